"""Exporting SAM to two ONNX graphs: the image encoder and F-LMM's prompt decoder.

- image encoder: `image` (1, 3, S, S) float32, normalised and padded, S = img_size ->
  `image_embeddings` (1, C, S/16, S/16). Weights always go to one external-data file beside the graph
  (`image_encoder.onnx.data`), because ViT-H is over protobuf's 2 GB limit.
  precision 'fp16' exports an FP16 graph whose normalisation modules (LayerNorm, SAM's LayerNorm2d with
  its mean/pow/sqrt reductions) compute in FP32, with FP32 input and output: the graph TensorRT 11
  needs for a strongly typed build, and what ONNX Runtime runs for an FP16 encoder.
- prompt decoder (`SamPromptDecoder`, always FP32): `image_embeddings`, `mask_input` (1, 1, 4h, 4w),
  `box` (1, 4), `text_tokens` (1, T, C) with T dynamic -> `low_res_logits` (1, 1, 4h, 4w), `iou` (1, 1).
  No upscaling in the graph.
- precision 'int8' (ONNX Runtime on a CPU; the tracker's default there): the FP32 encoder graph with its MatMul /
  Gemm weights quantised to int8 per output channel, activations quantised per tensor at run time
  (`onnxruntime.quantization.quantize_dynamic`). On this model: embeddings within cosine 0.99995 of FP32, ~30 %
  faster (int8 dot products); tracking quality unchanged (BENCHMARKS.md, Tracking).

Exports are cached under `<cache_dir>/onnx/` in directories named by a key over the exported modules'
weights and structure, the precision and the exporter (ours, torch's version, the opset): new weights
give a new export, the same weights reuse the old one.
"""
from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from ..onnx_cache import OPSET, cached_export, module_fingerprint
from ..types import GroundingError
from . import folded_attention
from .prompt_decoder import SamPromptDecoder

EXPORTER_VERSION = 1      # bump when the graphs below change
PRECISIONS = ("fp32", "fp16")
ORT_PRECISIONS = PRECISIONS + ("int8",)    # int8: ONNX Runtime on a CPU only
# How an int8 encoder is made (part of its cache key): weights int8 per output channel, MatMul / Gemm only (int8
# convolutions are slower than FP32 ones on ONNX Runtime's CPU kernels; the patch embedding stays FP32).
INT8_QUANTIZATION = {"method": "dynamic", "weights": "int8", "per_channel": True, "ops": ["MatMul", "Gemm"]}

ENCODER_INPUT = "image"
ENCODER_OUTPUT = "image_embeddings"
DECODER_INPUTS = ("image_embeddings", "mask_input", "box", "text_tokens")
DECODER_OUTPUTS = ("low_res_logits", "iou")
TEXT_TOKENS = "text_tokens"

ENCODER_FILE = "image_encoder.onnx"
DECODER_FILE = "prompt_decoder.onnx"

# Modules computed in FP32 inside an FP16 encoder (they hold the reductions that overflow in FP16).
NORM_MODULES = (nn.LayerNorm, LayerNorm2d)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamOnnxModels:
    encoder: Path     # image_encoder.onnx; its weights are in image_encoder.onnx.data beside it
    decoder: Path     # prompt_decoder.onnx
    precision: str    # of the encoder graph; the decoder is FP32


class _Fp32Island(nn.Module):
    """Runs a normalisation module in FP32 inside an FP16 graph."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.float()).to(x.dtype)


class _Fp16ImageEncoder(nn.Module):
    """A half-precision copy of the encoder with FP32 normalisation islands and FP32 input/output."""

    def __init__(self, image_encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(image_encoder).half()
        for parent in list(self.encoder.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, NORM_MODULES):
                    setattr(parent, child_name, _Fp32Island(child))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(image.half()).float()


def _module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_axes: dict | None = None, external_data: bool = False,
            output_shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """torch.onnx.export (TorchScript exporter) to `path`; weights to `path`.data with `external_data`."""
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / path.name
        with warnings.catch_warnings():
            # The tracer warns about Python ints taken from shapes; SAM's shapes are static except T.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(raw), input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True,
                              dynamo=False)
        if not external_data and not output_shapes:
            shutil.move(str(raw), str(path))
            return
        import onnx  # loads any per-tensor files the exporter wrote for > 2 GB graphs
        model = onnx.load(str(raw))
        for output in model.graph.output:
            # The tracer leaves some static output dims symbolic; state them so the graph documents itself.
            if output.name in (output_shapes or {}):
                for dim, size in zip(output.type.tensor_type.shape.dim, output_shapes[output.name]):
                    dim.Clear()
                    dim.dim_value = size
        if not external_data:
            onnx.save_model(model, str(path))
            return
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0)


@torch.no_grad()
def export_image_encoder(sam: Sam, path: str | os.PathLike, precision: str = "fp32",
                         fold_rel_pos: bool = False) -> Path:
    """Write the image encoder to `path` (+ `path`.data); see the module docstring."""
    if precision not in PRECISIONS:
        raise GroundingError(f"precision {precision!r} is not one of {list(PRECISIONS)}")
    path = Path(path)
    encoder = sam.image_encoder
    if fold_rel_pos:
        encoder = folded_attention.fold_rel_pos(copy.deepcopy(encoder))
    encoder = encoder if precision == "fp32" else _Fp16ImageEncoder(encoder)
    size = sam.image_encoder.img_size
    image = torch.zeros(1, 3, size, size, device=_module_device(sam))
    embedding = (1, sam.prompt_encoder.embed_dim, *sam.prompt_encoder.image_embedding_size)
    _export(encoder.eval(), (image,), path, [ENCODER_INPUT], [ENCODER_OUTPUT], external_data=True,
            output_shapes={ENCODER_OUTPUT: embedding})
    return path


@torch.no_grad()
def export_prompt_decoder(sam: Sam, path: str | os.PathLike) -> Path:
    """Write `SamPromptDecoder(sam)` to `path`, with a dynamic number of text tokens."""
    path = Path(path)
    pe = sam.prompt_encoder
    device = _module_device(sam)
    input_h, input_w = pe.input_image_size
    inputs = (
        torch.zeros(1, pe.embed_dim, *pe.image_embedding_size, device=device),
        torch.zeros(1, 1, *pe.mask_input_size, device=device),
        torch.tensor([[0.0, 0.0, float(input_w), float(input_h)]], device=device),  # whole-image box
        torch.zeros(1, 2, pe.embed_dim, device=device),  # T = 2 so the tracer cannot specialise on 1
    )
    _export(SamPromptDecoder(sam).eval(), inputs, path, list(DECODER_INPUTS), list(DECODER_OUTPUTS),
            dynamic_axes={TEXT_TOKENS: {1: "num_text_tokens"}},
            output_shapes={DECODER_OUTPUTS[0]: (1, 1, *pe.mask_input_size), DECODER_OUTPUTS[1]: (1, 1)})
    return path


def quantize_encoder_int8(fp32_graph: Path, path: Path) -> Path:
    """Write the int8 version of an FP32 encoder graph to `path` (one file; see the module docstring)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class _NoPreprocessHint(logging.Filter):   # the quantizer's advice to run shape inference first, on the root
        def filter(self, record):                # logger; it cannot for graphs with external data, nor is it needed
            return "pre-processing" not in record.getMessage()

    hint = _NoPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        quantize_dynamic(str(fp32_graph), str(path), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=INT8_QUANTIZATION["ops"])
    finally:
        logging.getLogger().removeFilter(hint)
    log.info("quantised the image encoder to int8 with onnxruntime %s: %s", onnxruntime.__version__, path)
    return path


def export_sam_onnx(sam: Sam, cache_dir: str | os.PathLike, precision: str = "fp32",
                    force: bool = False, fold_rel_pos: bool = False) -> SamOnnxModels:
    """Both ONNX graphs of `sam`, from the cache when its weights were exported before. `fold_rel_pos`: the encoder's
    attention in the form ONNX Runtime runs faster (folded_attention.py; TensorRT builds keep segment-anything's).
    'int8' quantises the (cached) FP32 encoder graph, cached too."""
    if precision == "int8":
        import onnxruntime
        fp32 = export_sam_onnx(sam, cache_dir, "fp32", force, fold_rel_pos)
        fields = {"part": "image_encoder", "precision": "int8",
                  "source": fp32.encoder.parent.name,      # the FP32 export's directory: its key
                  "quantization": INT8_QUANTIZATION, "onnxruntime": onnxruntime.__version__}
        encoder = cached_export(Path(cache_dir) / "onnx", "image_encoder-int8", fields, ENCODER_FILE,
                                lambda p: quantize_encoder_int8(fp32.encoder, p), force)
        return SamOnnxModels(encoder=encoder, decoder=fp32.decoder, precision="int8")
    if precision not in PRECISIONS:
        raise GroundingError(f"precision {precision!r} is not one of {list(ORT_PRECISIONS)}")
    root = Path(cache_dir) / "onnx"
    exporter = {"exporter": EXPORTER_VERSION, "torch": torch.__version__.split("+")[0], "opset": OPSET}
    encoder_fields = {**exporter, "part": "image_encoder", "precision": precision,
                      "weights": module_fingerprint(sam.image_encoder),
                      "inputs": {ENCODER_INPUT: [1, 3, sam.image_encoder.img_size, sam.image_encoder.img_size]}}
    if fold_rel_pos:
        encoder_fields["attention"] = "folded_rel_pos"
    decoder_fields = {**exporter, "part": "prompt_decoder", "precision": "fp32",
                      "weights": module_fingerprint(sam.prompt_encoder, sam.mask_decoder),
                      "embed_dim": sam.prompt_encoder.embed_dim}
    encoder = cached_export(root, f"image_encoder-{precision}", encoder_fields, ENCODER_FILE,
                             lambda p: export_image_encoder(sam, p, precision, fold_rel_pos), force)
    decoder = cached_export(root, "prompt_decoder", decoder_fields, DECODER_FILE,
                             lambda p: export_prompt_decoder(sam, p), force)
    return SamOnnxModels(encoder=encoder, decoder=decoder, precision=precision)
