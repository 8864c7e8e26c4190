"""Benchmark: the node's CPU thread settings, on a quiet machine and beside a busy process.

Each setting runs in a fresh process (OpenMP reads its environment once, when torch loads), with the node's
`OMP_WAIT_POLICY=PASSIVE`: it builds the embedded pipeline, then times instructions on one 640x480 scene, wall
clock: a cached frame (median of --cached) and a new frame (median of --new). Settings alternate, --rounds
times, so a drift of the machine's speed hits them alike. "busy" repeats it all beside `while True: pass`, a
process that keeps one core busy (a camera driver, a planner).

    python bench/threads.py                 # the table in BENCHMARKS.md (~5 min on 2 cores)
    python bench/threads.py --quick         # smoke run (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# label -> environment added to the node's OMP_WAIT_POLICY=PASSIVE
SETTINGS = {
    "2 torch threads (ONNX Runtime 2)": {"OMP_NUM_THREADS": "2"},
    "1 torch thread (ONNX Runtime 1)": {"OMP_NUM_THREADS": "1"},
    "1 torch thread, ONNX Runtime 2": {"OMP_NUM_THREADS": "1", "FLMM_ROS_ORT_THREADS": "2"},
    "2 threads, GOMP_SPINCOUNT=10000": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
}


def worker(cached_runs: int, new_runs: int) -> None:
    """In a fresh process: median wall ms of cached-frame and new-frame instructions, as JSON."""
    sys.path.insert(0, str(ROOT / "bench"))
    import pipeline as bench_pipeline
    pipe, _naive_refiner, image = bench_pipeline.build("tabletop-tiny", "cpu", "float32", "auto")
    frame = pipe.encode(image)
    pipe.run(frame, bench_pipeline.INSTRUCTION)

    def median_ms(call, runs: int) -> float:
        call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3
    print(json.dumps({"cached": median_ms(lambda: pipe.run(frame, bench_pipeline.INSTRUCTION), cached_runs),
                      "new": median_ms(lambda: pipe.run(image, bench_pipeline.INSTRUCTION), new_runs)}))


def measure(env: dict[str, str], cached_runs: int, new_runs: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", str(cached_runs), str(new_runs)], check=True,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cached", type=int, default=40, help="cached-frame instructions per process")
    parser.add_argument("--new", type=int, default=20, help="new-frame instructions per process")
    parser.add_argument("--quick", action="store_true", help="smoke run: two settings, quiet only, few runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    settings = dict(list(SETTINGS.items())[:2]) if args.quick else SETTINGS
    conditions = ("quiet",) if args.quick else ("quiet", "busy")
    rounds, cached_runs, new_runs = (1, 3, 2) if args.quick else (args.rounds, args.cached, args.new)
    results = {c: {label: [] for label in settings} for c in conditions}
    for condition in conditions:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition == "busy" else None
        try:
            for _ in range(rounds):
                for label, env in settings.items():
                    results[condition][label].append(measure(env, cached_runs, new_runs))
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    print(f"\nembedded tabletop-tiny, 640x480, OMP_WAIT_POLICY=PASSIVE, wall ms (median per process; one value per "
          f"round), {os.cpu_count()} cores")
    header = "| setting | " + " | ".join(f"{c}: cached | {c}: new frame" for c in conditions) + " |"
    print(header)
    print("|---" * (1 + 2 * len(conditions)) + "|")
    for label in settings:
        cells = []
        for condition in conditions:
            rows = results[condition][label]
            cells += [" / ".join(f"{r[kind]:.1f}" for r in rows) for kind in ("cached", "new")]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
