"""The node's executor: rclpy's MultiThreadedExecutor without the re-submission spin of rclpy 9 (Kilted).

Why: rclpy 9's wait loop yields every unfinished task again on each pass, and MultiThreadedExecutor hands
each yield to its thread pool. A callback that is queued in the pool but not started yet is therefore handed
over again and again; under CPU load the pool's queue fills with no-op copies, the executor thread keeps the
GIL, and real callbacks wait. Measured on the 2-core CI machine: after an instruction that kept the CPU busy
for a second or two, a 30 Hz best-effort camera was counted at 2-5 frames in 2 s, for several seconds, with
the executor thread at 100 % CPU, and instructions that take 0.1 s took 0.7-6 s. With this executor, the
same run (bench-like script, 5 x 3 instructions on a streaming camera): 58-59 of 59 frames counted in every
2 s window, instructions 0.04-0.15 s, the idle node at 0.055 of a core instead of 0.09. rclpy fixed this
upstream after Kilted (ros2/rclpy commit 9695271e, a ready-task queue); the Kilted wheels do not have it.

Here a task goes to the pool again only once its previous run has ended: a coroutine that is suspended (an
action goal awaiting its result) is resumed on the executor's next wake-up, as before; a queued copy is never
added twice.
"""
from __future__ import annotations

from concurrent.futures import Future as PoolFuture
from concurrent.futures import wait

from rclpy.executors import (ConditionReachedException, ExternalShutdownException, MultiThreadedExecutor,
                             ShutdownException, TimeoutException)
from rclpy.task import Task

REYIELD_WAIT_S = 0.01   # how long a re-yield of a task still in the pool waits for it (GIL released)


class SteadyExecutor(MultiThreadedExecutor):
    """A MultiThreadedExecutor that submits each task to its pool at most once at a time (see the module)."""

    def __init__(self, num_threads: int, *, context=None):
        super().__init__(num_threads=num_threads, context=context)
        self._runs: dict[Task, PoolFuture] = {}   # task -> the pool's future of its latest run

    def _spin_once_impl(self, timeout_sec=None, wait_condition=lambda: False) -> None:
        try:
            task, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        previous = self._runs.get(task)
        if previous is not None and not previous.done():
            # Still queued or running: one copy in the pool is enough. Wait for it a moment with the GIL
            # released, so the pool thread can start it instead of this thread looping over it.
            wait([previous], timeout=REYIELD_WAIT_S)
            return
        self._runs[task] = self._executor.submit(task)
        for finished in [t for t, run in self._runs.items() if t.done() and run.done()]:
            del self._runs[finished]
            finished.result()                        # a callback's exception surfaces here, as in rclpy
