"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one square image, a g x g grid of image tokens."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from ..mask_head import crop_to_content
from .base import LMMAdapter, PreparedImage

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The long side becomes `size`, the short side int(short * size / long): floored, exactly as F-LMM's
    CustomLlavaImageProcessor.resize computes it (640x426 -> 336x223, not 224). At least 1 px."""
    if h > w:
        return size, max(1, int(w * size / h))
    return max(1, int(h * size / w)), size


class LlavaAdapter(LMMAdapter):
    """LLaVA-1.5: F-LMM's resize-and-pad preprocessing, a square grid of image tokens, padding cropped off."""

    model_class = LlavaForConditionalGeneration

    def __init__(self, model, tokenizer, image_processor=None, template: str = "vicuna"):
        super().__init__(model, tokenizer, image_processor, template)
        vision = model.config.vision_config
        self.image_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size
        self.mean = tuple(getattr(image_processor, "image_mean", None) or CLIP_MEAN)
        self.std = tuple(getattr(image_processor, "image_std", None) or CLIP_STD)
        if model.config.vision_feature_select_strategy != "default":
            raise ValueError("LLaVA adapter needs vision_feature_select_strategy='default' (no CLS token)")

    def prepare_image(self, image: np.ndarray) -> PreparedImage:
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
        pixel_values = x.permute(2, 0, 1)[None].to(self.device, self.dtype)
        return PreparedImage(pixel_values, (h, w), {"content_hw": (new_h, new_w), "pad_top_left": (top, left)})

    def image_features(self, prepared: PreparedImage) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.pixel_values, return_dict=True)
        return torch.cat(list(out.pooler_output), dim=0)

    def attention_to_maps(self, attention: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        p, c, n = attention.shape
        if n != self.grid * self.grid:
            raise ValueError(f"expected {self.grid}x{self.grid} image tokens, got {n}")
        return attention.reshape(p, c, self.grid, self.grid)        # row-major patches

    def crop_to_image(self, logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        return crop_to_content(logits, prepared.extra["content_hw"], (self.image_size, self.image_size),
                               prepared.extra["pad_top_left"])
