"""Tiny random-weight models built from configs, for tests and benchmarks.

They are real `transformers` LLaVA / LLaVA-NeXT models and a real `segment-anything` SAM, only small,
so every code path is the one real weights take. No weights are downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          LlavaNextImageProcessor, PreTrainedTokenizerFast)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEST_WORDS = ("user assistant : . , ? ! please give me a an the description of image pick up put grab take "
              "in on into next to left right front back red green blue yellow orange purple white black "
              "mug bowl ball box bottle can cup plate apple it is where what colour color how many there "
              "and big small").split()


def word_tokenizer(words=TEST_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with LLaVA's special tokens; BOS is added like Llama's tokenizer does."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + sorted(set(w.lower() for w in words)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def _text_config(vocab_size: int, layers: int, heads: int, kv_heads: int, hidden: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=4096, pad_token_id=3, bos_token_id=1, eos_token_id=2)


def _vision_config(image_size: int, patch: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image_size, patch_size=patch, projection_dim=32)


def tiny_llava(tokenizer=None, *, layers=2, heads=4, kv_heads=4, hidden=64, image_size=32, patch=8,
               seed=0) -> tuple[LlavaForConditionalGeneration, PreTrainedTokenizerFast, CLIPImageProcessor]:
    tokenizer = tokenizer or word_tokenizer()
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=_vision_config(image_size, patch),
                         text_config=_text_config(len(tokenizer), layers, heads, kv_heads, hidden),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=(image_size // patch) ** 2)
    model = LlavaForConditionalGeneration(config).eval()
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    return model, tokenizer, processor


def tiny_llava_next(tokenizer=None, *, layers=2, heads=4, kv_heads=2, hidden=64, image_size=32, patch=8, seed=0):
    tokenizer = tokenizer or word_tokenizer()
    torch.manual_seed(seed)
    pinpoints = [[image_size, image_size * 2], [image_size * 2, image_size], [image_size * 2, image_size * 2]]
    config = LlavaNextConfig(vision_config=_vision_config(image_size, patch),
                             text_config=_text_config(len(tokenizer), layers, heads, kv_heads, hidden),
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             image_grid_pinpoints=pinpoints)
    model = LlavaNextForConditionalGeneration(config).eval()
    processor = LlavaNextImageProcessor(size={"shortest_edge": image_size},
                                        crop_size={"height": image_size, "width": image_size},
                                        image_grid_pinpoints=pinpoints)
    return model, tokenizer, processor


def save_model_dir(out_dir: str | Path, model, tokenizer, processor) -> Path:
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def write_random_bundle(out_dir: str | Path, *, family: str = "llava", seed: int = 0, **model_kwargs) -> Path:
    """A complete model bundle with random weights: tiny LLaVA (or LLaVA-NeXT) + grounding head + tiny SAM."""
    from .bundle import write_bundle
    from .head import GroundingHead
    from .sam.models import TINY_TEST_SAM

    out = Path(out_dir)
    build = {"llava": tiny_llava, "llava_next": tiny_llava_next}[family]
    model, tokenizer, processor = build(seed=seed, **model_kwargs)
    save_model_dir(out / "lmm", model, tokenizer, processor)
    text = model.config.text_config
    channels = text.num_hidden_layers * text.num_attention_heads * (2 if family == "llava_next" else 1)
    torch.manual_seed(seed)
    mask_head_kwargs = {"base_channels": 8}
    head = GroundingHead(channels, text.hidden_size, text.num_hidden_layers, TINY_TEST_SAM, mask_head_kwargs)
    return write_bundle(out, "lmm", head, TINY_TEST_SAM, mask_head_kwargs, metadata={"kind": "random test bundle"})
