"""Benchmark: the SAM refiner's image encoder and prompt decoder on PyTorch fp32 (the naive way),
ONNX Runtime and TensorRT (where it can run), same random-weight model, same inputs, one process.

Each backend is made first (exports/builds are cached under --cache-dir and reported separately),
then timed: one warm-up call, then the median of --repeats calls, encoder and decoder separately
(decoder with --text-tokens phrase tokens). CUDA timings synchronise the device around each call.

    python bench/refiner.py --sam-type tiny --device cpu
    python bench/refiner.py --sam-type vit_b --device cpu --repeats 3
    python bench/refiner.py --sam-type vit_l --device cuda --precision fp16
"""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from flmm_ros.grounding.onnx_cache import default_cache_dir
from flmm_ros.grounding.sam.backends import TorchBackend, make_refiner_backend
from flmm_ros.grounding.sam.models import build_sam, parse_sam_type
from flmm_ros.grounding.sam.parity import parity_report
from flmm_ros.grounding.sam.shapes import SamShapes
from flmm_ros.grounding.types import GroundingError


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    once()
    return statistics.median(once() for _ in range(repeats))


def make_backends(sam, args, device):
    """(name, backend, seconds to make) for the baseline and every other backend that runs here."""
    start = time.perf_counter()
    made = [("torch fp32", TorchBackend(sam, device, "fp32", cuda_graphs=False), time.perf_counter() - start)]
    if device.type == "cuda":   # the same decoder replayed from CUDA graphs (the pipeline's torch backend)
        made.append(("torch fp32 + CUDA graphs", TorchBackend(sam, device, "fp32"), 0.0))
    for name in ("onnxruntime", "tensorrt"):
        start = time.perf_counter()
        try:
            backend = make_refiner_backend(name, sam, device=device, precision=args.precision,
                                           cache_dir=args.cache_dir, fallback=False)
        except GroundingError as e:
            print(f"{name}: skipped ({e})")
            continue
        made.append((f"{name} {args.precision}", backend, time.perf_counter() - start))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam-type", default="tiny", help="vit_b | vit_l | vit_h | tiny | JSON SamArch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                        help="of the ONNX Runtime / TensorRT encoders (the baseline stays fp32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-tokens", type=int, default=8)
    parser.add_argument("--cache-dir", default=str(default_cache_dir()))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    torch.manual_seed(0)
    sam = build_sam(parse_sam_type(args.sam_type)).to(device)
    shapes = SamShapes(sam)
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 3, shapes.image_size, shapes.image_size, generator=g).to(device)
    mask_input = torch.randn(1, 1, *shapes.mask_hw, generator=g).to(device)
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]], device=device) * shapes.image_size
    tokens = torch.randn(1, args.text_tokens, shapes.embed_dim, generator=g).to(device)

    backends = make_backends(sam, args, device)
    reference = backends[0][1]
    rows = []
    with torch.no_grad():
        embedding = reference.encode(image)
        for name, backend, setup in backends:
            encode = timed(lambda: backend.encode(image), device, args.repeats)
            decode = timed(lambda: backend.decode(embedding, mask_input, box, tokens), device, args.repeats)
            parity = parity_report(reference, backend, sam, text_token_counts=(args.text_tokens,))
            rows.append((name, setup, encode, decode, parity))

    threads = torch.get_num_threads() if device.type == "cpu" else None
    print(f"\nSAM refiner, {args.sam_type} (image {shapes.image_size}, embedding {shapes.embed_dim}x"
          f"{shapes.embedding_hw[0]}x{shapes.embedding_hw[1]}), device {device}"
          + (f" ({threads} threads)" if threads else "") + f", median of {args.repeats}, T = {args.text_tokens}")
    base_encode, base_decode = rows[0][2], rows[0][3]
    print(f"{'backend':<18} {'setup s':>8} {'encoder ms':>11} {'x torch':>8} {'decoder ms':>11} {'x torch':>8} "
          f"{'enc max|d|':>11} {'mask IoU':>9}")
    for name, setup, encode, decode, parity in rows:
        print(f"{name:<18} {setup:>8.1f} {encode * 1e3:>11.1f} {base_encode / encode:>7.2f}x "
              f"{decode * 1e3:>11.2f} {base_decode / decode:>7.2f}x {parity['encoder_max_abs']:>11.1e} "
              f"{parity['end_to_end_mask_iou']:>9.4f}")
    print("'x torch' = speed-up over PyTorch fp32 (higher is faster); setup = export/build or cache load.")


if __name__ == "__main__":
    main()
