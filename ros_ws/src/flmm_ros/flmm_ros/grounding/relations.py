"""Phrases that name an object by its nearness to another ("the ball next to the bowl"), checked in the image.

The presence of such a phrase was the presence of the object it names ("the ball"): a relation that no object
satisfies was judged present. And F-LMM's mask of the whole phrase often lies on another object: the frozen LMM's
attention finds objects by colour, and the tabletop model's mask of a relation phrase that holds is the object it
names (IoU >= 0.5) for 23 % of them. Here the relation is checked on the kind-checked instances of both objects instead:

1. the anchor ("the bowl") is the instance of "all the bowls" (trust.py's instance path: plural head, SAM split,
   instance filter with the LMM's look at each instance alone, kind_check.py) that the LMM most surely calls a bowl
   (an anchor named with place or size words, "the mug on the left", is grounded as itself: which of the mugs is
   meant is F-LMM's business);
2. the target is the instance of "all the balls" nearest to it (not the anchor itself; "the left ball next to the
   bowl": also of all the balls);
3. their centre distance, in units of min(H, W), gives P(the relation holds) by a logistic regression fitted on
   held-out scenes (`RelationCalibration`, `relations` in flmm_bundle.yaml; for the embedded model
   `python -m flmm_ros.tabletop.relation_calibration --model <bundle> --write`).

The phrase's presence is then P(a ball is there) x P(the bowl is there) x P(the relation holds). Each object is
there as surely as its own presence evidence ("the ball", presence.py) or the instance filter's belief in the
instance says, whichever is surer (the presence of a kind alone, "the ball", is the LMM's weak spot: it misses 12 %
of the balls of relations that hold, and the instance filter finds a ball it believes in for 85 % of those). Its
object is that nearest instance. A plural phrase ("all the mugs near the box") gives every instance whose own
presence, judged so, reaches the threshold.
Only nearness relations are checked (NEAR_WORDS); others ("the mug left of the box", "the ball in the bowl") keep the
presence of the object they name. Distances are in the image plane.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .instances import IRREGULAR, PREPOSITIONS, is_plural
from .presence import check_regression, fit_logistic, sigmoid
from .types import GroundingError

# Longest first, so that "near to" is not read as "near".
NEAR_WORDS = ("right next to", "next to", "close to", "near to", "near", "beside", "alongside", "by")
_NEAR = re.compile(r"^(?P<target>.+?)\s+(?:(?:that\s+|which\s+)?(?:is|are)\s+)?(?:"
                   + "|".join(map(re.escape, NEAR_WORDS)) + r")\s+(?P<anchor>.+)$", re.IGNORECASE)
PLACE_WORDS = {"left", "right", "middle", "centre", "center", "front", "back", "top", "bottom", "edge", "side",
               "camera", "me", "you", "here", "there"}      # "near the left" names a place, not an object
FEATURES = ("distance",)
SAME_OBJECT_IOU = 0.5        # a target instance this like the anchor (mask IoU) is the anchor itself
_PLURAL_OF = {v: k for k, v in IRREGULAR.items()}


@dataclass(frozen=True)
class NearRelation:
    """A phrase that names its object by nearness to another: target "the ball", anchor "the bowl"."""
    target: str
    anchor: str


def parse_near(phrase: str) -> NearRelation | None:
    """"the ball next to the bowl" -> NearRelation("the ball", "the bowl"), "all the mugs near the box" ->
    NearRelation("all the mugs", "the box"); None for any other phrase, one whose anchor is plural ("the ball next to
    the bowls": near which?) and one whose anchor is a place ("by the window" is an object, "near the left" is not:
    PLACE_WORDS)."""
    m = _NEAR.match(" ".join(phrase.strip().split()))
    if m is None:
        return None
    target, anchor = m.group("target"), m.group("anchor")
    if len(anchor.split()) < 2 or anchor.lower().split()[-1] in PLACE_WORDS \
            or is_plural(anchor):
        return None
    return NearRelation(target, anchor)


def plural_word(word: str) -> str:
    """English plural of a noun ("box" -> "boxes", "cherry" -> "cherries", "mug" -> "mugs")."""
    if word in _PLURAL_OF:
        return _PLURAL_OF[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and len(word) > 1 and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def every(phrase: str) -> str:
    """The plural phrase naming every object like this one: "the red mug" -> "all the red mugs", "the mug on the
    left" -> "all the mugs on the left" (the head noun, before the first preposition, made plural)."""
    words = phrase.split()
    if words[0].lower() in ("the", "a", "an"):
        words = words[1:]
    head = next((i for i, w in enumerate(words) if w.lower() in PREPOSITIONS and i > 0), len(words)) - 1
    words[head] = plural_word(words[head])
    return " ".join(["all", "the", *words])


def centre(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def distances(targets: list[np.ndarray], anchor: np.ndarray) -> list[tuple[int, float]]:
    """(index, centre distance to the anchor in units of min(H, W)) of each target mask, nearest first; a mask that
    is the anchor itself (IoU >= SAME_OBJECT_IOU: "the mug next to the red mug") left out, one that only overlaps it
    kept (touching objects: SAM's masks often run into each other)."""
    ax, ay = centre(anchor)
    side = min(anchor.shape)
    out = []
    for i, mask in enumerate(targets):
        inter = int((mask & anchor).sum())
        if not mask.any() or inter >= SAME_OBJECT_IOU * (int(mask.sum()) + int(anchor.sum()) - inter):
            continue
        x, y = centre(mask)
        out.append((i, math.hypot(x - ax, y - ay) / side))
    return sorted(out, key=lambda pair: pair[1])


def nearest(targets: list[np.ndarray], anchor: np.ndarray) -> tuple[int, float] | None:
    """The target mask nearest the anchor and its distance (`distances`), or None if no target is left."""
    found = distances(targets, anchor)
    return found[0] if found else None


@dataclass(frozen=True)
class RelationCalibration:
    """P(a nearness relation holds) from the centre distance of its two objects: a logistic regression, fitted on
    held-out scenes and stored in a bundle's flmm_bundle.yaml under `relations`."""
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    source: str = ""
    metrics: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        check_regression("relation calibration", FEATURES, self)

    def probability(self, distance: float) -> float:
        z = self.bias + sum(w * (distance - mu) / sd for mu, sd, w in zip(self.mean, self.scale, self.weights))
        return sigmoid(z)

    @classmethod
    def fit(cls, distances: list[float], labels: list[int], source: str = "") -> RelationCalibration:
        """Fitted on relation phrases labelled 1 (the relation holds) or 0."""
        mean, scale, weights, bias = fit_logistic([[d] for d in distances], labels)
        return cls(FEATURES, mean, scale, weights, bias, source)

    def to_spec(self) -> dict:
        return {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "source": self.source,
                "metrics": dict(self.metrics)}

    @classmethod
    def from_spec(cls, spec: Mapping) -> RelationCalibration:
        try:
            return cls(tuple(spec["features"]), tuple(map(float, spec["mean"])), tuple(map(float, spec["scale"])),
                       tuple(map(float, spec["weights"])), float(spec["bias"]), str(spec.get("source", "")),
                       dict(spec.get("metrics") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise GroundingError(f"bad relation calibration in the bundle ({type(e).__name__}: {e}); expected "
                                 "features, mean, scale, weights, bias") from None
