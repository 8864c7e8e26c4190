"""QoS presets named by the input_qos / output_qos parameters (Isaac ROS's names)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from flmm_ros.grounding.types import GroundingError

_RELIABILITY = {
    'SENSOR_DATA': ReliabilityPolicy.BEST_EFFORT,
    'BEST_EFFORT': ReliabilityPolicy.BEST_EFFORT,
    'DEFAULT': ReliabilityPolicy.RELIABLE,
    'RELIABLE': ReliabilityPolicy.RELIABLE,
    'SYSTEM_DEFAULT': ReliabilityPolicy.SYSTEM_DEFAULT,
}


def qos_profile(preset: str, depth: int) -> QoSProfile:
    """Keep-last `depth`, volatile, with the preset's reliability (SENSOR_DATA = best effort)."""
    if preset not in _RELIABILITY:
        raise GroundingError(f"unknown QoS preset {preset!r}; use one of {list(_RELIABILITY)}")
    durability = DurabilityPolicy.SYSTEM_DEFAULT if preset == 'SYSTEM_DEFAULT' else DurabilityPolicy.VOLATILE
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth, reliability=_RELIABILITY[preset],
                      durability=durability)


# The instruction topic: nothing may be lost, a short burst may wait (SPEC: reliable, depth 10).
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
# ~/status: late joiners (a client starting after the node) still see the current state.
STATUS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
