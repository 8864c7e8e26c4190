"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): a squashed base image plus any-res tiles.

Image tokens come as the base g x g grid, then the unpadded tile grid row by row with one newline
token closing each row. F-LMM drops the newline column, resizes both maps to the tile grid and puts
all coarse (base) channels before all fine (tile) channels, so the mask head sees 2 * L * H channels.
The maps cover only the image (no padding), so nothing is cropped afterwards.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaNextForConditionalGeneration
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ..types import GroundingError
from .base import LMMAdapter, PreparedImage


class LlavaNextAdapter(LMMAdapter):
    model_class = LlavaNextForConditionalGeneration

    def __init__(self, model, tokenizer, image_processor=None, template: str = "vicuna"):
        if image_processor is None:
            raise GroundingError("LLaVA-NeXT needs its image processor (preprocessor_config.json) beside the model")
        super().__init__(model, tokenizer, image_processor, template)
        vision = model.config.vision_config
        self.tile_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size

    @property
    def mask_head_channels(self) -> int:
        return 2 * self.num_layers * self.num_heads

    def prepare_image(self, image: np.ndarray) -> PreparedImage:
        inputs = self.image_processor(images=Image.fromarray(image), return_tensors="pt")
        image_size = inputs["image_sizes"][0]
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size.tolist(), self.model.config.image_grid_pinpoints,
                                                       self.tile_size)
        # The unpadded tile grid, computed exactly as the model packs its features.
        fine_h, fine_w = unpad_image(torch.empty(1, tiles_h * self.grid, tiles_w * self.grid), image_size).shape[1:]
        if tiles_h * tiles_w < 2 and (fine_h, fine_w) == (self.grid, self.grid):
            raise GroundingError("LLaVA-NeXT grounding needs the any-res tiles, but the image gave none")
        return PreparedImage(inputs["pixel_values"].to(self.device, self.dtype), tuple(image.shape[:2]),
                             {"image_sizes": inputs["image_sizes"].to(self.device), "fine_hw": (fine_h, fine_w)})

    def image_features(self, prepared: PreparedImage) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.pixel_values,
                                                  image_sizes=prepared.extra["image_sizes"], return_dict=True)
        return out.pooler_output[0]

    def attention_to_maps(self, attention: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        p, c, n = attention.shape
        fine_h, fine_w = prepared.extra["fine_hw"]
        base = self.grid * self.grid
        if n != base + fine_h * (fine_w + 1):
            raise ValueError(f"expected {base} + {fine_h}x{fine_w + 1} image tokens, got {n}")
        coarse = attention[..., :base].reshape(p, c, self.grid, self.grid)
        fine = attention[..., base:].reshape(p, c, fine_h, fine_w + 1)[..., :fine_w]   # drop newline column
        coarse = F.interpolate(coarse, size=(fine_h, fine_w), mode="bilinear", align_corners=False)
        return torch.cat([coarse, fine], dim=1)

    def crop_to_image(self, logits: torch.Tensor, prepared: PreparedImage) -> torch.Tensor:
        return logits
