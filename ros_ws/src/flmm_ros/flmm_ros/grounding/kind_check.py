"""Is this instance what the phrase names? The frozen LMM looks at the instance alone (issue #18).

A plural phrase's union mask takes in objects of another kind: the frozen LMM's attention finds objects by colour,
so "all the mugs" also covers a red box beside a red mug. Yet the same LMM reads kinds well once it knows where to
look ("what is the red object?" is right 99 % of the time on the embedded model). So each instance is shown to the
LMM alone, in a copy of the camera image where everything outside the instance (grown by a few pixels) is painted
the colour of the image's border, and the LMM describes it. The evidence (`lmm_kind`, a feature of the instance
filter, instance_filter.py) is how likely the LMM's description is to name the phrase: the mean over the phrase's
content words ("the red mug" -> red, mug; articles and "object" left out) of the word's best log-probability among
the description's first `words` words, decoded greedily after `answer_prefix`. One word may thus be read at any
of those places ("a red mug ...": the colour, then the kind), whatever the phrase leaves out.

`KindCheck` is the recipe, stored with the instance filter in the bundle (`instances.kind_check`); `KindScorer`
runs it for one phrase. Each instance costs one vision-tower pass, and all of a phrase's instances together one
LMM pass over their views and `words` - 1 one-token passes; only instances of plural phrases are checked, and only
with a filter that uses the feature.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from transformers import DynamicCache

from .devices import ids_tensor
from .types import GroundingError

ARTICLES = {"the", "a", "an"}
GENERIC_NOUNS = {"object", "objects", "thing", "things", "item", "items", "one", "ones"}
GROW_PIXELS = 2          # the instance is shown with this margin: a mask a pixel short still shows the outline


@dataclass(frozen=True)
class KindCheck:
    """How the LMM is asked what an instance is: the prompt, the start of its answer, and how many words of the
    answer after that start may name the phrase's words."""
    prompt: str = "Please give me a description of the image."
    answer_prefix: str = "a"
    words: int = 2

    def __post_init__(self):
        if not self.prompt.strip() or not 1 <= self.words <= 8:
            raise GroundingError(f"bad kind check {self}: it needs a prompt and 1-8 words")

    def to_spec(self) -> dict:
        return {"prompt": self.prompt, "answer_prefix": self.answer_prefix, "words": self.words}

    @classmethod
    def from_spec(cls, spec: Mapping) -> KindCheck:
        try:
            return cls(str(spec["prompt"]), str(spec.get("answer_prefix", "")), int(spec.get("words", 2)))
        except (KeyError, TypeError, ValueError) as e:
            raise GroundingError(f"bad kind_check in the bundle's instance filter ({type(e).__name__}: {e}); "
                                 "expected prompt, answer_prefix, words") from None


def content_words(phrase: str) -> list[str]:
    """The words of a one-instance phrase that a description should contain ("the red object" -> ["red"])."""
    return [w for w in phrase.lower().replace(",", " ").split() if w not in ARTICLES | GENERIC_NOUNS]


def isolated_view(image: np.ndarray, mask: np.ndarray, grow: int = GROW_PIXELS) -> np.ndarray:
    """A copy of `image` (H, W, 3 uint8) showing only `mask` (grown by `grow` pixels); the rest is the median
    colour of the image's border (what surrounds the scene, in place of the other objects)."""
    shown = mask.astype(np.uint8)
    if grow:
        shown = cv2.dilate(shown, np.ones((3, 3), np.uint8), iterations=grow)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    view = np.empty_like(image)
    view[...] = np.median(border, axis=0).astype(np.uint8)
    cv2.copyTo(np.ascontiguousarray(image), shown, view)       # twice as fast as np.where here
    return view


class KindScorer:
    """The `lmm_kind` evidence of instances of one phrase: call it with the camera image and the instance masks.

    The instances' views go through the vision tower one by one and through the LMM together, as one batch: they
    share the prompt and the image's size, so their sequences have one length (a fifth faster than one by one on
    the 2-core CPU). None for each instance when the phrase has no word the LMM can say ("every object", a word
    its tokenizer does not know): the filter then counts the evidence as neither way."""

    def __init__(self, lmm, check: KindCheck, phrase: str):
        self.lmm, self.check = lmm, check
        # A word's first token stands for it (the embedded model's tokenizer has one token per word).
        unknown = lmm.tokenizer.unk_token_id
        self.word_ids = [ids[0] for ids in (lmm.text_ids(w) for w in content_words(phrase))
                         if ids and ids[0] != unknown]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, masks: list[np.ndarray]) -> list[float | None]:
        if not masks or not self.word_ids:
            return [None] * len(masks)
        lmm = self.lmm
        features = torch.stack([lmm.image_features(lmm.prepare_image(isolated_view(image, m))).to(lmm.dtype)
                                for m in masks])                                    # (B, n_image, d)
        ids = lmm.prompt_ids(self.check.prompt, features.shape[1], self.check.answer_prefix)
        embeds = lmm.embed_tokens(ids_tensor(ids, lmm.device)).repeat(len(masks), 1, 1)
        embeds[:, [i for i, t in enumerate(ids) if t == lmm.image_token_id]] = features
        cache = DynamicCache(config=lmm.model.config.text_config)
        out = lmm.language_model(inputs_embeds=embeds, past_key_values=cache, use_cache=True)
        best = torch.full((len(masks), len(self.word_ids)), float("-inf"))
        ended = torch.zeros(len(masks), dtype=torch.bool)
        for step in range(self.check.words):
            logp = lmm.model.lm_head(out.last_hidden_state[:, -1]).float().log_softmax(-1).cpu()
            best = torch.where(ended[:, None], best, torch.maximum(best, logp[:, self.word_ids]))
            greedy = logp.argmax(-1)
            ended |= greedy == lmm.tokenizer.eos_token_id           # a description that ended names no more
            if step + 1 < self.check.words and not ended.all():
                out = lmm.language_model(inputs_embeds=lmm.embed_tokens(greedy[:, None].to(lmm.device)),
                                         past_key_values=cache, use_cache=True)
        return best.mean(1).tolist()
