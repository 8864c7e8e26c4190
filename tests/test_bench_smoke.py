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
    assert {"vision", "sam_encoder"} <= set(result["stage_ms"]["ours_new"])       # the prefix: in the phrase pass
    assert not {"vision", "lmm_prefix", "sam_encoder"} & set(result["stage_ms"]["ours_cached"])
    assert {"vision", "sam_encoder", "phrase_pass"} <= set(result["stage_ms"]["naive"])
    assert result["coarse_max_abs_diff"] < 1e-3              # both ways compute the same masks
    assert re.search(r"total .* \d+\.\d+x", out)
    # Time to mask vs time to answer: both answer lengths really generated, the masks before the answer.
    timing = result["answer_timing"]
    assert set(timing) == {"cached_8", "new_8", "cached_48", "new_48"}
    for key, row in timing.items():
        assert row["answer_tokens"] == int(key.split("_")[1]) and 0 < row["mask_ms"] < row["answer_ms"]
    assert "to mask ms" in out


def test_quantization_benchmark_quick(tmp_path):
    out = run("bench/quantization.py", "--quick", "--json", str(tmp_path / "q.json"))
    result = json.loads((tmp_path / "q.json").read_text())
    memory = {row["option"]: row["lmm_weights_gib"] for row in result["memory_llava15_7b"]}
    assert 13 < memory["none"] < 13.5 and memory["int4"] < memory["int8"] < memory["none"] / 1.8
    for deviation in result["deviation"]["random-l3-w64"].values():
        assert 0 < deviation["maps_max_abs_diff"] < 0.05 and 0 <= deviation["mask_iou_min"] <= 1
    assert "int4" in out


def test_gpu_check_script_runs_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu_check.sh --smoke: every step of the GPU run, small and on the CPU, tables in one folder."""
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--smoke", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [name for name, *_ in steps] == ["environment", "pipeline_random-small_float32", "refiner_tiny_fp32",
                                            "tracking_random-small", "gpu_tests"]
    assert all(status == "ok" for _, status, _ in steps)
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "device: CPU only" in summary and "to mask ms" in summary and "onnxruntime" in summary
    assert json.loads((tmp_path / "pipeline_random-small_float32.json").read_text())["total_ms"]["naive"] > 0


def test_tracking_benchmark_smoke(tmp_path):
    out = run("bench/tracking.py", "--config", "random-small", "--repeats", "2", "--warmup", "1", "--objects", "1",
              "--threads", "1", "--json", str(tmp_path / "r.json"))
    result = json.loads((tmp_path / "r.json").read_text())
    ways = {r["backend"] for r in result["runs"]}
    assert {"torch, fp32 encoder", "onnxruntime, int8 encoder", "onnxruntime, fp32 encoder", "re-ground"} <= ways
    for run_ in result["runs"]:
        assert run_["total_ms"] > 0
        if run_["backend"] != "re-ground":
            assert run_["lost_at_end"] == 0 and run_["stage_ms"]["sam_decoder"] > 0 and run_["speedup"] > 0
    assert re.search(r"track, onnxruntime, int8 encoder .* \d+\.\dx \|", out)


@pytest.mark.ros
def test_soak_smoke(tmp_path):
    out = run("bench/soak.py", "--duration", "8", "--json", str(tmp_path / "soak.json"), "--work", str(tmp_path))
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["instructions_sent"] >= 10
    assert summary["results_received"] == summary["instructions_sent"] and summary["lost"] == 0
    assert summary["frames_published"] > summary["frames_grounded"] > 0
    assert summary["node_alive_at_end"]
    assert "latency p50 / p95 / p99" in out
    # Every success published its masks on ~/objects before its result.
    assert summary["masks_received"] == summary["successes"] and summary["unmatched_objects"] == 0
    assert summary["mask_latency_ms"]["p50"] <= summary["result_arrival_ms"]["p50"]
    assert "time to mask p50" in out


@pytest.mark.ros
def test_soak_track_smoke(tmp_path):
    """--track: the camera plays a tracking video, the second half's instructions also start tracking; every
    instruction still gets its result, and the tracks really follow the objects."""
    out = run("bench/soak.py", "--duration", "10", "--track", "--json", str(tmp_path / "soak.json"),
              "--work", str(tmp_path))
    summary = json.loads((tmp_path / "soak.json").read_text())
    assert summary["results_received"] == summary["instructions_sent"] >= 10 and summary["lost"] == 0
    assert summary["node_alive_at_end"] and summary["node_exit_code_after_sigint"] == 0
    tracking = summary["tracking"]
    assert tracking["tracking_updates"] > 0 and tracking["tracked_object_states"].get("tracking", 0) > 0
    assert tracking["mask_ms_without_tracking_p50"] > 0 and tracking["mask_ms_with_tracking_p50"] > 0
    assert "time to mask p50 / p95 ms, tracking" in out


def test_threads_benchmark_quick(tmp_path):
    out = run("bench/threads.py", "--quick", "--json", str(tmp_path / "t.json"))
    result = json.loads((tmp_path / "t.json").read_text())
    assert set(result) == {"quiet"} and len(result["quiet"]) == 2
    for rows in result["quiet"].values():
        assert len(rows) == 1 and rows[0]["cached"] > 0 and rows[0]["new"] > 0
    assert "1 torch thread (ONNX Runtime 1)" in out


@pytest.mark.ros
def test_soak_rss_trend_ignores_the_tracker_loading_step():
    """With --track the tracker's sessions load once when tracking starts: a step in RSS, not a leak. The trend is
    measured per phase, after each one's warm-up, so the step does not read as a slope; a real leak still does."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("soak", ROOT / "bench" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    step = [(t, 500.0 + (95.0 if t >= 60 else 0.0)) for t in range(0, 120, 5)]
    assert abs(soak.rss_slope(step, after=10)) > 10           # the step read as one line
    assert soak.rss_slope(step, after=10, switch=60) == pytest.approx(0.0, abs=1e-6)
    leak = [(t, m + 0.5 * t) for t, m in step]                   # +30 MiB/min in both phases
    assert soak.rss_slope(leak, after=10, switch=60) == pytest.approx(30.0)


def test_instances_benchmark_smoke():
    out = run("bench/instances.py", "--scenes", "3", "--fit", "6")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ") and "ms" not in line}
    assert set(rows) == {"no filter", "mask filter", "+ kind check"}
    assert float(rows["no filter"].split("|")[4]) == 1.0           # the ratio's own base


def test_relations_benchmark_smoke():
    out = run("bench/relations.py", "--scenes", "4")
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines()
            if line.startswith("| ") and "ms" not in line}
    assert set(rows) == {"unchecked", "checked"}
    assert float(rows["unchecked"][4]) == 1.0                      # the ratio's own base
    assert all(0.0 <= float(v) <= 1.0 for row in rows.values() for v in row[5:8])
