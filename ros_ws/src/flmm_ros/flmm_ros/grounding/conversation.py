"""Grounded conversation (GLaMM's grounded conversation generation, F-LMM's demo): link the noun phrases of a
free answer to the answer's own tokens, so that each phrase is grounded from the rows that generated it.

F-LMM's demo (`scripts/demo/grounded_conversation.py`, DeepSeek-VL) keeps the attention of the generated tokens,
takes spaCy's noun chunks of the decoded answer and maps their character spans to token spans through the
tokenizer's offsets. Here the answer is generated greedily, then fed once more, teacher-forced after the same
prompt (`LMMAdapter.answer_pass`): a causal model gives each token the same attention as while generating, and
only the phrase rows are recomputed. The character span of each generated token comes from decoding the
answer's prefixes, so it holds for the ids that were generated, never for a re-tokenised copy of the text.
"""
from __future__ import annotations

from dataclasses import dataclass

from .noun_phrases import NounPhrase, noun_phrases


@dataclass(frozen=True)
class AnswerTokens:
    """A generated answer: its text (as `LMMAdapter.generate` returns it) and each token's character span."""
    text: str
    ids: list[int]
    spans: list[tuple[int, int]]     # per token: [start, end) in `text`; empty (start == end) when it adds no text


def answer_tokens(tokenizer, ids: list[int]) -> AnswerTokens:
    """Decode `ids` like `LMMAdapter.generate` (special tokens skipped, outer whitespace stripped) and give each
    token the characters it adds: token k covers what `decode(ids[:k + 1])` adds to `decode(ids[:k])`. When a
    prefix does not decode to a prefix of the answer (a character split over byte tokens), that token adds
    nothing and the next one takes its characters."""
    text = tokenizer.decode(ids, skip_special_tokens=True).strip()
    spans, end = [], 0
    for k in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=True).strip()
        new_end = len(prefix) if text.startswith(prefix) and len(prefix) >= end else end
        spans.append((end, new_end))
        end = new_end
    return AnswerTokens(text, list(ids), spans)


def token_rows(answer: AnswerTokens, phrase: NounPhrase) -> list[int]:
    """Indices of the answer tokens of a phrase: from the first to the last token whose characters overlap the
    phrase's non-space characters (so the byte tokens of a character split over several are all in)."""
    rows = [k for k, (start, end) in enumerate(answer.spans)
            if answer.text[max(start, phrase.start):min(end, phrase.end)].strip()]
    return list(range(rows[0], rows[-1] + 1)) if rows else []


def grounded_phrases(answer: AnswerTokens) -> list[tuple[NounPhrase, list[int]]]:
    """The answer's noun phrases (`noun_phrases` rules) that own at least one token, with their token rows."""
    pairs = [(phrase, token_rows(answer, phrase)) for phrase in noun_phrases(answer.text)]
    return [(phrase, rows) for phrase, rows in pairs if rows]
