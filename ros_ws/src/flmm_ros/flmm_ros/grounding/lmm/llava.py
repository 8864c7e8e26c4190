"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square image, a g x g grid of image tokens."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from ..devices import to_device
from ..types import GroundingError
from .base import LMMAdapter, PreparedImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The long side becomes `size`, the short side int(short * size / long): floored, exactly as F-LMM's
    CustomLlavaImageProcessor.resize computes it (640x426 -> 336x223, not 224). At least 1 px."""
    if h > w:
        return size, max(1, int(w * size / h))
    return max(1, int(h * size / w)), size


@dataclass
class LlavaPreparedImage(PreparedImage):
    """A LLaVA-1.5 input: the resized image (`content_hw`) centred on the square canvas."""
    pad_top_left: tuple[int, int]             # padding above and left of the image, in LMM-input pixels


def crop_to_content(logits: torch.Tensor, image_hw: tuple[int, int], padded_hw: tuple[int, int],
                    pad_top_left: tuple[int, int]) -> torch.Tensor:
    """Crop mask logits (..., H, W) predicted over a padded square image to the image's own region.

    `image_hw` is the resized image before padding, `padded_hw` the padded size and `pad_top_left`
    the padding added above and to the left, all in LMM-input pixels. F-LMM's rule (§1.8): top is
    floored, height rounded: top = int(pad_top * H / padded_h), height = int(img_h * H / padded_h + 0.5);
    the same for the width. The height/width is kept at least 1 for extremely thin images.
    """
    (img_h, img_w), (padded_h, padded_w), (pad_top, pad_left) = image_hw, padded_hw, pad_top_left
    if logits.ndim < 2:
        raise GroundingError(f"expected mask logits (..., H, W), got shape {tuple(logits.shape)}")
    if min(img_h, img_w, padded_h, padded_w) <= 0 or min(pad_top, pad_left) < 0:
        raise GroundingError(f"bad crop geometry: image {image_hw}, padded {padded_hw}, padding {pad_top_left}")
    if pad_top + img_h > padded_h or pad_left + img_w > padded_w:
        raise GroundingError(f"image {image_hw} with padding {pad_top_left} does not fit in padded size {padded_hw}")
    H, W = logits.shape[-2:]
    top = int(pad_top * H / padded_h)
    left = int(pad_left * W / padded_w)
    height = max(1, int(img_h * H / padded_h + 0.5))
    width = max(1, int(img_w * W / padded_w + 0.5))
    return logits[..., top:top + height, left:left + width].contiguous()


class LlavaAdapter(LMMAdapter):
    """LLaVA-1.5: F-LMM's resize-and-pad preprocessing, a square grid of image tokens, padding cropped off."""

    model_class = LlavaForConditionalGeneration

    def __init__(self, model, tokenizer, image_processor=None, template: str = "vicuna"):
        super().__init__(model, tokenizer, image_processor, template)
        # The vision tower + projector on ONNX Runtime (vision_engine.VisionEngine), set by the pipeline on a CPU;
        # None: PyTorch. Inference only: with gradients on, PyTorch runs.
        self.vision_engine = None
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size
        self.mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA adapter needs vision_feature_select_strategy='default' (no CLS token)")

    def prepare_image(self, image: np.ndarray) -> LlavaPreparedImage:
        """F-LMM's CustomLlavaImageProcessor: longest side to S (bicubic), centred pad with the mean colour."""
        h, w = image.shape[:2]
        new_h, new_w = resized_size(h, w, self.image_size)
        s = self.image_size
        resized = Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC)
        top, left = (s - new_h) // 2, (s - new_w) // 2
        canvas = Image.new("RGB", (s, s), tuple(int(m * 255) for m in self.mean))
        canvas.paste(resized, (left, top))
        x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)
        x = (x - torch.tensor(self.mean)) / torch.tensor(self.std)
        pixel_values = to_device(x.permute(2, 0, 1)[None], self.device, self.dtype)
        return LlavaPreparedImage(pixel_values, (h, w), (new_h, new_w), (top, left))

    def image_features(self, prepared: LlavaPreparedImage) -> torch.Tensor:
        if self.vision_engine is not None and not torch.is_grad_enabled():
            return self.vision_engine(prepared.pixel_values).to(self.device, self.dtype)
        out = self.model.model.get_image_features(pixel_values=prepared.pixel_values, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def attention_to_maps(self, attention: torch.Tensor, prepared: LlavaPreparedImage) -> torch.Tensor:
        p, c, n = attention.shape
        if n != self.grid * self.grid:
            raise ValueError(f"expected {self.grid}x{self.grid} image tokens, got {n}")
        return attention.reshape(p, c, self.grid, self.grid)        # row-major patches

    def crop_to_image(self, logits: torch.Tensor, prepared: LlavaPreparedImage) -> torch.Tensor:
        return crop_to_content(logits, prepared.content_hw, (self.image_size, self.image_size), prepared.pad_top_left)
