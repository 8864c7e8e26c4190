"""Training tabletop-tiny's SAM-architecture refiner from scratch on generated scenes, and measuring it.

    python -m flmm_ros.tabletop.train_sam --out out/tabletop_sam --steps 7000
    python -m flmm_ros.tabletop.train_sam --out out/tabletop_sam --eval     # mIoU of the saved model

The model is a real `segment_anything.Sam` (`build_sam(TABLETOP_SAM)`). Later, F-LMM style, its image
encoder is frozen and its prompt encoder + mask decoder are fine-tuned to refine the mask head's
coarse masks. Here all of it learns to segment tabletop objects from SAM-style prompts; every object
gets four, each type one decoder batch per image:
- box: the object's box, jittered (SAM: noise of 10% of the box side);
- points: 1-3 clicks, the first positive, later ones positive in the object or negative just around it;
- coarse + box: F-LMM's refiner prompt. A coarse logit map like the mask head's (the object's mask at a
  low resolution, shifted, scaled, grown or shrunk, blurred, with holes, leaks onto other objects and
  noise) becomes the dense prompt, and the box is thresholded from it, both through `SamRefiner`, the
  product's own code (whole image when nothing passes the threshold);
- coarse + box + kind: SAM's text prompt (SAM paper §7.5) in miniature. The coarse map also covers
  objects of other kinds (mostly of the same colour: a frozen LMM's attention finds colour more easily
  than kind), and one learned token per kind (`KindPrompts`) goes after the box tokens, where F-LMM puts
  the phrase's tokens. To pick the named object the encoder has to see what kind each object is, and
  the decoder to read a token that names it; F-LMM's head then learns to say the kind through its text
  projection. A linear probe on the image embedding, trained to read each cell's kind, teaches the encoder
  to see kinds sooner. The kind table and probe are training aids, saved beside the model, not part of it.
Images go through SAM's own path: `ResizeLongestSide`, `sam.preprocess` (normalise, pad bottom/right).
The image encoder runs once per image.
Loss on the single-mask output (`multimask_output=False`, SAM's first mask token) at the low-res mask
size: BCE + Dice (F-LMM's losses) against the visible mask resized the same way, plus the MSE of the
IoU head against the IoU the mask actually reached, plus the kind probe's cross-entropy. AdamW, linear
warm-up, cosine decay, gradient clipping; batches are a pure function of (seed, step), so a run resumes
from its last checkpoint and reproduces the same batches.

Output in OUT: `sam.safetensors` (a Sam state_dict: image_encoder.*, prompt_encoder.*, mask_decoder.*,
loadable with `grounding.checkpoint.load_sam_weights`), `sam_arch.yaml` (`SamArch.to_dict()`),
`kind_prompts.safetensors` (kind tokens and probe, for `--eval`) and `train_log.json`; `load_tabletop_sam(OUT)`
rebuilds the model.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam
from torch import nn
from tqdm import tqdm

from ..grounding.checkpoint import load_sam_weights
from ..grounding.refiner import SamRefiner
from ..grounding.sam_models import SamArch, build_sam
from .scenes import SPLIT_SIZE, Scene, generate_scene, split_seeds
from .shapes import KINDS

# 256 px input with 16 px patches (SAM's): a 16x16 embedding and 64x64 low-res masks. Masks at 64x64,
# upsampled as SAM does, still reproduce the scenes' objects at 0.98 mIoU, and 8 px patches cost 2.5x
# more per training step, which on a shared CPU means 2.5x fewer steps. 4 blocks of width 128, SAM's
# pattern of windowed (8x8 tokens) and global blocks; the decoder is SAM's at half width.
TABLETOP_SAM = SamArch(encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4,
                       encoder_global_attn_indexes=(1, 3), image_size=256, patch_size=16, window_size=8,
                       prompt_embed_dim=128, decoder_mlp_dim=512, decoder_num_heads=4, iou_head_hidden_dim=128)

TRAIN_SIZES = ((256, 256), (480, 640), (240, 320))
TRAIN_SIZE_WEIGHTS = (0.4, 0.4, 0.2)
EVAL_SIZES = ((256, 256), (480, 640))
BOX_JITTER = 0.1            # std of box-corner noise, as a fraction of the box side (SAM)
MAX_POINTS = 3
COARSE_LONG_SIDE = (16, 64)  # coarse logit maps: LMM attention grids (24) up to the mask head's 64
CONFUSION_PROB = 0.75        # kind prompts: how often the coarse map also covers objects of other kinds
SAME_COLOUR_PROB = 0.7       # ... and how often those are the ones of the object's colour (when there are)
KIND_PROBE_WEIGHT = 0.5
SAM_FILE, ARCH_FILE, LOG_FILE = "sam.safetensors", "sam_arch.yaml", "train_log.json"
KIND_FILE = "kind_prompts.safetensors"


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


def kind_ids(kinds: list[str]) -> torch.Tensor:
    """Kind names -> their indices in `shapes.KINDS`; a clear error for a name not there."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kind {unknown[0]!r}; kinds are {KINDS}")
    return torch.tensor([KINDS.index(k) for k in kinds])


class KindPrompts(nn.Module):
    """One learned sparse prompt token per object kind (`shapes.KINDS`), and a linear probe that reads each
    image-embedding cell's kind (0 = no object): its loss makes the encoder see kinds from the first steps,
    which the kind prompts alone teach it only slowly."""

    def __init__(self, dim: int):
        super().__init__()
        self.table = nn.Embedding(len(KINDS), dim)
        self.probe = nn.Conv2d(dim, len(KINDS) + 1, kernel_size=1)

    def forward(self, kinds: list[str]) -> torch.Tensor:
        """N kind names -> (N, 1, dim) tokens."""
        return self.table(kind_ids(kinds))[:, None]


# ----------------------------------------------------------------------------------------------- prompts

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


# ------------------------------------------------------------------------------------------------ model

def low_res_targets(masks: np.ndarray, refiner: SamRefiner, input_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool -> (N, 1, h, w) coverage in [0, 1] on the decoder's low-res grid (resized, padded)."""
    s = refiner.image_size
    t = F.interpolate(torch.from_numpy(masks).float()[:, None], size=input_hw, mode="area")
    t = F.pad(t, (0, s - input_hw[1], 0, s - input_hw[0]))
    return F.interpolate(t, size=refiner.mask_prompt_size, mode="area")


def decode(sam: Sam, embedding: torch.Tensor, points=None, boxes=None, masks=None, tokens=None):
    """One decoder batch on one image's embedding; SAM's single-mask output (low-res logits, IoU).
    `tokens` (N, T, C) go after the box tokens, where F-LMM puts a phrase's."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    if tokens is not None:
        sparse = torch.cat([sparse, tokens.to(sparse.dtype)], dim=1)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=False)


def prompt_batches(sam: Sam, kind_prompts: KindPrompts, refiner: SamRefiner, embedding: torch.Tensor,
                   sample: PromptSample, input_hw: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(low-res logits, predicted IoU) of every object, for each prompt type of one image."""
    image_hw = sample.image.shape[:2]
    boxes = refiner.transform.apply_boxes_torch(torch.from_numpy(sample.boxes), image_hw)
    coords = refiner.transform.apply_coords_torch(torch.from_numpy(sample.points), image_hw)
    return [
        decode(sam, embedding, boxes=refiner.boxes(sample.coarse, image_hw),
               masks=refiner.dense_prompts(sample.coarse, input_hw)),
        decode(sam, embedding, boxes=boxes),
        decode(sam, embedding, points=(coords, torch.from_numpy(sample.point_labels))),
        decode(sam, embedding, boxes=refiner.boxes(sample.confusable, image_hw),
               masks=refiner.dense_prompts(sample.confusable, input_hw), tokens=kind_prompts(sample.kinds)),
    ]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F-LMM's naive Dice (eps 1) per mask."""
    p, t = logits.sigmoid().flatten(1), targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per mask of two boolean (N, ...) tensors (1 when both are empty)."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def cell_kinds(target: torch.Tensor, kinds: list[str], grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) low-res coverage of N objects -> (gh, gw) class per embedding cell: 1 + the kind index of
    the object covering most of it, or 0 where no object covers 30 %."""
    cover = F.adaptive_avg_pool2d(target, grid)[:, 0]
    best, index = cover.max(dim=0)
    labels = (kind_ids(kinds) + 1)[index]
    return torch.where(best >= 0.3, labels, torch.zeros_like(labels))


def training_loss(sam: Sam, kind_prompts: KindPrompts, refiner: SamRefiner, samples: list[PromptSample],
                  probe_weight: float = KIND_PROBE_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over every prompt of BCE + Dice + IoU-head MSE, plus the kind probe's cross-entropy over the
    embedding cells; the encoder runs once for all images."""
    inputs = [refiner.preprocess(s.image) for s in samples]
    embeddings = sam.image_encoder(torch.cat([x for x, _ in inputs]))
    logits, ious, targets, cells = [], [], [], []
    for i, (sample, (_, input_hw)) in enumerate(zip(samples, inputs)):
        target = low_res_targets(sample.masks, refiner, input_hw)
        cells.append(cell_kinds(target, sample.kinds, embeddings.shape[-2:]))
        for batch_logits, batch_iou in prompt_batches(sam, kind_prompts, refiner, embeddings[i:i + 1], sample,
                                                      input_hw):
            logits.append(batch_logits)
            ious.append(batch_iou[:, 0])
            targets.append(target)
    logits, ious, targets = torch.cat(logits), torch.cat(ious), torch.cat(targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    dice = dice_loss(logits, targets)
    reached = binary_iou(logits.detach() > 0, targets > 0.5)
    iou_mse = (ious - reached) ** 2
    probe = F.cross_entropy(kind_prompts.probe(embeddings), torch.stack(cells))
    loss = (bce + dice + iou_mse).mean() + probe_weight * probe
    return loss, {"bce": bce.mean().item(), "dice": dice.mean().item(), "iou_mse": iou_mse.mean().item(),
                  "kind_probe": probe.item(), "train_iou": reached.mean().item(), "prompts": len(logits)}


# ------------------------------------------------------------------------------------------- evaluation

@dataclass
class EvalScene:
    scene: Scene
    coarse: torch.Tensor        # fixed simulated coarse logits, one map per object
    confused: torch.Tensor      # the same, also covering objects of other kinds wherever a scene has them


def eval_set(count: int, split: str = "val") -> list[EvalScene]:
    """Held-out scenes at two sizes, with fixed coarse maps (drawn from each scene's own seed)."""
    out = []
    for seed in split_seeds(split, count):
        scene = generate_scene(seed, EVAL_SIZES[seed % len(EVAL_SIZES)])
        if scene.objects:
            masks = np.stack([o.mask for o in scene.objects])
            confused = confusable_masks(scene, np.random.default_rng([seed, 2]), prob=1.0)
            out.append(EvalScene(scene, simulate_coarse_logits(masks, np.random.default_rng([seed, 1])),
                                 simulate_coarse_logits(confused, np.random.default_rng([seed, 3]))))
    return out


@torch.no_grad()
def evaluate(sam: Sam, kind_prompts: KindPrompts, data: list[EvalScene]) -> dict[str, float]:
    """Per-object IoU at the image's resolution (logits > 0), averaged (mIoU) and pooled (cIoU = ΣI/ΣU).

    box: the exact object box; coarse_box: F-LMM's prompt from the fixed coarse map; coarse_input:
    the coarse map itself (sigmoid > 0.5 at image size), the baseline the refiner has to beat;
    confused_box / confused_kind: F-LMM's prompt from a map that also covers objects of other kinds,
    without / with the object's kind token (the gap is what the kind token tells the refiner).
    """
    was_training = sam.training
    sam.eval()
    refiner = SamRefiner(sam, backend=None)
    names = ("box", "coarse_box", "coarse_input", "confused_box", "confused_kind")
    stats = {k: {"ious": [], "inter": 0, "union": 0} for k in names}
    for item in data:
        scene = item.scene
        image_hw = scene.image.shape[:2]
        x, input_hw = refiner.preprocess(scene.image)
        embedding = sam.image_encoder(x)
        gt = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        low_box, _ = decode(sam, embedding, boxes=refiner.transform.apply_boxes_torch(boxes, image_hw))
        low_coarse, _ = decode(sam, embedding, boxes=refiner.boxes(item.coarse, image_hw),
                               masks=refiner.dense_prompts(item.coarse, input_hw))
        confused = {"boxes": refiner.boxes(item.confused, image_hw),
                    "masks": refiner.dense_prompts(item.confused, input_hw)}
        low_confused, _ = decode(sam, embedding, **confused)
        low_kind, _ = decode(sam, embedding, **confused, tokens=kind_prompts([o.kind for o in scene.objects]))
        predictions = {
            "box": sam.postprocess_masks(low_box, input_hw, image_hw)[:, 0] > 0,
            "coarse_box": sam.postprocess_masks(low_coarse, input_hw, image_hw)[:, 0] > 0,
            "coarse_input": F.interpolate(item.coarse[:, None], size=image_hw, mode="bilinear")[:, 0] > 0,
            "confused_box": sam.postprocess_masks(low_confused, input_hw, image_hw)[:, 0] > 0,
            "confused_kind": sam.postprocess_masks(low_kind, input_hw, image_hw)[:, 0] > 0,
        }
        for kind, pred in predictions.items():
            s = stats[kind]
            s["ious"] += binary_iou(pred, gt).tolist()
            s["inter"] += int((pred & gt).sum())
            s["union"] += int((pred | gt).sum())
    sam.train(was_training)
    result = {}
    for kind, s in stats.items():
        result[f"{kind}_miou"] = float(np.mean(s["ious"])) if s["ious"] else 0.0
        result[f"{kind}_ciou"] = s["inter"] / max(1, s["union"])
    result["objects"] = len(stats["box"]["ious"])
    return result


def scenes_fingerprint() -> str:
    """A hash of a few generated scenes: tells whether a model was trained on today's scene generator."""
    digest = hashlib.sha256()
    for seed in split_seeds("val", 3):
        for size in EVAL_SIZES:
            scene = generate_scene(seed, size)
            digest.update(scene.image.tobytes())
            for obj in scene.objects:
                digest.update(np.packbits(obj.mask).tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------------- saving, loading

def save_tabletop_sam(sam: Sam, arch: SamArch, out_dir: str | Path) -> None:
    """`sam.safetensors` (the whole Sam state_dict) and `sam_arch.yaml` in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    partial = out_dir / (SAM_FILE + ".partial")   # never leave a half-written file under the real name
    save_file({k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}, str(partial),
              metadata={"format": "segment_anything.Sam", "arch": json.dumps(arch.to_dict())})
    partial.replace(out_dir / SAM_FILE)
    (out_dir / ARCH_FILE).write_text(yaml.safe_dump(arch.to_dict(), sort_keys=False))


def load_tabletop_sam(out_dir: str | Path) -> Sam:
    """Rebuild the Sam saved by `save_tabletop_sam` (eval mode)."""
    out_dir = Path(out_dir)
    arch = SamArch.from_dict(yaml.safe_load((out_dir / ARCH_FILE).read_text()))
    sam = build_sam(arch)
    report = load_sam_weights(sam, out_dir / SAM_FILE)
    if report.missing or report.unexpected:
        raise ValueError(f"{out_dir / SAM_FILE} does not match {out_dir / ARCH_FILE}: {report}")
    return sam


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as flat named tensors, so that checkpoints are safetensors too."""
    return {f"{index}.{name}": value.contiguous() for index, state in optimizer.state_dict()["state"].items()
            for name, value in state.items()}


def _load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _save_checkpoint(ckpt_dir: Path, sam: Sam, kind_prompts: KindPrompts, optimizer, step: int,
                     history: list[dict], fingerprint: str) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files = {"sam.safetensors": sam.state_dict(), KIND_FILE: kind_prompts.state_dict(),
             "optimizer.safetensors": _optimizer_tensors(optimizer)}
    for name, tensors in files.items():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, ckpt_dir / (name + ".tmp"))
    for name in files:
        (ckpt_dir / (name + ".tmp")).replace(ckpt_dir / name)
    (ckpt_dir / "state.json").write_text(json.dumps({"step": step, "history": history, "scenes": fingerprint}))


# --------------------------------------------------------------------------------------------- training

def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))


def train(args: argparse.Namespace, arch: SamArch = TABLETOP_SAM) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out / "checkpoint"
    sam = build_sam(arch)
    kind_prompts = KindPrompts(arch.prompt_embed_dim)
    trained = nn.ModuleList([sam, kind_prompts])
    refiner = SamRefiner(sam, backend=None)
    optimizer = make_optimizer(trained, args.lr, args.weight_decay)
    start, history, fingerprint = 0, [], scenes_fingerprint()
    if (ckpt_dir / "state.json").is_file() and not args.restart:
        state = json.loads((ckpt_dir / "state.json").read_text())
        if state.get("scenes") != fingerprint:
            raise SystemExit(f"{ckpt_dir} was trained on other scenes (the scene generator changed since): "
                             "start again with --restart")
        if not (ckpt_dir / KIND_FILE).is_file():
            raise SystemExit(f"{ckpt_dir} has no {KIND_FILE} (it was trained before kind prompts): "
                             "start again with --restart")
        load_sam_weights(sam, ckpt_dir / "sam.safetensors")
        kind_prompts.load_state_dict(load_file(ckpt_dir / KIND_FILE))
        _load_optimizer_tensors(optimizer, load_file(ckpt_dir / "optimizer.safetensors"))
        start, history = state["step"], state["history"]
        print(f"resuming from step {start}")
    val = eval_set(args.eval_scenes)
    trained.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train sam", mininterval=10)
    # elapsed_s counts training time over resumed runs too
    ema, window = None, []
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for step in bar:
        lr = lr_at(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        samples = training_samples(step, args.seed, args.images_per_step)
        loss, parts = training_loss(sam, kind_prompts, refiner, samples, args.kind_probe_weight)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained.parameters(), args.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        window.append({"loss": loss.item(), "grad_norm": grad_norm, **parts})
        bar.set_postfix(loss=f"{ema:.3f}", iou=f"{parts['train_iou']:.2f}", lr=f"{lr:.1e}", refresh=False)
        done = step + 1 == args.steps
        if (step + 1) % args.log_every == 0 or done:  # the log keeps window means, so it stays small
            record = {"step": step + 1, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 1)}
            record.update({k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]})
            window = []
            if (step + 1) % args.eval_every == 0 or done:
                record["val"] = {k: round(v, 4) for k, v in evaluate(sam, kind_prompts, val).items()}
                tqdm.write(f"step {step + 1}: loss {ema:.3f} val {record['val']}")
            history.append(record)
        if (step + 1) % args.save_every == 0 or done:
            _save_checkpoint(ckpt_dir, sam, kind_prompts, optimizer, step + 1, history, fingerprint)
    trained.eval()
    final = history[-1]["val"] if history and "val" in history[-1] else evaluate(sam, kind_prompts, val)
    save_tabletop_sam(sam, arch, out)
    save_file({k: v.detach().contiguous() for k, v in kind_prompts.state_dict().items()}, str(out / KIND_FILE))
    log = {"arch": arch.to_dict(), "args": vars(args), "steps": args.steps, "scenes": fingerprint,
           "train_wall_s": history[-1]["elapsed_s"] if history else 0.0,
           "val": final, "history": history}
    (out / LOG_FILE).write_text(json.dumps(log, indent=1))
    print(f"saved {out / SAM_FILE}")
    return final


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    sam = load_tabletop_sam(args.out)
    kind_prompts = KindPrompts(sam.prompt_encoder.embed_dim)
    kind_prompts.load_state_dict(load_file(Path(args.out) / KIND_FILE))
    log_path = Path(args.out) / LOG_FILE
    if log_path.is_file() and json.loads(log_path.read_text()).get("scenes") != scenes_fingerprint():
        print(f"warning: {args.out} was trained on other scenes (the scene generator changed since)")
    t0 = time.perf_counter()
    result = evaluate(sam, kind_prompts, eval_set(args.eval_scenes, args.split))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=1))
    print(f"{args.eval_scenes} {args.split} scenes in {time.perf_counter() - t0:.1f} s")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True,
                   help="run directory: sam.safetensors, sam_arch.yaml, train_log.json, checkpoint/")
    p.add_argument("--eval", action="store_true", help="only evaluate the saved model in OUT")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--steps", type=int, default=7000)
    p.add_argument("--images-per-step", type=int, default=1)
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clipping")
    p.add_argument("--kind-probe-weight", type=float, default=KIND_PROBE_WEIGHT,
                   help="weight of the per-cell kind probe's loss on the image embedding (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=500, help="a multiple of --log-every")
    p.add_argument("--eval-scenes", type=int, default=60)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run_eval(args) if args.eval else train(args)
    if not args.eval:
        print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=1))


if __name__ == "__main__":
    main()
