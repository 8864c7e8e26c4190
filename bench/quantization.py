"""Benchmark: 8-bit / 4-bit LMM weights (quantization: int8 | int4) — memory, and how far the maps and masks move.

1. Memory for LLaVA-1.5-7B (+ SAM ViT-L), counted from the model's config on the meta device (no weights
   needed): the weights of each option as torchao stores them (int8: one byte per weight + a scale and a zero
   point per output row; int4 tinygemm: half a byte per weight + a bfloat16 scale and zero per 128 weights),
   the KV cache of the image prefix, and SAM.
2. Deviation from the unquantized model, same inputs, on random-weight LLaVA configs and on the embedded
   tabletop-tiny model (trained weights): attention maps (max |diff|, relative to the largest map value),
   coarse logits, and the IoU of the published (refined) masks and of the coarse masks. On the CPU, int4 is
   the same groupwise int4 grid kept unpacked in int8 (quantization.py), so the numbers are int4's rounding.

    python bench/quantization.py                 # memory table + deviation on every config (~2 min on 2 cores)
    python bench/quantization.py --quick         # smoke (CI)
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from flmm_ros.grounding import GroundingPipeline, PipelineConfig
from flmm_ros.grounding.quantization import NOT_QUANTIZED
from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.tabletop.scenes import generate_scene, split_seeds

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "ros_ws/src/flmm_ros/models/tabletop_tiny"
INSTRUCTIONS = ("pick the red mug", "put the blue ball in the bowl", "grab the green box", "take the yellow can")
RANDOM_CONFIGS = {   # name: write_random_bundle keyword arguments (tiny CLIP tower, 4x4 image tokens)
    "random-l3-w64": {"layers": 3, "heads": 4, "hidden": 64},
    "random-l8-w512": {"layers": 8, "heads": 8, "hidden": 512},
    "random-l16-w1024": {"layers": 16, "heads": 16, "hidden": 1024},
}
GIB = 2**30


# ---- 1. memory -----------------------------------------------------------------------------------------------
def llava15_7b() -> LlavaForConditionalGeneration:
    """LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B) on the meta device: shapes only."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text,
                                                         image_token_id=32000, image_seq_length=576))


def quantized(name: str) -> bool:
    import re
    return name.endswith(".weight") and not any(re.match(p, name) or name.startswith(p) for p in NOT_QUANTIZED)


def weight_bytes(model, option: str, group: int = 128) -> int:
    """Bytes of the weights as stored with `option` (none: fp16/bf16)."""
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    total = 0
    for name, p in model.named_parameters():
        if option == "none" or name not in linears or not quantized(name):
            total += p.numel() * 2
        elif option == "int8":
            total += p.numel() + p.shape[0] * (2 + 1)          # int8 data, bf16 scale + int8 zero point per row
        else:
            total += p.numel() // 2 + (p.shape[1] // group) * p.shape[0] * 2 * 2   # int4 + bf16 scale and zero
    return total


def memory_table() -> list[dict]:
    from flmm_ros.grounding.sam.models import SAM_PRESETS, build_sam
    model = llava15_7b()
    text = model.config.text_config
    with torch.device("meta"):
        sam = build_sam(SAM_PRESETS["vit_l"])
    sam_fp16 = sum(p.numel() for p in sam.parameters()) * 2
    prefix = 576 + 40                                            # image tokens + template, LLaVA-1.5
    kv = 2 * text.num_hidden_layers * prefix * text.hidden_size * 2
    rows = []
    for option in ("none", "int8", "int4"):
        weights = weight_bytes(model, option)
        rows.append({"option": option, "lmm_weights_gib": weights / GIB, "sam_vit_l_fp16_gib": sam_fp16 / GIB,
                     "kv_cache_gib": kv / GIB, "total_gib": (weights + sam_fp16 + kv) / GIB})
    return rows


# ---- 2. deviation --------------------------------------------------------------------------------------------
def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def deviation(model: str, images: list[np.ndarray], options=("int8", "int4")) -> dict:
    pipes = {q: GroundingPipeline.from_config(PipelineConfig(model=model, quantization=q, answer=False))
             for q in ("none", *options)}
    out = {}
    for q in options:
        map_diff = map_scale = coarse_diff = 0.0
        refined_iou, coarse_iou = [], []
        for i, image in enumerate(images):
            instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
            runs = {}
            for name in ("none", q):
                pipe = pipes[name]
                frame = pipe.encode(image)
                phrases = pipe.run(frame, instruction).phrases
                with torch.no_grad():
                    maps = pipe.lmm.phrase_pass(frame.lmm, phrases).maps
                    logits = pipe.ground_logits(frame, phrases)
                runs[name] = maps, logits.coarse, pipe.run(frame, instruction).objects
            (maps, coarse, objects), (qmaps, qcoarse, qobjects) = runs["none"], runs[q]
            map_diff = max(map_diff, (qmaps - maps).abs().max().item())
            map_scale = max(map_scale, maps.abs().max().item())
            coarse_diff = max(coarse_diff, (qcoarse - coarse).abs().max().item())
            coarse_iou += [iou(a.numpy() > 0, b.numpy() > 0) for a, b in zip(coarse, qcoarse)]
            refined_iou += [iou(a.mask > 0, b.mask > 0) for a, b in zip(objects, qobjects)]
        out[q] = {"maps_max_abs_diff": map_diff, "maps_max_rel_diff": map_diff / map_scale,
                  "coarse_logits_max_abs_diff": coarse_diff, "coarse_mask_iou_mean": float(np.mean(coarse_iou)),
                  "coarse_mask_iou_min": float(np.min(coarse_iou)), "mask_iou_mean": float(np.mean(refined_iou)),
                  "mask_iou_min": float(np.min(refined_iou)), "masks": len(refined_iou)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the smallest config, 2 images (smoke)")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"memory_llava15_7b": memory_table(), "deviation": {}}
    print("LLaVA-1.5-7B + SAM ViT-L, memory by LMM weight option (GiB; KV cache of the 616-token image prefix, fp16)")
    print(f"{'option':<8} {'LMM weights':>11} {'SAM ViT-L fp16':>14} {'KV cache':>8} {'total':>6}")
    for row in results["memory_llava15_7b"]:
        print(f"{row['option']:<8} {row['lmm_weights_gib']:>11.2f} {row['sam_vit_l_fp16_gib']:>14.2f} "
              f"{row['kv_cache_gib']:>8.2f} {row['total_gib']:>6.2f}")
    images = [generate_scene(seed, (240, 320)).image for seed in split_seeds("test", 2 if args.quick else args.images)]
    configs = {"random-l3-w64": RANDOM_CONFIGS["random-l3-w64"]} if args.quick else dict(RANDOM_CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: str(write_random_bundle(Path(tmp) / name, **kw)) for name, kw in configs.items()}
        if not args.quick:
            models["tabletop-tiny (trained)"] = str(EMBEDDED)
        print(f"\ndeviation from the unquantized model ({len(images)} scenes, one instruction each; CPU, float32)")
        header = (f"{'config':<24} {'option':<6} {'maps max |d|':>12} {'rel':>7} {'coarse max |d|':>14} "
                  f"{'coarse IoU mean/min':>19} {'mask IoU mean/min':>17}")
        print(header)
        print("-" * len(header))
        for name, path in models.items():
            results["deviation"][name] = dev = deviation(path, images)
            for q, d in dev.items():
                print(f"{name:<24} {q:<6} {d['maps_max_abs_diff']:>12.2e} {d['maps_max_rel_diff']:>7.1%} "
                      f"{d['coarse_logits_max_abs_diff']:>14.3f} "
                      f"{d['coarse_mask_iou_mean']:>10.3f}/{d['coarse_mask_iou_min']:.3f} "
                      f"{d['mask_iou_mean']:>9.3f}/{d['mask_iou_min']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
