"""What the LMM adapters hand out: a prepared image, the per-frame state, and the results of their passes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache


@dataclass
class PreparedImage:
    """Model inputs for one image plus what is needed to map attention back to pixels; each family's adapter
    returns a subclass with its own geometry (padding, any-res grid)."""
    pixel_values: torch.Tensor
    image_hw: tuple[int, int]                 # original image size
    # The image's size after the LMM's resize, before padding (F-LMM's meta_data image_shape; the F-LMM
    # recipe's training targets are resized through it).
    content_hw: tuple[int, int]


@dataclass
class LMMFrame:
    """The LMM's per-frame state: image tokens encoded once, reused by every instruction.

    A frame encoded with `defer_prefix` holds the image features and no cache yet: the first pass over it runs
    the prefix with its own tokens in one forward (phrase_pass) or fills the cache first (every other pass)."""
    prepared: PreparedImage
    prefix_ids: list[int]            # token ids up to and including the last image token
    image_keys: torch.Tensor         # positions of the image tokens in the sequence
    cache: DynamicCache | None       # KV cache of prefix_ids (None: deferred)
    features: torch.Tensor | None = field(default=None, repr=False)   # (n_image, d) while the prefix is deferred


@dataclass
class PhrasePass:
    """What the grounding head needs from the LMM, per phrase."""
    maps: torch.Tensor               # (P, C, h, w) attention maps in [0, 1], C = mask-head input channels
    hidden_states: list[torch.Tensor]  # per phrase: (L, T_p, d) hidden states of its tokens (embeddings excluded)
    # Per phrase: (T_p,) log-probability of each of its tokens given everything before it (how likely the LMM
    # finds the phrase as its answer; presence.py reads it). None where not computed.
    token_logprobs: list[torch.Tensor] | None = None
    # `phrase_pass(questions=...)`: question -> (vocab,) fp32 logits of its answer's first token (next_token_logits)
    answers: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class ScoredAnswer:
    """A decoded answer with its log-probability (LMMAdapter.generate_scored)."""
    ids: list[int]                   # EOS excluded
    logprob: float                   # under the model's own distribution, EOS included
    conflict: int | None             # first step where a banned token would have been chosen (None: never)
    alternatives: list[list[int]]    # per step, the next likeliest allowed tokens (empty for forced ones)


@dataclass
class ReasoningPass:
    """F-LMM's reasoning segmentation: the generated answer and the grounding of the tokens fed while generating."""
    generated_ids: list[int]         # every generated token (the last one is never fed back), EOS excluded
    grounded_ids: list[int]          # the tokens fed during generation: their rows make the one mask
    phrase_pass: PhrasePass          # one "phrase": all grounded rows merged
