"""The latest camera frame and what is known about the stream (no rclpy here).

Only the newest frame is kept (no backlog). Counters say how many frames arrived, how many the transport
reported lost, and when the last one came, so that a refusal can say what is actually known.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Frame:
    """One image to ground in: `seq` identifies it (for the per-frame encoding cache), `received` is the
    time.monotonic() of its arrival, `from_camera` is False for an image sent with an action goal."""
    seq: int
    image: Any
    received: float
    from_camera: bool = True


class FrameStore:
    """The newest camera frame plus stream counters. Thread-safe: subscription callbacks add, the worker reads."""

    def __init__(self):
        self._lock = threading.Condition()
        self._latest: Frame | None = None
        self._seq = 0
        self.received = 0
        self.lost = 0

    def add(self, image: Any, from_camera: bool = True) -> Frame:
        """Store a camera frame (it becomes the latest) or wrap a goal's own image (it does not)."""
        with self._lock:
            self._seq += 1
            frame = Frame(self._seq, image, time.monotonic(), from_camera)
            if from_camera:
                self._latest = frame
                self.received += 1
                self._lock.notify_all()
            return frame

    def wait_newer(self, seq: int, timeout: float) -> Frame | None:
        """The latest camera frame once it is newer than `seq` (None after `timeout` s without one). Frames that
        came in between are skipped: whoever waits always gets the newest one."""
        with self._lock:
            self._lock.wait_for(lambda: self._latest is not None and self._latest.seq > seq, timeout)
            latest = self._latest
        return latest if latest is not None and latest.seq > seq else None

    def note_lost(self, count: int) -> None:
        """The transport reported `count` more samples lost (a DDS 'message lost' event)."""
        with self._lock:
            self.lost += max(int(count), 0)

    @property
    def latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    def describe(self, now: float | None = None) -> str:
        """What is known about the stream, for error messages: counts, the last arrival, losses."""
        now = time.monotonic() if now is None else now
        with self._lock:
            received, lost, latest = self.received, self.lost, self._latest
        parts = [f"{received} frame{'s' if received != 1 else ''} received"]
        if latest is not None:
            parts.append(f"the last {now - latest.received:.1f} s ago")
        if lost:
            parts.append(f"{lost} lost in transport (a best-effort camera and a slow or lossy link drop frames; "
                         "see the README's QoS notes)")
        return ", ".join(parts)
