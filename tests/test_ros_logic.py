"""The node's DDS-free logic: busy policy (RequestQueue), stamp matching, parameter checks, QoS presets."""
import threading
import time
from types import SimpleNamespace

import pytest
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy

from flmm_ros.grounding.types import GroundingCancelled, GroundingError
from flmm_ros.ros import parameters
from flmm_ros.ros.qos import qos_profile
from flmm_ros.ros.requests import BUSY, CANCELLED, PREEMPTED, SHUTDOWN, Request, RequestQueue
from flmm_ros.ros.stamp_sync import StampMatcher, stamp_ns


# ---- busy policy ------------------------------------------------------------------------------
def test_queue_policy_serves_in_order_and_bounds_the_queue():
    queue = RequestQueue('queue', max_queued=2)
    first, second, third, fourth = (Request(f"r{i}") for i in range(4))
    assert queue.submit(first) == []
    assert queue.take(timeout=0) is first          # running
    assert queue.submit(second) == [] and queue.submit(third) == []
    assert queue.submit(fourth) == [(fourth, BUSY)]  # two already waiting
    assert first.stop_reason is None                 # queueing never disturbs the running one
    queue.finish(first)
    assert queue.take(timeout=0) is second
    queue.finish(second)
    assert queue.take(timeout=0) is third
    queue.finish(third)
    assert not queue.busy and queue.take(timeout=0) is None


def test_reject_policy_refuses_while_running_or_waiting():
    queue = RequestQueue('reject')
    first, second, third = Request('a'), Request('b'), Request('c')
    assert queue.submit(first) == []
    assert queue.submit(second) == [(second, BUSY)]  # first still waiting (e.g. model loading)
    assert queue.take(timeout=0) is first
    assert queue.submit(third) == [(third, BUSY)]
    queue.finish(first)
    assert queue.submit(third) == []


def test_preempt_policy_stops_running_and_drops_waiting():
    queue = RequestQueue('preempt')
    running, waiting, newest = Request('a'), Request('b'), Request('c')
    queue.submit(running)
    assert queue.take(timeout=0) is running
    assert queue.submit(waiting) == []
    assert running.stop_reason == PREEMPTED
    with pytest.raises(GroundingCancelled, match=PREEMPTED):
        running.check()
    assert queue.submit(newest) == [(waiting, PREEMPTED)]
    queue.finish(running)
    assert queue.take(timeout=0) is newest


def test_first_stop_reason_wins_and_remove_waiting():
    queue = RequestQueue('queue', max_queued=3)
    running, waiting = Request('a'), Request('b')
    queue.submit(running)
    queue.take(timeout=0)
    queue.submit(waiting)
    waiting.stop(CANCELLED)
    waiting.stop(PREEMPTED)
    assert waiting.stop_reason == CANCELLED
    assert queue.remove(waiting) and not queue.remove(waiting) and not queue.remove(running)


def test_close_returns_waiting_and_stops_running():
    queue = RequestQueue('queue', max_queued=2)
    running, waiting = Request('a'), Request('b')
    queue.submit(running)
    queue.take(timeout=0)
    queue.submit(waiting)
    assert queue.close() == [waiting]
    assert running.stop_reason == SHUTDOWN
    late = Request('c')
    assert queue.submit(late) == [(late, SHUTDOWN)]
    assert queue.take(timeout=1.0) is None


def test_take_blocks_until_submit_from_another_thread():
    queue = RequestQueue('queue')
    request = Request('x')
    timer = threading.Timer(0.05, queue.submit, args=(request,))
    timer.start()
    start = time.monotonic()
    assert queue.take(timeout=5.0) is request
    assert 0.03 < time.monotonic() - start < 4.0


def test_request_completes_once():
    request = Request('x')
    assert not request.done and not request.wait(timeout=0)
    assert request.complete('first') and not request.complete('second')
    assert request.result == 'first' and request.wait(timeout=0)


@pytest.mark.parametrize('policy, max_queued', [('later', 1), ('queue', 0)])
def test_queue_rejects_bad_settings(policy, max_queued):
    with pytest.raises(ValueError):
        RequestQueue(policy, max_queued)


# ---- stamp matching -----------------------------------------------------------------------------
def test_stamp_matcher_picks_closest_within_slop():
    matcher = StampMatcher(slop_s=0.01, capacity=3)
    assert matcher.match(0) is None
    for t_ms in (100, 133, 166):
        matcher.add(t_ms * 1_000_000, f"depth{t_ms}")
    assert matcher.match(131_000_000) == 'depth133'
    assert matcher.match(175_999_999) == 'depth166'   # 9.999999 ms away
    assert matcher.match(176_000_001) is None         # just outside the slop
    assert matcher.match(150_000_000) is None         # between two, 16-17 ms from each


def test_stamp_matcher_forgets_oldest_and_exact_slop_zero():
    matcher = StampMatcher(slop_s=0.0, capacity=2)
    for t in (1, 2, 3):
        matcher.add(t, t)
    assert len(matcher) == 2 and matcher.match(1) is None and matcher.match(3) == 3


def test_stamp_ns():
    assert stamp_ns(SimpleNamespace(sec=3, nanosec=25)) == 3_000_000_025


# ---- parameters and QoS -------------------------------------------------------------------------
def defaults():
    return {spec.name: spec.default for spec in parameters.all_parameters()}


@pytest.mark.parametrize('name, value, message', [
    ('busy_policy', 'drop', 'busy_policy'), ('backend', 'tflite', 'backend'), ('input_qos', 'FAST', 'input_qos'),
    ('max_frame_age', -1.0, 'max_frame_age'), ('max_queued', 0, 'max_queued'), ('sync_slop', -0.1, 'sync_slop'),
])
def test_parameter_validation(name, value, message):
    values = defaults()
    parameters.validate(values)
    values[name] = value
    with pytest.raises(GroundingError, match=message):
        parameters.validate(values)


def test_empty_model_means_embedded_model():
    config = parameters.pipeline_config(defaults())
    assert config.model.endswith('models/tabletop_tiny')
    values = defaults() | {'model': '/some/bundle', 'device': 'cpu'}
    assert parameters.pipeline_config(values).model == '/some/bundle'


def test_every_parameter_has_a_description():
    names = [spec.name for spec in parameters.all_parameters()]
    assert len(names) == len(set(names))
    assert all(len(spec.description) > 15 for spec in parameters.all_parameters())


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


def test_refusal_codes_are_the_message_error_codes():
    from flmm_msgs.msg import GroundingResult
    assert (BUSY, PREEMPTED, CANCELLED, SHUTDOWN) == (
        GroundingResult.ERROR_BUSY, GroundingResult.ERROR_PREEMPTED, GroundingResult.ERROR_CANCELLED,
        GroundingResult.ERROR_SHUTDOWN)
