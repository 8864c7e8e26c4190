"""The QoS presets named by input_qos / output_qos, and the fixed profiles of the node's own topics."""
import pytest
from rclpy.qos import DurabilityPolicy, HistoryPolicy, ReliabilityPolicy

from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros import parameters
from flmm_ros.ros.qos import ACTION_SERVICE_QOS, INSTRUCTION_DEPTH, INSTRUCTION_QOS, qos_profile


@pytest.mark.parametrize('preset, reliability', [
    ('SENSOR_DATA', ReliabilityPolicy.BEST_EFFORT), ('BEST_EFFORT', ReliabilityPolicy.BEST_EFFORT),
    ('DEFAULT', ReliabilityPolicy.RELIABLE), ('RELIABLE', ReliabilityPolicy.RELIABLE),
    ('SYSTEM_DEFAULT', ReliabilityPolicy.SYSTEM_DEFAULT)])
def test_qos_presets(preset, reliability):
    profile = qos_profile(preset, 3)
    assert profile.reliability == reliability and profile.depth == 3
    assert preset in parameters.QOS_PRESETS
    if preset != 'SYSTEM_DEFAULT':
        assert profile.durability == DurabilityPolicy.VOLATILE


def test_qos_presets_match_parameter_choices():
    for preset in parameters.QOS_PRESETS:
        qos_profile(preset, 1)
    with pytest.raises(GroundingError, match='unknown QoS preset'):
        qos_profile('FAST', 1)


def test_instructions_and_action_requests_are_reliable_and_deep():
    for profile in (INSTRUCTION_QOS, ACTION_SERVICE_QOS):
        assert profile.reliability == ReliabilityPolicy.RELIABLE and profile.history == HistoryPolicy.KEEP_LAST
        assert profile.depth == INSTRUCTION_DEPTH >= 300
