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


class PatchProbe(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.kind = nn.Linear(dim, len(KINDS) + 1)
        self.colour = nn.Linear(dim, len(COLOURS) + 1)

    def loss(self, image_tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of kind and colour per patch; image_tokens (B, N, D), targets (B, N, 2)."""
        total = image_tokens.new_zeros(())
        for head, target, scale in ((self.kind, targets[..., 0], KIND_WEIGHT), (self.colour, targets[..., 1], 1.0)):
            weight = torch.ones(head.out_features, device=image_tokens.device)
            weight[0] = BACKGROUND_WEIGHT
            total = total + scale * F.cross_entropy(head(image_tokens).flatten(0, 1), target.flatten(), weight=weight)
        return total
