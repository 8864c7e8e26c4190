"""Grounded conversation's token bookkeeping (grounding/conversation.py) and the LMM's teacher-forced pass over a
generated answer (`LMMAdapter.answer_pass`), against eager `output_attentions` over the whole sequence."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from flmm_ros.grounding.attention import enable_phrase_attention
from flmm_ros.grounding.conversation import answer_tokens, grounded_phrases, token_rows
from flmm_ros.grounding.lmm import GROUNDING_PROMPT
from flmm_ros.grounding.noun_phrases import noun_phrases
from flmm_ros.grounding.testing import word_tokenizer
from flmm_ros.grounding.types import GroundingError
# the LMM families' tiny models and frames, and one torch thread: as in the adapter contract tests
from test_lmm_contract import _one_thread, adapter, frame  # noqa: F401, F811 (fixtures)

ANSWER = "the red mug is next to the blue bowl ."


@pytest.fixture(scope="module")
def byte_bpe():
    """A byte-level BPE (GPT-2 / Llama-3 style) trained here: words split into pieces, a curly apostrophe into
    several byte tokens whose prefixes do not decode to text."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the red mug is next to the blue bowl.", "a yellow can on the left, and a ball!"] * 5
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def test_every_token_gets_the_characters_it_adds(byte_bpe):
    text = " The reddish mug’s handle, next to a blue bowl!"
    ids = byte_bpe(text, add_special_tokens=False).input_ids + [byte_bpe.eos_token_id]
    answer = answer_tokens(byte_bpe, ids)
    assert answer.text == byte_bpe.decode(ids, skip_special_tokens=True).strip() == text.strip()
    assert answer.spans[0][0] == 0 and answer.spans[-1][1] == len(answer.text)
    assert all(a[1] == b[0] for a, b in zip(answer.spans, answer.spans[1:]))       # contiguous, in order
    assert sum(1 for s, e in answer.spans if s == e) >= 2     # the leading space, a byte of "’", the EOS
    for phrase, rows in grounded_phrases(answer):
        assert rows == list(range(rows[0], rows[-1] + 1))
        assert byte_bpe.decode([ids[r] for r in rows]).strip() == phrase.text
    assert [p.text for p, _ in grounded_phrases(answer)] == ["The reddish mug’s handle", "a blue bowl"]


def test_word_level_tokens_map_one_to_one():
    tokenizer = word_tokenizer()
    ids = tokenizer(ANSWER, add_special_tokens=False).input_ids
    answer = answer_tokens(tokenizer, ids)
    found = grounded_phrases(answer)
    assert [(p.text, rows) for p, rows in found] == [("the red mug", [0, 1, 2]), ("the blue bowl", [6, 7, 8])]
    assert token_rows(answer, noun_phrases("the mug")[0]) == [0, 1]        # by characters, not by words


# ---- the teacher-forced pass over the answer, every LMM family -----------------------------------------------
def test_the_answer_ids_are_what_generate_says(adapter, frame):
    ids = adapter.generate_ids(frame, "where is the mug ?", 6)
    assert 0 < len(ids) <= 6 and adapter.tokenizer.eos_token_id not in ids
    text = adapter.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert text == adapter.generate(frame, "where is the mug ?", 6)


def test_answer_pass_rows_are_the_answer_tokens_as_eager_attention_sees_them(adapter, frame):
    """Each phrase's maps are the mean of eager attention rows of its tokens, in the full sequence of the prompt
    followed by the answer; the KV cache of the image prefix is left as it was."""
    prompt = "where is the mug ?"
    answer_ids = adapter.text_ids(ANSWER)
    rows = [r for _, r in grounded_phrases(answer_tokens(adapter.tokenizer, answer_ids))]
    n = frame.cache.get_seq_length()
    ours = adapter.answer_pass(frame, prompt, answer_ids, rows)
    assert frame.cache.get_seq_length() == n
    continuation = adapter.prompt_ids(prompt, len(frame.image_keys))[len(frame.prefix_ids):]
    sequence = frame.prefix_ids + continuation + answer_ids
    model = adapter.model
    sizes = getattr(frame.prepared, "image_sizes", None)
    model.set_attn_implementation({"text_config": "eager"})
    try:
        out = model(input_ids=torch.tensor([sequence]), pixel_values=frame.prepared.pixel_values,
                    output_attentions=True, output_hidden_states=True, use_cache=False,
                    **({} if sizes is None else {"image_sizes": sizes}))
    finally:
        enable_phrase_attention(model)
    start = len(frame.prefix_ids) + len(continuation)
    absolute = [[start + i for i in r] for r in rows]
    eager = torch.stack([torch.cat([a[0, :, r][:, :, frame.image_keys].mean(1) for a in out.attentions])
                         for r in absolute])
    assert (ours.maps - adapter.attention_to_maps(eager, frame.prepared)).abs().max() <= 1e-5
    hidden = torch.stack(out.hidden_states[1:])[:, 0]
    for p, r in enumerate(absolute):
        assert torch.allclose(ours.hidden_states[p], hidden[:, r], atol=1e-5)
    # Not the same as the phrases alone after F-LMM's grounding prompt: the answer's context is in the rows.
    alone = adapter.phrase_pass(frame, ["the red mug", "the blue bowl"], GROUNDING_PROMPT)
    assert (alone.maps - ours.maps).abs().max() > 1e-4


def test_answer_pass_refuses_rows_outside_the_answer(adapter, frame):
    with pytest.raises(GroundingError, match="do not index an answer of 3 tokens"):
        adapter.answer_pass(frame, "hi", adapter.text_ids("the red mug"), [[0, 3]])
    with pytest.raises(GroundingError, match="do not index"):
        adapter.answer_pass(frame, "hi", adapter.text_ids("the red mug"), [[]])
