"""LLaVA-1.5's vision tower and projector on ONNX Runtime: the CPU inference path of the "vision" stage.

`LlavaAdapter.image_features` runs CLIP (the selected hidden layer, the CLS token dropped) and the multimodal
projector: one image in, one row of features per image token out. It is a fixed-shape function of the pixels,
so it is exported to ONNX once per set of weights and input size and cached by content like the SAM graphs and
the U-Net (`onnx_cache.cached_export`). The LMM is frozen, so the graph never goes stale while it runs; a
different checkpoint has a different fingerprint and gets its own export. Only the language model stays on
PyTorch (its KV cache and the phrase-attention capture live there).
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .onnx_cache import OPSET, cached_export, module_fingerprint
from .onnx_runtime import SessionsByShape

EXPORTER_VERSION = 1          # bump when the graph below changes
INPUT = "pixel_values"
OUTPUT = "features"
FILE = "vision.onnx"


class VisionFeatures(nn.Module):
    """What the graph computes: pixel_values (1, 3, S, S) -> image-token features (n_image, d)."""

    def __init__(self, model):
        super().__init__()
        self.model = model          # a LlavaForConditionalGeneration

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=pixel_values, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)


def _vision_modules(model) -> list[nn.Module]:
    return [model.model.vision_tower, model.model.multi_modal_projector]


@torch.no_grad()
def export_vision(model, pixel_shape: tuple[int, ...], path: str | os.PathLike) -> Path:
    """Write the vision tower + projector for inputs of `pixel_shape` to `path` (float32)."""
    path = Path(path)
    example = torch.rand(*pixel_shape, dtype=model.dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                  # tracer warnings about Python ints from shapes
        torch.onnx.export(VisionFeatures(model).eval(), (example,), str(path), input_names=[INPUT],
                          output_names=[OUTPUT], opset_version=OPSET, do_constant_folding=True, dynamo=False)
    return path


class VisionEngine:
    """`LlavaAdapter.image_features` on ONNX Runtime (CPU, float32): same features to float rounding (~1e-5).
    One session per input shape, made on first use; thread-safe like `MaskHeadEngine`."""

    name = "onnxruntime"

    def __init__(self, model, cache_dir: str | os.PathLike):
        self.model = model
        self.cache_dir = Path(cache_dir)
        self._fingerprint = module_fingerprint(*_vision_modules(model))
        self.session = SessionsByShape("vision tower", self._export)    # OnnxRuntimeMissing now, not at a frame

    def _export(self, pixel_shape: tuple[int, ...]) -> Path:
        config = self.model.config
        fields = {"exporter": EXPORTER_VERSION, "torch": torch.__version__.split("+")[0], "opset": OPSET,
                  "part": "vision", "precision": "fp32", "weights": self._fingerprint,
                  "layer": repr(config.vision_feature_layer), "strategy": config.vision_feature_select_strategy,
                  "inputs": {INPUT: list(pixel_shape)}}
        return cached_export(self.cache_dir / "onnx", "vision", fields, FILE,
                             lambda p: export_vision(self.model, pixel_shape, p), False)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(pixel_values.detach().float().cpu().numpy())
        (features,) = self.session(tuple(x.shape)).run([OUTPUT], {INPUT: x})
        return torch.from_numpy(features)
