"""Phrase-row attention (SDPA + recomputed rows) against eager `output_attentions=True`."""
import numpy as np
import pytest
import torch

from flmm_ros.grounding.attention import eager_phrase_attention
from flmm_ros.grounding.lmm import LlavaAdapter, LlavaNextAdapter
from flmm_ros.grounding.testing import tiny_llava, tiny_llava_next

PHRASES = [["the red mug"], ["the ball", "the bowl next to the box"], ["a mug", "the blue can", "it"]]


def eager_reference(adapter, frame, phrases):
    """The naive F-LMM way on the full sequence: eager attention, every matrix kept, then sliced."""
    ids, rows = adapter.phrase_tokens(frame, phrases)
    full = torch.tensor([frame.prefix_ids + ids])
    offset = len(frame.prefix_ids)
    model = adapter.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        sizes = getattr(frame.prepared, "image_sizes", None)      # LLaVA-NeXT's any-res input
        extra = {} if sizes is None else {"image_sizes": sizes}
        out = model(input_ids=full, pixel_values=frame.prepared.pixel_values, output_attentions=True,
                    output_hidden_states=True, use_cache=False, **extra)
    finally:
        from flmm_ros.grounding.attention import enable_phrase_attention
        enable_phrase_attention(model)
    maps = eager_phrase_attention(out.attentions, [r + offset for r in rows], frame.image_keys)
    hidden = torch.stack(out.hidden_states[1:])[:, 0]
    return adapter.attention_to_maps(maps, frame.prepared), [hidden[:, r + offset] for r in rows]


def random_image(seed, hw=(48, 80)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llava_phrase_attention_matches_eager(heads, kv_heads, seed):
    model, tok, proc = tiny_llava(layers=3, heads=heads, kv_heads=kv_heads, hidden=48 if heads == 6 else 64,
                                  seed=seed)
    adapter = LlavaAdapter(model, tok, proc)
    frame = adapter.encode_frame(random_image(seed))
    phrases = PHRASES[seed]
    result = adapter.phrase_pass(frame, phrases)
    ref_maps, ref_hidden = eager_reference(adapter, frame, phrases)
    assert result.maps.shape == (len(phrases), 3 * heads, adapter.grid, adapter.grid)
    assert (result.maps - ref_maps).abs().max() <= 1e-5
    for ours, ref in zip(result.hidden_states, ref_hidden):
        assert torch.allclose(ours, ref, atol=1e-5)
    # The maps are real attention: inside [0, 1] and not all equal.
    assert result.maps.min() >= 0 and result.maps.max() <= 1 and result.maps.std() > 0


def test_llava_next_phrase_attention_matches_eager():
    model, tok, proc = tiny_llava_next(layers=2, heads=4, kv_heads=2)
    adapter = LlavaNextAdapter(model, tok, proc)
    frame = adapter.encode_frame(random_image(3, (40, 72)))
    result = adapter.phrase_pass(frame, ["the red mug", "the bowl"])
    ref_maps, _ = eager_reference(adapter, frame, ["the red mug", "the bowl"])
    fine_h, fine_w = frame.prepared.fine_hw
    assert result.maps.shape == (2, 2 * 2 * 4, fine_h, fine_w)
    assert (fine_h, fine_w) != (adapter.grid, adapter.grid)
    assert (result.maps - ref_maps).abs().max() <= 1e-5


def test_prefix_cache_is_restored_after_each_pass():
    model, tok, proc = tiny_llava()
    adapter = LlavaAdapter(model, tok, proc)
    frame = adapter.encode_frame(random_image(5))
    n = frame.cache.get_seq_length()
    assert n == len(frame.prefix_ids)
    first = adapter.phrase_pass(frame, ["the mug"]).maps
    adapter.generate(frame, "where is the mug ?", max_new_tokens=4)
    assert frame.cache.get_seq_length() == n
    assert torch.equal(adapter.phrase_pass(frame, ["the mug"]).maps, first)


def flmm_bf16_maps(adapter, frame, phrases):
    """F-LMM's bf16 way: eager output_attentions in the model dtype, image columns sliced, mean in that dtype."""
    ids, rows = adapter.phrase_tokens(frame, phrases)
    offset = len(frame.prefix_ids)
    model = adapter.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        out = model(input_ids=torch.tensor([frame.prefix_ids + ids]), pixel_values=frame.prepared.pixel_values,
                    output_attentions=True, use_cache=False)
    finally:
        from flmm_ros.grounding.attention import enable_phrase_attention
        enable_phrase_attention(model)
    maps = [torch.cat([a[0][:, r + offset][..., frame.image_keys].mean(dim=1) for a in out.attentions]) for r in rows]
    return adapter.attention_to_maps(torch.stack(maps).float(), frame.prepared)


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_phrase_rows_round_like_flmms_bf16_eager(seed):
    """In bf16 (F-LMM's dtype) the recomputed rows round scores and probabilities as eager bf16 does: the first
    layer (same inputs for both) is bit-identical, and overall we sit far closer to F-LMM's bf16 maps than they
    sit to float32 (later layers differ only through SDPA vs eager outputs in the bf16 forward)."""
    model, tok, proc = tiny_llava(layers=4, heads=4, kv_heads=2, seed=seed)
    image, phrases = random_image(seed), ["the red mug", "the ball"]
    fp32 = LlavaAdapter(model, tok, proc)
    flmm_fp32 = flmm_bf16_maps(fp32, fp32.encode_frame(image), phrases)
    bf16 = LlavaAdapter(model.to(torch.bfloat16), tok, proc)
    frame = bf16.encode_frame(image)
    ours, flmm = bf16.phrase_pass(frame, phrases).maps, flmm_bf16_maps(bf16, frame, phrases)
    assert torch.equal(ours[:, :4], flmm[:, :4])                                  # layer 0: 4 heads
    assert (ours - flmm).abs().mean() < 0.2 * (flmm - flmm_fp32).abs().mean()
    assert (ours - flmm).abs().max() <= 2 ** -7 * flmm.abs().max()                # at most one bf16 step
