"""Evaluate grounding: cIoU (sum I / sum U) and gIoU (mean IoU) of coarse and refined masks.

Predictions as in F-LMM's RefCOCO script: logits resized bilinearly to the ground-truth size,
sigmoid > 0.5. One expression per object ('select_first'), all of an image's expressions in one pass.

    python -m flmm_ros.grounding.training.evaluate --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --data tabletop --split test --count 500
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .metrics import IoUMeter


def _predictions(logits: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    if tuple(logits.shape[-2:]) != tuple(image_hw):
        logits = F.interpolate(logits[None].float(), size=image_hw, mode="bilinear")[0]
    return (logits.sigmoid() > 0.5).cpu().numpy()


def _add(meters: dict[str, IoUMeter], logits, targets: np.ndarray, image_hw, cases=None) -> None:
    """Scores under "coarse" / "refined", and with cases also under "refined | <case>"."""
    for name, value in (("coarse", logits.coarse), ("refined", logits.refined)):
        if value is None:
            continue
        for k, (pred, target) in enumerate(zip(_predictions(value.detach(), image_hw), targets)):
            meters.setdefault(name, IoUMeter()).add(pred, target)
            if cases:
                meters.setdefault(f"{name} | {cases[k]}", IoUMeter()).add(pred, target)


def scores_of(meters: dict[str, IoUMeter]) -> dict[str, dict[str, float]]:
    return {k: {"ciou": m.ciou, "giou": m.giou, "count": m.count} for k, m in meters.items()}


def format_scores(scores: dict) -> str:
    """One line for the overall scores (training logs); one line per group when there are cases."""
    sep = "\n" if any(" | " in k for k in scores) else "  "
    return sep.join(f"{k}: cIoU {s['ciou']:.3f} gIoU {s['giou']:.3f}" for k, s in sorted(scores.items()))


@torch.no_grad()
def evaluate_cached(pipe, cache: list) -> dict:
    """On cached frozen features (used during training)."""
    meters: dict[str, IoUMeter] = {}
    for sample in cache:
        logits = pipe.head_logits(sample.phrase_pass(), sample.prepared, sample.sam_encoding())
        _add(meters, logits, sample.masks().numpy().astype(bool), sample.image_hw)
    return scores_of(meters)


@torch.no_grad()
def evaluate(pipe, samples, count: int | None = None, by_case: bool = False) -> dict:
    """End to end through the pipeline (encode + phrase pass + head), the product path.
    With by_case, also the scores of each group of phrases named in the samples' `cases`."""
    meters: dict[str, IoUMeter] = {}
    for sample in tqdm(samples, total=count, desc="eval", unit="img"):
        frame = pipe.encode(sample.image)
        logits = pipe.ground_logits(frame, sample.phrases)
        _add(meters, logits, np.stack(sample.masks).astype(bool), frame.image_hw, sample.cases if by_case else None)
    return scores_of(meters)


def whole_image_baseline(samples) -> dict:
    """Every mask = the whole image: the score of knowing nothing about where the object is."""
    meter = IoUMeter()
    for sample in samples:
        for mask in sample.masks:
            meter.add(np.ones_like(mask, dtype=bool), mask)
    return scores_of({"whole_image": meter})


def main(argv=None) -> None:
    from ..config import PipelineConfig
    from ..pipeline import GroundingPipeline
    from .data import refcoco_samples, tabletop_samples

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model bundle (or LMM with --mask-head/--sam-checkpoint)")
    parser.add_argument("--mask-head", default="")
    parser.add_argument("--sam-checkpoint", default="")
    parser.add_argument("--sam-type", default="vit_l")
    parser.add_argument("--data", default="tabletop", help="'tabletop' or a RefCOCO-format directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--count", type=int, default=500, help="tabletop: number of scenes")
    parser.add_argument("--baseline", choices=["whole-image"], help="score a trivial baseline instead of a model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print scores as JSON")
    parser.add_argument("--by-case", action="store_true",
                        help="tabletop: also score objects by what else is in the scene (same colour, same kind)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def samples():
        if args.data == "tabletop":
            return tabletop_samples(args.split, args.count, expression="first")
        return refcoco_samples(args.data, args.split)

    if args.baseline:
        scores = whole_image_baseline(samples())
    else:
        pipe = GroundingPipeline.from_config(PipelineConfig(model=args.model, mask_head=args.mask_head,
                                                            sam_checkpoint=args.sam_checkpoint,
                                                            sam_type=args.sam_type, answer=False))
        scores = evaluate(pipe, samples(), args.count if args.data == "tabletop" else None, by_case=args.by_case)
    print(json.dumps(scores, indent=1) if args.json else format_scores(scores))


if __name__ == "__main__":
    main()
