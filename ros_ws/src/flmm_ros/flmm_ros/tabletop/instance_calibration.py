"""Fit a bundle's instance filter (grounding/instance_filter.py) on held-out instance scenes.

    python -m flmm_ros.tabletop.instance_calibration --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --split val --count 300 --write

On each instance scene (2-4 objects of one kind beside others, `trust_eval.instance_scene`) the plural phrase that
names them all is grounded and split as the node does it, with the filter open (every instance kept, masks cut at
seed regions of another colour). An instance is labelled 1 when it is matched one to one to a named object at
IoU >= 0.5. The logistic regression is fitted on them; the threshold is the one with the best F1 of instance
precision and recall over the scenes (recall counts every named object, also those no instance found). The filter
uses every feature, the LMM's look at each instance alone included (`lmm_kind`, kind_check.py, with its default
recipe); the scores of a fit on the mask features alone are stored beside it (`without_lmm_kind`).
`--write` stores it under `instances` in the bundle's flmm_bundle.yaml; `trust_eval evaluate` then measures it on
the test split.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm import tqdm

from ..grounding.bundle import BUNDLE_FILE
from ..grounding.config import PipelineConfig
from ..grounding.instance_filter import FEATURES, InstanceCalibration
from ..grounding.kind_check import KindCheck
from ..grounding.pipeline import GroundingPipeline
from .scenes import split_seeds
from .trust_eval import SIZES, instance_scene, matched_predictions, write_calibration

OPEN = InstanceCalibration(FEATURES, (0.0,) * len(FEATURES), (1.0,) * len(FEATURES), (0.0,) * len(FEATURES), 0.0,
                           threshold=0.0, source="open: keeps every instance", kind_check=KindCheck())


def matched_labels(masks: list[np.ndarray], targets: list[np.ndarray], min_iou: float = 0.5) -> list[int]:
    """1 for each mask `trust_eval.matched` counts (one to one with a target at IoU >= min_iou), else 0."""
    hits = matched_predictions(masks, targets, min_iou)
    return [int(i in hits) for i in range(len(masks))]


def collect(pipe: GroundingPipeline, split: str, count: int) -> tuple[list[dict], list[int], int]:
    """Features and labels of every instance, and the number of named objects."""
    pipe.instance_calibration = OPEN
    rows, labels, named = [], [], 0
    for i, seed in enumerate(tqdm(split_seeds(split, count), desc="instances", unit="scene")):
        scene, kind, phrase = instance_scene(seed, SIZES[i % 2])
        if phrase is None:
            continue
        frame = pipe.encode(scene.image)
        with torch.no_grad():
            instances = pipe.split_instances(frame, pipe.ground_logits(frame, [phrase]), 0, phrase)
        targets = [o.mask for o in scene.objects if o.kind == kind]
        named += len(targets)
        rows += [k.features for k in instances]
        labels += matched_labels([k.mask for k in instances], targets)
    return rows, labels, named


def best_threshold(probs: list[float], labels: list[int], named: int) -> tuple[float, dict]:
    """The threshold with the best F1 of instance precision (kept instances that are named objects) and recall
    (named objects kept), and those scores."""
    p, y = np.asarray(probs), np.asarray(labels, bool)
    best = (0.0, {"precision": 0.0, "recall": 0.0, "f1": -1.0})
    for t in np.round(np.arange(0.0, 1.0, 0.02), 2):
        keep = p >= t
        precision = float((keep & y).sum() / max(1, keep.sum()))
        recall = float((keep & y).sum() / max(1, named))
        f1 = 2 * precision * recall / max(1e-9, precision + recall)
        if f1 > best[1]["f1"]:
            best = (float(t), {"precision": precision, "recall": recall, "f1": f1})
    return best


def fit_filter(rows: list[dict], labels: list[int], named: int, source: str = "",
               kind_check: KindCheck | None = None) -> tuple[InstanceCalibration, dict]:
    """The filter fitted on `collect`'s instances (on every feature with `kind_check`, on the mask features without)
    at its best-F1 threshold, and its scores there."""
    fitted = InstanceCalibration.fit(rows, labels, source, kind_check)
    threshold, scores = best_threshold([fitted.probability(r) for r in rows], labels, named)
    return replace(fitted, threshold=threshold), scores


def calibrate(pipe: GroundingPipeline, split: str, count: int) -> InstanceCalibration:
    rows, labels, named = collect(pipe, split, count)
    first = split_seeds(split, 1)[0]
    source = (f"tabletop {split} instance scenes from seed {first}: {count} scenes, {len(labels)} instances "
              f"({sum(labels)} of named objects), {named} named objects")
    fitted, scores = fit_filter(rows, labels, named, source, KindCheck())
    _, mask_scores = fit_filter(rows, labels, named)
    open_scores = {"precision": sum(labels) / max(1, len(labels)), "recall": sum(labels) / max(1, named)}
    metrics = json.loads(json.dumps({"at_threshold": scores, "without_lmm_kind": mask_scores,
                                     "unfiltered": open_scores}))
    return replace(fitted, metrics=metrics)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model bundle")
    parser.add_argument("--split", default="val")
    parser.add_argument("--count", type=int, default=300, help="instance scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="store it in the bundle's flmm_bundle.yaml")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = calibrate(GroundingPipeline.from_config(PipelineConfig(model=args.model)), args.split, args.count)
    print(yaml.safe_dump(calibration.to_spec(), sort_keys=False))
    if args.write:
        write_calibration(Path(args.model), calibration, "instances")
        print(f"written to {Path(args.model) / BUNDLE_FILE}")


if __name__ == "__main__":
    main()
