"""Evaluate grounding as F-LMM does: RefCOCO-layout data, ReasonSeg, or the generated tabletop scenes.

RefCOCO protocol (F-LMM's scripts/multiprocess_eval_refcoco.py --concat with mmdet's RefCocoDataset,
`select_first`): per image, the first sentence (`raw`, lower-cased) of every referred object, all grounded in
one pass; logits resized bilinearly to the ground truth, sigmoid > 0.5; cIoU = sum I / sum U and gIoU = mean
IoU over objects (mmdet RefSegMetric; printed as fractions, the paper's table is x100). The original
`instances.json` + `refs(unc).p` / `refs(umd).p` are read directly (training/refcoco.py). Coarse (mask head)
scores are printed beside the refined (SAM) ones.

ReasonSeg protocol (F-LMM's scripts/reason_seg.py): reasoning mode on the first query of each image, the query
type from its `is_sentence`, the mask = refined logits > 0; gIoU / cIoU of per-image I and U divided by the
image's pixel count, overall and for long (sentence) and short queries.

    python -m flmm_ros.grounding.training.evaluate --model llava-hf/llava-1.5-7b-hf --device cuda \
        --mask-head frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth --sam-checkpoint sam_vit_l_0b3195.pth \
        --data data/coco/refcoco --split val

The generated tabletop scenes (the embedded model's quality numbers) are evaluated through
`python -m flmm_ros.tabletop.head_cli evaluate --model ros_ws/src/flmm_ros/models/tabletop_tiny --split test`.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import PipelineConfig
from ..pipeline import GroundingPipeline
from .data import refcoco_samples
from .metrics import IoUMeter, ReasonSegMeter
from .reasonseg import is_reasonseg_dir, reasonseg_samples
from .refcoco import TEXT_MODES


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


@torch.no_grad()
def evaluate_reasoning(pipe, samples, count: int | None = None) -> dict:
    """F-LMM's ReasonSeg evaluation through the pipeline's reasoning mode (one mask per image)."""
    meter = ReasonSegMeter()
    for sample in tqdm(samples, total=count, desc="reason_seg", unit="img"):
        frame = pipe.encode(sample.image)
        _, _, logits = pipe.reasoning_logits(frame, sample.query, sample.is_sentence)
        meter.add((logits.refined[0] > 0).cpu().numpy(), sample.target, sample.is_sentence)
    return meter.scores()


def whole_image_baseline(samples) -> dict:
    """Every mask = the whole image: the score of knowing nothing about where the object is."""
    meter = IoUMeter()
    for sample in samples:
        for mask in sample.masks:
            meter.add(np.ones_like(mask, dtype=bool), mask)
    return scores_of({"whole_image": meter})


def data_format(data: str) -> str:
    """refcoco | reasonseg, from what the --data directory holds."""
    if data == "tabletop":
        raise ValueError("--data tabletop: the generated scenes are evaluated with python -m flmm_ros.tabletop.head_cli "
                         "evaluate (the same options, without --data)")
    if not Path(data).is_dir():
        raise ValueError(f"--data {data!r} is not a directory")
    return "reasonseg" if is_reasonseg_dir(data) else "refcoco"


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options of every evaluation; where the samples come from is added by each front end (`main` here:
    RefCOCO and ReasonSeg; `flmm_ros.tabletop.head_cli`: the generated scenes)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model bundle (or LMM with --mask-head/--sam-checkpoint)")
    parser.add_argument("--mask-head", default="")
    parser.add_argument("--sam-checkpoint", default="")
    parser.add_argument("--sam-type", default="vit_l")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="LMM dtype (auto: bfloat16 on CUDA as F-LMM, else float32)")
    parser.add_argument("--split", default=None, help="tabletop: test; RefCOCO: val | testA | testB | test")
    parser.add_argument("--count", type=int, default=None, help="tabletop: number of scenes (500); else a limit")
    parser.add_argument("--baseline", choices=["whole-image"], help="score a trivial baseline instead of a model")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print scores as JSON")
    return parser


def run(args: argparse.Namespace, samples: Callable[[], Iterable], count: int | None, *, reasoning: bool = False,
        by_case: bool = False) -> dict:
    """Score the model of `args` (or the baseline) on `samples()` and print the scores."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.baseline:
        scores = whole_image_baseline(samples())
    else:
        pipe = GroundingPipeline.from_config(PipelineConfig(model=args.model, mask_head=args.mask_head,
                                                            sam_checkpoint=args.sam_checkpoint, sam_type=args.sam_type,
                                                            device=args.device, dtype=args.dtype, answer=False))
        if reasoning:
            scores = evaluate_reasoning(pipe, samples(), count)
        else:
            scores = evaluate(pipe, samples(), count, by_case=by_case)
    print(json.dumps(scores, indent=1) if args.json else format_scores(scores))
    return scores


def main(argv=None) -> None:
    parser = build_parser()
    parser.add_argument("--data", required=True,
                        help="a RefCOCO directory (instances.json + refs(unc).p) or a ReasonSeg split")
    parser.add_argument("--text-mode", default="select_first", choices=TEXT_MODES,
                        help="RefCOCO: F-LMM's select_first, or original (every sentence, the LISA-style count)")
    parser.add_argument("--refs", default="", help="RefCOCO refs file in --data (default: refs(unc).p, refs(umd).p)")
    parser.add_argument("--images", default="", help="RefCOCO images (default: <data>/images or <data>/../train2014)")
    parser.add_argument("--random", action="store_true", help="ReasonSeg: a random query per image (F-LMM --random)")
    args = parser.parse_args(argv)
    try:
        kind = data_format(args.data)
    except ValueError as e:
        parser.error(str(e))
    if args.baseline and kind == "reasonseg":
        parser.error("--baseline scores referring data (tabletop or RefCOCO), not ReasonSeg")

    def samples():
        if kind == "reasonseg":
            return reasonseg_samples(args.data, random_query=args.random, count=args.count)
        return refcoco_samples(args.data, args.split or "val", text_mode=args.text_mode, images_dir=args.images,
                               refs_file=args.refs, count=args.count)

    run(args, samples, args.count, reasoning=kind == "reasonseg")


if __name__ == "__main__":
    main()
