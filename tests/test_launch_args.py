"""The launch arguments' checks (flmm_ros.launch_args, shared by grounding.launch.py and the images'
entrypoint) and the fallback that starts the node from the same arguments where `ros2 launch` is missing."""
import os
import random
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from flmm_ros import launch_args as la

ROOT = Path(__file__).resolve().parents[1]
RVIZ = ROOT / 'ros_ws' / 'src' / 'flmm_ros' / 'rviz' / 'grounding.rviz'
DEFAULTS = {'params_file': 'grounding.yaml', 'log_level': 'info', 'use_rviz': 'false'}


def rviz_topics(text: str) -> dict[str, str]:
    displays = yaml.safe_load(text)['Visualization Manager']['Displays']
    return {d['Name']: d['Topic']['Value'] for d in displays if 'Topic' in d}


@pytest.mark.parametrize('text, value', [('true', True), ('True', True), ('1', True), (' false ', False),
                                         ('FALSE', False), ('0', False)])
def test_booleans_accept_launch_spellings(text, value):
    assert la.parse_bool('use_3d', text) is value


@pytest.mark.parametrize('text', ['maybe', 'yes', 'no', 'on', '2', 'ture'])
def test_non_boolean_text_is_an_error_not_false(text):
    # Defect: `use_3d:=maybe` used to turn 3D off silently.
    with pytest.raises(la.LaunchArgumentError, match=f"use_3d:='{text}' is not a boolean"):
        la.plan({**DEFAULTS, 'use_3d': text})


def test_every_bad_argument_is_reported_at_once():
    bad = {**DEFAULTS, 'use_3d': 'maybe', 'use_rviz': 'perhaps', 'log_level': 'loud', 'input_qos': 'fast',
           'namespace': '9lives', 'autostart': 'later'}
    with pytest.raises(la.LaunchArgumentError) as caught:
        la.plan(bad)
    message = str(caught.value)
    for fragment in ("use_3d:='maybe'", "use_rviz:='perhaps'", "autostart:='later'", "log_level:='loud' is not one of debug, info",
                     "input_qos:='fast' is not one of SENSOR_DATA", "namespace:='9lives'"):
        assert fragment in message


def test_plan_hands_over_parameters_remappings_and_levels():
    launch_plan = la.plan({**DEFAULTS, 'namespace': 'robot1/', 'use_3d': 'False', 'input_qos': 'RELIABLE',
                           'model': '/models/x', 'image_topic': '/cam/color', 'log_level': 'DEBUG', 'device': ''})
    assert launch_plan.namespace == '/robot1'
    assert launch_plan.overrides == {'use_3d': False, 'input_qos': 'RELIABLE', 'model': '/models/x'}
    assert launch_plan.remappings == [('image', '/cam/color')]
    assert launch_plan.log_level == 'debug' and launch_plan.use_rviz is False


def test_use_rviz_without_rviz2_is_refused_before_anything_starts():
    # Defect: the launch exited on the missing rviz2 while the node it had started ran on (an orphan).
    assert la.rviz2_installed() is False  # the PyPI ROS wheels have no rviz2
    with pytest.raises(la.LaunchArgumentError, match='rviz2 is not installed'):
        la.plan({**DEFAULTS, 'use_rviz': 'true'})
    assert la.plan({**DEFAULTS, 'use_rviz': 'true'}, rviz_available=lambda: True).use_rviz


def test_input_qos_choices_are_the_nodes_presets():
    from flmm_ros.ros import qos
    assert set(la.QOS_PRESETS) == set(qos._RELIABILITY)


def test_rviz_config_follows_the_namespace(tmp_path):
    # Defect: the shipped config named /flmm_grounding/... only, so a namespaced node showed empty displays.
    text = RVIZ.read_text()
    assert la.rviz_config_for_namespace(text, '') == text
    topics = rviz_topics(la.rviz_config_for_namespace(text, '/robot1'))
    assert topics == {'Grounding overlay': '/robot1/flmm_grounding/overlay',
                      'Label mask': '/robot1/flmm_grounding/mask',
                      'Grounded objects 3D': '/robot1/flmm_grounding/markers'}
    assert la.write_rviz_config(str(RVIZ), '') == str(RVIZ)
    written = Path(la.write_rviz_config(str(RVIZ), '/a/b'))
    try:
        assert set(rviz_topics(written.read_text()).values()) == {f'/a/b/flmm_grounding/{t}'
                                                                  for t in ('overlay', 'mask', 'markers')}
    finally:
        written.unlink()


def test_cli_words_are_name_value_pairs_of_known_arguments():
    assert la.parse_cli(['use_3d:=false'])['use_3d'] == 'false'
    with pytest.raises(la.LaunchArgumentError, match="'modle:=x': expected name:=value"):
        la.parse_cli(['modle:=x'])
    with pytest.raises(la.LaunchArgumentError, match='expected name:=value'):
        la.parse_cli(['--model', 'x'])


def test_fallback_command_matches_the_launch_file():
    launch_plan = la.plan({**DEFAULTS, 'namespace': 'r1', 'use_3d': 'true', 'depth_topic': '/cam/depth'})
    command = la.node_command(launch_plan, python='python3')
    assert command[:3] == ['python3', '-m', 'flmm_ros.ros.node']
    words = ' '.join(command)
    for fragment in ('--ros-args', '-r __ns:=/r1', '--params-file grounding.yaml', '-p use_3d:=true',
                     '-r depth:=/cam/depth', '--log-level r1.flmm_grounding:=info'):
        assert fragment in words


def entrypoint(*args, env=None, timeout=60):
    environment = {**os.environ, 'FLMM_ROOT': str(ROOT), **(env or {})}
    return subprocess.run([str(ROOT / 'docker' / 'entrypoint.sh'), *args], capture_output=True, text=True,
                          env=environment, timeout=timeout, check=False)


def test_entrypoint_rejects_bad_launch_arguments_without_starting_anything():
    result = entrypoint('use_3d:=maybe')  # ros2 launch where installed, else the node module fallback
    assert result.returncode != 0
    assert "use_3d:='maybe' is not a boolean" in result.stdout + result.stderr
    assert 'process started' not in result.stdout + result.stderr


def test_entrypoint_runs_other_commands_in_the_sourced_environment():
    result = entrypoint('python3', '-c', 'import rclpy, flmm_ros.launch_args; print("ok")')
    assert result.returncode == 0 and result.stdout.strip() == 'ok', result.stderr


@pytest.mark.ros
@pytest.mark.slow
def test_entrypoint_fallback_starts_a_healthy_namespaced_node():
    """The images' default command without `ros2 launch`: the node, found by the HEALTHCHECK command."""
    env = {**os.environ, 'FLMM_ROOT': str(ROOT), 'ROS_DOMAIN_ID': str(random.Random(os.getpid()).randint(100, 200)),
           'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST'}
    node = subprocess.Popen([str(ROOT / 'docker' / 'entrypoint.sh'), 'namespace:=hc_test', 'use_3d:=false'],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        healthy = subprocess.run([str(ROOT / 'docker' / 'entrypoint.sh'), 'healthcheck', '--namespace', 'hc_test',
                                  '--timeout', '90'], env=env, capture_output=True, text=True, timeout=120,
                                 check=False)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        other = subprocess.run([str(ROOT / 'docker' / 'entrypoint.sh'), 'healthcheck', '--namespace', 'elsewhere',
                                '--timeout', '1'], env=env, capture_output=True, text=True, timeout=60,
                               check=False)
        assert other.returncode == 1 and 'unhealthy: no node /elsewhere/flmm_grounding' in other.stdout
    finally:
        node.send_signal(signal.SIGINT)
        output = node.communicate(timeout=30)[0]
    assert node.returncode == 0, output
    assert '__ns:=/hc_test' in output or '[hc_test.flmm_grounding]' in output, output
