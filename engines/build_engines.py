"""Build SAM's ONNX graphs and TensorRT plans for the refiner, in one command.

    # official ViT-L + F-LMM's fine-tuned prompt encoder/decoder, FP16 engines, parity check:
    python engines/build_engines.py --sam-type vit_l --sam-checkpoint sam_vit_l_0b3195.pth \\
        --flmm-checkpoint frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth --device cuda --check
    # the SAM of a model bundle (e.g. the embedded default), ONNX only on a CPU machine:
    python engines/build_engines.py --bundle ros_ws/src/flmm_ros/models/tabletop_tiny --device cpu --check
    # random weights of a size (benchmarks), or a custom size as JSON:
    python engines/build_engines.py --sam-type vit_b
    python engines/build_engines.py --sam-type '{"encoder_embed_dim": 64, "encoder_depth": 2, ...}'

Artifacts go to --cache-dir (default engines/cache, git-ignored), keyed by content: the node finds them
when it runs with the same weights and `engine_dir` pointing there. TensorRT plans are built on the
machine that runs them (they are tied to the GPU and the TensorRT version); without TensorRT or a GPU
only the ONNX graphs are made (--tensorrt require makes that an error).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from flmm_ros.grounding.bundle import load_bundle_sam
from flmm_ros.grounding.checkpoint import load_sam_part, load_sam_weights
from flmm_ros.grounding.onnx_cache import default_cache_dir
from flmm_ros.grounding.sam.backends import (
    BackendUnavailable,
    OnnxRuntimeBackend,
    TorchBackend,
    onnxruntime_placement,
)
from flmm_ros.grounding.sam.models import build_sam, parse_sam_type
from flmm_ros.grounding.sam.onnx_export import PRECISIONS, export_sam_onnx
from flmm_ros.grounding.sam.parity import parity_failures, parity_report
from flmm_ros.grounding.sam.shapes import SamShapes
from flmm_ros.grounding.sam.tensorrt import TensorRTBackend, tensorrt_unavailable_reason
from flmm_ros.grounding.types import GroundingError
from segment_anything.modeling import Sam

log = logging.getLogger("build_engines")


def sam_from_args(args) -> Sam:
    torch.manual_seed(args.seed)  # the same random weights every run, so their exports are reused
    if args.bundle:
        sam = load_bundle_sam(args.bundle)
        log.info("SAM from bundle %s", args.bundle)
    else:
        sam = build_sam(parse_sam_type(args.sam_type))
        if args.sam_checkpoint:
            log.info("SAM weights %s: %s", args.sam_checkpoint, load_sam_weights(sam, args.sam_checkpoint))
        else:
            log.warning("no --sam-checkpoint: random SAM weights (fine for benchmarks, not for grounding)")
    if args.flmm_checkpoint:
        log.info("F-LMM refiner weights %s: %d tensors", args.flmm_checkpoint,
                 load_sam_part(sam, args.flmm_checkpoint))
    return sam.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--sam-type", default="vit_l", help="vit_b | vit_l | vit_h | tiny | JSON SamArch | file")
    source.add_argument("--sam-checkpoint", help="official sam_vit_*.pth")
    source.add_argument("--flmm-checkpoint", help="F-LMM .pth or our head .safetensors: its SAM weights")
    source.add_argument("--bundle", help="a model bundle directory: its SAM size and weights")
    source.add_argument("--seed", type=int, default=0, help="seed of random weights")
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16", help="of the image encoder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tensorrt", choices=("auto", "require", "off"), default="auto")
    parser.add_argument("--check", action="store_true", help="parity against PyTorch FP32; exit 1 on failure")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except GroundingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    sam = sam_from_args(args).to(args.device)
    device = torch.device(args.device)
    built = []
    start = time.perf_counter()
    # The graphs ONNX Runtime runs (the encoder's attention folded: sam/folded_attention.py); TensorRTBackend
    # exports the form it builds from itself.
    models = export_sam_onnx(sam, args.cache_dir, args.precision, fold_rel_pos=True)
    print(f"ONNX ({time.perf_counter() - start:.1f} s):\n  {models.encoder}\n  {models.decoder}")
    try:
        ort_device, _ = onnxruntime_placement(device)
    except BackendUnavailable as e:  # e.g. no CUDA provider: check the graphs on the CPU instead
        log.warning("onnxruntime on %s: %s; checking the ONNX graphs on the CPU", device, e)
        ort_device = torch.device("cpu")
    built.append(OnnxRuntimeBackend(models, SamShapes(sam), ort_device))

    if args.tensorrt != "off":
        reason = tensorrt_unavailable_reason(device)
        if reason and args.tensorrt == "require":
            raise GroundingError(f"TensorRT required but unavailable: {reason}")
        if reason:
            print(f"TensorRT skipped: {reason}")
        else:
            start = time.perf_counter()
            trt_backend = TensorRTBackend(sam, device=device, precision=args.precision, cache_dir=args.cache_dir)
            print(f"TensorRT plans ({time.perf_counter() - start:.1f} s) in {trt_backend.plans.directory}")
            built.append(trt_backend)

    if not args.check:
        return 0
    reference = TorchBackend(sam, device, "fp32")
    failed = False
    print(f"\nparity against PyTorch fp32 ({args.precision} encoder; decoder fp32):")
    print(f"{'backend':<12} {'enc max|d|':>11} {'enc cos':>9} {'dec max|d|':>11} {'mask IoU':>9} "
          f"{'e2e IoU':>8} {'IoU-pred |d|':>13}")
    for backend in built:
        r = parity_report(reference, backend, sam)
        failures = parity_failures(r, args.precision)
        failed |= bool(failures)
        print(f"{backend.name:<12} {r['encoder_max_abs']:>11.2e} {r['encoder_cosine']:>9.6f} "
              f"{r['decoder_max_abs']:>11.2e} {r['mask_iou']:>9.4f} {r['end_to_end_mask_iou']:>8.4f} "
              f"{r['iou_pred_max_abs']:>13.2e}  {'FAIL: ' + '; '.join(failures) if failures else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
