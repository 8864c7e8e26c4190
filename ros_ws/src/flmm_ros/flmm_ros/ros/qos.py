"""QoS presets named by the input_qos / output_qos parameters (Isaac ROS's names)."""
from __future__ import annotations

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

try:
    from rclpy.event_handler import SubscriptionEventCallbacks
except ImportError:   # Humble
    from rclpy.qos_event import SubscriptionEventCallbacks

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


# The instruction topic: nothing may be lost. Reliable, and deep enough that a burst of INSTRUCTION_DEPTH
# instructions waits in the reader until the (cheap) callback takes each one; every one then gets its result.
INSTRUCTION_DEPTH = 1000
INSTRUCTION_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=INSTRUCTION_DEPTH,
                             reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# The action's goal / cancel / result services: rclpy's default (keep last 10) drops requests of a burst of
# goals before they are taken, and those goals are never answered.
ACTION_SERVICE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=INSTRUCTION_DEPTH,
                                reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
# ~/result and ~/answer keep this many samples for retransmission to a slow reader during a burst.
RESULT_DEPTH = 100
DIAGNOSTICS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.VOLATILE)
# ~/status: late joiners (a client starting after the node) still see the current state.
STATUS_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)


def reaches_anyone(publisher) -> bool:
    """Whether a message published now would reach anyone: someone subscribes, or the topic keeps it for later
    subscribers (not volatile). The viewers' images are drawn only then: nobody would see them otherwise."""
    return publisher.get_subscription_count() > 0 or publisher.qos_profile.durability != DurabilityPolicy.VOLATILE


def lost_message_callbacks(on_lost) -> SubscriptionEventCallbacks:
    """Event callbacks that report samples the middleware lost (e.g. incomplete best-effort images)."""
    return SubscriptionEventCallbacks(message_lost=lambda status: on_lost(status.total_count_change))
