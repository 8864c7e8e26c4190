"""Training samples (image + referring expressions + masks) and the frozen-feature cache.

The LMM and the SAM image encoder are frozen (F-LMM), so their outputs for a sample never change:
`encode_sample` runs them once and keeps only what the trainable head needs (attention maps, phrase
hidden states, SAM image embedding, in float16), and every epoch reuses it.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..lmm import PhrasePass, PreparedImage
from ..refiner import SamImageEncoding


@dataclass
class RefSample:
    image: np.ndarray            # (H, W, 3) uint8 RGB
    phrases: list[str]           # one referring expression per object
    masks: list[np.ndarray]      # (H, W) bool, one per phrase
    cases: list[str] | None = None  # optional group of each phrase, for scores by case


def tabletop_samples(split: str, count: int, *, offset: int = 0, sizes=((256, 256), (480, 640)),
                     expression: str = "random") -> Iterator[RefSample]:
    """Generated tabletop scenes; one expression per object ('random' for training, 'first' for evaluation,
    like F-LMM's RefCOCO `select_first`)."""
    from ...tabletop.scenes import generate_scene, split_seeds

    for i, seed in enumerate(split_seeds(split, count, offset)):
        scene = generate_scene(seed, size=sizes[i % len(sizes)])
        rng = random.Random(seed)
        # An object no expression singles out (e.g. two identical mugs side by side) is not referred to.
        objects = [o for o in scene.objects if o.expressions]
        if not objects:
            continue
        phrases = [rng.choice(o.expressions) if expression == "random" else o.expressions[0] for o in objects]
        yield RefSample(scene.image, phrases, [o.mask for o in objects], [distractor_case(o, scene.objects) for o in objects])


def distractor_case(obj, objects) -> str:
    """What else in the scene looks like the object: the hardest case for a model that finds it by colour."""
    if any(o is not obj and o.colour == obj.colour for o in objects):
        return "another object of its colour"
    if any(o is not obj and o.kind == obj.kind for o in objects):
        return "another object of its kind, no other of its colour"
    return "unique colour and kind"


def refcoco_samples(directory: str | Path, split: str, *, text_mode: str = "select_first", images_dir: str = "",
                    refs_file: str = "", seed: int = 0, count: int | None = None) -> Iterator[RefSample]:
    """A RefCOCO-layout split as F-LMM reads it (`refcoco.read_split`): one sample per image with one text per
    referred object ('select_first' for evaluation, 'random' for training, 'original' for every sentence)."""
    from .refcoco import default_images_dir, read_split

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
    prepared = PreparedImage(torch.empty(0), frame.lmm.prepared.image_hw, frame.lmm.prepared.extra)
    sam = None
    if frame.sam is not None:
        sam = SamImageEncoding(frame.sam.embedding.half(), frame.sam.input_hw, frame.sam.image_hw)
    masks = np.stack([np.asarray(m, dtype=bool) for m in sample.masks])
    return CachedSample(prepared, out.maps.half(), [h.half() for h in out.hidden_states], sam,
                        np.packbits(masks), tuple(sample.image.shape[:2]))
