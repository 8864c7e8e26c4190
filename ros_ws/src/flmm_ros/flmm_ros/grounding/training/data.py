"""Training samples (image + referring expressions + masks) and the frozen-feature cache.

The LMM and the SAM image encoder are frozen (F-LMM), so their outputs for a sample never change:
`encode_sample` runs them once and keeps only what the trainable head needs (attention maps, phrase
hidden states, SAM image embedding, in float16), and every epoch reuses it.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..lmm import PhrasePass, PreparedImage
from ..sam.refiner import SamImageEncoding
from .refcoco import default_images_dir, read_split


@dataclass
class RefSample:
    """One image with its referring expressions and their masks: what training and evaluation read, from RefCOCO
    (`refcoco_samples`) or any other producer (the tabletop scenes: `flmm_ros.tabletop.samples`)."""
    image: np.ndarray            # (H, W, 3) uint8 RGB
    phrases: list[str]           # one referring expression per object
    masks: list[np.ndarray]      # (H, W) bool, one per phrase
    cases: list[str] | None = None  # optional group of each phrase, for scores by case


def refcoco_samples(directory: str | Path, split: str, *, text_mode: str = "select_first", images_dir: str = "",
                    refs_file: str = "", seed: int = 0, count: int | None = None) -> Iterator[RefSample]:
    """A RefCOCO-layout split as F-LMM reads it (`refcoco.read_split`): one sample per image with one text per
    referred object ('select_first' for evaluation, 'random' for training, 'original' for every sentence)."""
    items = read_split(directory, split, text_mode, refs_file, seed)[:count]
    for item in items:
        image, masks = item.load(images_dir or default_images_dir(directory))
        yield RefSample(image, item.texts, masks)


@dataclass
class CachedSample:
    """Frozen features of one sample, everything the head's forward needs."""
    prepared: PreparedImage
    maps: torch.Tensor                   # (P, C, h, w) float16
    hidden_states: list[torch.Tensor]    # per phrase (L, T, d) float16
    sam: SamImageEncoding | None         # embedding in float16
    packed_masks: np.ndarray             # np.packbits of the (P, H, W) ground truth
    image_hw: tuple[int, int]

    def phrase_pass(self) -> PhrasePass:
        return PhrasePass(self.maps.float(), [h.float() for h in self.hidden_states])

    def sam_encoding(self) -> SamImageEncoding | None:
        if self.sam is None:
            return None
        return SamImageEncoding(self.sam.embedding.float(), self.sam.input_hw, self.sam.image_hw)

    def masks(self) -> torch.Tensor:
        p = len(self.hidden_states)
        bits = np.unpackbits(self.packed_masks, count=p * self.image_hw[0] * self.image_hw[1])
        return torch.from_numpy(bits.reshape(p, *self.image_hw).astype(np.float32))


@torch.no_grad()
def encode_sample(pipe, sample: RefSample) -> CachedSample:
    frame = pipe.encode(sample.image)
    out = pipe.lmm.phrase_pass(frame.lmm, sample.phrases)
    prepared = replace(frame.lmm.prepared, pixel_values=torch.empty(0))    # the geometry, not the pixels
    sam = None
    if frame.sam is not None:
        sam = SamImageEncoding(frame.sam.embedding.half(), frame.sam.input_hw, frame.sam.image_hw)
    masks = np.stack([np.asarray(m, dtype=bool) for m in sample.masks])
    return CachedSample(prepared, out.maps.half(), [h.half() for h in out.hidden_states], sam,
                        np.packbits(masks), tuple(sample.image.shape[:2]))
