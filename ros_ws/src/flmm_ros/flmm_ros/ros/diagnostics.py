"""The node's health on /diagnostics, in the shape diagnostic_updater publishes (one status per task).

`NodeStats` counts what happened (thread-safe, no ROS); `diagnostic_array` turns a snapshot into a
diagnostic_msgs/DiagnosticArray: level OK / WARN / ERROR, a one-line message, and key-value pairs that
`ros2 topic echo /diagnostics` or rqt_robot_monitor show.
"""
from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Mapping

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from std_msgs.msg import Header

LATENCY_WINDOW = 200   # the percentiles describe the last this many results


class NodeStats:
    """Counters of instructions and results for /diagnostics. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.instructions = 0
        self.results: Counter[str] = Counter()     # error code ('' = success) -> count
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def instruction_received(self) -> None:
        with self._lock:
            self.instructions += 1

    def result(self, error_code: str, seconds: float) -> None:
        with self._lock:
            self.results[error_code] += 1
            if not error_code:
                self._latencies.append(seconds)

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            latencies = np.asarray(self._latencies, dtype=float)
            errors = {code: n for code, n in sorted(self.results.items()) if code}
            snapshot = {
                'instructions_received': self.instructions,
                'results_succeeded': self.results.get('', 0),
                'results_failed': sum(errors.values()),
                'errors_by_code': ', '.join(f"{code}={n}" for code, n in errors.items()) or 'none',
            }
        for name, q in (('latency_p50_s', 50), ('latency_p95_s', 95)):
            snapshot[name] = f"{np.percentile(latencies, q):.3f}" if latencies.size else 'n/a'
        return snapshot


def diagnostic_array(header: Header, name: str, hardware_id: str, level: bytes, message: str,
                     values: Mapping[str, object]) -> DiagnosticArray:
    """One DiagnosticStatus named `name` (diagnostic_updater's "<node>: <task>") in a DiagnosticArray."""
    status = DiagnosticStatus(level=level, name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])
    return DiagnosticArray(header=header, status=[status])


OK, WARN, ERROR = DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR
