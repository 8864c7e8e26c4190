"""SAM's image-encoder attention on `scaled_dot_product_attention` (the 'torch' backend on a GPU).

segment-anything's `Attention.forward` computes softmax((q * scale) @ k^T + rel_pos) @ v with explicit matrices;
for ViT-L at 1024 px the four global-attention blocks each hold 16 x 4096 x 4096 scores. `SdpaAttention` computes
the same with one fused kernel, the decomposed relative-position term (from the unscaled q, as segment-anything
adds it) passed as the additive mask. Same parameters, same state_dict; the modules are switched by class, so
`use_sdpa(encoder, False)` restores segment-anything's own forward (the naive baseline in bench/pipeline.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


class SdpaAttention(Attention):
    """segment-anything's `Attention` (same parameters) computed with scaled_dot_product_attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)                                        # (B, heads, N, C)
        bias = None
        if self.use_rel_pos:
            r_q = q.reshape(b * self.num_heads, h, w, -1)
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
            bias = (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(b, self.num_heads, h * w, h * w)
            bias = bias.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


def use_sdpa(image_encoder: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every attention block of a segment-anything image encoder to SDPA (or back); returns it."""
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = SdpaAttention if enabled else Attention
    return image_encoder
