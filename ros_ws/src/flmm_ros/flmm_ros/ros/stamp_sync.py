"""Match messages to an image by header stamp within a slop (message_filters is not on PyPI; no rclpy here)."""
from __future__ import annotations

import threading
from collections import deque
from typing import Any


def stamp_ns(stamp) -> int:
    """builtin_interfaces/Time (anything with sec and nanosec) -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


class StampMatcher:
    """Keeps the last `capacity` messages of one stream; `match(t)` gives the one whose stamp is closest
    to t, if it lies within `slop_s`. Thread-safe: subscriptions add while the worker matches."""

    def __init__(self, slop_s: float, capacity: int = 10):
        if slop_s < 0 or capacity < 1:
            raise ValueError(f"need slop_s >= 0 and capacity >= 1, got {slop_s}, {capacity}")
        self.slop_ns = int(round(slop_s * 1e9))
        self._items: deque[tuple[int, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, t_ns: int, item: Any) -> None:
        with self._lock:
            self._items.append((t_ns, item))

    def match(self, t_ns: int) -> Any | None:
        with self._lock:
            best = min(self._items, key=lambda entry: abs(entry[0] - t_ns), default=None)
        if best is None or abs(best[0] - t_ns) > self.slop_ns:
            return None
        return best[1]

    def latest(self) -> Any | None:
        """The newest message kept, whatever its stamp (e.g. camera_info, which rarely changes)."""
        with self._lock:
            return self._items[-1][1] if self._items else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
