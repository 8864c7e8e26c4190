"""Which instances of a plural phrase to keep: a calibrated filter over each instance's evidence (issue #18).

A plural phrase's union mask (instances.py) can take in objects of another kind and split one object into parts.
Each instance SAM returns carries evidence of what it is:
- `iou`: SAM's predicted IoU of the instance mask; `score`: its mean foreground probability;
- `union`: the phrase's mean refined probability over the instance; `coarse`: the mask head's, over the instance;
- `rel_area`: its area relative to the largest instance of the phrase (parts and crumbs are small);
- `lmm_kind`: how likely the frozen LMM, shown the instance alone, names the phrase (kind_check.py). It is the
  one feature that tells a red box from a red mug; a calibration that uses it stores its recipe (`kind_check`).
`InstanceCalibration` is a logistic regression from them to P(the instance is one of the named objects), with the
threshold chosen on held-out scenes; a bundle stores it under `instances` in flmm_bundle.yaml (for the embedded
model: `python -m flmm_ros.tabletop.instance_calibration --model <bundle> --write`). A bundle that has one also
lets SAM's instances stop at seed regions of another colour (`InstanceSplitter(clip_colours=True)`): a mask that
runs over a differently coloured neighbour is cut there, and the filter removes what should not be an instance.
Without a calibration nothing is filtered or cut (the splitter as before).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from .kind_check import KindCheck
from .presence import check_regression, fit_logistic, sigmoid
from .types import GroundingError

FEATURES = ("iou", "score", "union", "coarse", "rel_area", "lmm_kind")
MASK_FEATURES = FEATURES[:5]         # what the masks alone give (no LMM pass)


@dataclass(frozen=True)
class InstanceCalibration:
    """Logistic regression over standardised instance features; instances with P >= `threshold` are kept."""
    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    weights: tuple[float, ...]
    bias: float
    threshold: float = 0.5
    source: str = ""
    metrics: dict = field(default_factory=dict, compare=False)
    kind_check: KindCheck | None = None      # how `lmm_kind` is measured, when it is a feature

    def __post_init__(self):
        check_regression("instance calibration", FEATURES, self)
        if not 0.0 <= self.threshold < 1.0:      # also refuses NaN
            raise GroundingError(f"instance calibration threshold {self.threshold} is outside [0, 1)")
        if self.uses_kind and self.kind_check is None:
            raise GroundingError("the instance calibration uses lmm_kind but has no kind_check (prompt, "
                                 "answer_prefix, words): refit it with tabletop.instance_calibration")

    @property
    def uses_kind(self) -> bool:
        """True when instances need the LMM's look at each of them (kind_check.py)."""
        return "lmm_kind" in self.features

    def probability(self, values: Mapping[str, float]) -> float:
        """P(one of the named objects); a feature not measured (lmm_kind without the camera image, or for a phrase
        with no word the LMM can say) counts as its mean, i.e. neither way."""
        return sigmoid(self.bias + sum(w * (values.get(f, mu) - mu) / sd
                                       for f, mu, sd, w in zip(self.features, self.mean, self.scale, self.weights)))

    def to_spec(self) -> dict:
        spec = {"features": list(self.features), "mean": list(self.mean), "scale": list(self.scale),
                "weights": list(self.weights), "bias": self.bias, "threshold": self.threshold}
        if self.kind_check is not None:
            spec["kind_check"] = self.kind_check.to_spec()
        return spec | {"source": self.source, "metrics": dict(self.metrics)}

    @classmethod
    def from_spec(cls, spec: Mapping) -> InstanceCalibration:
        kind_check = spec.get("kind_check") if isinstance(spec, Mapping) else None
        try:
            return cls(tuple(spec["features"]), tuple(map(float, spec["mean"])), tuple(map(float, spec["scale"])),
                       tuple(map(float, spec["weights"])), float(spec["bias"]), float(spec.get("threshold", 0.5)),
                       str(spec.get("source", "")), dict(spec.get("metrics") or {}),
                       None if kind_check is None else KindCheck.from_spec(kind_check))
        except (KeyError, TypeError, ValueError) as e:
            raise GroundingError(f"bad instance calibration in the bundle ({type(e).__name__}: {e}); expected "
                                 "features, mean, scale, weights, bias, threshold") from None

    @classmethod
    def fit(cls, rows: list[Mapping[str, float]], labels: list[int], source: str = "",
            kind_check: KindCheck | None = None) -> InstanceCalibration:
        """Fitted on instances labelled 1 (one of the named objects) or 0, on every feature with `kind_check`, on
        MASK_FEATURES without; threshold 0.5 (the caller chooses one)."""
        features = FEATURES if kind_check is not None else MASK_FEATURES
        mean, scale, weights, bias = fit_logistic([[r[f] for f in features] for r in rows], labels)
        return cls(features, mean, scale, weights, bias, 0.5, source, kind_check=kind_check)


def instance_features(masks: list[np.ndarray], ious: list[float], scores: list[float], union_prob: np.ndarray,
                      coarse_prob: np.ndarray) -> list[dict[str, float]]:
    """The FEATURES of each instance mask (H, W bool); union_prob and coarse_prob (H, W) at image size."""
    largest = max((int(m.sum()) for m in masks), default=1) or 1
    return [{"iou": iou, "score": score, "union": float(union_prob[m].mean()) if m.any() else 0.0,
             "coarse": float(coarse_prob[m].mean()) if m.any() else 0.0, "rel_area": float(m.sum()) / largest}
            for m, iou, score in zip(masks, ious, scores)]


def region_colours(image: np.ndarray, regions: list[np.ndarray]) -> list[np.ndarray]:
    """Mean chromaticity (r, g, b over their sum) of each region: what shading barely changes."""
    rgb = image.astype(np.float32) + 1.0
    return [(rgb[r] / rgb[r].sum(1, keepdims=True)).mean(0) for r in regions]


def coarse_at(coarse: torch.Tensor, image_hw: tuple[int, int]) -> np.ndarray:
    """The mask head's probabilities (h, w logits) at image size."""
    up = torch.nn.functional.interpolate(coarse.detach().float()[None, None], size=image_hw, mode="bilinear")
    return up[0, 0].sigmoid().cpu().numpy()
