"""The node's executor (ros/executor.py) hands each task to its thread pool at most once at a time."""
from __future__ import annotations

import threading
from collections import Counter

import pytest
import rclpy
from rclpy.context import Context
from std_msgs.msg import String

from flmm_ros.ros.executor import SteadyExecutor
from flmm_ros.ros.testing import _free_domain_id

pytestmark = pytest.mark.ros


@pytest.mark.filterwarnings("ignore:MultiThreadedExecutor is used with a single thread")
def test_a_callback_waiting_in_the_pool_is_not_submitted_again():
    """One pool thread, held by a blocking callback while more messages and timer ticks become ready: every
    task must be in the pool at most once (rclpy 9's MultiThreadedExecutor queues copy after copy here)."""
    context = Context()
    rclpy.init(context=context, domain_id=_free_domain_id())
    node = rclpy.create_node('steady_executor_test', context=context,
                             enable_rosout=False, start_parameter_services=False)
    executor = SteadyExecutor(num_threads=1, context=context)
    in_pool, most, lock = Counter(), Counter(), threading.Lock()
    submit = executor._executor.submit

    def counting_submit(task):
        with lock:
            in_pool[task] += 1
            most[task] = max(most[task], in_pool[task])

        def ran(_):
            with lock:
                in_pool[task] -= 1
        future = submit(task)
        future.add_done_callback(ran)
        return future
    executor._executor.submit = counting_submit

    release, blocking, received, ticks = threading.Event(), threading.Event(), [], []

    def on_message(msg):
        if msg.data == 'block':
            blocking.set()
            release.wait(10)
        received.append(msg.data)
    node.create_subscription(String, 'steady_executor_topic', on_message, 100)
    node.create_timer(0.01, lambda: ticks.append(1))
    publisher = node.create_publisher(String, 'steady_executor_topic', 100)
    executor.add_node(node)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        publisher.publish(String(data='block'))
        assert blocking.wait(30), 'the blocking callback never ran'
        for i in range(20):
            publisher.publish(String(data=str(i)))
        threading.Event().wait(0.3)      # let ready work pile up behind the blocked pool thread
        release.set()
        deadline = threading.Event()
        for _ in range(300):
            if len(received) == 21:
                break
            deadline.wait(0.1)
        assert received == ['block'] + [str(i) for i in range(20)]
        assert ticks, 'the timer never ran'
        assert max(most.values()) == 1, f"a task was queued {max(most.values())} times at once"
    finally:
        release.set()
        executor.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=context)
        spinner.join(10)
