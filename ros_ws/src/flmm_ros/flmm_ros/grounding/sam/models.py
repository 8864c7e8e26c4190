"""Building SAM models (official ViT-B/L/H or small custom sizes) from `segment-anything` classes.

Weights are never loaded here: `segment_anything`'s own builders call `torch.load` without
`weights_only`, so checkpoints go through `checkpoint.py` instead.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import yaml
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from ..types import GroundingError


@dataclass(frozen=True)
class SamArch:
    """Every size knob of a SAM model; the presets are the official ones."""
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256

    def to_dict(self) -> dict:
        d = asdict(self)
        d["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SamArch":
        d = dict(d)
        if "encoder_global_attn_indexes" in d:
            d["encoder_global_attn_indexes"] = tuple(d["encoder_global_attn_indexes"])
        return cls(**d)


SAM_PRESETS: dict[str, SamArch] = {
    "vit_b": SamArch(),
    "vit_l": SamArch(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                     encoder_global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": SamArch(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                     encoder_global_attn_indexes=(7, 15, 23, 31)),
}


def resolve_sam_arch(arch: str | dict | SamArch) -> SamArch:
    if isinstance(arch, SamArch):
        return arch
    if isinstance(arch, dict):
        return SamArch.from_dict(arch)
    if arch not in SAM_PRESETS:
        raise ValueError(f"unknown SAM type {arch!r}: use one of {sorted(SAM_PRESETS)} or a size dict")
    return SAM_PRESETS[arch]


def build_sam(arch: str | dict | SamArch) -> Sam:
    """A randomly initialised SAM in eval mode, laid out exactly like the official builders."""
    a = resolve_sam_arch(arch)
    embedding_size = a.image_size // a.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=a.encoder_depth,
            embed_dim=a.encoder_embed_dim,
            img_size=a.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=a.encoder_num_heads,
            patch_size=a.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=a.encoder_global_attn_indexes,
            window_size=a.window_size,
            out_chans=a.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=a.prompt_embed_dim,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(a.image_size, a.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=a.prompt_embed_dim,
                mlp_dim=a.decoder_mlp_dim,
                num_heads=a.decoder_num_heads,
            ),
            transformer_dim=a.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=a.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


# A SAM small enough for unit tests on a 2-core CPU (same classes and code paths as ViT-L).
TINY_TEST_SAM = SamArch(encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                        encoder_global_attn_indexes=(1,), image_size=256, window_size=4,
                        prompt_embed_dim=32, decoder_mlp_dim=64, decoder_num_heads=2,
                        iou_head_hidden_dim=32)


def parse_sam_type(text: str) -> SamArch:
    """A SAM size named on a command line: 'vit_b' | 'vit_l' | 'vit_h' | 'tiny' (tests and benchmarks) | a JSON
    object of SamArch fields | a .json / .yaml file holding one. engines/, bench/ and training all use this."""
    if text == "tiny":
        return TINY_TEST_SAM
    if text in SAM_PRESETS:
        return SAM_PRESETS[text]
    if text.lstrip().startswith("{"):
        return resolve_sam_arch(json.loads(text))
    path = Path(text)
    if path.is_file():
        return resolve_sam_arch(yaml.safe_load(path.read_text()))
    raise GroundingError(f"SAM type {text!r}: use {sorted(SAM_PRESETS)}, 'tiny', a JSON object or a file")
