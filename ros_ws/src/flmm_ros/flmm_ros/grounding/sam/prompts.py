"""SAM's prompt geometry: its input frame, and F-LMM's prompts built from coarse mask logits.

As F-LMM's `SAMWrapper` builds them (flmm/models/mask_head/mask_refiner.py in wusize/F-LMM):
- input: the image resized so its long side is SAM's input size (`ResizeLongestSide`), then `sam.preprocess`
  (normalised, padded right/bottom to the square input); `input_hw` is the resized size inside it;
- dense prompt: coarse logits resized to `input_hw`, padded right/bottom with min(-1, min logit) to the square
  input, resized to the mask-prompt size (256 for a 1024 input);
- box: sigmoid(coarse logits resized to the image) > 0.5 -> [x0, y0, x1 + 1, y1 + 1] (whole image if empty),
  mapped into SAM's input frame.
The refiner (any backend) and the training of SAM's decoder share it, so both see the same prompts.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.transforms import ResizeLongestSide

from ..devices import to_device
from .resize import resize_image


def mask_to_box(mask: torch.Tensor) -> torch.Tensor | None:
    """[x0, y0, x1 + 1, y1 + 1] of a boolean (H, W) mask (F-LMM's mask2box), None if empty."""
    # max over a uint8 view is "any" without torch's bool reduction, ~20x faster on an image-sized mask (and far
    # cheaper than listing every pixel with nonzero)
    flags = (mask if mask.dtype == torch.bool else mask != 0).view(torch.uint8)
    return _box(flags.amax(dim=1) > 0, flags.amax(dim=0) > 0)


def box_above(prob: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """`mask_to_box(prob > threshold)` of a finite (H, W) map, read from its row and column maxima: the same box
    without forming the mask (~4x cheaper)."""
    return _box(prob.amax(dim=1) > threshold, prob.amax(dim=0) > threshold)


def _box(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor | None:
    """The box of the rows and columns that hold a pixel (1-D booleans), None if none does."""
    if not bool(rows.any()):
        return None
    return torch.stack([first_true(cols), first_true(rows), last_true(cols) + 1, last_true(rows) + 1]).float()


def first_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True of a 1-D boolean tensor that has one."""
    return flags.to(torch.uint8).argmax()


def last_true(flags: torch.Tensor) -> torch.Tensor:
    """Index of the last True of a 1-D boolean tensor that has one."""
    return flags.numel() - 1 - flags.flip(0).to(torch.uint8).argmax()


class SamPromptGeometry:
    """Frames and prompts of one SAM model: image -> SAM input, coarse logits -> dense and box prompts, pixel
    coordinates -> SAM's input frame, low-res decoder logits -> image-size logits.

    It holds no state beyond the model's sizes and normalisation, so one instance may be shared between threads.
    Gradients flow through `dense_prompts` (training needs them); box prompts are gradient-free, as in F-LMM.
    """

    def __init__(self, sam: Sam):
        self.sam = sam
        self.image_size = sam.image_encoder.img_size
        self.mask_prompt_size = tuple(sam.prompt_encoder.mask_input_size)
        self.transform = ResizeLongestSide(self.image_size)

    @property
    def device(self) -> torch.device:
        return self.sam.pixel_mean.device

    def preprocess(self, image: np.ndarray, resize: str = "pil") -> tuple[torch.Tensor, tuple[int, int]]:
        """RGB uint8 (H, W, 3) -> normalised, padded (1, 3, S, S) float32 and the resized size. `resize`: "pil"
        (segment-anything's and F-LMM's `apply_image`) or "torch" (3-4x faster, within one or two grey levels of
        it: `resize.resize_image`)."""
        if resize not in ("pil", "torch"):
            raise ValueError(f"resize must be 'pil' or 'torch', not {resize!r}")
        h, w = self.transform.get_preprocess_shape(image.shape[0], image.shape[1], self.image_size)
        if resize == "pil":
            resized = torch.from_numpy(self.transform.apply_image(image)).permute(2, 0, 1)
        else:
            resized = resize_image(image, (h, w))
        # `sam.preprocess` ((x - mean) / std, then zero padding) written into the padded input in place: the same
        # numbers, without its three image-sized temporaries
        x = torch.zeros(1, 3, self.image_size, self.image_size, device=self.device)
        content = x[0, :, :h, :w]
        content.copy_(to_device(resized, self.device))
        content.sub_(self.sam.pixel_mean).div_(self.sam.pixel_std)
        return x, (h, w)

    def dense_prompts(self, coarse: torch.Tensor, input_hw: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) coarse logits -> (N, 1, *mask_prompt_size) dense prompts (F-LMM generate_prompt_masks)."""
        pad_value = min(-1.0, coarse.min().item())
        masks = F.interpolate(coarse[:, None].float(), size=input_hw, mode="bilinear")
        masks = F.pad(masks, (0, self.image_size - input_hw[1], 0, self.image_size - input_hw[0]), value=pad_value)
        return F.interpolate(masks, size=self.mask_prompt_size, mode="bilinear")

    def boxes(self, coarse: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(N, h, w) coarse logits -> (N, 4) box prompts in SAM's input frame."""
        probs = F.interpolate(coarse.detach()[None].float().sigmoid(), size=image_hw, mode="bilinear")[0]
        whole = torch.tensor([0.0, 0.0, image_hw[1], image_hw[0]], device=coarse.device)
        boxes = [b if (b := box_above(p, 0.5)) is not None else whole for p in probs]
        return self.scale_boxes(torch.stack(boxes), image_hw).to(coarse.device)

    def scale_boxes(self, boxes: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(N, 4) x0, y0, x1, y1 in image pixels -> SAM's input frame (`ResizeLongestSide.apply_boxes_torch`)."""
        return self.scale_points(boxes.reshape(-1, 2, 2), image_hw).reshape(-1, 4)

    def scale_points(self, coords: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) x, y in image pixels -> SAM's input frame: `ResizeLongestSide.apply_coords_torch`'s arithmetic
        on a copy made with `clone` (it deep-copies the tensor, which costs ~0.1 ms a call)."""
        new_h, new_w = self.transform.get_preprocess_shape(image_hw[0], image_hw[1], self.image_size)
        coords = coords.to(torch.float, copy=True)
        coords[..., 0] = coords[..., 0] * (new_w / image_hw[1])
        coords[..., 1] = coords[..., 1] * (new_h / image_hw[0])
        return coords

    def postprocess(self, low_res: torch.Tensor, input_hw: tuple[int, int], image_hw: tuple[int, int]) -> torch.Tensor:
        """(N, 1, h, w) decoder logits -> (N, 1, H, W) logits over the image (SAM's upsample, un-pad, resize)."""
        return self.sam.postprocess_masks(low_res, input_hw, image_hw)
