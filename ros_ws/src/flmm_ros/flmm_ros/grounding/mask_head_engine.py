"""F-LMM's U-Net mask head on ONNX Runtime: the CPU inference path of the mask-head stage.

`UNetHead.forward` is input preparation (range checks, each map divided by its sum, bilinear upsampling
to 64) followed by the U-Net body (zero padding to a multiple of 8, encoder, decoder, crop, `conv_seg`).
The preparation stays in torch: it is cheap and it is where the clear errors for bad maps are raised. The
body is exported to ONNX once per set of weights and prepared-input size (64x64 for LLaVA-1.5) and cached
by content like the SAM graphs (`onnx_cache.cached_export`): new weights give a new export, the same
weights reuse the file. The number of phrases is a dynamic axis. The graph runs each decoder upsampling's
1x1 conv before its bilinear resize instead of after (`UNetBody._up_conv_block`): the same function, less work.

The engine snapshots the weights when a graph is exported: it serves inference only. Training, and
anything that needs gradients, runs `UNetHead` itself (`GroundingPipeline.head_logits` does so whenever
gradients are enabled).
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .mask_head import UNetHead, UpConvBlock
from .onnx_runtime import SessionsByShape
from .onnx_cache import OPSET, cached_export, module_fingerprint
from .types import GroundingError

EXPORTER_VERSION = 2          # bump when the graph below changes
INPUT = "maps"
OUTPUT = "logits"
FILE = "mask_head.onnx"


class UNetBody(nn.Module):
    """What the graph computes: prepared maps (N, C, h, w) -> logits (N, 1, h, w), for one fixed (h, w)."""

    def __init__(self, head: UNetHead, input_hw: tuple[int, int]):
        super().__init__()
        self.head = head
        self.input_hw = input_hw
        h, w = input_hw
        multiple = 2 ** (head.num_stages - 1)
        # UNetHead.forward pads bottom/right with zeros; a constant F.pad is the same and keeps the graph static.
        self.padding = (0, math.ceil(w / multiple) * multiple - w, 0, math.ceil(h / multiple) * multiple - h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.input_hw
        head = self.head
        skips = []
        x = F.pad(x, self.padding)
        for stage in head.encoder:
            x = stage(x)
            skips.append(x)
        for i in reversed(range(len(head.decoder))):
            x = self._up_conv_block(head.decoder[i], skips[i], x)
        return head.conv_seg(x[..., :h, :w])

    @staticmethod
    def _up_conv_block(block: UpConvBlock, skip: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`UpConvBlock.forward` with the upsampling's 1x1 conv moved before the bilinear x2. Both are linear and the
        conv has no bias, so they commute: the conv runs on a quarter of the pixels and the resize on half the
        channels. GroupNorm and ReLU stay after the resize (their statistics are over the upsampled map)."""
        upsample, conv_module = block.upsample.interp_upsample
        x = conv_module.activate(conv_module.gn(upsample(conv_module.conv(x))))
        return block.conv_block(torch.cat([skip, x], dim=1))


@torch.no_grad()
def export_mask_head(head: UNetHead, input_hw: tuple[int, int], path: str | os.PathLike) -> Path:
    """Write the U-Net body for prepared inputs of size `input_hw` to `path` (float32, dynamic N)."""
    path = Path(path)
    body = UNetBody(copy.deepcopy(head).float().cpu().eval(), input_hw)
    example = torch.rand(2, head.in_channels, *input_hw)       # N = 2 so the tracer cannot specialise on 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                        # tracer warnings about Python ints from shapes
        torch.onnx.export(body, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "phrases"}, OUTPUT: {0: "phrases"}}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    return path


def export_mask_head_cached(head: UNetHead, input_hw: tuple[int, int], cache_dir: str | os.PathLike,
                            force: bool = False) -> Path:
    """The ONNX graph of `head` for `input_hw` from `cache_dir`/onnx, exported first when absent."""
    fields = {"exporter": EXPORTER_VERSION, "torch": torch.__version__.split("+")[0], "opset": OPSET,
              "part": "mask_head", "precision": "fp32", "weights": module_fingerprint(head),
              "inputs": {INPUT: [head.in_channels, *input_hw]}}
    return cached_export(Path(cache_dir) / "onnx", "mask_head", fields, FILE,
                          lambda p: export_mask_head(head, input_hw, p), force)


class MaskHeadEngine:
    """`UNetHead.forward` with the U-Net body on ONNX Runtime (CPU): same inputs, same checks, same logits
    (to float rounding, ~1e-6). One session per prepared-input size, made on first use. Thread-safe
    (ONNX Runtime sessions may be run concurrently; making one is locked). Inference only: the weights are
    those of `head` when a size is first seen."""

    name = "onnxruntime"

    def __init__(self, head: UNetHead, cache_dir: str | os.PathLike):
        if not isinstance(head, UNetHead):
            raise GroundingError(f"MaskHeadEngine needs a UNetHead, got {type(head).__name__}")
        self.head = head
        self.cache_dir = Path(cache_dir)
        # The session for prepared inputs of size (h, w) (exported and loaded on first use).
        self.session = SessionsByShape("mask head", lambda hw: export_mask_head_cached(head, hw, self.cache_dir))

    def __call__(self, maps: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) attention maps in [0, 1] -> (N, 1, H, W) coarse logits, like `UNetHead.forward`."""
        x = self.head.prepare_input(maps).float().cpu()
        session = self.session(tuple(x.shape[-2:]))
        (logits,) = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.numpy())})
        return torch.from_numpy(logits).to(maps.device)
