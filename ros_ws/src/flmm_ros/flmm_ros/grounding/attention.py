"""Word-to-image attention of the phrase tokens, without `output_attentions` (all N x N matrices).

F-LMM reads, for every layer and head, the post-softmax attention from each phrase token (query) to
each image token (key). Asking `transformers` for all attention matrices keeps L x H x N x N floats
alive and forces the slow eager kernel. Instead, the language model runs on SDPA and a thin wrapper
around SDPA recomputes only the phrase rows: q_phrase . K^T over the full causal key range, softmax,
then keep the image columns. q and k reach the attention function after RoPE, and k before the GQA
repetition, so no model-specific position code is needed here.
In float32 the rows equal eager attention to ~1e-6; in bf16/fp16 (F-LMM ran bf16) they are rounded where eager
rounds (scores, scaled scores, probabilities, the mean over a phrase's tokens), so they equal F-LMM's bf16 maps.

Use:
    enable_phrase_attention(model)                  # once per model
    with capture_phrase_attention(rows, image_keys) as capture:
        language_model(...)                         # any forward, with or without a KV cache
    maps = capture.maps()                           # (P, L*H, n_image), channel = l*H + h
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PHRASE_SDPA = "flmm_phrase_sdpa"


@dataclass
class PhraseAttentionCapture:
    """What to capture in the current forward, and the per-layer results."""
    phrase_rows: list[torch.Tensor]   # per phrase: query indices inside the current chunk
    image_keys: torch.Tensor          # absolute key indices of the image tokens
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (P, H, n_image) fp32

    def maps(self) -> torch.Tensor:
        """(P, L*H, n_image) float32, channels layer-major (l*H + h) like F-LMM."""
        if not self.layers:
            raise RuntimeError("no attention was captured: is the model set up with enable_phrase_attention()?")
        return torch.cat([self.layers[l] for l in sorted(self.layers)], dim=1)


_ACTIVE: contextvars.ContextVar[PhraseAttentionCapture | None] = contextvars.ContextVar("flmm_phrase_capture",
                                                                                         default=None)


def phrase_attention_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                          scaling: float, capture: PhraseAttentionCapture) -> torch.Tensor:
    """Mean post-softmax attention of each phrase's rows to the image keys: (P, H, n_image), fp32.

    query (1, H, Tq, D) is the current chunk; key (1, Hkv, Nk, D) covers cached + current tokens.
    """
    _, num_heads, tq, head_dim = query.shape
    num_kv_heads, nk = key.shape[1], key.shape[2]
    rows = torch.cat(capture.phrase_rows)
    q = query[0, :, rows].float()                                   # (H, T, D)
    t = rows.numel()
    # Query head h reads kv head h // n_rep (transformers' repeat_kv order): group queries per kv head.
    q = q.reshape(num_kv_heads, (num_heads // num_kv_heads) * t, head_dim)
    scores = q @ key[0].float().transpose(-1, -2)                   # (Hkv, n_rep*T, Nk)
    half = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else None
    if half is not None:
        # Eager attention in bf16/fp16 (F-LMM's output_attentions path) rounds the scores, the scaled scores
        # and the probabilities to the model dtype; do the same so the maps match it, not an fp32 ideal.
        scores = (scores.to(half).float() * scaling).to(half).float()
    else:
        scores = scores * scaling
    scores = scores.reshape(num_heads, t, nk)
    if attention_mask is None:                                      # causal, from the absolute position
        absolute = (nk - tq) + rows
        allowed = torch.arange(nk, device=key.device)[None, :] <= absolute[:, None]
    elif attention_mask.dtype == torch.bool:                        # (1, 1|H, Tq, Nk): True = attend
        allowed = attention_mask[0, 0, rows]
    else:                                                           # additive float mask
        allowed = attention_mask[0, 0, rows] > torch.finfo(attention_mask.dtype).min / 2
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    # Softmax over the FULL causal range first, then keep image columns (sinks take real mass).
    probs = scores.softmax(-1)[..., capture.image_keys]             # (H, T, n_image)
    if half is not None:
        probs = probs.to(half).float()
    per_phrase = torch.split(probs, [r.numel() for r in capture.phrase_rows], dim=1)
    return torch.stack([merge_mean(p, dim=1, dtype=query.dtype) for p in per_phrase])   # (P, H, n_image)


def merge_mean(x: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """F-LMM's `apply_merge` (mean over a phrase's tokens) as float32; for a bf16/fp16 model the mean is
    rounded to that dtype, as F-LMM's mean over its bf16 attention tensors is."""
    mean = x.float().mean(dim=dim)
    return mean.to(dtype).float() if dtype in (torch.float16, torch.bfloat16) else mean


def _phrase_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    output = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                    dropout=dropout, **kwargs)
    capture = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    if capture is not None and layer is not None:
        if query.shape[0] != 1:
            raise ValueError("phrase attention capture supports batch size 1")
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        capture.layers[layer] = phrase_attention_rows(query, key, attention_mask, scale, capture)
    return output


AttentionInterface.register(PHRASE_SDPA, _phrase_sdpa)
# Without a mask function under our name, transformers would build no mask and silently ignore padding.
AttentionMaskInterface.register(PHRASE_SDPA, sdpa_mask)


def enable_phrase_attention(model) -> None:
    """Route the language model's attention through the capturing SDPA; the vision tower is untouched."""
    model.set_attn_implementation({"text_config": PHRASE_SDPA})


@contextlib.contextmanager
def capture_phrase_attention(phrase_rows: list[torch.Tensor], image_keys: torch.Tensor):
    capture = PhraseAttentionCapture(phrase_rows=phrase_rows, image_keys=image_keys)
    token = _ACTIVE.set(capture)
    try:
        yield capture
    finally:
        _ACTIVE.reset(token)


def side_by_side(turns: list[list[int]], start: int, device, shared: int = 0) -> dict[str, torch.Tensor]:
    """`attention_mask` and `position_ids` for one chunk holding several turns after `start` cached tokens: each
    turn attends to the cache, to the chunk's first `shared` tokens (a prefix that runs in the same forward, placed
    before turns[0]) and, causally, to itself only, at the positions it would have alone (True = attend)."""
    lengths = [shared + len(turns[0])] + [len(t) for t in turns[1:]]
    total = sum(lengths)
    allowed = torch.zeros(total, start + total, dtype=torch.bool)
    allowed[:, :start] = True
    allowed[lengths[0]:, start:start + shared] = True          # the later turns see the shared prefix
    positions, at = [], 0
    for k, n in enumerate(lengths):
        allowed[at:at + n, start + at:start + at + n] = torch.ones(n, n, dtype=torch.bool).tril()
        first = start if k == 0 else start + shared
        positions.append(torch.arange(first, first + n))
        at += n
    return {"attention_mask": allowed[None, None].to(device), "position_ids": torch.cat(positions)[None].to(device)}


def eager_phrase_attention(attentions: tuple[torch.Tensor, ...], phrase_rows: list[torch.Tensor],
                           image_keys: torch.Tensor) -> torch.Tensor:
    """The naive reference: slice eager `output_attentions` matrices (1, H, N, N) -> (P, L*H, n_image).

    phrase_rows here are absolute query positions in the full sequence. Used by tests and benchmarks only.
    """
    per_layer = []
    for attn in attentions:
        sliced = attn[0][:, :, image_keys].float()                 # (H, N, n_image)
        per_layer.append(torch.stack([sliced[:, r].mean(dim=1) for r in phrase_rows]))
    return torch.cat(per_layer, dim=1)
