"""Benchmark: what checking nearness relations (grounding/relations.py) costs and buys.

On held-out ordinary scenes of the embedded model, every nearness expression of the scene ("the ball next to the
bowl": those that hold, and the one no object satisfies; `relation_calibration.relation_phrases`) runs as "pick up
<phrase>" through `pipe.run` in two ways, interleaved per phrase so that a change of machine load hits both alike:
  unchecked   the bundle without `relations:` (the phrase's presence is that of the object it names);
  checked     the bundle's relation calibration (the anchor and the target among kind-checked instances).
Per way: the median and 90th percentile of the instruction's wall time, how often a relation that holds is found
and its mask is the named object (IoU >= 0.5), and how often one that no object satisfies is judged present.

    python bench/relations.py                 # 150 test scenes
    python bench/relations.py --scenes 5      # smoke run
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.tabletop.relation_calibration import relation_phrases
from flmm_ros.tabletop.scenes import generate_scene, split_seeds
from flmm_ros.tabletop.track_eval import EMBEDDED
from flmm_ros.tabletop.trust_eval import SIZES, VERB


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=150, help="test scenes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED)))
    ways = {"unchecked": None, "checked": pipe.relation_calibration}
    stats = {w: {"ms": [], "held_found": 0, "held_on_object": 0, "not_held_found": 0} for w in ways}
    held = not_held = 0
    for i, seed in enumerate(split_seeds("test", args.scenes)):
        scene = generate_scene(seed, SIZES[i % 2])
        items = relation_phrases(scene)
        if not items:
            continue
        frame = pipe.encode(scene.image)
        pipe.run(frame, f"{VERB} {items[0][0]}")       # the frame's first pass (LMM prefix) is not the check's cost
        for phrase, holds in items:
            held, not_held = held + holds, not_held + (not holds)
            target = next((o.mask for o in scene.objects if phrase in o.expressions), None)
            for way, calibration in ways.items():
                pipe.relation_calibration = calibration
                t = time.perf_counter()
                result = pipe.run(frame, f"{VERB} {phrase}")
                s = stats[way]
                s["ms"].append((time.perf_counter() - t) * 1000)
                obj = result.objects[0]
                if holds:
                    s["held_found"] += obj.found
                    s["held_on_object"] += obj.found and iou(obj.mask > 0, target) >= 0.5
                else:
                    s["not_held_found"] += obj.found
    print(f"\ntabletop-tiny, {args.scenes} test scenes (256x256 and 640x480), {held} relations that hold and "
          f"{not_held} that no object satisfies, {args.threads} torch thread(s), cached frames; \"{VERB} <phrase>\" "
          "through pipe.run\n")
    print("| way | median ms | p90 ms | x unchecked | holds: found | holds: found, on the named object | "
          "not satisfied: found |")
    print("|---|---|---|---|---|---|---|")
    base = float(np.median(stats["unchecked"]["ms"])) if stats["unchecked"]["ms"] else float("nan")
    for way, s in stats.items():
        ms = np.asarray(s["ms"]) if s["ms"] else np.asarray([float("nan")])
        print(f"| {way} | {np.median(ms):.1f} | {np.percentile(ms, 90):.1f} | {np.median(ms) / base:.2f} | "
              f"{s['held_found'] / max(1, held):.3f} | {s['held_on_object'] / max(1, held):.3f} | "
              f"{s['not_held_found'] / max(1, not_held):.3f} |")


if __name__ == "__main__":
    main()
