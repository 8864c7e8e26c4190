"""F-LMM's SAM refiner: coarse mask logits + phrase tokens -> refined logits at the image resolution.

Prompts are built exactly as F-LMM's `SAMWrapper` does (research/flmm.md §3):
- dense prompt: coarse logits resized to SAM's resized-input size, padded right/bottom with
  min(-1, min logit) to the square input, resized to the mask-prompt size (256 for 1024 input);
- box: sigmoid(coarse logits resized to the image) > 0.5 -> [x0, y0, x1 + 1, y1 + 1] (whole image if empty),
  mapped into SAM's input frame;
- the projected phrase tokens go after the two box-corner tokens; one decoder pass, single mask.
The image encoder and decoder run through a `RefinerBackend` (PyTorch, ONNX Runtime or TensorRT).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide


@dataclass
class SamImageEncoding:
    embedding: torch.Tensor         # (1, C, h, w)
    input_hw: tuple[int, int]       # size of the resized image inside SAM's square input
    image_hw: tuple[int, int]       # original image size


def mask_to_box(mask: torch.Tensor) -> torch.Tensor | None:
    """[x0, y0, x1 + 1, y1 + 1] of a boolean (H, W) mask (F-LMM's mask2box), None if empty."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    if ys.numel() == 0:
        return None
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()


class SamRefiner:
    def __init__(self, sam: Sam, backend):
        self.sam = sam
        self.backend = backend
        self.image_size = sam.image_encoder.img_size
        self.mask_prompt_size = tuple(sam.prompt_encoder.mask_input_size)
        self.transform = ResizeLongestSide(self.image_size)

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB uint8 (H, W, 3) -> normalised, padded (1, 3, S, S) float32 and the resized size."""
        resized = self.transform.apply_image(image)
        x = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return self.sam.preprocess(x), tuple(resized.shape[:2])

    @torch.no_grad()
    def encode(self, image: np.ndarray) -> SamImageEncoding:
        x, input_hw = self.preprocess(image)
        return SamImageEncoding(self.backend.encode(x), input_hw, tuple(image.shape[:2]))

    def dense_prompts(self, coarse: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) coarse logits -> (N, 1, *mask_prompt_size) dense prompts (F-LMM generate_prompt_masks)."""
        pad_value = min(-1.0, coarse.min().item())
        masks = F.interpolate(coarse[:, None].float(), size=input_hw, mode="bilinear")
        masks = F.pad(masks, (0, self.image_size - input_hw[1], 0, self.image_size - input_hw[0]), value=pad_value)
        return F.interpolate(masks, size=self.mask_prompt_size, mode="bilinear")

    def boxes(self, coarse: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) coarse logits -> (N, 4) boxes in SAM's input frame (gradient-free, as in F-LMM)."""
        probs = F.interpolate(coarse.detach()[None].float().sigmoid(), size=image_hw, mode="bilinear")[0]
        whole = torch.tensor([0.0, 0.0, image_hw[1], image_hw[0]], device=coarse.device)
        boxes = [b if (b := mask_to_box(p > 0.5)) is not None else whole for p in probs]
        scaled = self.transform.apply_boxes_torch(torch.stack(boxes), image_hw)
        return scaled.to(coarse.device)

    def refine(self, encoding: SamImageEncoding, coarse: torch.Tensor,
               text_tokens: list[torch.Tensor]) -> torch.Tensor:
        """coarse (N, h, w) logits over the image, text_tokens[i] (T_i, C) -> (N, H, W) logits at image size.

        Differentiable with the PyTorch backend (training uses it; the box prompt is detached).
        """
        dense = self.dense_prompts(coarse, encoding.input_hw)
        boxes = self.boxes(coarse, encoding.image_hw)
        refined = []
        for i, tokens in enumerate(text_tokens):
            low_res, _ = self.backend.decode(encoding.embedding, dense[i:i + 1], boxes[i:i + 1],
                                             tokens[None].to(dense.dtype))
            refined.append(self.sam.postprocess_masks(low_res.float(), encoding.input_hw, encoding.image_hw)[0, 0])
        return torch.stack(refined)
