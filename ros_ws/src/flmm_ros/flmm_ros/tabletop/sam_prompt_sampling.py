"""Prompts for training tabletop-tiny's SAM: every object of a generated scene gets a jittered box, clicks, and
coarse logit maps like the mask head's (one plain, one that may also cover objects of other kinds).

All in the original image's pixel frame; `SamPromptGeometry` maps them into SAM's. The images and prompts of a
training step are a pure function of (seed, step), so a resumed run sees the same batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import SPLIT_SIZE, Scene, generate_scene

TRAIN_SIZES = ((256, 256), (480, 640), (240, 320))
TRAIN_SIZE_WEIGHTS = (0.4, 0.4, 0.2)
BOX_JITTER = 0.1            # std of box-corner noise, as a fraction of the box side (SAM)
MAX_POINTS = 3
COARSE_LONG_SIDE = (16, 64)  # coarse logit maps: LMM attention grids (24) up to the mask head's 64
CONFUSION_PROB = 0.75        # kind prompts: how often the coarse map also covers objects of other kinds
SAME_COLOUR_PROB = 0.7       # ... and how often those are the ones of the object's colour (when there are)


@dataclass
class PromptSample:
    """One training image with every prompt of its objects, in the original image's pixel frame."""
    image: np.ndarray           # (H, W, 3) uint8
    masks: np.ndarray           # (N, H, W) bool, visible pixels
    boxes: np.ndarray           # (N, 4) float x0, y0, x1, y1 (exclusive), jittered
    points: np.ndarray          # (N, P, 2) float x, y pixel indices
    point_labels: np.ndarray    # (N, P) int, 1 = on the object, 0 = off it
    coarse: torch.Tensor        # (N, h, w) coarse logits over the image
    kinds: list[str]            # (N,) each object's kind
    confusable: torch.Tensor    # (N, h, w) coarse logits that may also cover objects of other kinds


def jitter_box(box, image_hw: tuple[int, int], rng: np.random.Generator, scale: float = BOX_JITTER) -> np.ndarray:
    """SAM's box noise: each coordinate moves by N(0, scale * side), clipped to 2 std; stays in the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sides = np.array([x1 - x0, y1 - y0, x1 - x0, y1 - y0])
    noise = np.clip(rng.normal(0.0, scale, 4), -2 * scale, 2 * scale) * sides
    h, w = image_hw
    x0, y0, x1, y1 = np.array([x0, y0, x1, y1]) + noise
    x0, x1 = np.clip(x0, 0, w - 1), np.clip(x1, 1, w)
    y0, y1 = np.clip(y0, 0, h - 1), np.clip(y1, 1, h)
    return np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], dtype=np.float32)


def _random_pixel(region: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    ys, xs = np.nonzero(region)
    k = rng.integers(len(ys))
    return float(xs[k]), float(ys[k])


def sample_points(mask: np.ndarray, box, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`count` clicks (x, y) and labels: first on the object, then on it or (half the time) just around it."""
    h, w = mask.shape
    x0, y0, x1, y1 = box
    mx, my = 0.2 * (x1 - x0) + 2, 0.2 * (y1 - y0) + 2
    near = np.zeros_like(mask)
    near[max(0, int(y0 - my)):min(h, int(y1 + my)), max(0, int(x0 - mx)):min(w, int(x1 + mx))] = True
    outside = near & ~mask
    if not outside.any():
        outside = ~mask
    coords, labels = [], []
    for i in range(count):
        positive = i == 0 or rng.random() < 0.5 or not outside.any()
        coords.append(_random_pixel(mask if positive else outside, rng))
        labels.append(int(positive))
    return np.array(coords, np.float32), np.array(labels, np.int64)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.transpose(2, 3))


def _shift_and_scale(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Move a (1, 1, h, w) map a little and scale it about the object's centre (affine_grid's [-1, 1] frame)."""
    h, w = p.shape[-2:]
    ys, xs = torch.nonzero(p[0, 0] > 0.25, as_tuple=True)
    cx = float((xs.float().mean() + 0.5) / w * 2 - 1) if len(xs) else 0.0
    cy = float((ys.float().mean() + 0.5) / h * 2 - 1) if len(ys) else 0.0
    scale = rng.uniform(0.85, 1.15)
    shift = rng.normal(0.0, 0.04, 2)
    theta = torch.tensor([[1 / scale, 0.0, cx * (1 - 1 / scale) - shift[0]],
                          [0.0, 1 / scale, cy * (1 - 1 / scale) - shift[1]]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], list(p.shape), align_corners=False)
    return F.grid_sample(p, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _cut_hole(p: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Dim a rectangle around one object cell (there must be one): a part the mask head missed."""
    ys, xs = torch.nonzero(p[0, 0] > 0.5, as_tuple=True)
    k = rng.integers(len(ys))
    ry = max(1, round((ys.max() - ys.min() + 1).item() * rng.uniform(0.15, 0.35)))
    rx = max(1, round((xs.max() - xs.min() + 1).item() * rng.uniform(0.15, 0.35)))
    y, x = int(ys[k]), int(xs[k])
    p = p.clone()
    p[..., max(0, y - ry):y + ry, max(0, x - rx):x + rx] *= rng.uniform(0.0, 0.4)
    return p


def simulate_coarse_logits(masks: np.ndarray, rng: np.random.Generator,
                           coarse_hw: tuple[int, int] | None = None) -> torch.Tensor:
    """(N, H, W) bool masks -> (N, h, w) logits that look like a mask head's guesses of them.

    The object's coverage at a low resolution (longest side 16-64, the image's aspect), then per
    object: a small shift and scale, grown or shrunk by a cell, sometimes a hole or another object's
    mask leaking in (attention spreads to look-alikes), blur, noise; logits = gain * (probability -
    threshold), so some maps are sharp, some faint, and a few empty (then the box is the whole image).
    """
    n, h, w = masks.shape
    if coarse_hw is None:
        long_side = int(rng.integers(COARSE_LONG_SIDE[0], COARSE_LONG_SIDE[1] + 1))
        coarse_hw = (max(4, round(long_side * h / max(h, w))), max(4, round(long_side * w / max(h, w))))
    cover = F.interpolate(torch.from_numpy(masks).float()[:, None], size=coarse_hw, mode="area")
    out = []
    for i in range(n):
        p = _shift_and_scale(cover[i:i + 1], rng)
        grow = rng.choice([-1, 0, 0, 1])
        if grow > 0:
            p = F.max_pool2d(p, 3, stride=1, padding=1)
        elif grow < 0:
            p = -F.max_pool2d(-p, 3, stride=1, padding=1)
        if (p > 0.5).any() and rng.random() < 0.2:
            p = _cut_hole(p, rng)
        if n > 1 and rng.random() < 0.25:
            j = int(rng.choice([j for j in range(n) if j != i]))
            p = torch.maximum(p, cover[j:j + 1] * rng.uniform(0.2, 0.8))
        sigma = rng.uniform(0.0, 1.5)
        if sigma > 0.3:
            p = _gaussian_blur(p, sigma)
        noise = torch.from_numpy(rng.standard_normal(coarse_hw).astype(np.float32)) * rng.uniform(0.0, 0.12)
        threshold = rng.uniform(0.9, 1.1) if rng.random() < 0.04 else rng.uniform(0.3, 0.65)
        out.append(rng.uniform(4.0, 20.0) * (p[0, 0] + noise - threshold))
    return torch.stack(out)


def confusable_masks(scene: Scene, rng: np.random.Generator, prob: float = CONFUSION_PROB) -> np.ndarray:
    """(N, H, W): each object's mask, with probability `prob` joined with one or two objects of other kinds,
    preferring those of its own colour: what a phrase's attention covers when it matches colour, not kind."""
    objects = scene.objects
    out = []
    for obj in objects:
        mask = obj.mask.copy()
        others = [x for x in objects if x.kind != obj.kind]
        if others and rng.random() < prob:
            same_colour = [x for x in others if x.colour == obj.colour]
            pool = same_colour if same_colour and rng.random() < SAME_COLOUR_PROB else others
            count = min(len(pool), int(rng.integers(1, 3)))
            for k in rng.choice(len(pool), size=count, replace=False):
                mask |= pool[k].mask
        out.append(mask)
    return np.stack(out)


def sample_prompts(scene: Scene, rng: np.random.Generator) -> PromptSample:
    """A jittered box, clicks, a coarse map and a confusable coarse map for every object of `scene`."""
    image_hw = scene.image.shape[:2]
    masks = np.stack([o.mask for o in scene.objects])
    boxes = np.stack([jitter_box(o.box, image_hw, rng) for o in scene.objects])
    count = int(rng.integers(1, MAX_POINTS + 1))  # one count per image: a decoder batch needs equal lengths
    clicks = [sample_points(o.mask, o.box, count, rng) for o in scene.objects]
    return PromptSample(
        image=scene.image, masks=masks, boxes=boxes,
        points=np.stack([c for c, _ in clicks]), point_labels=np.stack([lab for _, lab in clicks]),
        coarse=simulate_coarse_logits(masks, rng), kinds=[o.kind for o in scene.objects],
        confusable=simulate_coarse_logits(confusable_masks(scene, rng), rng))


def training_samples(step: int, seed: int, images: int) -> list[PromptSample]:
    """The images and prompts of a training step: a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    samples = []
    while len(samples) < images:
        size = TRAIN_SIZES[rng.choice(len(TRAIN_SIZES), p=TRAIN_SIZE_WEIGHTS)]
        scene = generate_scene(int(rng.integers(0, SPLIT_SIZE)), size)   # train seed range
        if scene.objects:
            samples.append(sample_prompts(scene, rng))
    return samples
