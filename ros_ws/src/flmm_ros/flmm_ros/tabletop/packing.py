"""Packing several question-answer turns about one image into one sequence.

A packed sequence is `<s> USER: <image>*N` (the shared prefix) followed by segments
`{question} ASSISTANT: {answer}</s>`. A 4D attention mask lets each segment see the prefix and
itself only, and its position ids continue from the prefix, so every segment computes exactly
what the single-turn prompt `USER: <image>\\n{question} ASSISTANT: {answer}</s>` computes alone,
while the image tokens are paid for once. Labels cover the answer tokens and `</s>` only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerFast

from .tokenizer import EOS, IMAGE

IGNORE = -100


@dataclass
class PackedSequence:
    input_ids: list[int]
    labels: list[int]
    segment: list[int]      # -1 for the shared prefix, k for the k-th turn
    positions: list[int]
    answer_spans: list[tuple[int, int]]  # [start, end) of each turn's labelled tokens (answer + </s>)


def pack(tokenizer: PreTrainedTokenizerFast, image_tokens: int, turns: list[tuple[str, str]]) -> PackedSequence:
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    prefix = tokenizer("USER:", add_special_tokens=True).input_ids + [image_id] * image_tokens
    ids, labels, segment = list(prefix), [IGNORE] * len(prefix), [-1] * len(prefix)
    positions = list(range(len(prefix)))
    spans = []
    for k, (question, answer) in enumerate(turns):
        q = tokenizer(f"{question} ASSISTANT:", add_special_tokens=False).input_ids
        a = tokenizer(f"{answer}{EOS}", add_special_tokens=False).input_ids
        spans.append((len(ids) + len(q), len(ids) + len(q) + len(a)))
        ids += q + a
        labels += [IGNORE] * len(q) + a
        segment += [k] * (len(q) + len(a))
        positions += list(range(len(prefix), len(prefix) + len(q) + len(a)))
    return PackedSequence(ids, labels, segment, positions, spans)


def collate(seqs: list[PackedSequence], pad_id: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Right-padded tensors and the additive 4D mask (0 = attend, dtype min = blocked)."""
    length = max(len(s.input_ids) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE, dtype=torch.long)
    positions = torch.zeros((n, length), dtype=torch.long)
    segment = torch.full((n, length), -2, dtype=torch.long)   # -2 = padding: sees the prefix and itself
    for i, s in enumerate(seqs):
        t = len(s.input_ids)
        input_ids[i, :t] = torch.tensor(s.input_ids)
        labels[i, :t] = torch.tensor(s.labels)
        positions[i, :t] = torch.tensor(s.positions)
        positions[i, t:] = torch.arange(t, length)
        segment[i, :t] = torch.tensor(s.segment)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]
    prefix = (segment == -1)[:, None, :]
    allowed = causal[None] & (same | prefix)
    mask = torch.zeros(n, 1, length, length, dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": mask}
