"""SAM's image-encoder attention with the relative-position terms inside the q @ k^T product (the ONNX graph's form).

segment-anything adds its decomposed relative-position terms to the scores with two broadcasts over a 5-D view,
attn[b, qh, qw, kh, kw] + rel_h[b, qh, qw, kh] + rel_w[b, qh, qw, kw]. ONNX Runtime's CPU Add is slow on those
broadcasts: in the tabletop SAM's two global blocks they took 0.75 of the encoder's 5 ms. The same sum is one matrix
product of widened rows: q' = [q * scale | rel_h | rel_w] and k' = [k | onehot(kh) | onehot(kw)], so
q' . k' = scale q . k + rel_h[kh] + rel_w[kw]. The one-hot columns are constants of the grid and fold into the graph.
Same parameters and state_dict as segment-anything's `Attention`; only the order of a few float additions changes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


class FoldedRelPosAttention(Attention):
    """segment-anything's `Attention` (same parameters) with the relative-position terms in the score product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)      # (B * heads, N, C)
        if self.use_rel_pos:
            r_q = q.reshape(b * self.num_heads, h, w, -1)     # unscaled q, as segment-anything uses it
            rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h)).flatten(1, 2)
            rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w)).flatten(1, 2)
            key_row = torch.arange(h, device=x.device).repeat_interleave(w)      # key n = kh * w + kw
            key_col = torch.arange(w, device=x.device).repeat(h)
            onehots = torch.cat([F.one_hot(key_row, h), F.one_hot(key_col, w)], dim=-1).to(k.dtype)
            q = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
            k = torch.cat([k, onehots.expand(k.shape[0], -1, -1)], dim=-1)
        else:
            q = q * self.scale
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


def fold_rel_pos(image_encoder: nn.Module) -> nn.Module:
    """Switch every attention block of a segment-anything image encoder to `FoldedRelPosAttention`; returns it."""
    for module in image_encoder.modules():
        if isinstance(module, Attention):
            module.__class__ = FoldedRelPosAttention
    return image_encoder
