"""The LMM's linear layers on oneDNN with packed weights, for the long passes on a CPU.

A new frame's grounding pass runs ~180 rows (image prefix, phrases, presence question) through every linear layer.
At those sizes MKL's sgemm, which `F.linear` calls, reaches about half of what oneDNN does with a weight packed once
into its own blocked layout (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile's CPU freezing uses):
measured on this 2-core CPU, one thread, 180 x 160 -> 480 takes 263 us with `F.linear` and 131 us packed. Below
about 24 rows (a cached frame's short passes, one token of generation) oneDNN's fixed cost loses, so those stay on
`F.linear`. Same weights, same function; only the order of float additions changes (outputs within ~1e-5).

Inference only: with gradients on, `F.linear` runs (training the LMM is untouched), and also while an ONNX export
traces the module (vision_engine.py exports the vision tower from these same layers). The packed copy is made when
`pack_linears` switches a layer (made in the first pass instead, it slowed the node's first instruction by ~13 ms)
and again whenever the weight tensor is changed or replaced. It costs as much memory as the weights it copies, so
`pack_linears` skips models whose linear weights exceed `MAX_PACKED_BYTES`.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_ROWS = 24                       # fewer rows: F.linear (oneDNN's fixed cost is larger than its gain)
MAX_PACKED_BYTES = 1 << 30          # a second copy of up to 1 GiB of weights


class PackedLinear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict) whose gradient-free CPU float32 forward over at least
    MIN_ROWS rows runs oneDNN on a packed copy of the weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (torch.jit.is_tracing() or torch.is_grad_enabled() or x.device.type != "cpu"   # (an ONNX export traces)
                or x.dtype != torch.float32 or x.numel() < MIN_ROWS * self.in_features):
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(), self.bias, "none", [], "")

    def __getstate__(self):
        """Copies and pickles leave the packed copy out (oneDNN's tensors have no storage to copy); it is packed
        again on first use."""
        state = dict(super().__getstate__())
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    def _packed_weight(self) -> torch.Tensor:
        key = (self.weight.data_ptr(), self.weight._version)      # a new or in-place changed weight: pack again
        if getattr(self, "_packed_key", None) != key:
            self._packed = self.weight.detach().to_mkldnn()
            self._packed_key = key
        return self._packed


def _plain_linears(module: nn.Module) -> list[nn.Linear]:
    """Exactly nn.Linear: quantized layers (bitsandbytes, torchao) subclass it and must keep their own forward."""
    return [m for m in module.modules() if type(m) is nn.Linear]


def onednn_linear_works() -> bool:
    """Whether this torch has the packed oneDNN linear and it computes F.linear (checked on a small case)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        x, w = torch.randn(MIN_ROWS, 8), torch.randn(4, 8)
        got = torch.ops.mkldnn._linear_pointwise(x, w.to_mkldnn(), None, "none", [], "")
        return torch.allclose(got, F.linear(x, w), atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def pack_linears(module: nn.Module) -> int:
    """Switch the float32 CPU nn.Linear layers of `module` to PackedLinear; returns how many (0 when oneDNN's
    linear is missing here or the weights are over MAX_PACKED_BYTES)."""
    layers = [m for m in _plain_linears(module) if m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    size = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    if not layers or size > MAX_PACKED_BYTES or not onednn_linear_works():
        if size > MAX_PACKED_BYTES:
            log.info("LMM linear layers stay on F.linear: %.1f GiB of weights is over the packing limit", size / 2**30)
        return 0
    for m in layers:
        m.__class__ = PackedLinear
        m._packed_weight()          # now, not in the first instruction's pass
    return len(layers)


def unpack_linears(module: nn.Module) -> list[nn.Module]:
    """Switch PackedLinear layers back to nn.Linear (dropping their packed copies); returns them."""
    layers = [m for m in module.modules() if type(m) is PackedLinear]
    for m in layers:
        m.__class__ = nn.Linear
        m.__dict__.pop("_packed", None)
        m.__dict__.pop("_packed_key", None)
    return layers
