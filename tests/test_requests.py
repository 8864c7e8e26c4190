"""The busy policy (RequestQueue) and one request's single result (Request), without DDS."""
import threading

import pytest
from flmm_msgs.msg import GroundingResult

from flmm_ros.grounding.types import GroundingCancelled
from flmm_ros.ros.requests import BUSY, CANCELLED, INACTIVE, PREEMPTED, SHUTDOWN, Request, RequestQueue


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
    submitted = threading.Event()

    def submit():
        submitted.set()
        queue.submit(request)

    threading.Timer(0.05, submit).start()
    assert queue.take(timeout=60.0) is request
    assert submitted.is_set()   # take returned only after the other thread submitted


def test_drain_answers_waiting_and_stops_running_but_stays_open():
    queue = RequestQueue('queue', max_queued=2)
    running, waiting = Request('a'), Request('b')
    queue.submit(running)
    queue.take(timeout=0)
    queue.submit(waiting)
    assert queue.drain(INACTIVE) == [waiting] and running.stop_reason == INACTIVE
    assert queue.running is running and queue.waiting == 0
    later = Request('c')
    assert queue.submit(later) == [] and queue.waiting == 1   # still open


def test_on_done_is_called_once_with_the_result():
    seen = []
    request = Request('x', on_done=seen.append)
    assert request.complete('first') and not request.complete('second')
    assert seen == ['first']


def test_request_completes_once():
    request = Request('x')
    assert not request.done and not request.wait(timeout=0)
    assert request.complete('first') and not request.complete('second')
    assert request.result == 'first' and request.wait(timeout=0)


@pytest.mark.parametrize('policy, max_queued', [('later', 1), ('queue', 0)])
def test_queue_rejects_bad_settings(policy, max_queued):
    with pytest.raises(ValueError):
        RequestQueue(policy, max_queued)


def test_refusal_codes_are_the_message_error_codes():
    assert (BUSY, PREEMPTED, CANCELLED, SHUTDOWN, INACTIVE) == (
        GroundingResult.ERROR_BUSY, GroundingResult.ERROR_PREEMPTED, GroundingResult.ERROR_CANCELLED,
        GroundingResult.ERROR_SHUTDOWN, GroundingResult.ERROR_INACTIVE)


def test_wait_idle_returns_when_nothing_runs_or_waits():
    queue = RequestQueue('queue', max_queued=1)
    assert queue.wait_idle(timeout=0)
    running = Request('a')
    queue.submit(running)
    assert not queue.wait_idle(timeout=0)          # waiting counts as busy
    queue.take(timeout=0)
    assert not queue.wait_idle(timeout=0)          # running too
    threading.Timer(0.05, queue.finish, args=(running,)).start()
    assert queue.wait_idle(timeout=60)
