"""The contract every LMM adapter keeps, run over every family in `lmm.ADAPTERS` (tiny random-weight models).

- the per-frame KV cache of the image prefix is left exactly as it was after a phrase pass, an answer and a
  reasoning pass (the next instruction on the frame sees the same prefix);
- the maps have `mask_head_channels` channels, layer-major: channel l*H + h is layer l, head h (LLaVA-NeXT: the
  base-image block, then the tile block, each in that order), as F-LMM stacks them;
- the phrase rows' attention equals eager `output_attentions=True` attention, hidden states included;
- questions asked beside the phrases (`phrase_pass(questions=...)`) change nothing of the phrases' results, and
  their answers equal those of separate passes (`next_token_logits`);
- a frame encoded with `defer_prefix` gives what an eagerly encoded one gives, whichever pass comes first (a phrase
  pass runs the prefix in its own forward), and is left with the same KV cache;
- the prepared image is a typed, per-family dataclass;
- remembered token ids are the tokenizer's, and a caller editing its list changes nothing remembered.
A new family gets a line in FAMILIES, or the first test fails.
"""
import dataclasses

import numpy as np
import pytest
import torch

from flmm_ros.grounding.attention import enable_phrase_attention
from flmm_ros.grounding.lmm import ADAPTERS, PreparedImage
from flmm_ros.grounding.testing import tiny_llava, tiny_llava_next

# family -> tiny model builder and its sizes (grouped-query attention, so K/V heads differ from query heads)
FAMILIES = {
    "llava": (tiny_llava, {"layers": 3, "heads": 4, "kv_heads": 2}),
    "llava_next": (tiny_llava_next, {"layers": 2, "heads": 4, "kv_heads": 2}),
}
PHRASES = ["the red mug", "the bowl next to the box"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_family_is_under_contract():
    assert set(FAMILIES) == set(ADAPTERS)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def adapter(request):
    build, sizes = FAMILIES[request.param]
    model, tokenizer, processor = build(seed=1, **sizes)
    return ADAPTERS[request.param](model, tokenizer, processor)


@pytest.fixture
def frame(adapter):
    image = np.random.default_rng(4).integers(0, 256, (40, 72, 3), dtype=np.uint8)   # NeXT: two tiles wide
    return adapter.encode_frame(image)


def _cache_tensors(frame) -> list[torch.Tensor]:
    return [t.clone() for layer in frame.cache.layers for t in (layer.keys, layer.values)]


def test_prefix_cache_is_restored_after_every_pass(adapter, frame):
    n, before = frame.cache.get_seq_length(), _cache_tensors(frame)
    assert n == len(frame.prefix_ids)
    first = adapter.phrase_pass(frame, PHRASES).maps
    for run in (lambda: adapter.phrase_pass(frame, PHRASES), lambda: adapter.generate(frame, "where is the mug ?", 4),
                lambda: adapter.reasoning_pass(frame, "where is the mug ?", "It is", 3)):
        run()
        assert frame.cache.get_seq_length() == n
        assert all(torch.equal(a, b) for a, b in zip(before, _cache_tensors(frame)))
    assert torch.equal(adapter.phrase_pass(frame, PHRASES).maps, first)


def _eager(adapter, frame, phrases):
    """Eager attention over the whole sequence with every matrix returned (F-LMM's way), and the phrase rows."""
    ids, rows = adapter.phrase_tokens(frame, phrases)
    model = adapter.model
    sizes = getattr(frame.prepared, "image_sizes", None)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        out = model(input_ids=torch.tensor([frame.prefix_ids + ids]), pixel_values=frame.prepared.pixel_values,
                    output_attentions=True, output_hidden_states=True, use_cache=False,
                    **({} if sizes is None else {"image_sizes": sizes}))
    finally:
        enable_phrase_attention(model)
    return out, [r + len(frame.prefix_ids) for r in rows]


def test_map_channels_are_layer_major_l_times_heads_plus_h(adapter, frame):
    out, rows = _eager(adapter, frame, PHRASES)
    layers, heads = adapter.num_layers, adapter.num_heads
    reference = torch.zeros(len(rows), layers * heads, len(frame.image_keys))
    for p, r in enumerate(rows):
        for layer in range(layers):
            for head in range(heads):      # written out channel by channel: the order under test
                rows_to_image = out.attentions[layer][0, head][r][:, frame.image_keys]
                reference[p, layer * heads + head] = rows_to_image.mean(0)
    expected = adapter.attention_to_maps(reference, frame.prepared)
    maps = adapter.phrase_pass(frame, PHRASES).maps
    assert maps.shape[:2] == (len(PHRASES), adapter.mask_head_channels) == expected.shape[:2]
    assert (maps - expected).abs().max() <= 1e-5
    # Channels differ from each other, so a permuted order could not pass the comparison above.
    flat = maps[0].flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(len(flat))).min() > 1e-4


def test_phrase_rows_equal_eager_output_attentions(adapter, frame):
    """One-token phrases, so each map is one query row as eager computes it (no mean over tokens to hide in)."""
    words = "the red mug".split()
    out, rows = _eager(adapter, frame, words)
    assert all(len(r) == 1 for r in rows)
    eager_rows = torch.stack([torch.cat([a[0, :, r[0]][:, frame.image_keys] for a in out.attentions]) for r in rows])
    ours = adapter.phrase_pass(frame, words)
    assert (ours.maps - adapter.attention_to_maps(eager_rows, frame.prepared)).abs().max() <= 1e-5
    hidden = torch.stack(out.hidden_states[1:])[:, 0]
    for p, r in enumerate(rows):
        assert torch.allclose(ours.hidden_states[p], hidden[:, r], atol=1e-5)
    assert ours.maps.min() >= 0 and ours.maps.max() <= 1 and ours.maps.std() > 0


def test_questions_asked_beside_the_phrases_are_answered_as_if_asked_alone(adapter, frame):
    questions = ["is there a red mug ?", "is there a bowl ?", "is there a red mug ?"]   # a repeat is asked once
    n, before = frame.cache.get_seq_length(), _cache_tensors(frame)
    alone = adapter.phrase_pass(frame, PHRASES)
    beside = adapter.phrase_pass(frame, PHRASES, questions=questions)
    assert alone.answers == {} and list(beside.answers) == questions[:2]
    assert (beside.maps - alone.maps).abs().max() <= 1e-6
    for a, b, la, lb in zip(alone.hidden_states, beside.hidden_states, alone.token_logprobs, beside.token_logprobs):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(la, lb, atol=1e-5)
    for question, logits in beside.answers.items():
        separate = adapter.next_token_logits(frame, question)
        assert logits.shape == separate.shape and (logits - separate).abs().max() <= 1e-4
    # The two questions' answers differ, so a mask that let one see the other (or the phrases) would show here.
    assert (beside.answers[questions[0]] - beside.answers[questions[1]]).abs().max() > 1e-3
    assert frame.cache.get_seq_length() == n
    assert all(torch.equal(a, b) for a, b in zip(before, _cache_tensors(frame)))


def test_each_of_several_phrases_gets_the_log_probabilities_it_has_alone(adapter, frame):
    """Presence reads a phrase's likelihood as if it were the only answer (a turn of its own beside the pass); the
    maps and hidden states still come from F-LMM's one pass over all the phrases (test above: eager equality)."""
    n, before = frame.cache.get_seq_length(), _cache_tensors(frame)
    several = adapter.phrase_pass(frame, PHRASES, questions=["is there a red mug ?"])
    alone = [adapter.phrase_pass(frame, [phrase]) for phrase in PHRASES]
    for k in range(len(PHRASES)):
        assert torch.allclose(several.token_logprobs[k], alone[k].token_logprobs[0], atol=1e-4)
    # In the one pass the second phrase follows the first, and its log-probabilities there differ.
    ids, rows = adapter.phrase_tokens(frame, PHRASES)
    with torch.no_grad():
        in_sequence = adapter._token_logprobs(adapter._run_on_cache(frame, ids).last_hidden_state[0], ids, rows)
    assert (in_sequence[1] - several.token_logprobs[1]).abs().max() > 1e-3
    assert torch.allclose(in_sequence[0], several.token_logprobs[0], atol=1e-4)
    assert (several.answers["is there a red mug ?"] - adapter.next_token_logits(frame, "is there a red mug ?")
            ).abs().max() <= 1e-4
    assert frame.cache.get_seq_length() == n
    assert all(torch.equal(a, b) for a, b in zip(before, _cache_tensors(frame)))


def _deferred(adapter):
    image = np.random.default_rng(4).integers(0, 256, (40, 72, 3), dtype=np.uint8)   # the `frame` fixture's image
    frame = adapter.encode_frame(image, defer_prefix=True)
    assert frame.cache is None and frame.features is not None
    return frame


@pytest.mark.parametrize("questions", [[], ["is there a red mug ?", "is there a bowl ?"]])
def test_a_deferred_prefix_runs_inside_the_first_phrase_pass(adapter, frame, questions):
    eager = adapter.phrase_pass(frame, PHRASES, questions=questions)
    deferred = _deferred(adapter)
    first = adapter.phrase_pass(deferred, PHRASES, questions=questions)
    assert (first.maps - eager.maps).abs().max() <= 1e-5
    for a, b, la, lb in zip(first.hidden_states, eager.hidden_states, first.token_logprobs, eager.token_logprobs):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(la, lb, atol=1e-5)
    assert list(first.answers) == questions
    assert all((first.answers[q] - eager.answers[q]).abs().max() <= 1e-4 for q in questions)
    # The cache now holds the prefix, as the eager frame's does; later passes run on it.
    assert deferred.features is None and deferred.cache.get_seq_length() == len(frame.prefix_ids)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(_cache_tensors(deferred), _cache_tensors(frame)))
    assert (adapter.phrase_pass(deferred, PHRASES).maps - eager.maps).abs().max() <= 1e-5


def test_a_deferred_prefix_runs_first_for_any_other_pass(adapter, frame):
    deferred = _deferred(adapter)
    assert adapter.generate_ids(deferred, "where is the mug ?", 4) == adapter.generate_ids(frame, "where is the mug ?", 4)
    assert deferred.cache.get_seq_length() == len(frame.prefix_ids)
    logits = adapter.next_token_logits(_deferred(adapter), "is there a bowl ?")
    assert (logits - adapter.next_token_logits(frame, "is there a bowl ?")).abs().max() <= 1e-4


def test_a_failed_first_pass_leaves_the_prefix_deferred(adapter, monkeypatch):
    deferred = _deferred(adapter)
    real = adapter.language_model.forward
    monkeypatch.setattr(adapter.language_model, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        adapter.phrase_pass(deferred, PHRASES)
    assert deferred.cache is None and deferred.features is not None
    monkeypatch.setattr(adapter.language_model, "forward", real)
    assert adapter.phrase_pass(deferred, PHRASES).maps.shape[0] == len(PHRASES)


def test_the_prepared_image_is_a_typed_per_family_dataclass(adapter, frame):
    prepared = frame.prepared
    assert isinstance(prepared, PreparedImage) and type(prepared) is not PreparedImage
    assert dataclasses.is_dataclass(prepared) and not any(isinstance(v, dict) for v in vars(prepared).values())
    assert prepared.image_hw == (40, 72) and min(prepared.content_hw) > 0
    coarse = adapter.crop_to_image(torch.zeros(len(PHRASES), 64, 64), prepared)
    assert coarse.shape[0] == len(PHRASES) and 0 < coarse.shape[1] <= 64 and 0 < coarse.shape[2] <= 64


def test_remembered_token_ids_are_the_tokenizers_and_callers_cannot_change_them(adapter):
    prompt = adapter.template.format(input="<image>\nthe red mug")
    first = adapter.text_ids("the red mug.")
    assert first == adapter.tokenizer("the red mug.", add_special_tokens=False).input_ids
    first.append(-1)                                    # a caller's edit of its list
    assert adapter.text_ids("the red mug.") == adapter.tokenizer("the red mug.", add_special_tokens=False).input_ids
    expanded = adapter.prompt_ids("the red mug", 3)
    plain = adapter.tokenizer(prompt, add_special_tokens=True).input_ids
    i = plain.index(adapter.image_token_id)
    assert expanded == plain[:i] + [adapter.image_token_id] * 3 + plain[i + 1:]
