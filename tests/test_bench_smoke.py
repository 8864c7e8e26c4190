"""The benchmarks run and print their tables (smoke: tiny sizes; how fast is not checked here)."""
import re
import subprocess
import sys
from pathlib import Path

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
