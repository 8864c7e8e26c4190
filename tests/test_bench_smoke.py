"""The benchmarks run and print their tables (smoke: tiny sizes; how fast is not checked here)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> str:
    return subprocess.run([sys.executable, *args], cwd=ROOT, check=True, capture_output=True, text=True,
                          timeout=600).stdout


def test_attention_benchmark_quick():
    out = run("bench/attention.py", "--quick")
    row = next(line for line in out.splitlines() if line.startswith("tiny-quick"))
    max_diff = float(row.split()[-1])
    assert max_diff <= 1e-5                                    # same maps as eager output_attentions
    assert re.search(r"\d+\.\d+x", row)                       # a speed-up ratio was measured


def test_refiner_benchmark_tiny(tmp_path):
    out = run("bench/refiner.py", "--sam-type", "tiny", "--repeats", "2", "--cache-dir", str(tmp_path))
    assert "torch" in out and "onnxruntime" in out


def test_pipeline_benchmark_smoke(tmp_path):
    out = run("bench/pipeline.py", "--config", "random-small", "--repeats", "2", "--warmup", "1",
              "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    for way in ("ours_new", "ours_cached", "naive"):
        assert result["total_ms"][way] > 0
        assert set(result["peak_mib"][way]) == {"peak_mib", "total_mib"}
    # A cached frame skips the encoders; the naive way recomputes them per instruction.
    assert {"vision", "lmm_prefix", "sam_encoder"} <= set(result["stage_ms"]["ours_new"])
    assert not {"vision", "lmm_prefix", "sam_encoder"} & set(result["stage_ms"]["ours_cached"])
    assert {"vision", "sam_encoder", "phrase_pass"} <= set(result["stage_ms"]["naive"])
    assert result["coarse_max_abs_diff"] < 1e-3              # both ways compute the same masks
    assert re.search(r"total .* \d+\.\d+x", out)


def test_tracking_benchmark_smoke(tmp_path):
    out = run("bench/tracking.py", "--config", "random-small", "--repeats", "2", "--warmup", "1", "--objects", "1",
              "--threads", "1", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    ways = {r["backend"] for r in result["runs"]}
    assert {"torch", "onnxruntime", "re-ground"} <= ways
    for run_ in result["runs"]:
        assert run_["total_ms"] > 0
        if run_["backend"] != "re-ground":
            assert run_["lost_at_end"] == 0 and run_["stage_ms"]["sam_decoder"] > 0 and run_["speedup"] > 0
    assert re.search(r"track, onnxruntime .* \d+\.\dx faster", out)


@pytest.mark.ros
def test_soak_smoke(tmp_path):
    out = run("bench/soak.py", "--duration", "8", "--json", str(tmp_path / "soak.json"), "--work", str(tmp_path))
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["instructions_sent"] >= 10
    assert summary["results_received"] == summary["instructions_sent"] and summary["lost"] == 0
    assert summary["frames_published"] > summary["frames_grounded"] > 0
    assert summary["node_alive_at_end"]
    assert "latency p50 / p95 / p99" in out
