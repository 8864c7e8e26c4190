"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): a squashed base image plus any-res tiles.

Image tokens come as the base g x g grid, then the unpadded tile grid row by row with one newline
token closing each row. F-LMM drops the newline column, resizes both maps to the tile grid and puts
all coarse (base) channels before all fine (tile) channels, so the mask head sees 2 * L * H channels.
The maps cover only the image (no padding), so nothing is cropped afterwards.

Preprocessing is F-LMM's CustomLlavaNextImageProcessor (transformers 4.39, PIL bicubic): the image squashed to
the tile size for the base, and resized to the best any-res resolution, centred and zero-padded, for the tiles.
transformers 5 has the same steps in the processor's PIL backend (`LlavaNextImageProcessorPil`), which is used
here; its default torchvision backend resamples differently (1-2 grey levels in tiles, ~10 in the base).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaNextForConditionalGeneration
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from ..devices import to_device
from ..types import GroundingError
from .base import LMMAdapter, PreparedImage


def pil_processor(processor):
    """The same LLaVA-NeXT image processor on its PIL backend (F-LMM's resampling)."""
    if getattr(processor, "backend", "pil") == "pil":
        return processor
    return LlavaNextImageProcessorPil(**{k: v for k, v in processor.to_dict().items() if k != "image_processor_type"})


@dataclass
class LlavaNextPreparedImage(PreparedImage):
    """A LLaVA-NeXT input: the base image and the any-res tiles, `content_hw` being the image's size in the tiles."""
    image_sizes: torch.Tensor                 # (1, 2): the processor's image_sizes, as the model takes them
    fine_hw: tuple[int, int]                  # the unpadded tile grid, in image tokens


class LlavaNextAdapter(LMMAdapter):
    """LLaVA-NeXT: base image + any-res tiles, 2 x L x H mask-head channels (coarse then fine)."""

    model_class = LlavaNextForConditionalGeneration

    def __init__(self, model, tokenizer, image_processor=None, template: str = "vicuna"):
        if image_processor is None:
            raise GroundingError("LLaVA-NeXT needs its image processor (preprocessor_config.json) beside the model")
        super().__init__(model, tokenizer, pil_processor(image_processor), template)
        vision = model.config.vision_config
        self.tile_size = vision.image_size
        self.grid = vision.image_size // vision.patch_size

    @property
    def mask_head_channels(self) -> int:
        return 2 * self.num_layers * self.num_heads

    def prepare_image(self, image: np.ndarray) -> LlavaNextPreparedImage:
        inputs = self.image_processor(images=Image.fromarray(image), return_tensors="pt")
        image_size = inputs["image_sizes"][0]
        # The image's size inside the tiles before padding (F-LMM's meta_data image_shape; training targets).
        best = select_best_resolution(tuple(image.shape[:2]), self.image_processor.image_grid_pinpoints)
        content_hw = get_patch_output_size(np.empty((1, *image.shape[:2])), best, ChannelDimension.FIRST)
        tiles_h, tiles_w = get_anyres_image_grid_shape(image_size.tolist(), self.model.config.image_grid_pinpoints,
                                                       self.tile_size)
        # The unpadded tile grid, computed exactly as the model packs its features.
        fine_h, fine_w = unpad_image(torch.empty(1, tiles_h * self.grid, tiles_w * self.grid), image_size).shape[1:]
        if tiles_h * tiles_w < 2 and (fine_h, fine_w) == (self.grid, self.grid):
            raise GroundingError("LLaVA-NeXT grounding needs the any-res tiles, but the image gave none")
        return LlavaNextPreparedImage(to_device(inputs["pixel_values"], self.device, self.dtype), tuple(image.shape[:2]),
                                      tuple(content_hw), inputs["image_sizes"].to(self.device), (fine_h, fine_w))

    def image_features(self, prepared: LlavaNextPreparedImage) -> torch.Tensor:
        out = self.model.model.get_image_features(pixel_values=prepared.pixel_values,
                                                  image_sizes=prepared.image_sizes, return_dict=True)
        return out.pooler_output[0]

    def attention_to_maps(self, attention: torch.Tensor, prepared: LlavaNextPreparedImage) -> torch.Tensor:
        p, c, n = attention.shape
        fine_h, fine_w = prepared.fine_hw
        base = self.grid * self.grid
        if n != base + fine_h * (fine_w + 1):
            raise ValueError(f"expected {base} + {fine_h}x{fine_w + 1} image tokens, got {n}")
        coarse = attention[..., :base].reshape(p, c, self.grid, self.grid)
        fine = attention[..., base:].reshape(p, c, fine_h, fine_w + 1)[..., :fine_w]   # drop newline column
        coarse = F.interpolate(coarse, size=(fine_h, fine_w), mode="bilinear", align_corners=False)
        return torch.cat([coarse, fine], dim=1)

    def crop_to_image(self, logits: torch.Tensor, prepared: LlavaNextPreparedImage) -> torch.Tensor:
        return logits
