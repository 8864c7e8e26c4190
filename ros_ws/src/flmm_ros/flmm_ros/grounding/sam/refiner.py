"""F-LMM's SAM refiner: coarse mask logits + phrase tokens -> refined logits at the image resolution.

F-LMM's `SAMWrapper` (flmm/models/mask_head/mask_refiner.py in wusize/F-LMM) in two parts: the prompt geometry
(`prompts.SamPromptGeometry`: SAM's input frame, the dense prompt from the coarse logits, their box) and a
runtime for SAM's image encoder and prompt decoder (`backends.RefinerBackend`: PyTorch, ONNX Runtime or
TensorRT). The projected phrase tokens go after the two box-corner tokens; one decoder pass, single mask.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.modeling import Sam

from .prompts import SamPromptGeometry


@dataclass
class SamImageEncoding:
    """One image's SAM embedding and the frames needed to map prompts into it and masks back out."""
    embedding: torch.Tensor         # (1, C, h, w)
    input_hw: tuple[int, int]       # size of the resized image inside SAM's square input
    image_hw: tuple[int, int]       # original image size


class SamRefiner:
    """F-LMM's SAM refiner: SAM's prompt geometry composed with a RefinerBackend. Holds no state of its own, so it
    is as thread-safe as its backend (GroundingPipeline calls it under its lock, except a new frame's encoder pass
    on a CPU, which it runs beside the LMM: ONNX Runtime sessions and PyTorch modules in inference allow that)."""

    def __init__(self, sam: Sam, backend, prompts: SamPromptGeometry | None = None):
        self.sam = sam
        self.backend = backend
        self.prompts = prompts or SamPromptGeometry(sam)

    @property
    def device(self) -> torch.device:
        return self.prompts.device

    def encode(self, image: np.ndarray, resize: str = "pil") -> SamImageEncoding:
        """SAM's embedding of an RGB uint8 image; `resize`: see `SamPromptGeometry.preprocess`."""
        return self.encode_later(image, resize)()

    @torch.no_grad()
    def encode_later(self, image: np.ndarray, resize: str = "pil") -> Callable[[], SamImageEncoding]:
        """`encode` in two halves: SAM's input is made from `image` now (the caller may reuse its buffer once this
        returns), the encoder pass runs when the returned call is made, on any thread."""
        x, input_hw = self.prompts.preprocess(image, resize)
        image_hw = tuple(image.shape[:2])

        @torch.no_grad()       # grad mode is per thread
        def run() -> SamImageEncoding:
            return SamImageEncoding(self.backend.encode(x), input_hw, image_hw)
        return run

    def refine(self, encoding: SamImageEncoding, coarse: torch.Tensor,
               text_tokens: list[torch.Tensor]) -> torch.Tensor:
        """coarse (N, h, w) logits over the image, text_tokens[i] (T_i, C) -> (N, H, W) logits at image size.

        Differentiable with the PyTorch backend (training uses it; the box prompt is detached).
        """
        return self.refine_scored(encoding, coarse, text_tokens)[0]

    def refine_scored(self, encoding: SamImageEncoding, coarse: torch.Tensor, text_tokens: list[torch.Tensor],
                      boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`refine`, plus SAM's predicted IoU of each mask (N,); `boxes` (N, 4) x0, y0, x1, y1 in image pixels
        replace the box prompts taken from the coarse logits (instance prompts: one box per seed)."""
        dense = self.prompts.dense_prompts(coarse, encoding.input_hw)
        if boxes is None:
            boxes = self.prompts.boxes(coarse, encoding.image_hw)
        else:
            boxes = self.prompts.scale_boxes(boxes.float(), encoding.image_hw).to(dense.device)
        refined, ious = [], []
        for i, tokens in enumerate(text_tokens):
            low_res, iou = self.backend.decode(encoding.embedding, dense[i:i + 1], boxes[i:i + 1],
                                               tokens[None].to(dense.dtype))
            refined.append(self.prompts.postprocess(low_res.float(), encoding.input_hw, encoding.image_hw)[0, 0])
            ious.append(iou.reshape(()).float())
        return torch.stack(refined), torch.stack(ious)
