"""F-LMM's SAM prompt decoder replayed from CUDA graphs (the 'torch' backend on a GPU).

The decoder is small and bound by kernel launches: about a hundred kernels of microseconds each. Its shapes are
static except the number of phrase tokens T, so one graph is captured per T on first use (PyTorch's recipe:
warm-up on a side stream, then `torch.cuda.graph`) and replayed afterwards: the inputs are copied into the
graph's static tensors, one launch replays every kernel, and the outputs are cloned out. Graphs read the
parameters in place, so they see weights loaded later; they are used only without gradients (training runs
the decoder eagerly). If a capture fails (an operation that cannot be captured), the decoder runs eagerly from
then on and a warning says why: the graphs are an optimisation, never a requirement.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch
from torch import nn

MAX_GRAPHS = 32          # distinct phrase-token counts kept; beyond that the decoder runs eagerly
WARMUP_RUNS = 2

log = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


class GraphedDecoder:
    """Calls `decoder(*inputs)` through one CUDA graph per input-shape signature (in practice: per T).
    Thread-safe (a lock around the static tensors). `replays` and `captured` count what happened."""

    def __init__(self, decoder: nn.Module, device: torch.device):
        self.decoder = decoder
        self.device = device
        self.graphs: dict[tuple, _Graph] = {}
        self.disabled_reason: str | None = None
        self.replays = 0
        self._lock = threading.Lock()

    @property
    def captured(self) -> int:
        return len(self.graphs)

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.disabled_reason is not None or torch.is_grad_enabled():
            return self.decoder(*inputs)
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        with self._lock:
            entry = self.graphs.get(key)
            if entry is None:
                if len(self.graphs) >= MAX_GRAPHS:
                    return self.decoder(*inputs)
                entry = self._capture(inputs)
                if entry is None:
                    return self.decoder(*inputs)
                self.graphs[key] = entry
            for static, value in zip(entry.inputs, inputs):
                static.copy_(value, non_blocking=True)
            entry.graph.replay()
            self.replays += 1
            return tuple(out.clone() for out in entry.outputs)

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> _Graph | None:
        static = tuple(t.detach().clone() for t in inputs)
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        try:
            stream.wait_stream(current)
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(WARMUP_RUNS):       # lazy initialisation (cuBLAS handles, workspaces) off the graph
                    self.decoder(*static)
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                outputs = self.decoder(*static)
        except RuntimeError as e:                  # e.g. an operation not permitted while capturing
            self.disabled_reason = f"{type(e).__name__}: {e}"
            log.warning("SAM decoder runs without CUDA graphs: capture failed (%s)", self.disabled_reason)
            torch.cuda.synchronize(self.device)
            return None
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return _Graph(graph, static, tuple(outputs))
