"""Benchmark: what the instance filter's look at each instance (grounding/kind_check.py) costs and buys.

On held-out instance scenes of the embedded model (2-4 objects of one kind beside others, `trust_eval.instance_scene`)
each frame is encoded once, then "pick up <the plural phrase>" runs through `pipe.run` in three ways, interleaved
per scene so that a change of machine load hits all alike:
  no filter     every instance SAM separates is kept (a bundle without `instances:`);
  mask filter   the filter fitted on the mask features alone (refitted here on --fit validation scenes);
  + kind check  the bundle's filter, which also shows each instance alone to the LMM (`lmm_kind`).
Per way: the median and 90th percentile of the instruction's wall time, the instances it published, and their
precision / recall at IoU 0.5 against the true masks (as `trust_eval evaluate` counts them).

    python bench/instances.py                    # 60 test scenes, filter refitted on 100 validation scenes
    python bench/instances.py --scenes 5 --fit 10    # smoke run
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.instance_filter import InstanceCalibration
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.tabletop.instance_calibration import collect, fit_filter
from flmm_ros.tabletop.scenes import split_seeds
from flmm_ros.tabletop.track_eval import EMBEDDED
from flmm_ros.tabletop.trust_eval import SIZES, VERB, instance_scene, matched


def mask_filter(pipe: GroundingPipeline, scenes: int) -> InstanceCalibration:
    """The filter the bundle would have without `lmm_kind`: fitted on the same kind of validation scenes."""
    bundle_filter = pipe.instance_calibration
    rows, labels, named = collect(pipe, "val", scenes)
    pipe.instance_calibration = bundle_filter
    return fit_filter(rows, labels, named)[0]              # no kind_check: the mask features only


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=60, help="test instance scenes")
    parser.add_argument("--fit", type=int, default=100, help="validation scenes for the mask-only filter")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED)))
    ways = {"no filter": None, "mask filter": mask_filter(pipe, args.fit), "+ kind check": pipe.instance_calibration}
    times = {w: [] for w in ways}
    counts = {w: {"tp": 0, "pred": 0, "gt": 0} for w in ways}
    for i, seed in enumerate(split_seeds("test", args.scenes)):
        scene, kind, phrase = instance_scene(seed, SIZES[i % 2])
        if phrase is None:
            continue
        frame = pipe.encode(scene.image)
        pipe.run(frame, f"{VERB} {phrase}")          # the frame's first pass (LMM prefix) is not the filter's cost
        targets = [o.mask for o in scene.objects if o.kind == kind]
        for way, calibration in ways.items():
            pipe.instance_calibration = calibration
            t = time.perf_counter()
            result = pipe.run(frame, f"{VERB} {phrase}")
            times[way].append(time.perf_counter() - t)
            preds = [o.mask > 0 for o in result.objects if o.found]
            for key, value in (("tp", matched(preds, targets)), ("pred", len(preds)), ("gt", len(targets))):
                counts[way][key] += value
    n = len(times["no filter"])
    print(f"\ntabletop-tiny, {n} test instance scenes (256x256 and 640x480), {args.threads} torch thread(s), "
          f"cached frames; \"{VERB} <plural phrase>\" through pipe.run\n")
    print("| way | median ms | p90 ms | x no filter | instances / scene | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    base = statistics.median(times["no filter"])
    for way in ways:
        ms = np.asarray(times[way]) * 1000
        c = counts[way]
        print(f"| {way} | {np.median(ms):.1f} | {np.percentile(ms, 90):.1f} | {np.median(ms) / 1000 / base:.2f} | "
              f"{c['pred'] / max(1, n):.2f} | {c['tp'] / max(1, c['pred']):.3f} | {c['tp'] / max(1, c['gt']):.3f} |")


if __name__ == "__main__":
    main()
