"""An auxiliary training signal for the image tokens: which kind and colour each patch shows.

A CLIP tower learned from scratch on a few thousand images learns slowly from answer tokens alone.
During pre-training, a linear probe on the projected image tokens (what the language model
attends to) predicts the kind and the colour of the object covering each patch, from the scene's
exact masks. The probe is dropped after training: the saved model is a plain LLaVA.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .language import COLOURS
from .scenes import Scene
from .shapes import KINDS

SAMPLES_PER_PATCH = 6   # label samples per patch side
MIN_COVER = 0.25        # a patch is labelled with an object when it covers this fraction of it
BACKGROUND_WEIGHT = 0.2  # most patches are table or wall: weigh them down so object patches drive the tower
KIND_WEIGHT = 2.0        # shape is much slower to learn from scratch than colour


def patch_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid*grid,) fraction of each image patch covered by `mask`, row-major.

    Patches follow the LLaVA image processor with do_pad: the image is centred in a square."""
    h, w = mask.shape
    side = max(h, w)
    n = grid * SAMPLES_PER_PATCH
    coords = ((np.arange(n) + 0.5) * side / n).astype(np.int64)
    ys, xs = coords - (side - h) // 2, coords - (side - w) // 2
    inside = ((ys >= 0) & (ys < h))[:, None] & ((xs >= 0) & (xs < w))[None, :]
    samples = mask[np.ix_(np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1))] & inside
    return samples.reshape(grid, SAMPLES_PER_PATCH, grid, SAMPLES_PER_PATCH).mean(axis=(1, 3)).ravel()


def patch_targets(scene: Scene, grid: int) -> np.ndarray:
    """(grid*grid, 2) int64: kind index + 1 and colour index + 1 per patch (0 = table / wall)."""
    out = np.zeros((grid * grid, 2), np.int64)
    if not scene.objects:
        return out
    cover = np.stack([patch_coverage(o.mask, grid) for o in scene.objects], 1)
    best = cover.argmax(1)
    covered = cover.max(1) >= MIN_COVER
    kind_ids = np.array([KINDS.index(o.kind) + 1 for o in scene.objects])
    colour_ids = np.array([COLOURS.index(o.colour) + 1 for o in scene.objects])
    out[covered, 0] = kind_ids[best[covered]]
    out[covered, 1] = colour_ids[best[covered]]
    return out


def _weighted_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over patches with the background class (0) weighed down."""
    weight = torch.ones(logits.shape[-1], device=logits.device)
    weight[0] = BACKGROUND_WEIGHT
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), weight=weight)


class PatchProbe(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.kind = nn.Linear(dim, len(KINDS) + 1)
        self.colour = nn.Linear(dim, len(COLOURS) + 1)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of kind and colour per patch; image_tokens (B, N, D), targets (B, N, 2)."""
        return (KIND_WEIGHT * _weighted_loss(self.kind(image_tokens), targets[..., 0])
                + _weighted_loss(self.colour(image_tokens), targets[..., 1]))


class TiedPatchProbe(nn.Module):
    """The probe with its class vectors tied to the input embeddings of the kind and colour words.

    LLaVA's stage-1 alignment in miniature: a mug's patches are pulled towards the embedding of the
    word "mug", so that from the first training step a word can find its object by the same kind of
    dot product that attention computes. Only the background vectors, biases and scales are the
    probe's own; the word embeddings stay the model's (and train with it)."""

    def __init__(self, embeddings: nn.Embedding, kind_ids: list[int], colour_ids: list[int]):
        super().__init__()
        self._embeddings = [embeddings]   # in a list: the model owns these weights, not the probe
        self.register_buffer("kind_ids", torch.tensor(kind_ids), persistent=False)
        self.register_buffer("colour_ids", torch.tensor(colour_ids), persistent=False)
        dim = embeddings.weight.shape[1]
        self.background = nn.Parameter(torch.zeros(2, dim))
        self.bias = nn.Parameter(torch.zeros(2))
        self.scale = nn.Parameter(torch.ones(2))

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        words = self._embeddings[0].weight
        total = image_tokens.new_zeros(())
        for i, (ids, scale) in enumerate(((self.kind_ids, KIND_WEIGHT), (self.colour_ids, 1.0))):
            classes = torch.cat([self.background[i:i + 1], words[ids]])
            logits = self.scale[i] * (image_tokens @ classes.T) / classes.shape[1] ** 0.5
            # Only the background class has a bias: a word's score is its embedding's dot product alone.
            logits = logits + torch.cat([self.bias[i:i + 1], logits.new_zeros(len(ids))])
            total = total + scale * _weighted_loss(logits, targets[..., i])
        return total
