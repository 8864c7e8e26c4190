"""Tracking evaluation on generated sequences with exact masks: our tracker against two baselines.

    python -m flmm_ros.tabletop.track_eval --count 40                # embedded model, test seeds
    python -m flmm_ros.tabletop.track_eval --count 5 --methods ours,keep_first --json out.json

On each sequence (`sequences.py`) the targets' phrases are grounded once on frame 0 with the LMM; then
- ours:         `ObjectTracker` (SAM encoder once per frame + one decoder pass per object), regrounding auto;
- ours_noreground: the same with regrounding off (SAM only after frame 0);
- ours_gt_init: the tracker started from the true frame-0 masks (how well it tracks, grounding aside);
- reground:     the slow upper bound: encode every frame with the LMM and ground the phrases again;
- keep_first:   the naive baseline: frame 0's masks, published unchanged on every frame.
Scores (`track_metrics.py`): mean IoU of the tracked masks, lost rate, id switches, recovery after
re-entry, and the mean cost per frame of each method.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from ..grounding.blas_threads import single_threaded_numpy_blas
from ..grounding.config import PipelineConfig
from ..grounding.pipeline import GroundingPipeline
from ..grounding.tracking import ObjectTracker, TrackerConfig
from .scenes import split_seeds
from .sequences import SCENARIOS, TrackingSequence, generate_sequence
from .track_metrics import Output, SequenceScore, score_sequence, summarize

EMBEDDED = Path(__file__).resolve().parents[1].parent / "models" / "tabletop_tiny"
METHODS = ("ours", "ours_noreground", "ours_gt_init", "reground", "keep_first")
SIZES = ((256, 256), (480, 640))
SEED_OFFSET = 500_000        # test seeds, away from the ones generate_scene's test scenes use


def sequence_for(index: int, split: str = "test") -> TrackingSequence:
    """The index-th evaluation sequence: scenarios in turn, sizes alternating like the model card's scenes."""
    seed = split_seeds(split, index + 1, SEED_OFFSET)[index]
    return generate_sequence(seed, SIZES[(index // len(SCENARIOS)) % 2], SCENARIOS[index % len(SCENARIOS)])


def _tracked(update_objects, count: int) -> list[Output]:
    return [Output(o.track_id, o.state, o.mask > 0) for o in update_objects[:count]]


def run_method(method: str, pipe: GroundingPipeline, seq: TrackingSequence, frames, grounded,
               tracker_config: TrackerConfig) -> tuple[list[list[Output]], float]:
    """Outputs per frame (frame 0 = the grounding) and mean seconds per frame after frame 0."""
    first = [Output(j + 1, "tracking" if o.mask.any() else "lost", o.mask > 0) for j, o in enumerate(grounded)]
    outputs, seconds = [first], []
    if method == "keep_first":
        for _ in frames[1:]:
            start = time.perf_counter()
            outputs.append([Output(o.track_id, o.state, o.mask) for o in first])
            seconds.append(time.perf_counter() - start)
    elif method == "reground":
        for f in frames[1:]:
            start = time.perf_counter()
            objects = pipe.ground(pipe.encode(f.image), list(seq.phrases))
            outputs.append([Output(j + 1, "tracking" if o.mask.any() else "lost", o.mask > 0)
                            for j, o in enumerate(objects)])
            seconds.append(time.perf_counter() - start)
    else:
        cfg = replace(tracker_config, regrounding="off") if method == "ours_noreground" else tracker_config
        tracker = ObjectTracker(pipe, cfg)
        start_objects = grounded
        if method == "ours_gt_init":
            start_objects = [replace(o, mask=frames[0].masks[k].astype(np.uint8) * 255)
                             for o, k in zip(grounded, seq.targets)]
            outputs[0] = [Output(j + 1, "tracking", frames[0].masks[k]) for j, k in enumerate(seq.targets)]
        started = tracker.start(start_objects, image=frames[0].image)
        ids = [t.track_id for t in started]
        for j, i in enumerate(ids):
            outputs[0][j].track_id = i
        for f in frames[1:]:
            start = time.perf_counter()
            update = tracker.update(f.image)
            seconds.append(time.perf_counter() - start)
            by_id = {o.track_id: o for o in update.objects}
            outputs.append(_tracked([by_id[i] for i in ids], len(ids)))
    return outputs, float(np.mean(seconds)) if seconds else 0.0


@torch.no_grad()
def evaluate(pipe: GroundingPipeline, count: int, methods=METHODS, tracker_config: TrackerConfig | None = None,
             split: str = "test", log=print) -> dict:
    tracker_config = tracker_config or TrackerConfig()
    scores: dict[str, list[SequenceScore]] = defaultdict(list)
    cost: dict[str, list[float]] = defaultdict(list)
    for index in range(count):
        seq = sequence_for(index, split)
        frames = list(seq.frames())
        grounded = pipe.ground(pipe.encode(frames[0].image), list(seq.phrases))
        gt = [f.masks for f in frames]
        vis = [np.array([f.visible_fraction(k) for k in range(len(seq.objects))]) for f in frames]
        line = []
        for method in methods:
            outputs, seconds = run_method(method, pipe, seq, frames, grounded, tracker_config)
            s = score_sequence(seq.scenario, gt, vis, list(seq.targets), outputs)
            scores[method].append(s)
            cost[method].append(seconds)
            line.append(f"{method} {s.mean_iou:.3f}")
        log(f"[{index + 1}/{count}] seed {seq.seed} {seq.scenario:<9} {seq.size[1]}x{seq.size[0]} "
            f"{seq.length} frames, {len(seq.targets)} targets: " + ", ".join(line))
    results = {}
    for method in methods:
        summary = summarize(scores[method])
        summary["ms_per_frame"] = 1e3 * float(np.mean(cost[method]))
        summary["by_scenario"] = {sc: summarize([s for s in scores[method] if s.scenario == sc])["mean_iou"]
                                  for sc in SCENARIOS}
        results[method] = summary
    return {"count": count, "tracker_config": asdict(tracker_config), "methods": results,
            "sequences": {m: [asdict(s) for s in v] for m, v in scores.items()}}


def print_table(results: dict, out=print) -> None:
    rows = results["methods"]
    out(f"\n{results['count']} sequences ({', '.join(SCENARIOS)} in turn; 256x256 and 640x480), "
        "targets grounded on frame 0")
    out("| method | mean IoU (lost = 0) | IoU of tracked masks | lost rate | hidden but tracked | id switches "
        "(without re-entry) | recovered after re-entry | median frames to recover | ms / frame |")
    out("|---|---|---|---|---|---|---|---|---|")
    for method, r in rows.items():
        out(f"| {method} | {r['mean_iou']:.3f} | {r['tracked_iou']:.3f} | {r['lost_rate']:.3f} | "
            f"{r['hidden_tracked']:.3f} | "
            f"{r['id_switches']} ({r['id_switches_no_reentry']} in {r['sequences_no_reentry']}) | "
            f"{r['recovered']}/{r['reentries']} | {r['median_frames_to_recover']:.0f} | {r['ms_per_frame']:.1f} |")
    out("\nmean IoU by scenario:")
    out("| method | " + " | ".join(SCENARIOS) + " |")
    out("|---|" + "---|" * len(SCENARIOS))
    for method, r in rows.items():
        out(f"| {method} | " + " | ".join(f"{r['by_scenario'][sc]:.3f}" for sc in SCENARIOS) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(EMBEDDED), help="model bundle (default: the embedded tabletop-tiny)")
    parser.add_argument("--count", type=int, default=40, help="number of sequences")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--tracker", default="{}", help="TrackerConfig fields as JSON, e.g. '{\"box_margin\": 0.2}'")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    single_threaded_numpy_blas()      # as in the node
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; use {METHODS}")
    pipe = GroundingPipeline.from_config(PipelineConfig(model=args.model, answer=False))
    results = evaluate(pipe, args.count, methods, TrackerConfig.from_dict(json.loads(args.tracker)), args.split)
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
