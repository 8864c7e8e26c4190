"""Benchmark: phrase-row attention on SDPA (ours) vs eager `output_attentions=True` (naive F-LMM way).

Both methods run the same random-weight LLaVA model on the same inputs. Time: one process, methods
interleaved, median of repeats. Peak memory: a fresh process per method, peak RSS (VmHWM) above the
RSS after model load and one warm-up run (tracemalloc does not see torch tensors).

    python bench/attention.py                 # all configurations
    python bench/attention.py --quick         # tiny smoke run (CI)
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

import torch

from flmm_ros.grounding.attention import (capture_phrase_attention, eager_phrase_attention,
                                          enable_phrase_attention)
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

# name: (text layers, heads, kv heads, hidden, image side / 14 = grid)
CONFIGS = {
    "small-576": (8, 8, 8, 512, 24),
    "llava15-576": (32, 32, 32, 1024, 24),       # LLaVA-1.5-7B layer/head count, narrower width
    "small-2304": (8, 8, 8, 512, 48),
    # LLaVA-NeXT length: the naive way would keep 32 x 32 x 2335^2 fp32 = 22 GiB here, more than this
    # 24 GiB machine can hold beside the model, so the long sequence uses half the layers and heads.
    "medium-2304": (16, 16, 16, 1024, 48),
    "tiny-quick": (2, 4, 2, 64, 8),
}
IMAGE_TOKEN = 999
PHRASE_TOKENS = 4


def build(name: str):
    layers, heads, kv, hidden, grid = CONFIGS[name]
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                              image_size=grid * 14, patch_size=14)
    text = LlamaConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                      image_token_id=IMAGE_TOKEN)).eval()
    n_img = grid * grid
    ids = [1] + list(range(10, 15)) + [IMAGE_TOKEN] * n_img + list(range(20, 45))
    input_ids = torch.tensor([ids])
    pixels = torch.randn(1, 3, grid * 14, grid * 14)
    image_keys = (input_ids[0] == IMAGE_TOKEN).nonzero()[:, 0]
    start = len(ids) - 15                                     # a 4-token phrase inside the answer
    rows = [torch.arange(start, start + PHRASE_TOKENS)]
    return model, input_ids, pixels, image_keys, rows


@torch.no_grad()
def run_ours(model, input_ids, pixels, image_keys, rows):
    enable_phrase_attention(model)
    with capture_phrase_attention(rows, image_keys) as capture:
        model(input_ids=input_ids, pixel_values=pixels, use_cache=False, logits_to_keep=1)
    return capture.maps()


@torch.no_grad()
def run_naive(model, input_ids, pixels, image_keys, rows):
    model.set_attn_implementation({"text_config": "eager"})
    out = model(input_ids=input_ids, pixel_values=pixels, use_cache=False, logits_to_keep=1, output_attentions=True)
    return eager_phrase_attention(out.attentions, rows, image_keys)


METHODS = {"ours": run_ours, "naive": run_naive}


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(field)


def memory_worker(name: str, method: str) -> None:
    """Fresh process: load, warm up, reset the peak, run once, print the peak above the baseline."""
    args = build(name)
    METHODS[method](*args)
    Path("/proc/self/clear_refs").write_text("5")            # resets VmHWM to the current RSS
    base = rss_kib("VmRSS")
    METHODS[method](*args)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - base) / 1024}))


def peak_memory(name: str, method: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-worker", name, method], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def bench(name: str, repeats: int) -> dict:
    args = build(name)
    ours, naive = run_ours(*args), run_naive(*args)          # warm-up, and the parity check
    times = {"ours": [], "naive": []}
    for _ in range(repeats):
        for method in ("naive", "ours"):
            t = time.perf_counter()
            METHODS[method](*args)
            times[method].append(time.perf_counter() - t)
    return {"config": name, "tokens": args[1].shape[1], "max_abs_diff": float((ours - naive).abs().max()),
            "naive_s": statistics.median(times["naive"]), "ours_s": statistics.median(times["ours"]),
            "naive_mib": peak_memory(name, "naive"), "ours_mib": peak_memory(name, "ours")}


def memory_ratio(naive_mib: float, ours_mib: float) -> str:
    """Below 1 MiB the allocator reused the warm-up's memory: report a lower bound against 1 MiB."""
    return f"{naive_mib / ours_mib:.1f}x" if ours_mib >= 1.0 else f">{naive_mib:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=[c for c in CONFIGS if c != "tiny-quick"],
                        choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one tiny configuration, 2 repeats (smoke test)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("CONFIG", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return
    configs, repeats = (["tiny-quick"], 2) if args.quick else (args.configs, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, CPU; median of {repeats}")
    header = (f"{'config':<14} {'tokens':>6} {'naive ms':>9} {'ours ms':>8} {'speed-up':>8} "
              f"{'naive MiB':>9} {'ours MiB':>8} {'mem ratio':>9} {'max |diff|':>10}")
    print(header)
    print("-" * len(header))
    for name in configs:
        r = bench(name, repeats)
        print(f"{r['config']:<14} {r['tokens']:>6} {r['naive_s'] * 1e3:>9.0f} {r['ours_s'] * 1e3:>8.0f} "
              f"{r['naive_s'] / r['ours_s']:>7.2f}x {r['naive_mib']:>9.1f} {r['ours_mib']:>8.1f} "
              f"{memory_ratio(r['naive_mib'], r['ours_mib']):>9} {r['max_abs_diff']:>10.1e}", flush=True)


if __name__ == "__main__":
    main()
