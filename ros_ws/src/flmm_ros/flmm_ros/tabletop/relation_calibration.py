"""Fit a bundle's relation calibration (grounding/relations.py) on held-out tabletop scenes.

    python -m flmm_ros.tabletop.relation_calibration --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --split val --count 600 --write

On each ordinary scene every nearness expression that holds ("the ball next to the bowl": the only ball near that
object, language.referring_expressions) is labelled 1, and the scene's relation that no object satisfies (every ball
far from the bowl, language.absent_expressions) 0. Each is checked as the node does it (`near_relation`: the anchor
and the target among the kind-checked instances of their kinds) and the logistic regression from the centre distance
to the label is fitted. Phrases with no distance (no anchor, or no target apart from it) are left out of the fit;
the node judges them absent, and `metrics` counts them. `--write` stores it under `relations` in the bundle's
flmm_bundle.yaml; `trust_eval evaluate` then measures it on the test split.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..grounding.bundle import BUNDLE_FILE
from ..grounding.config import PipelineConfig
from ..grounding.pipeline import GroundingPipeline
from ..grounding.relations import RelationCalibration, parse_near
from ..grounding.track_cues import mask_iou
from .scenes import generate_scene, split_seeds
from .trust_eval import SIZES, roc_auc, write_calibration


def relation_phrases(scene) -> list[tuple[str, int]]:
    """(phrase, 1 if the relation holds else 0) of every nearness expression of an ordinary scene."""
    held = [(e, 1) for o in scene.objects for e in o.expressions if parse_near(e)]
    return held + [(a.expression, 0) for a in scene.absent if a.reason == "relation" and parse_near(a.expression)]


def collect(pipe: GroundingPipeline, split: str, count: int) -> tuple[list[float | None], list[int], dict]:
    """The checked distance (None: none) and the label of every relation phrase of `count` scenes; and how often,
    for relations that hold, the object the check picks and F-LMM's mask of the phrase are the named object (IoU
    >= 0.5)."""
    distances, labels, on_target = [], [], {"checked": 0, "phrase_mask": 0}
    for i, seed in enumerate(tqdm(split_seeds(split, count), desc="relations", unit="scene")):
        scene = generate_scene(seed, SIZES[i % 2])
        items = relation_phrases(scene)
        if not items:
            continue
        frame = pipe.encode(scene.image)
        for phrase, label in items:
            with torch.no_grad():
                obj = pipe._objects([phrase], pipe.ground_logits(frame, [phrase]), frame.image_hw)[0]
                _, found = pipe.near_relation(frame, parse_near(phrase), obj)
            instance, distance = found[0] if found else (None, None)
            distances.append(distance)
            labels.append(label)
            if label:
                target = next(o.mask for o in scene.objects if phrase in o.expressions)
                on_target["phrase_mask"] += int(mask_iou(obj.mask > 0, target) >= 0.5)
                on_target["checked"] += int(instance is not None and mask_iou(instance.mask, target) >= 0.5)
    held = max(1, sum(labels))
    return distances, labels, {k: round(v / held, 4) for k, v in on_target.items()}



def calibrate(pipe: GroundingPipeline, split: str, count: int) -> RelationCalibration:
    distances, labels, on_target = collect(pipe, split, count)
    measured = [(d, y) for d, y in zip(distances, labels) if d is not None]
    first = split_seeds(split, 1)[0]
    source = (f"tabletop {split} scenes from seed {first}: {count} scenes, {len(labels)} relation phrases "
              f"({sum(labels)} that hold)")
    fitted = RelationCalibration.fit([d for d, _ in measured], [y for _, y in measured], source)
    probs = [0.0 if d is None else fitted.probability(d) for d in distances]
    held = [p for p, y in zip(probs, labels) if y]
    not_held = [p for p, y in zip(probs, labels) if not y]
    metrics = {"roc_area": roc_auc(probs, labels),
               "holds_judged_false": sum(p < 0.5 for p in held) / max(1, len(held)),
               "not_held_judged_true": sum(p >= 0.5 for p in not_held) / max(1, len(not_held)),
               "no_distance": {"holds": sum(d is None for d, y in zip(distances, labels) if y),
                               "not_held": sum(d is None for d, y in zip(distances, labels) if not y)},
               "holds_on_named_object": on_target}
    return RelationCalibration(fitted.features, fitted.mean, fitted.scale, fitted.weights, fitted.bias, source,
                               {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model bundle")
    parser.add_argument("--split", default="val")
    parser.add_argument("--count", type=int, default=600, help="ordinary scenes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", action="store_true", help="store it in the bundle's flmm_bundle.yaml")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    calibration = calibrate(GroundingPipeline.from_config(PipelineConfig(model=args.model)), args.split, args.count)
    print(yaml.safe_dump(calibration.to_spec(), sort_keys=False))
    if args.write:
        write_calibration(Path(args.model), calibration, "relations")
        print(f"written to {Path(args.model) / BUNDLE_FILE}")


if __name__ == "__main__":
    main()
