"""Weight-only 8-bit / 4-bit LMM weights through transformers' `TorchAoConfig` (torchao), for a 7B LMM in 16 GB.

Only the language model's linear layers are quantized (for LLaVA-1.5-7B, 6.5 of its 7.1 billion weights); the
vision tower, the projector, the embeddings and `lm_head` keep the LMM dtype. Activations, attention and
the KV cache keep the LMM dtype too, so the phrase-row attention (attention.py) is computed from the
quantized model's own q and k exactly as before: the maps equal that model's eager `output_attentions`
maps (tests/test_quantization.py). What changes is the model, by the rounding of its weights.

- `int8`: per-output-channel symmetric int8 (`Int8WeightOnlyConfig`), on the CPU and CUDA.
- `int4`: groupwise (128 weights) asymmetric int4. On CUDA (sm80+: A100/H100, Jetson Orin) the tinygemm
  packing (`Int4WeightOnlyConfig`, `tile_packed_to_4d`, bfloat16), quantized while loading on the GPU
  (transformers' `device_map`, which needs `accelerate`). On the CPU the same int4 grid is kept unpacked in
  int8 (`IntxWeightOnlyConfig`): the int4 rounding without the int4 memory saving, for measuring accuracy.

torchao was chosen over bitsandbytes because it is pure Python over torch's own kernels: it installs and
runs here and with Jetson's torch, where bitsandbytes' PyPI aarch64 wheels are built for server ARM
(aarch64-sbsa) CUDA and fail on L4T (bitsandbytes issues #1930, #1941).
"""
from __future__ import annotations

import importlib.util

import torch

from .types import GroundingError

QUANTIZATIONS = ("none", "int8", "int4")
INT4_GROUP_SIZES = (128, 64, 32)     # the first that divides every quantized layer's input width is used
# Kept in the LMM dtype: transformers' patterns (regex from the start of a weight's name, or a suffix) for the
# Llava / LlavaNext modules `model.vision_tower`, `model.multi_modal_projector` and `lm_head`.
NOT_QUANTIZED = [r".*\bvision_tower", r".*\bmulti_modal_projector", "lm_head"]
ACCELERATE_PIN = "accelerate==1.15.0"


def _torchao():
    if importlib.util.find_spec("torchao") is None:
        raise GroundingError("quantization needs torchao (pinned in requirements.txt: pip install -r requirements.txt)")
    import torchao.quantization as q
    return q


def int4_group_size(text_config) -> int:
    """The int4 group size for a language model: 128 (LLaVA-1.5-7B), or the largest of 64 / 32 that divides
    every quantized layer's input width (hidden size, attention output and MLP widths)."""
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    widths = (text_config.hidden_size, text_config.intermediate_size, head_dim * text_config.num_attention_heads)
    for size in INT4_GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise GroundingError(f"int4 needs layer widths divisible by 32; this LMM has {widths}")


def check_quantization(quantization: str, device: str, dtype: torch.dtype) -> None:
    """GroundingError when `quantization` cannot run on `device` with `dtype` (before anything is loaded)."""
    if quantization not in QUANTIZATIONS:
        raise GroundingError(f"quantization {quantization!r} is not one of {list(QUANTIZATIONS)}")
    if quantization == "none":
        return
    _torchao()
    if quantization == "int4" and str(device).startswith("cuda"):
        if dtype != torch.bfloat16:
            raise GroundingError(f"int4 on CUDA runs tinygemm kernels, which need dtype bfloat16 (got {dtype}); "
                                 "set dtype: bfloat16 or auto")
        if importlib.util.find_spec("accelerate") is None:
            raise GroundingError("int4 on CUDA quantizes while loading onto the GPU (transformers' device_map), "
                                 f"which needs accelerate: pip install {ACCELERATE_PIN}")


def load_kwargs(quantization: str, device: str, dtype: torch.dtype, text_config) -> dict:
    """Keyword arguments for `from_pretrained`: {} for 'none', else `quantization_config` (+ `device_map` for
    int4 on CUDA). `text_config` is the language model's config (for the int4 group size)."""
    check_quantization(quantization, device, dtype)
    if quantization == "none":
        return {}
    from transformers import TorchAoConfig
    q = _torchao()
    if quantization == "int8":
        quant_type = q.Int8WeightOnlyConfig(set_inductor_config=False)
    elif str(device).startswith("cuda"):
        from torchao.quantization.quantize_.workflows import Int4PackingFormat
        quant_type = q.Int4WeightOnlyConfig(group_size=int4_group_size(text_config), set_inductor_config=False,
                                            int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
    else:
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType
        quant_type = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(int4_group_size(text_config)),
                                            mapping_type=MappingType.ASYMMETRIC)
    kwargs = {"quantization_config": TorchAoConfig(quant_type=quant_type, modules_to_not_convert=list(NOT_QUANTIZED))}
    if quantization == "int4" and str(device).startswith("cuda"):
        kwargs["device_map"] = {"": torch.device(device)}    # pack on the GPU as each weight arrives
    return kwargs


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers occupy, quantized tensors counted by their inner tensors."""
    def size(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            return sum(size(getattr(t, n)) for n in names if isinstance(getattr(t, n), torch.Tensor))
        return t.numel() * t.element_size()
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += size(t.data if isinstance(t, torch.nn.Parameter) else t)
    return total
