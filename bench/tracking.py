"""Benchmark: the per-frame cost of tracking grounded objects, against re-grounding them every frame.

One run, same frames (a 640x480 camera pan from `tabletop/sequences.py`), same objects:
  track      `ObjectTracker.update` (regrounding off): the SAM image encoder once, then per object template
             matching, one prompt-decoder pass and post-processing (cleaning, lost rule), plus 3D per object
             (`geometry3d.object_pose_from_depth` on a synthetic aligned depth image). The lost rule's thresholds are
             set to 0, so that every object is followed on every frame;
  re-ground  the slow way: per frame `pipe.encode` (vision tower, LMM prefix, SAM encoder) and
             `pipe.ground(phrases)` (phrase pass, mask head, SAM decoder), plus the same 3D.
Tracking runs on each SAM backend that runs here (torch; ONNX Runtime on a CPU, with its default int8 image encoder
and with the FP32 one) with 1 and 2 threads (torch threads, and ONNX Runtime intra-op threads). Every way runs on
every frame in turn (interleaved, so that a change of machine load hits all alike); medians over --repeats frames
after --warmup, wall time and the process's CPU time.

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

from pipeline import RANDOM_CONFIGS, build  # bench/pipeline.py: the same pipelines

from flmm_ros.geometry3d import CameraIntrinsics, object_pose_from_depth
from flmm_ros.grounding.blas_threads import single_threaded_numpy_blas
from flmm_ros.grounding.tracking import ObjectTracker, TrackerConfig
from flmm_ros.grounding.types import GroundingError
from flmm_ros.tabletop.sequences import generate_sequence

SIZE = (480, 640)
SEED = 2_500_000                     # a test-range seed: a pan over objects with unique names
INTRINSICS = CameraIntrinsics(525.0, 525.0, 319.5, 239.5, SIZE[1], SIZE[0])
PAN_FRAMES = 64                      # the pan's length at least: its speed per frame does not depend on --repeats
STAGES = ("sam_encoder", "motion", "sam_decoder", "post", "3d")   # the tracker's timings, then 3D


def scene_frames(count: int, objects: int):
    """A pan sequence with at least `objects` named targets, its frames and synthetic depth images."""
    for seed in range(SEED, SEED + 100):
        seq = generate_sequence(seed, SIZE, "pan", length=max(count, PAN_FRAMES))
        if len(seq.targets) >= objects:
            break
    else:
        raise RuntimeError(f"no pan sequence with {objects} named objects")
    frames = list(seq.frames())[:count]
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


def tracker_for(pipe, backend: str, threads: int, frame0, objects, int8_encoder: bool = True) -> ObjectTracker:
    # The lost rule's thresholds off: every object is followed on every frame (the cost of a tracked object).
    cfg = TrackerConfig(backend=backend, threads=threads, int8_encoder=int8_encoder, regrounding="off", min_area=0.0,
                        min_confidence=0.0, min_colour_similarity=0.0, max_area_change=1e6)
    tracker = ObjectTracker(pipe, cfg)
    tracker.start(objects, image=frame0.image)
    return tracker


def track_step(tracker: ObjectTracker, image, depth) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    update = tracker.update(image)
    update_s = time.perf_counter() - start
    three_d = poses([o.mask for o in update.objects], depth)
    return {**{s: update.timings.get(s, 0.0) for s in STAGES[:-1]}, "3d": three_d, "update": update_s,
            "total": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def reground_step(pipe, phrases, image, depth) -> dict[str, float]:
    start, cpu = time.perf_counter(), time.process_time()
    frame = pipe.encode(image)
    encoded = time.perf_counter()
    objects = pipe.ground(frame, phrases)
    grounded = time.perf_counter()
    three_d = poses([o.mask for o in objects], depth)
    return {"encode": encoded - start, "ground": grounded - encoded, "update": grounded - start, "3d": three_d,
            "total": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def bench(config: str, device: str, dtype: str, counts: list[int], threads: list[int], repeats: int,
          warmup: int) -> dict:
    """Every way on every frame in turn (interleaved: a change of machine load hits all of them alike)."""
    pipe = build(config, device, dtype, "auto")[0]       # the pipeline as the node runs it by default
    results = {"config": config, "device": device, "size": SIZE, "repeats": repeats, "runs": []}
    for count in counts:
        seq, frames, depths = scene_frames(repeats + warmup + 1, count)
        objects = start_objects(pipe, seq, frames[0], count)
        phrases = list(seq.phrases[:count])
        for n in threads if device == "cpu" else [1]:
            torch.set_num_threads(n)
            ways = {}
            for backend, int8 in (("torch", False), ("onnxruntime", True), ("onnxruntime", False)):
                try:
                    tracker = tracker_for(pipe, backend, n, frames[0], objects, int8)
                except GroundingError as e:
                    print(f"{backend}: skipped ({e})")
                    continue
                name = f"{tracker.backend.name}, {tracker.backend.precision} encoder"
                if name not in ways:     # not a fallback to one already measured
                    ways[name] = tracker
            samples = {name: [] for name in [*ways, "re-ground"]}
            for i, (f, depth) in enumerate(zip(frames[1:], depths[1:])):
                for name, tracker in ways.items():
                    samples[name].append(track_step(tracker, f.image, depth))
                samples["re-ground"].append(reground_step(pipe, phrases, f.image, depth))
            medians = {name: {k: 1e3 * statistics.median(step[k] for step in steps[warmup:]) for k in steps[0]}
                       for name, steps in samples.items()}
            fastest = {name: 1e3 * min(step["update"] for step in steps[warmup:]) for name, steps in samples.items()}
            for name, ms in medians.items():
                lost = sum(o.state == "lost" for o in ways[name].tracks) if name in ways else 0
                results["runs"].append({"backend": name, "objects": count, "threads": n, "total_ms": ms["total"],
                                        "update_ms": ms["update"], "update_min_ms": fastest[name],
                                        "cpu_ms": ms["cpu"], "stage_ms": ms,
                                        "lost_at_end": lost,
                                        "speedup": medians["re-ground"]["total"] / ms["total"]})
    return results


def print_table(r: dict) -> None:
    gpu = torch.cuda.get_device_name(r["device"]) if r["device"].startswith("cuda") else "CPU"
    print(f"\n{r['config']} on {r['device']} ({gpu}), {r['size'][1]}x{r['size'][0]} camera pan, "
          f"median of {r['repeats']} frames, ways interleaved frame by frame; ms")
    print("| objects | way | threads | SAM encoder | motion | SAM decoder | post | update | fastest update | 3D | "
          "total / frame | CPU time | vs re-ground |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for run in r["runs"]:
        s = run["stage_ms"]
        if run["backend"] == "re-ground":
            cells = [f"(encode {s['encode']:.1f})", "-", f"(ground {s['ground']:.1f})", "-"]
            way = "re-ground every frame"
        else:
            cells = [f"{s[k]:.1f}" for k in ("sam_encoder", "motion", "sam_decoder", "post")]
            way = f"track, {run['backend']}"
        print(f"| {run['objects']} | {way} | {run['threads']} | " + " | ".join(cells) +
              f" | {run['update_ms']:.1f} | {run['update_min_ms']:.1f} | {s['3d']:.1f} | {run['total_ms']:.1f} | "
              f"{run['cpu_ms']:.1f} | "
              f"{run['speedup']:.1f}x |")
    print("update = the tracker's update (or encode + ground), median and fastest frame; total adds 3D; CPU time = "
          "process CPU time per frame (all threads); vs re-ground = re-ground total / this total (higher is faster).")


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
    single_threaded_numpy_blas()      # as in the node (grounding/blas_threads.py)
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
