"""What the LMM sees and which rows are grounded, checked against F-LMM's own code paths (issue #15).

References are computed here, independently, from F-LMM's sources: flmm/datasets/llava_processors.py,
flmm/datasets/llava_next_processors.py (transformers 4.39 steps), and, on the `rebuttal` branch,
flmm/models/frozen_llava.py::reason_seg + scripts/reason_seg.py.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import LlavaNextImageProcessor, MistralConfig, PreTrainedTokenizerFast

from flmm_ros.grounding.attention import eager_phrase_attention, enable_phrase_attention
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import LlavaAdapter, LlavaNextAdapter
from flmm_ros.grounding.lmm.base import PROMPT_TEMPLATES
from flmm_ros.grounding.lmm.llava import crop_to_content, resized_size
from flmm_ros.grounding.phrases import REASONING_ANSWER_PREFIX, reasoning_prompt
from flmm_ros.grounding.testing import save_model_dir, tiny_llava, tiny_llava_next
from flmm_ros.grounding.types import GroundingError

V16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]   # llava-v1.6 preprocessor
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


def photo(h, w, seed=0):
    """A smooth image with edges (resampling differences show on both)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.NEAREST).resize((w, h), Image.BILINEAR))


def normalise(pixels: np.ndarray) -> np.ndarray:
    """transformers 4.39 rescale (uint8 * 1/255 in float64 -> float32) then normalize (float32), HWC -> CHW."""
    x = (pixels * (1 / 255)).astype(np.float32)
    return ((x - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)


# ---- 1. LLaVA-1.5 resize: floor, as CustomLlavaImageProcessor.resize --------------------------------------
@pytest.mark.parametrize("hw, expected", [((426, 640), (223, 336)), ((424, 640), (222, 336)),
                                          ((333, 500), (223, 336)), ((640, 426), (336, 223)),
                                          ((480, 640), (252, 336)), ((360, 640), (189, 336)), ((50, 50), (336, 336))])
def test_llava_resize_floors_the_short_side(hw, expected):
    assert resized_size(*hw, 336) == expected


def test_llava_pixels_and_crop_follow_flmm_for_640x426():
    model, tok, _ = tiny_llava(image_size=336, patch=14, layers=1)
    adapter = LlavaAdapter(model, tok)
    image = photo(426, 640)
    prepared = adapter.prepare_image(image)
    assert prepared.content_hw == (223, 336) and prepared.pad_top_left == (56, 0)
    # F-LMM: resize to (int(426 * 336 / 640), 336) bicubic, centred pad with int(mean * 255), rescale, normalize.
    resized = np.asarray(Image.fromarray(image).resize((336, 223), Image.BICUBIC))
    canvas = np.empty((336, 336, 3), np.uint8)
    canvas[:] = (CLIP_MEAN * 255).astype(int)
    canvas[56:56 + 223] = resized
    assert np.abs(prepared.pixel_values[0].numpy() - normalise(canvas)).max() < 1e-5
    # The coarse mask keeps int(223 * 64 / 336 + 0.5) = 42 rows (a rounded resize gave 224 px and 43 rows).
    assert adapter.crop_to_image(torch.zeros(1, 64, 64), prepared).shape == (1, 42, 64)


def test_crop_to_content_uses_flmm_rounding():
    # A 448x336 (w x h) image resized to 336x252 and centre-padded to 336x336: 42 px top and bottom.
    logits = torch.arange(64 * 64, dtype=torch.float32).view(1, 64, 64)
    out = crop_to_content(logits, image_hw=(252, 336), padded_hw=(336, 336), pad_top_left=(42, 0))
    top, height = int(42 * 64 / 336), int(252 * 64 / 336 + 0.5)
    assert (top, height) == (8, 48)
    assert torch.equal(out, logits[:, 8:56, :])
    # Portrait: 200x336 content with 68 px on the left; width = int(200*64/336 + .5) = int(38.59) = 38.
    out = crop_to_content(logits, image_hw=(336, 200), padded_hw=(336, 336), pad_top_left=(0, 68))
    assert torch.equal(out, logits[:, :, 12:50])
    # Leading dims are kept; an unpadded image is left whole.
    assert torch.equal(crop_to_content(logits[None], (336, 336), (336, 336), (0, 0)), logits[None])


def test_crop_to_content_rejects_bad_geometry():
    logits = torch.zeros(1, 64, 64)
    with pytest.raises(GroundingError, match="does not fit"):
        crop_to_content(logits, image_hw=(300, 336), padded_hw=(336, 336), pad_top_left=(42, 0))
    with pytest.raises(GroundingError, match="bad crop geometry"):
        crop_to_content(logits, image_hw=(0, 336), padded_hw=(336, 336), pad_top_left=(0, 0))


# ---- 2. LLaVA-NeXT preprocessing: PIL bicubic, as transformers 4.39 ----------------------------------------
def flmm_next_pixels(image: np.ndarray, tile: int = 336, pinpoints=V16_PINPOINTS) -> np.ndarray:
    """CustomLlavaNextImageProcessor.preprocess, step by step (select_best_resolution, _get_patch_output_size,
    PIL bicubic, zero padding split before = pad // 2, row-major tiles, squashed base image first)."""
    h, w = image.shape[:2]
    best, best_effective, best_wasted = None, 0, float("inf")
    for th, tw in pinpoints:
        scale = min(tw / w, th / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = th * tw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (th, tw), effective, wasted
    th, tw = best
    if tw / w < th / h:
        nh, nw = min(math.ceil(h * tw / w), th), tw
    else:
        nh, nw = th, min(math.ceil(w * th / h), tw)
    padded = np.zeros((th, tw, 3), np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    padded[top:top + nh, left:left + nw] = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    tiles = [padded[i:i + tile, j:j + tile] for i in range(0, th, tile) for j in range(0, tw, tile)]
    base = np.asarray(Image.fromarray(image).resize((tile, tile), Image.BICUBIC))
    return np.stack([normalise(p) for p in [base] + tiles])


@pytest.mark.parametrize("hw, content_hw", [((426, 640), (448, 672)), ((333, 500), (336, 505)),
                                            ((500, 333), (505, 336))])
def test_llava_next_pixels_equal_flmms_pil_preprocessing(hw, content_hw):
    model, tok, _ = tiny_llava_next(image_size=336, patch=14, layers=1)
    model.config.image_grid_pinpoints = V16_PINPOINTS
    torchvision_processor = LlavaNextImageProcessor(size={"shortest_edge": 336}, image_grid_pinpoints=V16_PINPOINTS,
                                                    crop_size={"height": 336, "width": 336})
    adapter = LlavaNextAdapter(model, tok, torchvision_processor)
    assert adapter.image_processor.backend == "pil"
    image = photo(*hw, seed=sum(hw))
    prepared = adapter.prepare_image(image)
    reference = flmm_next_pixels(image)
    ours = prepared.pixel_values[0].numpy()
    assert ours.shape == reference.shape
    grey_level = 1 / 255 / CLIP_STD.max()
    assert np.abs(ours - reference).max() < 0.01 * grey_level        # the same 8-bit pixels
    assert prepared.content_hw == content_hw                 # F-LMM meta_data image_shape
    # What transformers 5 picks by default (torchvision) is a different image: the old behaviour.
    old = torchvision_processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"][0].numpy()
    assert np.abs(old - reference).max() >= grey_level


def test_from_pretrained_loads_the_pil_processor(tmp_path):
    model, tok, _ = tiny_llava_next(layers=1)
    processor = LlavaNextImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=model.config.image_grid_pinpoints)
    adapter = LlavaNextAdapter.from_pretrained(str(save_model_dir(tmp_path / "next", model, tok, processor)))
    assert adapter.image_processor.backend == "pil"


# ---- 3. reasoning: "It is" tokens and the rows of the tokens fed while generating --------------------------
WORDS = ("USER ASSISTANT What is in this image Briefly answer the question a single sentence red mug ball "
         "Please give me description of where bowl blue").split()


def sentencepiece_like_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-style (legacy SentencePiece) tokenizer: '\u2581' marks a preceding space, so "ASSISTANT:It" has the
    piece `It` and " It" the piece `\u2581It`; '.' alone is '\u2581' + '.'."""
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    pieces = ["\u2581" + w for w in WORDS] + ["It", "\u2581It", "\u2581is", ":", ".", "?", "\n", "\u2581"]
    chars = sorted({c for w in WORDS + ["It"] for c in w} | set(":.?,\n"))
    vocab = [(s, 0.0) for s in specials] + [(p, -1.0) for p in pieces] + [(c, -10.0) for c in chars if c not in pieces]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


@pytest.fixture(scope="module")
def sp_adapter():
    tok = sentencepiece_like_tokenizer()
    model, tok, proc = tiny_llava(tok, layers=3, heads=4, kv_heads=2, seed=3)
    return LlavaAdapter(model, tok, proc)


def test_the_answer_prefix_is_tokenised_with_the_prompt(sp_adapter):
    tok = sp_adapter.tokenizer
    ids = sp_adapter.prompt_ids(reasoning_prompt("the red mug"), 4, REASONING_ANSWER_PREFIX)
    assert tok.convert_ids_to_tokens(ids[-4:]) == ["\u2581ASSISTANT", ":", "It", "\u2581is"]
    # Tokenised on its own (the old way), the prefix would start with the other piece.
    assert tok.convert_ids_to_tokens(sp_adapter.text_ids(REASONING_ANSWER_PREFIX)) == ["\u2581It", "\u2581is"]


def full_eager(adapter, frame, ids):
    """The whole sequence (cached prefix + ids) through the eager model with output_attentions."""
    model = adapter.model
    model.set_attn_implementation({"text_config": "eager"})
    try:
        return model(input_ids=torch.tensor([frame.prefix_ids + ids]), pixel_values=frame.prepared.pixel_values,
                     output_attentions=True, output_hidden_states=True, use_cache=False)
    finally:
        enable_phrase_attention(model)


def test_reasoning_grounds_the_tokens_fed_while_generating(sp_adapter):
    adapter = sp_adapter
    frame = adapter.encode_frame(photo(40, 56, seed=3))
    prompt = reasoning_prompt("the red mug")
    out = adapter.reasoning_pass(frame, prompt, REASONING_ANSWER_PREFIX, 16)
    eos = adapter.tokenizer.eos_token_id
    assert eos not in out.generated_ids
    # Greedy tokens as HF generate gives them: 1 from the prompt pass + 16 new, the last one never fed back.
    prompt_ids = adapter.prompt_ids(prompt, len(frame.image_keys), REASONING_ANSWER_PREFIX)
    hf = adapter.model.generate(input_ids=torch.tensor([prompt_ids]), pixel_values=frame.prepared.pixel_values,
                                max_new_tokens=17, do_sample=False)[0, len(prompt_ids):].tolist()
    assert out.generated_ids == hf[:hf.index(eos)] if eos in hf else out.generated_ids == hf
    assert len(out.generated_ids) == 17 and out.grounded_ids == out.generated_ids[:16]
    # Rows = exactly the fed tokens (after the prompt and "It is"), mean of their attention and their hidden states.
    continuation = adapter._continuation(frame, prompt, REASONING_ANSWER_PREFIX)
    eager = full_eager(adapter, frame, continuation + out.grounded_ids)
    start = len(frame.prefix_ids) + len(continuation)
    rows = torch.arange(start, start + len(out.grounded_ids))
    reference = adapter.attention_to_maps(eager_phrase_attention(eager.attentions, [rows], frame.image_keys),
                                          frame.prepared)
    assert (out.phrase_pass.maps - reference).abs().max() <= 1e-5
    hidden = torch.stack(eager.hidden_states[1:])[:, 0, rows]
    assert torch.allclose(out.phrase_pass.hidden_states[0], hidden, atol=1e-5)
    assert frame.cache.get_seq_length() == len(frame.prefix_ids)


def test_reasoning_stops_at_eos_and_grounds_every_fed_token():
    tok = sentencepiece_like_tokenizer()
    model, tok, proc = tiny_llava(tok, layers=3, heads=4, kv_heads=2, seed=3)
    adapter = LlavaAdapter(model, tok, proc)
    frame = adapter.encode_frame(photo(40, 56, seed=3))
    prompt = reasoning_prompt("the red mug")
    first = adapter.reasoning_pass(frame, prompt, REASONING_ANSWER_PREFIX, 16).generated_ids
    k = next(i for i in range(1, len(first)) if first[i] not in first[:i])
    tok.eos_token = tok.convert_ids_to_tokens(first[k])          # that token now ends the answer
    out = adapter.reasoning_pass(frame, prompt, REASONING_ANSWER_PREFIX, 16)
    assert out.generated_ids == first[:k] and out.grounded_ids == first[:k]


# ---- 6. the '.' separator, the template, the dtype ---------------------------------------------------------
def test_phrase_separator_is_the_last_token_of_a_dot(sp_adapter):
    adapter = sp_adapter
    frame = adapter.encode_frame(photo(40, 56))
    assert adapter.tokenizer.convert_ids_to_tokens(adapter.text_ids(".")) == ["\u2581", "."]
    ids, rows = adapter.phrase_tokens(frame, ["the red mug", "the ball"])
    dot = adapter.tokenizer.convert_tokens_to_ids(".")
    assert ids[rows[0][-1] + 1] == dot and rows[1][0] == rows[0][-1] + 2 and ids[-1] == dot


def test_template_comes_from_the_model_not_its_path(tmp_path):
    model, tok, proc = tiny_llava(layers=1)
    vicuna = LlavaAdapter.from_pretrained(str(save_model_dir(tmp_path / "my-mistral-finetune", model, tok, proc)))
    assert vicuna.template == PROMPT_TEMPLATES["vicuna"]
    model, tok, proc = tiny_llava_next(layers=1)
    config = model.config
    config.text_config = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, pad_token_id=3)
    mistral_model = type(model)(config).eval()
    mistral = LlavaNextAdapter.from_pretrained(str(save_model_dir(tmp_path / "plain", mistral_model, tok, proc)))
    assert mistral.template == PROMPT_TEMPLATES["mistral"]


def test_dtype_auto_is_flmms_bfloat16_on_cuda_and_float32_on_cpu():
    assert PipelineConfig(model="x").dtype == "auto"
    assert PipelineConfig(model="x").torch_dtype == torch.float32
    assert PipelineConfig(model="x", device="cuda").torch_dtype == torch.bfloat16
    assert PipelineConfig(model="x", device="cuda:1", dtype="float16").torch_dtype == torch.float16
