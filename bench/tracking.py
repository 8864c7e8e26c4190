"""Benchmark: the per-frame cost of tracking grounded objects, against re-grounding them every frame.

One run, same frames (a 640x480 camera pan from `tabletop/sequences.py`), same objects:
  track      `ObjectTracker.update` (regrounding off): the SAM image encoder once, then per object template
             matching, one prompt-decoder pass and post-processing (cleaning, lost rule), plus 3D per object
             (`geometry3d.object_pose_from_depth` on a synthetic aligned depth image). The lost rule's thresholds are
             set to 0, so that every object is followed on every frame;
  re-ground  the slow way: per frame `pipe.encode` (vision tower, LMM prefix, SAM encoder) and
             `pipe.ground(phrases)` (phrase pass, mask head, SAM decoder), plus the same 3D.
Tracking runs on each SAM backend that runs here (torch; ONNX Runtime on a CPU) with 1 and 2 threads
(torch threads, and ONNX Runtime intra-op threads). Medians over --repeats frames after --warmup.

    python bench/tracking.py                                       # embedded tabletop-tiny on this CPU
    python bench/tracking.py --config llava15-7b --device cuda     # LLaVA-1.5-7B + SAM ViT-L shapes (GPU)
    python bench/tracking.py --config random-small --repeats 3     # smoke run (CI)

The objects start from the true masks of frame 0 with the phrase tokens of a grounding pass, so random-weight
configurations track real objects too (the cost does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline import RANDOM_CONFIGS, build  # noqa: E402  (bench/pipeline.py: the same pipelines)

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_from_depth  # noqa: E402
from flmm_ros.grounding.tracking import ObjectTracker, TrackerConfig  # noqa: E402
from flmm_ros.grounding.types import GroundingError  # noqa: E402
from flmm_ros.tabletop.sequences import generate_sequence  # noqa: E402

SIZE = (480, 640)
SEED = 2_500_000                     # a test-range seed: a pan over objects with unique names
INTRINSICS = CameraIntrinsics(525.0, 525.0, 319.5, 239.5, SIZE[1], SIZE[0])
STAGES = ("sam_encoder", "motion", "sam_decoder", "post", "3d")


def scene_frames(count: int, objects: int):
    """A pan sequence with at least `objects` named targets, its frames and synthetic depth images."""
    for seed in range(SEED, SEED + 100):
        seq = generate_sequence(seed, SIZE, "pan", length=count)
        if len(seq.targets) >= objects:
            break
    else:
        raise RuntimeError(f"no pan sequence with {objects} named objects")
    frames = list(seq.frames())
    depths = []
    rng = np.random.default_rng(0)
    for f in frames:                 # table at 1.2 m, objects 0.3 m nearer, 2 mm noise
        depth = np.full(SIZE, 1.2, np.float32) - 0.3 * f.masks.any(0) + rng.normal(0, 0.002, SIZE)
        depths.append(depth.astype(np.float32))
    return seq, frames, depths


def start_objects(pipe, seq, frame0, count: int):
    grounded = pipe.ground(pipe.encode(frame0.image), list(seq.phrases[:count]))
    return [replace(o, mask=frame0.masks[k].astype(np.uint8) * 255) for o, k in zip(grounded, seq.targets)]


def poses(masks, depth) -> float:
    start = time.perf_counter()
    for mask in masks:
        if mask.any():
            object_pose_from_depth(mask, depth, INTRINSICS)
    return time.perf_counter() - start


def time_tracking(pipe, backend: str, threads: int, frames, depths, objects, warmup: int) -> dict:
    torch.set_num_threads(threads)
    # The lost rule's thresholds off: every object is followed on every frame (the cost of a tracked object).
    cfg = TrackerConfig(backend=backend, threads=threads, regrounding="off", min_area=0.0, min_confidence=0.0,
                        min_colour_similarity=0.0, max_area_change=1e6)
    tracker = ObjectTracker(pipe, cfg)
    tracker.start(objects, image=frames[0].image)
    totals, updates, stages = [], [], {s: [] for s in STAGES}
    for i, (f, depth) in enumerate(zip(frames[1:], depths[1:])):
        start = time.perf_counter()
        update = tracker.update(f.image)
        updated = time.perf_counter()
        three_d = poses([o.mask for o in update.objects], depth)
        if i >= warmup:
            totals.append(time.perf_counter() - start)
            updates.append(updated - start)
            for s in STAGES:
                stages[s].append(three_d if s == "3d" else update.timings.get(s, 0.0))
    lost = sum(o.state == "lost" for o in update.objects)
    return {"backend": tracker.backend.name, "threads": threads, "total_ms": 1e3 * statistics.median(totals),
            "update_ms": 1e3 * statistics.median(updates),
            "stage_ms": {s: 1e3 * statistics.median(v) for s, v in stages.items()}, "lost_at_end": lost}


def time_reground(pipe, threads: int, frames, depths, phrases, warmup: int) -> dict:
    torch.set_num_threads(threads)
    totals, stages = [], {"encode": [], "ground": [], "3d": []}
    for i, (f, depth) in enumerate(zip(frames[1:], depths[1:])):
        start = time.perf_counter()
        frame = pipe.encode(f.image)
        encoded = time.perf_counter()
        objects = pipe.ground(frame, phrases)
        grounded = time.perf_counter()
        three_d = poses([o.mask for o in objects], depth)
        if i >= warmup:
            totals.append(time.perf_counter() - start)
            stages["encode"].append(encoded - start)
            stages["ground"].append(grounded - encoded)
            stages["3d"].append(three_d)
    return {"threads": threads, "total_ms": 1e3 * statistics.median(totals),
            "stage_ms": {s: 1e3 * statistics.median(v) for s, v in stages.items()}}


def bench(config: str, device: str, dtype: str, counts: list[int], threads: list[int], repeats: int,
          warmup: int) -> dict:
    pipe = build(config, device, dtype)[0]
    backends = ["torch", "onnxruntime"]
    results = {"config": config, "device": device, "size": SIZE, "repeats": repeats, "runs": []}
    for count in counts:
        seq, frames, depths = scene_frames(repeats + warmup + 1, count)
        objects = start_objects(pipe, seq, frames[0], count)
        for n in threads if device == "cpu" else [1]:
            reground = time_reground(pipe, n, frames, depths, list(seq.phrases[:count]), warmup)
            seen = set()
            for backend in backends:
                try:
                    run = time_tracking(pipe, backend, n, frames, depths, objects, warmup)
                except GroundingError as e:
                    print(f"{backend}: skipped ({e})")
                    continue
                if run["backend"] in seen:      # fell back to a backend already measured
                    continue
                seen.add(run["backend"])
                run.update(objects=count, reground_ms=reground["total_ms"],
                           speedup=reground["total_ms"] / run["total_ms"])
                results["runs"].append(run)
            results["runs"].append({"backend": "re-ground", "objects": count, **reground})
    return results


def print_table(r: dict) -> None:
    gpu = torch.cuda.get_device_name(r["device"]) if r["device"].startswith("cuda") else "CPU"
    print(f"\n{r['config']} on {r['device']} ({gpu}), {r['size'][1]}x{r['size'][0]} camera pan, "
          f"median of {r['repeats']} frames")
    print("| objects | way | threads | SAM encoder | motion | SAM decoder | post | update | 3D | total ms / frame | "
          "vs re-ground |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for run in r["runs"]:
        s = run["stage_ms"]
        if run["backend"] == "re-ground":
            print(f"| {run['objects']} | re-ground every frame | {run['threads']} | (encode {s['encode']:.1f}) | - | "
                  f"(ground {s['ground']:.1f}) | - | {s['encode'] + s['ground']:.1f} | {s['3d']:.1f} | "
                  f"{run['total_ms']:.1f} | 1.00x |")
            continue
        print(f"| {run['objects']} | track, {run['backend']} | {run['threads']} | {s['sam_encoder']:.1f} | "
              f"{s['motion']:.1f} | {s['sam_decoder']:.1f} | {s['post']:.1f} | {run['update_ms']:.1f} | "
              f"{s['3d']:.1f} | {run['total_ms']:.1f} | {run['speedup']:.1f}x faster |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tabletop-tiny", choices=["tabletop-tiny", *RANDOM_CONFIGS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="LMM dtype of the random configs (default: float16 on "
                        "CUDA, float32 on CPU)")
    parser.add_argument("--objects", default="1,2", help="comma-separated object counts")
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available on this machine")
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    result = bench(args.config, args.device, dtype, [int(c) for c in args.objects.split(",")],
                   [int(t) for t in args.threads.split(",")], args.repeats, args.warmup)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
