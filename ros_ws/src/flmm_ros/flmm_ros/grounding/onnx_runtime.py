"""ONNX Runtime sessions for the CPU engines (SAM encoder and decoder, the U-Net mask head), set up alike.

Threads: as many intra-op threads as torch uses (`torch.get_num_threads()`, i.e. OMP_NUM_THREADS or the
node's setting), one inter-op thread, and no spinning. ONNX Runtime's default is one spinning thread per
core: beside torch and ROS on a 2-core machine, threads that spin while waiting for work take the cores the
other stages need (the node sets OMP_WAIT_POLICY=PASSIVE for torch's OpenMP threads for the same reason).
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from .types import GroundingError

log = logging.getLogger(__name__)
THREADS_ENV = "FLMM_ROS_ORT_THREADS"   # overrides the thread count (e.g. 1 beside a busy torch process)


class OnnxRuntimeMissing(GroundingError):
    """onnxruntime is not installed; callers that can fall back to torch catch this."""


def intra_op_threads() -> int:
    """$FLMM_ROS_ORT_THREADS, else torch's thread count."""
    value = os.environ.get(THREADS_ENV, "")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise GroundingError(f"{THREADS_ENV}={value!r} must be a positive integer")
        return int(value)
    return max(1, torch.get_num_threads())


def session_options():
    """SessionOptions with the thread settings above and every graph optimisation."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise OnnxRuntimeMissing(f"onnxruntime is not installed ({e})") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def cpu_session(path: str | os.PathLike):
    """An InferenceSession of the graph at `path` on the CPU execution provider."""
    import onnxruntime as ort
    return ort.InferenceSession(str(path), sess_options=session_options(), providers=["CPUExecutionProvider"])


class SessionsByShape:
    """One CPU session per input shape, its graph exported (or found in the cache) and loaded on first use:
    `export(shape)` returns the graph's path. Thread-safe: ONNX Runtime sessions may run concurrently, making
    one is locked. Checks that onnxruntime is installed when made (OnnxRuntimeMissing), not at first use."""

    def __init__(self, what: str, export: Callable[[tuple[int, ...]], Path]):
        session_options()
        self.what = what
        self.export = export
        self._sessions: dict[tuple[int, ...], object] = {}
        self._lock = threading.Lock()

    def __call__(self, shape: tuple[int, ...]):
        with self._lock:
            if shape not in self._sessions:
                path = self.export(shape)
                self._sessions[shape] = cpu_session(path)
                log.info("%s on ONNX Runtime for %s inputs (%s)", self.what, "x".join(map(str, shape)), path)
            return self._sessions[shape]
