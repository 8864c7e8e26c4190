"""Is the named object there? A calibrated presence probability per grounded phrase (issue #18).

F-LMM always returns a mask, also for a phrase that names nothing in view. Here each phrase gets a probability
that it names something, from evidence the pipeline has anyway, plus one short LMM pass:

- `lmm_yes`: the frozen LMM's own yes / no to "Is there <phrase> in the image?" (the question template is the
  calibration's): log P(yes) - log P(no) of the first answer token, one pass over the cached frame, no generation;
- `phrase_logprob_min` / `_mean`: how likely the LMM finds the phrase as its answer to F-LMM's grounding prompt
  (the log-probabilities of the phrase's tokens after the first, read from the grounding pass itself);
- `attention_mass` / `attention_peak`: the phrase's attention to the image tokens (sum and maximum per layer and
  head, averaged), from the same pass;
- `coarse_peak` / `coarse_mean`: the mask head's highest logit and mean foreground probability;
- `mask_score`, `sam_iou`, `coarse_refined_iou`: the refined mask's mean probability, SAM's predicted IoU, and the
  IoU of the coarse and refined masks.

`PresenceCalibration` maps them to a probability with a logistic regression fitted on held-out data (for the
embedded model: `python -m flmm_ros.tabletop.trust_eval calibrate`), stored in the bundle's flmm_bundle.yaml under
`presence`. Without one (a plain LMM + F-LMM checkpoint, or a bundle made before), the LMM's own answer is the
probability: P(yes) / (P(yes) + P(no)) (`PresenceCalibration.lmm_only`). If the tokenizer has no single-token
yes / no either, the check is skipped: every phrase is found with presence 1.0, as in F-LMM. A feature that cannot
be computed (the refiner is off: no SAM IoU) takes its calibration mean, i.e. counts as neutral.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .types import GroundingError

FEATURES = ("lmm_yes", "phrase_logprob_min", "phrase_logprob_mean", "attention_mass", "attention_peak",
            "coarse_peak", "coarse_mean", "mask_score", "sam_iou", "coarse_refined_iou")
DEFAULT_QUESTION = "Is there {phrase} in the image?"
YES_WORDS, NO_WORDS = ("yes", "Yes", "YES"), ("no", "No", "NO")
_ARTICLE = re.compile(r"^(the|this|that)\s+", re.IGNORECASE)
log = logging.getLogger(__name__)


def indefinite(phrase: str) -> str:
    """'the red mug' -> 'a red mug', 'the orange box' -> 'an orange box' (the presence question's form)."""
    rest = _ARTICLE.sub("", phrase.strip())
    if rest == phrase.strip():
        return rest
    return f"{'an' if rest[:1].lower() in 'aeiou' else 'a'} {rest}"


@dataclass(frozen=True)
class PresenceCalibration:
    """A logistic regression from presence features (standardised) to P(the phrase names something in view).

    Stored in a bundle's flmm_bundle.yaml under `presence` (`to_spec` / `from_spec`); `lmm_only` is the fallback
    for models without one. Immutable, so one instance may be shared between threads."""
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    question: str = DEFAULT_QUESTION     # asked with the phrase made indefinite ("a red mug")
    source: str = ""                     # what it was fitted on (for the model card and the log)
    metrics: dict = field(default_factory=dict, compare=False)   # held-out scores at fitting time

    def __post_init__(self):
        check_regression("presence calibration", FEATURES, self)
        if "{phrase}" not in self.question:
            raise GroundingError(f"presence question {self.question!r} has no {{phrase}} placeholder")

    @classmethod
    def lmm_only(cls, question: str = DEFAULT_QUESTION) -> PresenceCalibration:
        """No fitted calibration: the LMM's own answer, P(yes) / (P(yes) + P(no)) = sigmoid(lmm_yes)."""
        return cls(("lmm_yes",), (0.0,), (1.0,), (1.0,), 0.0, question, source="uncalibrated: the LMM's yes / no")

    @property
    def calibrated(self) -> bool:
        return self.features != ("lmm_yes",) or self.weights != (1.0,) or self.bias != 0.0

    def probability(self, values: Mapping[str, float | None]) -> float:
        """P(present) for one phrase; a missing value (None or absent) counts as the calibration mean."""
        z = self.bias
        for name, mu, sd, w in zip(self.features, self.mean, self.scale, self.weights):
            v = values.get(name)
            if v is not None and math.isfinite(v):
                z += w * (v - mu) / sd
        return sigmoid(z)

    def to_spec(self) -> dict:
        return {"question": self.question, "features": list(self.features), "mean": list(self.mean),
                "scale": list(self.scale), "weights": list(self.weights), "bias": self.bias, "source": self.source,
                "metrics": dict(self.metrics)}

    @classmethod
    def from_spec(cls, spec: Mapping) -> PresenceCalibration:
        try:
            return cls(tuple(spec["features"]), tuple(map(float, spec["mean"])), tuple(map(float, spec["scale"])),
                       tuple(map(float, spec["weights"])), float(spec["bias"]),
                       str(spec.get("question", DEFAULT_QUESTION)), str(spec.get("source", "")),
                       dict(spec.get("metrics") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise GroundingError(f"bad presence calibration in the bundle ({type(e).__name__}: {e}); expected "
                                 "features, mean, scale, weights, bias") from None


def check_regression(what: str, known: tuple[str, ...], calibration) -> None:
    """GroundingError unless a logistic regression's `features` are `known` ones, its features, mean, scale and
    weights have one length, and its numbers are finite with positive scales (PresenceCalibration and
    instance_filter.InstanceCalibration)."""
    c = calibration
    unknown = sorted(set(c.features) - set(known))
    if unknown:
        raise GroundingError(f"{what} uses unknown features {unknown}; known: {list(known)}")
    if not len(c.features) == len(c.mean) == len(c.scale) == len(c.weights):
        raise GroundingError(f"{what}: features, mean, scale and weights differ in length")
    if any(not math.isfinite(v) for v in (*c.mean, *c.weights, c.bias)) or \
            any(not (math.isfinite(s) and s > 0) for s in c.scale):
        raise GroundingError(f"{what} has non-finite numbers or a scale that is not positive")


def sigmoid(z: float) -> float:
    """The logistic function, clamped so that exp never overflows."""
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def answer_token_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The single-token spellings of `words` in this tokenizer (an answer's first token), unknown words left out."""
    ids = set()
    for word in words:
        tokens = tokenizer(word, add_special_tokens=False).input_ids
        if len(tokens) == 1 and tokens[0] != tokenizer.unk_token_id:
            ids.add(tokens[0])
    return sorted(ids)


class PresenceJudge:
    """Computes the presence features of grounded phrases and their calibrated probability.

    Holds the calibration and the LMM's yes / no token ids; the LMM pass runs under the pipeline's lock."""

    def __init__(self, lmm, calibration: PresenceCalibration):
        self.lmm = lmm
        self.calibration = calibration
        self.yes_ids = answer_token_ids(lmm.tokenizer, YES_WORDS)
        self.no_ids = answer_token_ids(lmm.tokenizer, NO_WORDS)
        self.can_ask = bool(self.yes_ids and self.no_ids)
        # Uncalibrated and unable to ask: nothing to judge by, so every phrase is found (F-LMM's behaviour).
        self.enabled = self.can_ask or calibration.calibrated
        if not self.enabled:
            log.warning("presence check off: no presence calibration and no single-token yes / no in the tokenizer")

    def question(self, phrase: str) -> str | None:
        """The presence question about `phrase` ("is there a red mug?") if the judge asks the LMM one, else None."""
        if not (self.can_ask and self.enabled and "lmm_yes" in self.calibration.features):
            return None
        return self.calibration.question.format(phrase=indefinite(phrase))

    def lmm_yes(self, lmm_frame, phrase: str, answers: Mapping[str, torch.Tensor] | None = None) -> float | None:
        """log P(yes) - log P(no) of the LMM's answer to the presence question about `phrase`; read from `answers`
        (question -> first-token logits, asked beside the grounding pass: `PhrasePass.answers`) when it is there."""
        if not self.can_ask:
            return None
        question = self.calibration.question.format(phrase=indefinite(phrase))
        logits = (answers or {}).get(question)
        if logits is None:
            logits = self.lmm.next_token_logits(lmm_frame, question)
        logp = logits.log_softmax(-1)
        return float(logp[self.yes_ids].logsumexp(0) - logp[self.no_ids].logsumexp(0))

    def features(self, lmm_frame, phrases: list[str], logits, image_hw: tuple[int, int],
                 mask_threshold: float) -> list[dict[str, float | None]]:
        """Every feature of each phrase (its grounding in `logits`, at the same index)."""
        answers = getattr(getattr(logits, "lmm", None), "answers", None)
        out = []
        for k, phrase in enumerate(phrases):
            values = grounding_features(logits, k, image_hw, mask_threshold)
            values["lmm_yes"] = (self.lmm_yes(lmm_frame, phrase, answers) if "lmm_yes" in self.calibration.features
                                 else None)
            out.append(values)
        return out

    def probability(self, values: Mapping[str, float | None]) -> float:
        return self.calibration.probability(values) if self.enabled else 1.0


def grounding_features(logits, k: int, image_hw: tuple[int, int], mask_threshold: float) -> dict[str, float | None]:
    """The features of phrase k that come from the grounding pass, the mask head and SAM (see the module doc)."""
    values: dict[str, float | None] = dict.fromkeys(FEATURES)
    phrase_pass = getattr(logits, "lmm", None)
    if phrase_pass is not None:
        maps = phrase_pass.maps[k].float()                       # (C, h, w) attention in [0, 1]
        values["attention_mass"] = float(maps.sum((-2, -1)).mean())
        values["attention_peak"] = float(maps.amax((-2, -1)).mean())
        if phrase_pass.token_logprobs is not None:
            lp = phrase_pass.token_logprobs[k].float()
            lp = lp[1:] if lp.numel() > 1 else lp                # the first token is the article, mostly
            values["phrase_logprob_min"], values["phrase_logprob_mean"] = float(lp.min()), float(lp.mean())
    coarse = logits.coarse[k].detach().float()
    values["coarse_peak"] = float(coarse.max())
    prob = coarse.sigmoid()
    values["coarse_mean"] = foreground_mean(prob, prob > mask_threshold)
    if logits.refined is not None:
        rfg, values["mask_score"] = logits.refined_foreground(k, mask_threshold)
        up = F.interpolate(coarse[None, None], size=image_hw, mode="bilinear")[0, 0] > 0
        union = (up | rfg).sum()
        values["coarse_refined_iou"] = float((up & rfg).sum() / union) if union > 0 else 0.0
    if getattr(logits, "iou", None) is not None:
        values["sam_iou"] = float(logits.iou[k])
    return values


def foreground(prob: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """A mask from a probability map: (pixels above `threshold`, their mean probability: the object's score)."""
    fg = prob > threshold
    return fg, foreground_mean(prob, fg)


def foreground_mean(prob: torch.Tensor, fg: torch.Tensor) -> float:
    """Mean of `prob` over the pixels where `fg` is True (0 when none is). A masked sum: indexing with `fg` lists
    the pixels first, which costs more than the whole sum on an image-sized mask."""
    count = int(fg.sum())
    return float(torch.where(fg, prob, 0).sum() / count) if count else 0.0


def fit_calibration(rows: list[Mapping[str, float | None]], labels: list[int], features: tuple[str, ...] = FEATURES,
                    question: str = DEFAULT_QUESTION, source: str = "", l2: float = 1e-3,
                    balance: bool = False) -> PresenceCalibration:
    """Logistic regression (L-BFGS, small L2) of `labels` (1 present, 0 absent) on the standardised features;
    `balance` weights the two classes equally (then P = 0.5 means as likely present as absent)."""
    if len(set(labels)) < 2:
        raise GroundingError("presence calibration needs present and absent examples")
    mean, scale, weights, bias = fit_logistic(
        [[float(r.get(f) if r.get(f) is not None else math.nan) for f in features] for r in rows], labels, l2, balance)
    return PresenceCalibration(tuple(features), mean, scale, weights, bias, question, source)


def fit_logistic(x: list[list[float]], labels: list[int], l2: float = 1e-3, balance: bool = False
                 ) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], float]:
    """Logistic regression (L-BFGS, small L2) on standardised columns (NaN = the column's mean): (mean, scale,
    weights, bias). `balance` weights the two classes equally."""
    if len(set(labels)) < 2:
        raise GroundingError("a calibration needs examples of both classes")
    x = torch.tensor(x, dtype=torch.float64)
    mean = torch.nanmean(x, 0)
    x = torch.where(torch.isnan(x), mean, x)
    scale = x.std(0).clamp(min=1e-6)
    z = (x - mean) / scale
    y = torch.tensor(labels, dtype=torch.float64)
    weight = torch.ones_like(y)
    if balance:
        weight = torch.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y, weight=weight) + l2 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return tuple(mean.tolist()), tuple(scale.tolist()), tuple(w.detach().tolist()), float(b.detach())
