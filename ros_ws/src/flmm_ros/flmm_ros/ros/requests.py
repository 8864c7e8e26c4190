"""Instruction requests and the busy policy that decides what happens to one arriving while busy (no rclpy).

Subscription / action callbacks `submit` requests; one worker thread `take`s them one at a time and calls
`finish` when done. Every request ends in exactly one outcome: the worker's result, or a refusal
returned by `submit` / `close` that the caller must answer ('busy', 'preempted', 'shutdown').
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flmm_ros.grounding.types import GroundingCancelled

BUSY = 'busy'
PREEMPTED = 'preempted'
CANCELLED = 'cancelled'
SHUTDOWN = 'shutdown'
INACTIVE = 'inactive'


class Request:
    """One instruction to ground. `image` is an explicit image (action goal) or None for the latest frame.
    `on_stage(stage)` is told each stage as it starts (action feedback); `complete(result)` delivers the
    one result, wakes `wait` and calls `on_done(result)` (e.g. to resume an action goal's coroutine).
    Thread-safe: callbacks, the worker and shutdown may complete or stop it concurrently."""

    def __init__(self, instruction: str, image: Any = None, source: str = 'topic',
                 on_stage: Callable[[str], None] | None = None, on_done: Callable[[Any], None] | None = None,
                 track: bool = False, point: tuple[float, float] | None = None,
                 box: tuple[int, int, int, int] | None = None):
        self.instruction = instruction
        self.image = image
        self.source = source
        self.track = track          # keep following the grounded objects afterwards
        self.point = point          # region input: a pixel (x, y) and/or a box (x0, y0, x1, y1) to ask about
        self.box = box
        self.on_stage = on_stage
        self.on_done = on_done
        self.received = time.monotonic()
        self.result: Any = None
        self._done = threading.Event()
        self._stop_reason: str | None = None
        self._lock = threading.Lock()

    @property
    def is_region(self) -> bool:
        return self.point is not None or self.box is not None

    def complete(self, result: Any) -> bool:
        """Deliver the result; only the first call counts (exactly one result per request): True if it did."""
        with self._lock:
            if self._done.is_set():
                return False
            self.result = result
            self._done.set()
        if self.on_done is not None:
            self.on_done(result)
        return True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def stop(self, reason: str) -> None:
        """Ask the request to stop at its next stage ('cancelled' or 'preempted'); the first reason wins."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason

    @property
    def stop_reason(self) -> str | None:
        with self._lock:
            return self._stop_reason

    def check(self) -> None:
        """Raise GroundingCancelled when a stop was asked for (called between pipeline stages)."""
        reason = self.stop_reason
        if reason is not None:
            raise GroundingCancelled(reason)

    def age(self) -> float:
        return time.monotonic() - self.received


class RequestQueue:
    """The busy policy between callbacks that submit requests and the one worker that takes them.

    Thread-safe. `policy` and `max_queued` may be changed at run time (they apply to the next submit)."""
    POLICIES = ('queue', 'preempt', 'reject')

    def __init__(self, policy: str, max_queued: int = 1):
        if policy not in self.POLICIES:
            raise ValueError(f"busy policy {policy!r} is not one of {list(self.POLICIES)}")
        if max_queued < 1:
            raise ValueError(f"max_queued must be at least 1, got {max_queued}")
        self.policy = policy
        self.max_queued = max_queued
        self._waiting: deque[Request] = deque()
        self._running: Request | None = None
        self._closed = False
        self._condition = threading.Condition()

    def submit(self, request: Request) -> list[tuple[Request, str]]:
        """Add a request; returns the requests refused or dropped by this call, each with its error code."""
        with self._condition:
            if self._closed:
                return [(request, SHUTDOWN)]
            busy = self._running is not None or bool(self._waiting)
            refused: list[tuple[Request, str]] = []
            if busy and self.policy == 'reject':
                return [(request, BUSY)]
            if self.policy == 'queue' and len(self._waiting) >= self.max_queued:
                return [(request, BUSY)]
            if self.policy == 'preempt':
                refused = [(waiting, PREEMPTED) for waiting in self._waiting]
                self._waiting.clear()
                if self._running is not None:
                    self._running.stop(PREEMPTED)  # the worker answers it at its next stage
            self._waiting.append(request)
            self._condition.notify_all()
            return refused

    def take(self, timeout: float | None = None) -> Request | None:
        """The next request (now running), or None on timeout / after close."""
        with self._condition:
            if not self._condition.wait_for(lambda: self._waiting or self._closed, timeout) or self._closed:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def finish(self, request: Request) -> None:
        with self._condition:
            if self._running is request:
                self._running = None
            self._condition.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request runs or waits (True), or `timeout` s pass (False); closed counts as idle."""
        with self._condition:
            return self._condition.wait_for(lambda: self._closed or (self._running is None and not self._waiting),
                                            timeout)

    def remove(self, request: Request) -> bool:
        """Drop a waiting request (e.g. cancelled before it ran); False if it is not waiting."""
        with self._condition:
            try:
                self._waiting.remove(request)
            except ValueError:
                return False
            return True

    @property
    def running(self) -> Request | None:
        with self._condition:
            return self._running

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    @property
    def busy(self) -> bool:
        with self._condition:
            return self._running is not None or bool(self._waiting)

    def drain(self, reason: str) -> list[Request]:
        """Empty the queue and ask the running request to stop with `reason`; returns the waiting ones (to be
        answered with `reason`). The queue stays open (e.g. a lifecycle deactivation)."""
        with self._condition:
            left = list(self._waiting)
            self._waiting.clear()
            if self._running is not None:
                self._running.stop(reason)
            self._condition.notify_all()
            return left

    def close(self) -> list[Request]:
        """Stop taking requests for good; returns those still waiting (to be answered 'shutdown')."""
        with self._condition:
            self._closed = True
        return self.drain(SHUTDOWN)
