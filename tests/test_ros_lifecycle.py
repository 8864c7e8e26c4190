"""Lifecycle transitions, run-time parameters and start-up errors of the node, over real DDS (issue #19).

The transitions and `ros2 param set` are driven through the same services the ROS 2 CLI calls
(`<node>/change_state`, `<node>/get_state`, `<node>/set_parameters`).
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from action_msgs.msg import GoalStatus
from flmm_msgs.msg import GroundingResult
from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rcl_interfaces.srv import GetParameters, SetParameters
from rclpy.parameter import Parameter, parameter_value_to_python
from std_msgs.msg import String

from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.ros.image_conversions import rgb_to_image
from flmm_ros.ros.testing import (ANSWER_TIMEOUT, GroundingProcess, scene, send_goal, stamped, wait_future,
                                  wait_result)

pytestmark = pytest.mark.ros

E = GroundingResult
MANY_PHRASES = 'take ' + ' and '.join(['the red ball', 'the blue bowl', 'the green mug', 'the white box'] * 12)
BIG = (960, 1280)   # with MANY_PHRASES: seconds of work, long enough to act while it runs


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    return write_random_bundle(tmp_path_factory.mktemp('bundle'))


class Services:
    """Clients of the node's lifecycle and parameter services (what `ros2 lifecycle` / `ros2 param` call)."""

    def __init__(self, probe):
        node = '/flmm_grounding'
        self.change = probe.create_client(ChangeState, f'{node}/change_state')
        self.get = probe.create_client(GetState, f'{node}/get_state')
        self.set_params = probe.create_client(SetParameters, f'{node}/set_parameters')
        self.get_params = probe.create_client(GetParameters, f'{node}/get_parameters')
        for client in (self.change, self.get, self.set_params, self.get_params):
            assert client.wait_for_service(timeout_sec=60), client.srv_name

    def transition(self, transition_id: int) -> bool:
        request = ChangeState.Request(transition=Transition(id=transition_id))
        return wait_future(self.change.call_async(request), 120, 'a lifecycle transition').success

    def state(self) -> int:
        return wait_future(self.get.call_async(GetState.Request()), 30, 'the lifecycle state').current_state.id

    def set(self, name: str, value):
        request = SetParameters.Request(parameters=[Parameter(name, value=value).to_parameter_msg()])
        return wait_future(self.set_params.call_async(request), 30, 'set_parameters').results[0]

    def value(self, name: str):
        response = wait_future(self.get_params.call_async(GetParameters.Request(names=[name])), 30, 'get')
        return parameter_value_to_python(response.values[0])


def fresh_frame(probe, sec: int):
    probe.wait_frame(probe.publish_frame(scene(sec % 50), sec))


def test_lifecycle_transitions_gate_serving_and_free_the_model(tmp_path, bundle):
    node = GroundingProcess(tmp_path, bundle, {'autostart': False, 'diagnostics_period': 0.1, 'max_frame_age': 0.0,
                                               'input_qos': 'RELIABLE'})
    try:
        probe = node.probe
        probe.wait_for(lambda: any(s.data == 'unconfigured' for s in probe.outputs['status']), 120, 'unconfigured')
        services = Services(probe)
        assert services.state() == State.PRIMARY_STATE_UNCONFIGURED
        assert services.transition(Transition.TRANSITION_CONFIGURE)
        assert services.state() == State.PRIMARY_STATE_INACTIVE
        node.wait_ready_io()
        fresh_frame(probe, 1)
        inactive = probe.ask('pick the red mug while inactive')
        assert inactive.error_code == E.ERROR_INACTIVE and 'activate' in inactive.error

        assert services.transition(Transition.TRANSITION_ACTIVATE)
        assert probe.ask('pick the red mug while active').success

        stages: list[str] = []   # deactivate while one runs and one waits: both get 'inactive'
        running = send_goal(probe, MANY_PHRASES, stamped(rgb_to_image(scene(3, *BIG)), 3), stages)
        probe.wait_for(lambda: 'encode' in stages, ANSWER_TIMEOUT, 'the long goal to start')
        probe.instruction_pub.publish(String(data='pick the waiting mug'))
        probe.wait_diagnostic('queue_waiting', lambda v: v == '1', 'one waiting instruction')
        assert services.transition(Transition.TRANSITION_DEACTIVATE)
        status, result = wait_result(running)
        assert status == GoalStatus.STATUS_ABORTED and result.error_code == E.ERROR_INACTIVE
        probe.wait_for(lambda: probe.results_for('pick the waiting mug'), 30, 'the waiting instruction')
        assert probe.results_for('pick the waiting mug')[0].error_code == E.ERROR_INACTIVE

        assert services.transition(Transition.TRANSITION_CLEANUP)
        assert services.state() == State.PRIMARY_STATE_UNCONFIGURED
        probe.wait_for(lambda: probe.count_publishers('/flmm_grounding/result') == 0, 30, '~/result to go away')

        assert services.transition(Transition.TRANSITION_CONFIGURE)
        assert services.transition(Transition.TRANSITION_ACTIVATE)
        node.wait_ready_io()
        fresh_frame(probe, 4)
        assert probe.ask('pick the red mug after a cleanup').success
        assert node.alive()
    finally:
        node.close()


def test_runtime_parameters_are_validated_and_apply_to_the_next_instruction(tmp_path, bundle):
    # max_frame_age written as an integer in the YAML: accepted as 3.0 (it used to stop the node).
    node = GroundingProcess(tmp_path, bundle, {'diagnostics_period': 0.1, 'max_frame_age': 3, 'input_qos': 'RELIABLE'})
    try:
        node.wait_ready()
        probe = node.probe
        services = Services(probe)
        assert services.value('max_frame_age') in (3, 3.0)

        assert services.set('max_frame_age', 30).successful          # an int where a double is declared
        assert services.set('mask_threshold', 0.9).successful
        refused = services.set('busy_policy', 'sometimes')
        assert not refused.successful and "busy_policy='sometimes' is not one of" in refused.reason
        wrong_type = services.set('max_queued', 'two')
        assert not wrong_type.successful and 'must be an integer' in wrong_type.reason
        bad_range = services.set('mask_threshold', 1.5)
        assert not bad_range.successful and 'mask_threshold' in bad_range.reason
        read_only = services.set('model', '/somewhere/else')
        assert not read_only.successful and 'read-only' in read_only.reason.lower()
        assert services.value('busy_policy') == 'queue'               # a refused set changes nothing
        assert services.set('tracker.min_confidence', 0.5).successful  # the tracker's lost rule, at run time
        bad_tracker = services.set('tracker.memory', 1.0)
        assert not bad_tracker.successful and 'memory' in bad_tracker.reason
        assert 'read-only' in services.set('tracker.threads', 2).reason.lower()
        assert 'read-only' in services.set('tracker.int8_encoder', False).reason.lower()

        assert services.set('busy_policy', 'reject').successful       # takes effect at the next instruction
        fresh_frame(probe, 10)
        stages: list[str] = []
        running = send_goal(probe, MANY_PHRASES, stamped(rgb_to_image(scene(11, *BIG)), 11), stages)
        probe.wait_for(lambda: 'encode' in stages, ANSWER_TIMEOUT, 'the long goal to start')
        refused_now = probe.ask('pick the red mug while busy')
        assert refused_now.error_code == E.ERROR_BUSY and 'busy_policy reject' in refused_now.error
        assert wait_result(running)[1].success
    finally:
        node.close()


def test_a_malformed_params_file_is_one_line_without_traceback(tmp_path, bundle):
    broken = tmp_path / 'broken.yaml'
    broken.write_text('/**/flmm_grounding:\n  ros__parameters:\n    busy_policy: [queue\n')
    env = dict(os.environ, ROS_DOMAIN_ID='99', ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    done = subprocess.run([sys.executable, '-m', 'flmm_ros.ros.node', '--ros-args', '--params-file', str(broken)],
                          env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert 'Traceback' not in output and 'cannot start' in output


@pytest.mark.parametrize('value, message', [("'sometimes'", "busy_policy='sometimes' is not one of"),
                                            ('[1, 2]', 'must be a string')])
def test_bad_values_in_the_params_file_stop_with_one_line(tmp_path, bundle, value, message):
    params = tmp_path / 'params.yaml'
    params.write_text(f'/**/flmm_grounding:\n  ros__parameters:\n    model: "{bundle}"\n    busy_policy: {value}\n')
    env = dict(os.environ, ROS_DOMAIN_ID='98', ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    done = subprocess.run([sys.executable, '-m', 'flmm_ros.ros.node', '--ros-args', '--params-file', str(params)],
                          env=env, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert message in output and 'Traceback' not in output
