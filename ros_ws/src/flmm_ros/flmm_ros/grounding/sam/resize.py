"""Cheaper versions of SAM's resizes: the input image's (every new frame), and the tracker's per-frame ones.

- `resize_image`: SAM's input resize (`ResizeLongestSide.apply_image`: PIL's antialiased bilinear) with torch's
  uint8 antialiased bilinear kernel, which was written to reproduce PIL: 3-4x faster, within one or two grey
  levels of PIL (640x480 -> 256x192: 56 of 147,456 values differ, by 1). The pipeline's `sam_resize` chooses it
  (default) or PIL (F-LMM's input bit for bit); the tracker always uses it.
- `SamResizeMaps` (the tracker): SAM's chains of bilinear resizes as one matrix per axis. A bilinear resize
  (align_corners=False) is linear and separable, so `resize(x) = R @ x @ C.T`, and a chain of resizes and crops is
  the product of its matrices. The matrices are torch's own weights (F.interpolate of an identity), so the results
  equal the chained resizes' to float rounding (~1e-5 of the logits' range), and a window of the output needs only
  its rows of R and C:
  - `postprocess`: decoder logits -> a window of image-size logits (`Sam.postprocess_masks`: upsample to the
    square input, un-pad, resize to the image);
  - `to_input`: a box in image pixels -> SAM's input frame;
  - `mask_prompt`: a boolean mask given by its window -> SAM's dense prompt of the mask as +-L logits
    (`SamPromptGeometry.dense_prompts`: resize to the input frame, pad with min(-1, min logit), resize to the
    mask-prompt size).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> uint8 (3, h, w), resized with antialiased bilinear filtering (PIL's BILINEAR)."""
    image = np.ascontiguousarray(image)
    if not image.flags.writeable:   # e.g. a view of a ROS message's buffer: torch warns about those (only read here)
        image = image.copy()
    x = torch.from_numpy(image).permute(2, 0, 1)[None]    # channels-last memory: the fast path
    return F.interpolate(x, size=size_hw, mode="bilinear", antialias=True, align_corners=False)[0]


@functools.lru_cache(maxsize=64)
def resize_matrix(in_len: int, out_len: int) -> torch.Tensor:
    """(out_len, in_len) float64: torch's bilinear resize (align_corners=False) of a length-`in_len` axis."""
    eye = torch.eye(in_len, dtype=torch.float64)[None]
    return F.interpolate(eye, size=out_len, mode="linear", align_corners=False)[0].T.contiguous()


class SamResizeMaps:
    """SAM's resize chains for one image size, per axis (see the module doc), as NumPy float32 matrices: the tracker
    post-processes on the CPU in NumPy, which costs less per call than torch on windows this small. Read-only once
    built."""

    def __init__(self, image_size: int, low_res_hw: tuple[int, int], input_hw: tuple[int, int],
                 image_hw: tuple[int, int], prompt_hw: tuple[int, int]):
        self.image_hw = tuple(image_hw)
        self.input_scale = (input_hw[1] / image_hw[1], input_hw[0] / image_hw[0])     # x, y: image -> input frame
        # decoder logits (low_res) -> square input (image_size) -> crop (input_hw) -> image
        self.up = [(resize_matrix(i, n) @ resize_matrix(lo, image_size)[:i]).float().numpy()
                   for lo, i, n in zip(low_res_hw, input_hw, image_hw)]
        # image -> input frame -> padded square (the padding's columns of the last resize) -> prompt size
        down = [resize_matrix(image_size, p) for p in prompt_hw]
        self.down = [(d[:, :i] @ resize_matrix(n, i)).float().numpy() for d, i, n in zip(down, input_hw, image_hw)]
        sums = [m.sum(1) for m in self.down]      # < 1 on prompt rows that read the padding
        self.down_sums = np.outer(*sums)

    def to_input(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """A box (x0, y0, x1, y1) in image pixels in SAM's input frame (`SamPromptGeometry.scale_boxes`, on numbers)."""
        sx, sy = self.input_scale
        return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy

    def postprocess(self, low_res: np.ndarray, window: tuple[int, int, int, int]) -> np.ndarray:
        """(h, w) decoder logits -> the float32 logits at image pixels [y0:y1, x0:x1] of window (x0, y0, x1, y1)."""
        x0, y0, x1, y1 = window
        return self.up[0][y0:y1] @ low_res.astype(np.float32, copy=False) @ self.up[1][x0:x1].T

    def mask_prompt(self, mask: np.ndarray, window: tuple[int, int, int, int], logit: float) -> np.ndarray:
        """The (*prompt_hw) float32 dense prompt of the image-size boolean mask with +-`logit` values that is `mask`
        (the window's crop, bool) inside `window` and False elsewhere."""
        x0, y0, x1, y1 = window
        whole_image = mask.shape == self.image_hw and bool(mask.all())
        pad = -1.0 if whole_image else -logit      # min(-1, min logit)
        # resize(pad + (map - pad)) = pad + R (map - pad) C.T, and map - pad = (-logit - pad) + 2 logit * mask
        out = pad + (-logit - pad) * self.down_sums
        out += 2 * logit * (self.down[0][:, y0:y1] @ mask.astype(np.float32) @ self.down[1][:, x0:x1].T)
        return out.astype(np.float32, copy=False)
