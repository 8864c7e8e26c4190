"""Measuring tabletop-tiny's SAM on held-out scenes: per-object IoU for each kind of prompt.

    python -m flmm_ros.tabletop.train_sam --out out/tabletop_sam --eval     # the saved model
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segment_anything.modeling import Sam

from ..grounding.sam.prompts import SamPromptGeometry
from .sam_model import KIND_FILE, LOG_FILE, KindPrompts, decode, load_tabletop_sam
from .sam_prompt_sampling import confusable_masks, simulate_coarse_logits
from .scenes import Scene, generate_scene, split_seeds

EVAL_SIZES = ((256, 256), (480, 640))


def binary_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU per mask of two boolean (N, ...) tensors (1 when both are empty)."""
    pred, target = pred.flatten(1), target.flatten(1)
    inter = (pred & target).sum(1).float()
    union = (pred | target).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass
class EvalScene:
    """A held-out scene with its fixed coarse maps."""
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
    prompts = SamPromptGeometry(sam)
    names = ("box", "coarse_box", "coarse_input", "confused_box", "confused_kind")
    stats = {k: {"ious": [], "inter": 0, "union": 0} for k in names}
    for item in data:
        scene = item.scene
        image_hw = scene.image.shape[:2]
        x, input_hw = prompts.preprocess(scene.image)
        embedding = sam.image_encoder(x)
        gt = torch.from_numpy(np.stack([o.mask for o in scene.objects]))
        boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32)
        low_box, _ = decode(sam, embedding, boxes=prompts.scale_boxes(boxes, image_hw))
        low_coarse, _ = decode(sam, embedding, boxes=prompts.boxes(item.coarse, image_hw),
                               masks=prompts.dense_prompts(item.coarse, input_hw))
        confused = {"boxes": prompts.boxes(item.confused, image_hw),
                    "masks": prompts.dense_prompts(item.confused, input_hw)}
        low_confused, _ = decode(sam, embedding, **confused)
        low_kind, _ = decode(sam, embedding, **confused, tokens=kind_prompts([o.kind for o in scene.objects]))
        predictions = {
            "box": prompts.postprocess(low_box, input_hw, image_hw)[:, 0] > 0,
            "coarse_box": prompts.postprocess(low_coarse, input_hw, image_hw)[:, 0] > 0,
            "coarse_input": F.interpolate(item.coarse[:, None], size=image_hw, mode="bilinear")[:, 0] > 0,
            "confused_box": prompts.postprocess(low_confused, input_hw, image_hw)[:, 0] > 0,
            "confused_kind": prompts.postprocess(low_kind, input_hw, image_hw)[:, 0] > 0,
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


def evaluate_saved(out_dir: str | Path, split: str = "val", scenes: int = 60) -> dict[str, float]:
    """`evaluate` on the model saved in `out_dir` (with its kind prompts); warns when the scenes changed since."""
    sam = load_tabletop_sam(out_dir)
    kind_prompts = KindPrompts(sam.prompt_encoder.embed_dim)
    kind_prompts.load_state_dict(load_file(Path(out_dir) / KIND_FILE))
    log_path = Path(out_dir) / LOG_FILE
    if log_path.is_file() and json.loads(log_path.read_text()).get("scenes") != scenes_fingerprint():
        print(f"warning: {out_dir} was trained on other scenes (the scene generator changed since)")
    t0 = time.perf_counter()
    result = evaluate(sam, kind_prompts, eval_set(scenes, split))
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=1))
    print(f"{scenes} {split} scenes in {time.perf_counter() - t0:.1f} s")
    return result
