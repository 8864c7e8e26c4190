"""tabletop-tiny's LMM: a real `LlavaForConditionalGeneration` with a tiny CLIP tower and a tiny Llama.

Saved in Hugging Face format, so `LlavaForConditionalGeneration.from_pretrained(dir)` and
`AutoProcessor.from_pretrained(dir)` load it offline like any LLaVA-1.5 checkpoint. The image
processor is LLaVA's with `do_pad=True`: the image is padded to a square with the CLIP mean colour,
then resized to the tower's input (F-LMM's LLaVA-1.5 preprocessing, at a small size).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaImageProcessor, LlavaProcessor, PreTrainedTokenizerFast)

from .tokenizer import CHAT_TEMPLATE, IMAGE, build_tokenizer


@dataclass(frozen=True)
class TinyLlavaArch:
    """Every size knob of the tiny LLaVA."""
    image_size: int = 192
    patch_size: int = 16
    vision_hidden: int = 128
    vision_intermediate: int = 512
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 160
    text_intermediate: int = 480
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    max_positions: int = 512

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid


def build_config(arch: TinyLlavaArch, tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=arch.vision_hidden, intermediate_size=arch.vision_intermediate,
        num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
        image_size=arch.image_size, patch_size=arch.patch_size, projection_dim=arch.vision_hidden)
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=arch.text_hidden, intermediate_size=arch.text_intermediate,
        num_hidden_layers=arch.text_layers, num_attention_heads=arch.text_heads,
        num_key_value_heads=arch.text_kv_heads, max_position_embeddings=arch.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE), image_seq_length=arch.image_tokens,
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        # The tower is tiny: its last layer is the useful one (LLaVA-1.5 takes -2 of 24).
        vision_feature_layer=-1)


def build_processor(arch: TinyLlavaArch, tokenizer: PreTrainedTokenizerFast | None = None) -> LlavaProcessor:
    image_processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": arch.image_size},
        crop_size={"height": arch.image_size, "width": arch.image_size})
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer or build_tokenizer(),
        patch_size=arch.patch_size, vision_feature_select_strategy="default",
        num_additional_image_tokens=1,   # the CLS token, dropped by the "default" strategy
        chat_template=CHAT_TEMPLATE)


def build_model(arch: TinyLlavaArch, tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlavaForConditionalGeneration:
    """A freshly initialised model (the initialisation is deterministic given the seed)."""
    config = build_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def arch_of(model: LlavaForConditionalGeneration) -> TinyLlavaArch:
    """The arch a saved model was built from (read back from its config)."""
    v, t = model.config.vision_config, model.config.text_config
    return TinyLlavaArch(
        image_size=v.image_size, patch_size=v.patch_size, vision_hidden=v.hidden_size,
        vision_intermediate=v.intermediate_size, vision_layers=v.num_hidden_layers,
        vision_heads=v.num_attention_heads, text_hidden=t.hidden_size, text_intermediate=t.intermediate_size,
        text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads, text_kv_heads=t.num_key_value_heads,
        max_positions=t.max_position_embeddings)


def save_tabletop_lmm(model: LlavaForConditionalGeneration, processor: LlavaProcessor, out_dir: str | Path) -> None:
    """config.json + model.safetensors + generation_config.json + tokenizer and processor files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def load_tabletop_lmm(path: str | Path, attn_implementation: str = "sdpa"
                      ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The saved model (in eval mode) and its processor, from a local directory only."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no tabletop LMM at {path} (config.json missing)")
    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation,
                                                          local_files_only=True)
    processor = LlavaProcessor.from_pretrained(path, local_files_only=True)
    return model.eval(), processor
