"""grounding.launch.py under the real `ros2 launch` (a ROS 2 install: launch, launch_ros and ros2cli are
not on PyPI, so these tests skip on the PyPI-wheel setup). Each one reproduces a defect of issue #19:
arguments that used to start a node that was then orphaned or misconfigured, debug logging buried in
rcl timer noise, and a launch that kept running without its node."""
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / 'ros_ws' / 'src' / 'flmm_ros' / 'launch' / 'grounding.launch.py'


def have_ros2_launch() -> bool:
    if shutil.which('ros2') is None:
        return False
    probe = subprocess.run(['python3', '-c', 'import launch_ros, ros2launch'], capture_output=True, check=False)
    return probe.returncode == 0


pytestmark = [pytest.mark.ros, pytest.mark.slow,
              pytest.mark.skipif(not have_ros2_launch(),
                                 reason='`ros2 launch` is not installed (launch, launch_ros and ros2cli are not '
                                        'on PyPI; tests/test_launch_static.py and test_launch_args.py cover '
                                        'the file here)')]


@pytest.fixture
def ros_env():
    env = {**os.environ, 'ROS_DOMAIN_ID': str(random.Random(os.getpid() + time.time_ns()).randint(100, 200)),
           'ROS_AUTOMATIC_DISCOVERY_RANGE': 'LOCALHOST', 'RCUTILS_COLORIZED_OUTPUT': '0'}
    yield env
    for pid in own_nodes(env):  # what a failing launch left behind (the orphan defect)
        os.kill(pid, signal.SIGKILL)


def own_nodes(env) -> list[int]:
    """PIDs of flmm_grounding processes started in this test's ROS domain (never anyone else's)."""
    pids = []
    for proc in Path('/proc').iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / 'cmdline').read_bytes()
            environ = (proc / 'environ').read_bytes().split(b'\0')
        except OSError:
            continue
        if b'flmm_grounding' in cmdline and f"ROS_DOMAIN_ID={env['ROS_DOMAIN_ID']}".encode() in environ:
            pids.append(int(proc.name))
    return pids


@pytest.mark.parametrize('argument, message', [
    ('use_rviz:=true', 'rviz2 is not installed'),
    ('use_3d:=maybe', "use_3d:='maybe' is not a boolean"),
    ('input_qos:=fast', 'Valid options are'),
])
def test_bad_arguments_start_nothing(ros_env, argument, message):
    if argument == 'use_rviz:=true' and shutil.which('rviz2') is not None:
        pytest.skip('rviz2 is installed here')
    result = subprocess.run(['ros2', 'launch', str(LAUNCH), argument], capture_output=True, text=True,
                            env=ros_env, timeout=60, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and message in output, output
    assert 'process started' not in output
    assert own_nodes(ros_env) == []


def test_debug_level_shows_the_node_and_node_exit_ends_the_launch(ros_env, tmp_path):
    log = tmp_path / 'launch.log'
    with open(log, 'w') as out:
        launch = subprocess.Popen(['ros2', 'launch', str(LAUNCH), 'namespace:=launch_test', 'log_level:=debug'],
                                  stdout=out, stderr=subprocess.STDOUT, env=ros_env)
    try:
        deadline = time.monotonic() + 120
        while 'model loaded' not in log.read_text():
            assert launch.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        nodes = own_nodes(ros_env)
        assert len(nodes) == 1
        os.kill(nodes[0], signal.SIGKILL)  # the node dies: the launch must not stay up without it
        assert launch.wait(timeout=30) is not None
    finally:
        if launch.poll() is None:
            launch.send_signal(signal.SIGINT)
            launch.wait(timeout=30)
    output = log.read_text()
    assert '[DEBUG]' in output and '[launch_test.flmm_grounding]' in output
    assert '[rcl]' not in output and '[rmw_fastrtps_cpp]' not in output  # no timer / discovery noise
    assert 'shutting down launched system' in output
