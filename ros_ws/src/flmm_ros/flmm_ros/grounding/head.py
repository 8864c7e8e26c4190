"""The parts F-LMM trains on top of a frozen LMM, in one module with our own state_dict names.

- `mask_head.*`: the U-Net (`mask_head.UNetHead`), attention maps -> coarse mask logits;
- `text_layer_weights`: one logit per LMM layer; their softmax mixes the last L hidden states;
- `text_proj`: Linear(LMM hidden size -> SAM prompt dim), one sparse SAM prompt token per phrase token;
- `sam.*`: a `segment_anything` Sam (`sam.image_encoder`, `sam.prompt_encoder`, `sam.mask_decoder`).
  As in F-LMM, the image encoder is frozen and stays in eval mode.

F-LMM's released files name the SAM part `sam.model.*`; `checkpoint.py` maps those names.
"""
from __future__ import annotations

import torch
from torch import nn

from .mask_head import UNetHead
from .sam.models import SamArch, build_sam, resolve_sam_arch
from .types import GroundingError


class GroundingHead(nn.Module):
    def __init__(self, in_channels: int, lmm_hidden_size: int, num_text_layers: int,
                 sam_arch: str | dict | SamArch, mask_head_kwargs: dict | None = None):
        super().__init__()
        arch = resolve_sam_arch(sam_arch)
        self.config = {
            "in_channels": in_channels,
            "lmm_hidden_size": lmm_hidden_size,
            "num_text_layers": num_text_layers,
            "sam_arch": arch.to_dict(),
            "mask_head_kwargs": dict(mask_head_kwargs or {}),
        }
        self.mask_head = UNetHead(in_channels, **self.config["mask_head_kwargs"])
        self.text_layer_weights = nn.Parameter(torch.ones(num_text_layers))
        self.sam = build_sam(arch)
        self.text_proj = nn.Linear(lmm_hidden_size, self.sam.prompt_encoder.embed_dim)
        self.sam.image_encoder.requires_grad_(False)

    @classmethod
    def from_config(cls, config: dict) -> "GroundingHead":
        """Rebuild a head from `head.config` (stored in our safetensors metadata)."""
        return cls(**config)

    def train(self, mode: bool = True) -> "GroundingHead":
        super().train(mode)
        self.sam.image_encoder.eval()  # frozen, as in F-LMM's SAMWrapper
        return self

    @property
    def num_text_layers(self) -> int:
        return self.text_layer_weights.shape[0]

    def text_embeddings(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(L, T, d) hidden states of the last L LMM layers at T phrase tokens -> (T, prompt_dim).

        F-LMM `FrozenLlavaSAM._forward`: sum_l softmax(w)_l * h_l, then `text_proj` per token.
        Leading dims after L are kept: (L, ..., d) -> (..., prompt_dim).
        """
        if hidden_states.ndim < 2:
            raise GroundingError(f"expected hidden states (L, T, d), got shape {tuple(hidden_states.shape)}")
        num_layers, hidden_size = hidden_states.shape[0], hidden_states.shape[-1]
        if num_layers != self.num_text_layers:
            raise GroundingError(f"head expects hidden states of {self.num_text_layers} LMM layers, got {num_layers}")
        if hidden_size != self.text_proj.in_features:
            raise GroundingError(f"head expects LMM hidden size {self.text_proj.in_features}, got {hidden_size}")
        weights = torch.softmax(self.text_layer_weights.float(), dim=0)
        weights = weights.view(-1, *([1] * (hidden_states.ndim - 1)))
        fused = (hidden_states.float() * weights).sum(dim=0)
        return self.text_proj(fused.to(self.text_proj.weight.dtype))
