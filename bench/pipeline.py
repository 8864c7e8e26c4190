"""Benchmark: where the time goes for one instruction, ours against the naive F-LMM way.

Per stage (vision tower, LMM image prefix, phrase pass, mask head, SAM encoder, SAM decoder,
post-processing), medians over repeated runs, for three ways of serving "pick the red mug":
  ours, new frame     encode the frame (vision tower, LMM prefix KV cache, SAM embedding), then ground;
  ours, cached frame  a second instruction on an encoded frame: phrase pass + head + SAM decoder only;
  naive               F-LMM as published: one eager LMM forward over image + prompt + phrases with
                      `output_attentions=True`, fp32 SAM, nothing cached between instructions.
On a CPU with a core more than torch's threads, ours runs a new frame's SAM encoder on that core beside the LMM
(GroundingPipeline.sam_beside_lmm; its stage time is shown "beside" and not added up); the naive way is then also
timed with torch on every core, and the table ends with that comparison. `--clock cpu` encodes SAM inline.
The spoken answer is not part of "instruction to mask" and is left out of all three.

Then time-to-mask against time-to-answer: `run` grounds first and hands the masks to `on_objects` before it
generates the answer, so the time to the masks must not grow with the answer. Two answer lengths (8 and 48
tokens, EOS suppressed so that each answer really has that many), on a cached and on a new frame.

    python bench/pipeline.py                               # embedded tabletop-tiny on this CPU
    python bench/pipeline.py --config llava15-7b --device cuda   # LLaVA-1.5-7B + SAM ViT-L shapes, fp16
    python bench/pipeline.py --config random-small --repeats 2   # smoke (CI)
    OMP_NUM_THREADS=1 python bench/pipeline.py --clock cpu       # CPU time, on a machine other jobs share

Random weights cost the same as real ones, so the 7B-shaped row needs no download. Peak memory is
the allocator's peak on CUDA, and on CPU the RSS high-water mark of a fresh process per method
(tracemalloc does not see torch tensors): "peak MiB +" above the memory held after loading and one
warm-up (what one instruction adds), "peak MiB all" including the weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from flmm_ros.grounding import phrases as phrase_rules
from flmm_ros.grounding import pipeline as pipeline_module
from flmm_ros.grounding.attention import eager_phrase_attention, enable_phrase_attention
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.head import GroundingHead
from flmm_ros.grounding.lmm import GROUNDING_PROMPT, LMMFrame
from flmm_ros.grounding.lmm.llava import LlavaAdapter
from flmm_ros.grounding.lmm.packed_linear import pack_linears, unpack_linears
from flmm_ros.grounding.pipeline import GroundingLogits, GroundingPipeline, _StageClock
from flmm_ros.grounding.sam.refiner import SamRefiner
from flmm_ros.grounding.sam.backends import TorchBackend, make_refiner_backend
from flmm_ros.grounding.sam.models import TINY_TEST_SAM
from flmm_ros.grounding.sam.sdpa import use_sdpa
from flmm_ros.grounding.testing import word_tokenizer
from flmm_ros.tabletop.scenes import generate_scene

from attention import rss_kib  # bench/attention.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "ros_ws/src/flmm_ros/models/tabletop_tiny"
INSTRUCTION = "pick the red mug"
STAGES = ("vision", "lmm_prefix", "phrase_pass", "mask_head", "sam_encoder", "sam_decoder", "post")
WAYS = ("ours_new", "ours_cached", "naive")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock_now = time.perf_counter     # what every time here is read with (--clock)
ANSWER_TOKENS = (8, 48)

# Random-weight configurations: LLaVA-1.5 (CLIP ViT tower, Llama) sizes and the SAM size.
# name: (vision width, depth, heads, image side, patch; text width, layers, heads, MLP width; SAM)
RANDOM_CONFIGS = {
    "llava15-7b": ((1024, 24, 16, 336, 14), (4096, 32, 32, 11008), "vit_l"),   # LLaVA-1.5-7B + SAM ViT-L
    "random-small": ((32, 2, 2, 64, 8), (64, 2, 4, 128), TINY_TEST_SAM),           # smoke test
}


def random_pipeline(name: str, device: str, dtype: str, backend: str) -> GroundingPipeline:
    """A LLaVA-1.5-shaped pipeline with random weights, built on the target device."""
    (v_width, v_depth, v_heads, side, patch), (t_width, t_layers, t_heads, t_mlp), sam = RANDOM_CONFIGS[name]
    tokenizer = word_tokenizer()
    vision = CLIPVisionConfig(hidden_size=v_width, intermediate_size=4 * v_width, num_hidden_layers=v_depth,
                              num_attention_heads=v_heads, image_size=side, patch_size=patch)
    text = LlamaConfig(vocab_size=32064, hidden_size=t_width, intermediate_size=t_mlp, num_hidden_layers=t_layers,
                       num_attention_heads=t_heads, num_key_value_heads=t_heads, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_layer=-2,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(side // patch) ** 2)
    cfg = PipelineConfig(model="random", device=device, dtype=dtype, answer=False, backend=backend)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(config).to(cfg.torch_dtype)
        lmm = LlavaAdapter(model, tokenizer)
        head = GroundingHead(lmm.mask_head_channels, t_width, t_layers, sam).eval()
    sam_backend = make_refiner_backend(backend, head.sam, device=device,
                                       precision="fp16" if dtype != "float32" else "fp32")
    # As GroundingPipeline.from_config does: the U-Net and the vision tower on ONNX Runtime and the LMM's linear
    # layers packed for oneDNN when the backend means it (a CPU).
    GroundingPipeline._use_cpu_engines(cfg, lmm)
    return GroundingPipeline(lmm, head, SamRefiner(head.sam, sam_backend), cfg,
                             GroundingPipeline._mask_head_engine(cfg, head))


def build(name: str, device: str, dtype: str, backend: str) -> tuple[GroundingPipeline, SamRefiner, np.ndarray]:
    """The pipeline (SAM and the U-Net on `backend`), a naive fp32 torch SAM refiner beside it, and a 640x480 scene."""
    if name == "tabletop-tiny":
        pipe = GroundingPipeline.from_config(PipelineConfig(model=str(EMBEDDED), device=device, dtype="float32",
                                                            answer=False, backend=backend))   # tables: float32
    else:
        pipe = random_pipeline(name, device, dtype, backend)
    if clock_now is time.process_time:     # CPU time counts both threads: a new frame's SAM encoder inline
        pipe.sam_beside_lmm = False
    sam32 = copy.deepcopy(pipe.head.sam).float()
    naive_refiner = SamRefiner(sam32, TorchBackend(sam32, torch.device(device), "fp32", cuda_graphs=False))
    use_sdpa(sam32.image_encoder, False)        # F-LMM's SAM as published: segment-anything's own attention
    image = generate_scene(2000016, (480, 640)).image
    return pipe, naive_refiner, image


# ---- the three ways ---------------------------------------------------------------------------
def ways(pipe: GroundingPipeline, naive_refiner: SamRefiner, image: np.ndarray) -> dict:
    """way -> a call returning its stage timings. The cached way reuses one frame encoded here."""
    frame = pipe.encode(image)
    pipe.run(frame, INSTRUCTION)                          # from now on the frame counts as cached
    calls = {"ours_new": lambda: pipe.run(image, INSTRUCTION).timings,
             "ours_cached": lambda: pipe.run(frame, INSTRUCTION).timings,
             "naive": lambda: naive(pipe, naive_refiner, image)}
    if pipe.sam_beside_lmm:   # ours uses a second core on a new frame: the naive way gets every core too
        calls["naive_all_cores"] = lambda: with_threads(len(os.sched_getaffinity(0)), calls["naive"])
    return calls


def with_threads(threads: int, call):
    """call() with torch (and so the naive way) on `threads` threads, then back."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return call()
    finally:
        torch.set_num_threads(before)


@torch.no_grad()
def naive(pipe: GroundingPipeline, refiner: SamRefiner, image: np.ndarray, keep: dict | None = None
          ) -> dict[str, float]:
    """F-LMM's published path: everything recomputed, eager attention with output_attentions, fp32 SAM.

    `keep` receives the coarse logits, to check the naive way computes what ours does. Its timings include
    "total": F-LMM's work from image to masks, without the switches of our model to its way and back."""
    lmm, clock = pipe.lmm, _StageClock(None, pipe.config.device)
    lmm.model.set_attn_implementation({"text_config": "eager"})
    engine = getattr(lmm, "vision_engine", None)
    lmm.vision_engine = None                 # F-LMM's vision tower on PyTorch, not ours on ONNX Runtime
    packed = unpack_linears(lmm.model)       # and its linear layers on F.linear
    try:
        if clock.sync:
            clock.sync()
        start = clock_now()
        phrases = phrase_rules.phrases_from_instruction(INSTRUCTION)
        with clock.stage("vision"):
            prepared = lmm.prepare_image(image)
            features = lmm.image_features(prepared).to(lmm.dtype)
        with clock.stage("phrase_pass"):   # prefix and phrases in one full forward: no separate prefix
            ids = lmm.prompt_ids(GROUNDING_PROMPT, features.shape[0])
            prefix_len = len(ids) - ids[::-1].index(lmm.image_token_id)
            image_keys = (torch.tensor(ids[:prefix_len]) == lmm.image_token_id).nonzero()[:, 0].to(lmm.device)
            stub = LMMFrame(prepared, ids[:prefix_len], image_keys, cache=None)
            continuation, rows = lmm.phrase_tokens(stub, phrases)
            all_ids = torch.tensor([ids[:prefix_len] + continuation], device=lmm.device)
            embeds = lmm.embed_tokens(all_ids)
            embeds[0, all_ids[0] == lmm.image_token_id] = features
            out = lmm.language_model(inputs_embeds=embeds, use_cache=False, output_attentions=True,
                                     output_hidden_states=True)
            rows = [r + prefix_len for r in rows]
            maps = lmm.attention_to_maps(eager_phrase_attention(out.attentions, rows, image_keys), prepared)
            hidden = torch.stack(out.hidden_states[1:])[:, 0]
            del out
        head = pipe.head
        with clock.stage("mask_head"):
            coarse = lmm.crop_to_image(head.mask_head(maps.to(pipe.head_device).float())[:, 0], prepared)
        if keep is not None:
            keep["coarse"] = coarse
        with clock.stage("sam_encoder"):
            encoding = refiner.encode(image)
        with clock.stage("sam_decoder"):
            tokens = [head.text_embeddings(hidden[:, r].to(pipe.head_device).float()) for r in rows]
            refined = refiner.refine(encoding, coarse, tokens)
        with clock.stage("post"):
            pipe._objects(phrases, GroundingLogits(coarse, refined), image.shape[:2])
        clock.timings["total"] = clock_now() - start
    finally:
        enable_phrase_attention(lmm.model)
        lmm.vision_engine = engine
        if packed:
            pack_linears(lmm.model)
    return clock.timings


# ---- time to mask vs time to answer ----------------------------------------------------------------
def full_length_answers(lmm) -> list[int]:
    """Greedy decoding that never picks EOS, so every answer has exactly max_new_tokens tokens (for timing).
    Returns a one-element counter of the tokens generated (reset it before a run)."""
    eos, count = lmm.tokenizer.eos_token_id, [0]

    def greedy(out) -> int:
        logits = lmm.model.lm_head(out.last_hidden_state[:, -1]).float()
        logits[..., eos] = float("-inf")
        count[0] += 1
        return int(logits.argmax(-1))
    lmm._greedy = greedy
    return count


def answer_timing(pipe: GroundingPipeline, image: np.ndarray, repeats: int, warmup: int, sync) -> dict:
    """Per answer length and frame kind: medians of the time to `on_objects` (masks) and to the answer."""
    base = pipe.config
    frame = pipe.encode(image)
    pipe.run(frame, INSTRUCTION)
    samples: dict[str, dict[str, list]] = {}
    generated = full_length_answers(pipe.lmm)
    try:
        for i in range(warmup + repeats):
            for tokens in ANSWER_TOKENS:                  # interleaved, like the three ways
                # The LMM's own free answer, generated token by token (not one worded from the masks).
                free = {"answer_source": "lmm"} if hasattr(base, "answer_source") else {}
                pipe.config = replace(base, answer=True, max_new_tokens=tokens, **free)
                for kind, source in (("cached", frame), ("new", image)):
                    marks, generated[0] = {}, 0
                    sync()
                    start = clock_now()
                    pipe.run(source, INSTRUCTION, on_objects=lambda _r: (sync(), marks.setdefault(
                        "mask", clock_now())))
                    sync()
                    done = clock_now()
                    if i >= warmup:
                        row = samples.setdefault(f"{kind}_{tokens}", {"mask": [], "answer": [], "tokens": []})
                        row["mask"].append(marks["mask"] - start)
                        row["answer"].append(done - start)
                        row["tokens"].append(generated[0])
    finally:
        pipe.config = base
        del pipe.lmm._greedy                              # back to the class's greedy step
    return {key: {"mask_ms": statistics.median(v["mask"]) * 1e3, "answer_ms": statistics.median(v["answer"]) * 1e3,
                  "answer_tokens": statistics.median(v["tokens"])} for key, v in samples.items()}


class _CpuTime:
    """Stands in for the `time` module inside the pipeline, so that its stage clock reads CPU time."""
    perf_counter = staticmethod(time.process_time)


def use_clock(name: str) -> None:
    """Read every time here, and the pipeline's stage times, with the clock `name` (CLOCKS)."""
    global clock_now
    clock_now = CLOCKS[name]
    if name == "cpu":
        if torch.get_num_threads() != 1:
            sys.exit("--clock cpu adds up the CPU time of every thread: run it with OMP_NUM_THREADS=1")
        pipeline_module.time = _CpuTime
        # and so would the SAM encoder's worker thread (build() turns it off)


def timed(call, sync) -> tuple[float, dict[str, float]]:
    """(total seconds, stage seconds) of one call; its own "total" when it reports one (the naive way's)."""
    sync()
    t = clock_now()
    stages = dict(call())
    sync()
    total = clock_now() - t
    return stages.pop("total", total), stages


# ---- memory -------------------------------------------------------------------------------------
def cpu_memory_worker(name: str, way: str, dtype: str, backend: str) -> None:
    """Fresh process: load, warm up, reset the RSS high-water mark, run once, print the peak above it."""
    call = ways(*build(name, "cpu", dtype, backend))[way]
    call()
    Path("/proc/self/clear_refs").write_text("5")
    base = rss_kib("VmRSS")
    call()
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - base) / 1024, "total_mib": rss_kib("VmHWM") / 1024}))


def cpu_peak_mib(name: str, way: str, dtype: str, backend: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--memory-worker", name, way, dtype, backend], check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the benchmark -----------------------------------------------------------------------------
def bench(name: str, device: str, dtype: str, repeats: int, warmup: int, answer_repeats: int,
          backend: str = "auto") -> dict:
    pipe, refiner, image = build(name, device, dtype, backend)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    calls = ways(pipe, refiner, image)
    with torch.no_grad():                              # same masks both ways (up to float rounding)
        keep = {}
        naive(pipe, refiner, image, keep)
        frame = pipe.encode(image)
        prefix_tokens = len(frame.lmm.prefix_ids)
        ours = pipe.ground_logits(frame, phrase_rules.phrases_from_instruction(INSTRUCTION)).coarse
        coarse_diff = float((ours.float() - keep["coarse"].float()).abs().max())
    totals = {w: [] for w in calls}
    stages = {w: {} for w in calls}
    peaks = {}
    for i in range(warmup + repeats):
        for way in calls:                                  # interleaved: load changes hit all ways alike
            if cuda and i == warmup:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            total, parts = timed(calls[way], sync)
            if cuda and i == warmup:
                peaks[way] = {"peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
                              "total_mib": torch.cuda.max_memory_allocated() / 2**20}
            if i >= warmup:
                totals[way].append(total)
                for stage, seconds in parts.items():
                    stages[way].setdefault(stage, []).append(seconds)
    if not cuda:
        peaks = {way: cpu_peak_mib(name, way, dtype, backend) for way in WAYS}
    answers = answer_timing(pipe, image, answer_repeats, min(warmup, 1), sync) if answer_repeats else {}
    weights_mib = sum(p.numel() * p.element_size() for p in [*pipe.lmm.model.parameters(), *pipe.head.parameters()])
    return {"config": name, "device": device, "dtype": dtype if name != "tabletop-tiny" else "float32",
            "tokens": prefix_tokens, "repeats": repeats, "sam_beside_lmm": pipe.sam_beside_lmm,
            "cores": len(os.sched_getaffinity(0)),
            "total_ms": {w: statistics.median(totals[w]) * 1e3 for w in calls},
            "stage_ms": {w: {s: statistics.median(v) * 1e3 for s, v in stages[w].items()} for w in calls},
            "peak_mib": peaks, "weights_mib": weights_mib / 2**20, "coarse_max_abs_diff": coarse_diff,
            "answer_timing": answers,
            "backends": {"sam": pipe.refiner.backend.name, "requested": backend,
                         "mask_head": "onnxruntime" if pipe.mask_head_engine else "torch",
                         "vision": "onnxruntime" if getattr(pipe.lmm, "vision_engine", None) else "torch"}}


def print_table(r: dict) -> None:
    print(f"\n{r['config']} on {r['device']} ({r['dtype']} LMM), {r['tokens']} prefix tokens, "
          f"median of {r['repeats']}, weights {r['weights_mib']:.0f} MiB; ours: SAM on {r['backends']['sam']}, "
          f"mask head on {r['backends']['mask_head']}, vision tower on {r['backends']['vision']} "
          f"(backend {r['backends']['requested']}); naive: torch")
    header = f"{'stage':<14} {'ours new ms':>11} {'ours cached ms':>14} {'naive ms':>9} {'cached vs naive':>15}"
    print(header)
    print("-" * len(header))
    beside = r["sam_beside_lmm"]   # a new frame's SAM encoder ran on a worker thread beside the LMM
    for w in WAYS:   # stages not listed (phrase rules, validation, bookkeeping, waits) and timer overhead
        counted = [k for k in STAGES if not (beside and w == "ours_new" and k == "sam_encoder")]
        r["stage_ms"][w]["other"] = r["total_ms"][w] - sum(v for k, v in r["stage_ms"][w].items() if k in counted)
    for stage in (*STAGES, "other"):
        cells = [r["stage_ms"][w].get(stage) for w in WAYS]
        text = [f"{c:.1f}" if c is not None else "-" for c in cells]
        if stage == "lmm_prefix":   # ours: in a new frame's phrase pass (pipeline.encode defers it); naive: one pass
            text = [t if t != "-" or w == "ours_cached" else "(in pass)" for t, w in zip(text, WAYS)]
        if stage == "sam_encoder" and beside:
            text[0] = f"({text[0]} beside)"
        print(f"{stage:<14} {text[0]:>11} {text[1]:>14} {text[2]:>9}")
    t = r["total_ms"]
    print(f"{'total':<14} {t['ours_new']:>11.1f} {t['ours_cached']:>14.1f} {t['naive']:>9.1f} "
          f"{t['naive'] / t['ours_cached']:>14.2f}x")
    print(f"{'new vs naive':<14} {t['naive'] / t['ours_new']:>10.2f}x")
    if "naive_all_cores" in t:
        n = t["naive_all_cores"]
        print(f"the naive way on all {r['cores']} cores (torch {r['cores']} threads): {n:.1f} ms; against it ours is "
              f"{n / t['ours_new']:.2f}x on a new frame (SAM's encoder on the second core) and "
              f"{n / t['ours_cached']:.2f}x on a cached one")
    p = r["peak_mib"]
    for key, label in (("peak_mib", "peak MiB +"), ("total_mib", "peak MiB all")):
        print(f"{label:<14} {p['ours_new'][key]:>11.1f} {p['ours_cached'][key]:>14.1f} {p['naive'][key]:>9.1f}")
    print(f"coarse mask logits, ours vs naive: max |diff| {r['coarse_max_abs_diff']:.1e}")
    if r["answer_timing"]:
        print(f"\ntime to mask vs time to answer (median of {r['answer_repeats']}; masks are published before "
              "the answer is generated)")
        header = f"{'frame':<7} {'answer tokens':>13} {'to mask ms':>10} {'to answer ms':>12}"
        print(header)
        print("-" * len(header))
        for key, v in r["answer_timing"].items():
            kind = key.split("_")[0]
            print(f"{kind:<7} {v['answer_tokens']:>13.0f} {v['mask_ms']:>10.1f} {v['answer_ms']:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tabletop-tiny", choices=["tabletop-tiny", *RANDOM_CONFIGS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="LMM dtype of the random configs (default: float16 on "
                        "CUDA, float32 on CPU); the embedded model runs float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--answer-repeats", type=int, default=5,
                        help="runs per answer length for time-to-mask vs time-to-answer (0: skip)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall: elapsed time; cpu: this process's CPU time (with OMP_NUM_THREADS=1 and nothing else "
                             "running it equals wall time, and other jobs on the machine barely change it)")
    parser.add_argument("--backend", default="auto", help="our SAM and mask-head runtime (auto: ONNX Runtime on a "
                        "CPU, PyTorch on CUDA; the naive way always runs PyTorch)")
    parser.add_argument("--memory-worker", nargs=4, metavar=("CONFIG", "WAY", "DTYPE", "BACKEND"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    use_clock(args.clock)
    if args.memory_worker:
        cpu_memory_worker(*args.memory_worker)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: CUDA is not available on this machine")
    dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"torch {torch.__version__}, {gpu}, {torch.get_num_threads()} CPU threads, {args.clock} clock; "
          f"instruction {INSTRUCTION!r}; load average {os.getloadavg()[0]:.1f}")
    result = bench(args.config, args.device, dtype, args.repeats, args.warmup, args.answer_repeats, args.backend)
    result["answer_repeats"] = args.answer_repeats
    result["clock"], result["threads"], result["load_average"] = args.clock, torch.get_num_threads(), os.getloadavg()
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
