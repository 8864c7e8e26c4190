"""Runtimes for SAM's image encoder and F-LMM's prompt decoder, behind one small interface.

- 'auto' (the default): 'onnxruntime' on a CPU (6.7x / 13.8x faster than PyTorch for the tiny SAM's encoder /
  decoder, BENCHMARKS.md), 'torch' on CUDA (fp16 kernels and CUDA graphs, no export step; 'tensorrt' is
  chosen by name, its first build takes minutes). Falls back to 'torch' when onnxruntime is missing.
- 'torch': `sam.image_encoder` + `SamPromptDecoder` on the model itself (decode is differentiable; training
  uses it). fp16 runs the encoder under autocast.
- 'onnxruntime': the two ONNX graphs of `onnx_export.py` (exported once per set of weights, cached), on the
  CPU or, for a CUDA device, the CUDA execution provider with tensors bound in place.
- 'tensorrt': plans built from those graphs (`tensorrt.py`), cached per GPU and TensorRT version.

Precision applies to the image encoder (int8: ONNX Runtime on a CPU only, onnx_export.py); the prompt decoder
always runs FP32 (it is small and bound by kernel launches, and FP16 would coarsen the Fourier encoding of the box
corners).
ONNX Runtime and TensorRT snapshot the weights when the backend is made: make a new backend after
changing them.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..onnx_cache import default_cache_dir
from ..onnx_runtime import session_options
from ..types import GroundingCancelled, GroundingError
from .onnx_export import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    ORT_PRECISIONS,
    PRECISIONS,
    SamOnnxModels,
    export_sam_onnx,
)
from .cuda_graphs import GraphedDecoder
from .prompt_decoder import SamPromptDecoder
from .sdpa import use_sdpa
from .shapes import SamShapes
from .tensorrt import TensorRTBackend, tensorrt_unavailable_reason

BACKENDS = ("auto", "torch", "onnxruntime", "tensorrt")
_FALLBACKS = {"tensorrt": ("tensorrt", "onnxruntime", "torch"), "onnxruntime": ("onnxruntime", "torch"),
              "torch": ("torch",)}

log = logging.getLogger(__name__)


class RefinerBackend(Protocol):
    name: str  # 'torch' | 'onnxruntime' | 'tensorrt'

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, S, S) float32, normalised and padded -> (1, C, h, w) image embeddings."""

    def decode(self, image_embeddings: torch.Tensor, mask_input: torch.Tensor, box: torch.Tensor,
               text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> low-res logits (1, 1, 4h, 4w) and predicted IoU (1, 1); see `SamPromptDecoder`."""


class BackendUnavailable(RuntimeError):
    """This backend cannot run here (package missing, no GPU); `make_refiner_backend` may fall back."""


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend `name` stands for on `device`: 'auto' is 'onnxruntime' on a CPU and 'torch' elsewhere."""
    if name != "auto":
        return name
    return "onnxruntime" if torch.device(device).type == "cpu" else "torch"


class TorchBackend:
    """The model itself, on `device` (moved there). On CUDA the image encoder's attention runs on SDPA (sdpa.py)
    and gradient-free decodes replay CUDA graphs (cuda_graphs.py; `cuda_graphs=False` runs them eagerly)."""
    name = "torch"

    def __init__(self, sam: Sam, device: torch.device, precision: str, cuda_graphs: bool = True) -> None:
        self.sam = sam.to(device)
        self.device = torch.device(device)
        self.precision = precision
        self.shapes = SamShapes(sam)
        self.decoder = SamPromptDecoder(sam)
        self.graphed = GraphedDecoder(self.decoder, self.device) if cuda_graphs and self.device.type == "cuda" else None
        if self.device.type == "cuda":
            use_sdpa(sam.image_encoder)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.shapes.check_image(image)
        image = image.to(self.device, torch.float32)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.float16,
                                             enabled=self.precision == "fp16"):
            return self.sam.image_encoder(image).float()

    def decode(self, image_embeddings, mask_input, box, text_tokens):
        self.shapes.check_decoder_inputs(image_embeddings, mask_input, box, text_tokens)
        inputs = tuple(t.to(self.device, torch.float32) for t in (image_embeddings, mask_input, box, text_tokens))
        return (self.graphed or self.decoder)(*inputs)


def onnxruntime_placement(device: torch.device) -> tuple[torch.device, list]:
    """(device, execution providers) for ONNX Runtime on `device`; BackendUnavailable when it cannot run there."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise BackendUnavailable(f"onnxruntime is not installed ({e})") from None
    if device.type == "cpu":
        return device, ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise BackendUnavailable(f"onnxruntime runs on cpu or cuda devices, not {device}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("this onnxruntime build has no CUDAExecutionProvider "
                                 "(install onnxruntime-gpu for a CUDA device)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index), [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]


class OnnxRuntimeBackend:
    """The exported graphs on ONNX Runtime: CPU provider for a CPU device, CUDA provider (tensors bound
    by address, no copies) for a CUDA device. An image encoder pass run `interruptible` can be ended from another
    thread (`interrupt`); decoder passes always finish."""
    name = "onnxruntime"

    def __init__(self, models: SamOnnxModels, shapes: SamShapes, device: torch.device) -> None:
        self.device, self.providers = onnxruntime_placement(device)
        self.models = models
        self.precision = models.precision     # of the encoder graph, like TorchBackend.precision
        self.shapes = shapes
        self._open_sessions(session_options())   # torch's thread count, no spinning threads (onnx_runtime.py)
        embed = (1, shapes.embed_dim, *shapes.embedding_hw)
        self.encoder_outputs = {ENCODER_OUTPUT: embed}
        self.decoder_outputs = {DECODER_OUTPUTS[0]: (1, 1, *shapes.mask_hw), DECODER_OUTPUTS[1]: (1, 1)}
        self._interruptible = threading.local()
        self._encoder_run = None             # the RunOptions of the interruptible encoder pass in progress

    def _open_sessions(self, options) -> None:
        import onnxruntime as ort
        self.encoder = ort.InferenceSession(str(self.models.encoder), sess_options=options, providers=self.providers)
        self.decoder = ort.InferenceSession(str(self.models.decoder), sess_options=options, providers=self.providers)

    def set_threads(self, threads: int) -> None:
        """Open the sessions again with `threads` intra-op threads (the tracker's runtime, beside the thread serving
        instructions; still no spinning threads)."""
        options = session_options()
        options.intra_op_num_threads = threads
        self._open_sessions(options)

    def _run(self, session, feeds: dict[str, torch.Tensor], outputs: dict[str, tuple],
             options=None) -> list[torch.Tensor]:
        feeds = {k: v.detach().to(self.device, torch.float32).contiguous() for k, v in feeds.items()}
        if self.device.type == "cpu":
            results = session.run(list(outputs), {k: v.numpy() for k, v in feeds.items()}, options)
            return [torch.from_numpy(r) for r in results]
        binding = session.io_binding()
        for name, tensor in feeds.items():
            binding.bind_input(name, "cuda", self.device.index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        results = [torch.empty(shape, device=self.device) for shape in outputs.values()]
        for name, tensor in zip(outputs, results):
            binding.bind_output(name, "cuda", self.device.index, np.float32, tuple(tensor.shape), tensor.data_ptr())
        torch.cuda.current_stream(self.device).synchronize()  # inputs were written on torch's stream
        session.run_with_iobinding(binding, options)
        return results

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Raises GroundingCancelled when `interrupt` ended the pass (only inside `interruptible`)."""
        import onnxruntime as ort
        self.shapes.check_image(image)
        options = ort.RunOptions()
        if getattr(self._interruptible, "on", False):
            self._encoder_run = options
        try:
            return self._run(self.encoder, {ENCODER_INPUT: image}, self.encoder_outputs, options)[0]
        except Exception:
            if options.terminate:    # ONNX Runtime stopped between two nodes of the graph
                raise GroundingCancelled("the SAM image encoder pass was interrupted") from None
            raise
        finally:
            if self._encoder_run is options:
                self._encoder_run = None

    @contextmanager
    def interruptible(self):
        """The encoder passes this thread runs inside the block may be ended by `interrupt` (other passes never)."""
        self._interruptible.on = True
        try:
            yield
        finally:
            self._interruptible.on = False

    def interrupt(self) -> None:
        """End the interruptible encoder pass in progress, if any (from another thread): it raises
        GroundingCancelled."""
        run = self._encoder_run
        if run is not None:
            run.terminate = True

    def decode(self, image_embeddings, mask_input, box, text_tokens):
        self.shapes.check_decoder_inputs(image_embeddings, mask_input, box, text_tokens)
        feeds = dict(zip(DECODER_INPUTS, (image_embeddings, mask_input, box, text_tokens)))
        low_res, iou = self._run(self.decoder, feeds, self.decoder_outputs)
        return low_res, iou


def _make_torch(sam, device, precision, cache_dir, logger):
    if precision == "int8":     # ONNX Runtime's (missing: the fallback); PyTorch runs the FP32 encoder
        logger.warning("the int8 SAM encoder needs onnxruntime; PyTorch runs it in fp32")
        precision = "fp32"
    return TorchBackend(sam, device, precision)


def _make_onnxruntime(sam, device, precision, cache_dir, logger):
    onnxruntime_placement(device)  # fail before spending time on the export
    models = export_sam_onnx(sam, cache_dir, precision, fold_rel_pos=True)   # folded_attention.py
    return OnnxRuntimeBackend(models, SamShapes(sam), device)


def _make_tensorrt(sam, device, precision, cache_dir, logger):
    reason = tensorrt_unavailable_reason(device)
    if reason:
        raise BackendUnavailable(reason)
    return TensorRTBackend(sam, device=device, precision=precision, cache_dir=cache_dir, logger=logger)


_MAKERS = {"torch": _make_torch, "onnxruntime": _make_onnxruntime, "tensorrt": _make_tensorrt}


def make_refiner_backend(name: str, sam: Sam, *, device="cpu", precision: str = "fp32", cache_dir=None,
                         fallback: bool = True, logger: logging.Logger | None = None) -> RefinerBackend:
    """The backend `name` for `sam` ('auto': see `resolve_backend`). When it cannot run here (no `tensorrt`, no
    GPU, no onnxruntime): with `fallback`, warn and take the next of tensorrt -> onnxruntime -> torch; without,
    raise GroundingError with the reason. Errors of a backend that can run (a failed build) always raise."""
    logger = logger or log
    if name not in BACKENDS:
        raise GroundingError(f"unknown refiner backend {name!r}: use one of {list(BACKENDS)}")
    requested, name = name, resolve_backend(name, device)
    if precision not in ORT_PRECISIONS:
        raise GroundingError(f"unknown refiner precision {precision!r}: use one of {list(ORT_PRECISIONS)}")
    device = torch.device(device)
    if precision == "int8" and (name != "onnxruntime" or device.type != "cpu"):
        raise GroundingError(f"refiner precision int8 is for ONNX Runtime on a CPU, not {name} on {device}: "
                             f"use {list(PRECISIONS)}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GroundingError(f"device {device} requested but CUDA is not available")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    candidates = _FALLBACKS[name] if fallback else (name,)
    reasons = []
    for candidate in candidates:
        try:
            backend = _MAKERS[candidate](sam, device, precision, cache_dir, logger)
        except BackendUnavailable as e:
            reasons.append(f"{candidate}: {e}")
            if candidate != candidates[-1]:
                logger.warning("SAM refiner backend %r is unavailable (%s); falling back", candidate, e)
            continue
        if candidate != name:
            logger.warning("SAM refiner runs on %r instead of the requested %r", candidate, requested)
        return backend
    raise GroundingError(f"SAM refiner backend {requested!r} is unavailable: {'; '.join(reasons)}")


# Minimum agreement with PyTorch FP32 (random inputs; masks binarised at logit 0).
