"""8-bit / 4-bit LMM weights (torchao through transformers' TorchAoConfig): what is quantized, the phrase attention
still exact relative to the quantized model's own eager attention, the deviation from the unquantized model,
and clear errors for settings that cannot run."""
import importlib.util

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from flmm_ros.grounding import GroundingPipeline, PipelineConfig, quantization
from flmm_ros.grounding.attention import eager_phrase_attention, enable_phrase_attention
from flmm_ros.grounding.quantization import check_quantization, int4_group_size, load_kwargs, storage_bytes
from flmm_ros.grounding.testing import write_random_bundle
from flmm_ros.grounding.types import GroundingError

pytest.importorskip("torchao")
PHRASES = ["the red mug", "the bowl next to the box"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("q") / "bundle", layers=3, hidden=64))


@pytest.fixture(scope="module")
def pipes(bundle):
    torch.manual_seed(0)
    return {q: GroundingPipeline.from_config(PipelineConfig(model=bundle, quantization=q, answer=False))
            for q in quantization.QUANTIZATIONS}


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (48, 80, 3), dtype=np.uint8)


def eager_maps(adapter, frame, phrases):
    """The quantized model's own naive F-LMM maps: eager attention over the full sequence, output_attentions."""
    ids, rows = adapter.phrase_tokens(frame, phrases)
    offset = len(frame.prefix_ids)
    adapter.model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = adapter.model(input_ids=torch.tensor([frame.prefix_ids + ids]), use_cache=False,
                                pixel_values=frame.prepared.pixel_values, output_attentions=True)
    finally:
        enable_phrase_attention(adapter.model)
    return adapter.attention_to_maps(eager_phrase_attention(out.attentions, [r + offset for r in rows],
                                                            frame.image_keys), frame.prepared)


def test_only_the_language_models_linear_layers_are_quantized(pipes):
    kinds = {"none": "Parameter", "int8": "Int8Tensor", "int4": "IntxUnpackedToInt8Tensor"}
    for q, pipe in pipes.items():
        model = pipe.lmm.model
        layer = pipe.lmm.language_model.layers[0]
        for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
            assert type(linear.weight).__name__ == kinds[q]
        kept = [model.lm_head.weight, model.model.multi_modal_projector.linear_1.weight,
                model.model.vision_tower.encoder.layers[0].mlp.fc1.weight, pipe.lmm.embed_tokens.weight]
        assert all(type(w) is torch.nn.Parameter and w.dtype == torch.float32 for w in kept)
    # int8: one byte per weight, and per output row a float32 scale and an int8 zero point
    full = storage_bytes(pipes["none"].lmm.language_model.layers)
    int8 = storage_bytes(pipes["int8"].lmm.language_model.layers)
    linears = [m for m in pipes["none"].lmm.language_model.layers.modules() if isinstance(m, torch.nn.Linear)]
    weights = sum(m.weight.numel() for m in linears)
    rows = sum(m.weight.shape[0] for m in linears)
    assert full - int8 == 4 * weights - (weights + 5 * rows)


@pytest.mark.parametrize("q", ["int8", "int4"])
def test_phrase_attention_is_exact_relative_to_the_quantized_models_eager_attention(pipes, q):
    adapter = pipes[q].lmm
    frame = adapter.encode_frame(image())
    ours = adapter.phrase_pass(frame, PHRASES).maps
    assert (ours - eager_maps(adapter, frame, PHRASES)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("q,max_map_diff,min_iou", [("int8", 0.01, 0.95), ("int4", 0.1, 0.7)])
def test_quantized_maps_and_masks_stay_close_to_the_unquantized_models(pipes, q, max_map_diff, min_iou):
    """Bounds for this tiny random model (bench/quantization.py measures the deviation for larger ones)."""
    results = {}
    for name in ("none", q):
        pipe = pipes[name]
        frame = pipe.encode(image(1))
        with torch.no_grad():
            maps = pipe.lmm.phrase_pass(frame.lmm, PHRASES).maps
        results[name] = maps, pipe.run(frame, "put the red mug in the bowl")
    (maps, reference), (qmaps, got) = results["none"], results[q]
    diff = (qmaps - maps).abs().max().item()
    assert 0 < diff <= max_map_diff                   # the weights really changed, the maps only a little
    for a, b in zip(reference.objects, got.objects):
        union = np.logical_or(a.mask, b.mask).sum()
        assert union == 0 or np.logical_and(a.mask, b.mask).sum() / union >= min_iou


def test_int4_group_size_follows_the_layer_widths():
    llava7b = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    assert int4_group_size(llava7b) == 128
    assert int4_group_size(LlamaConfig(hidden_size=160, intermediate_size=480, num_attention_heads=4,
                                       head_dim=40)) == 32               # the embedded tabletop-tiny LMM
    assert int4_group_size(LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)) == 64
    with pytest.raises(GroundingError, match="divisible by 32"):
        int4_group_size(LlamaConfig(hidden_size=48, intermediate_size=96, num_attention_heads=6))


def test_settings_that_cannot_run_are_refused_clearly(monkeypatch):
    with pytest.raises(GroundingError, match=r"quantization 'int3' is not one of \['none', 'int8', 'int4'\]"):
        PipelineConfig(model="m", quantization="int3").validate()
    with pytest.raises(GroundingError, match="need dtype bfloat16"):
        check_quantization("int4", "cuda", torch.float16)
    if importlib.util.find_spec("accelerate") is None:
        with pytest.raises(GroundingError, match=r"needs accelerate: pip install accelerate==\d"):
            check_quantization("int4", "cuda:0", torch.bfloat16)
    check_quantization("int8", "cuda", torch.float16)   # int8 runs in any dtype, without accelerate
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else
                        real_find_spec(name, *a))
    with pytest.raises(GroundingError, match="quantization needs torchao"):
        check_quantization("int8", "cpu", torch.float32)
    check_quantization("none", "cpu", torch.float32)     # no quantization needs no torchao


def test_int4_on_cuda_packs_for_tinygemm_while_loading_onto_the_gpu(monkeypatch):
    """The CUDA path's load arguments (built without a GPU; running them needs one)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "accelerate" else
                        real_find_spec(name, *a))
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_attention_heads=32)
    kwargs = load_kwargs("int4", "cuda:1", torch.bfloat16, text)
    assert kwargs["device_map"] == {"": torch.device("cuda:1")}
    quant_type = kwargs["quantization_config"].quant_type
    assert type(quant_type).__name__ == "Int4WeightOnlyConfig" and quant_type.group_size == 128
    assert quant_type.int4_packing_format.value == "tile_packed_to_4d"
    assert load_kwargs("none", "cuda", torch.bfloat16, text) == {}
    assert "device_map" not in load_kwargs("int8", "cuda", torch.bfloat16, text)
