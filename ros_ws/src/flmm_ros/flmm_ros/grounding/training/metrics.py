"""Segmentation metrics exactly as F-LMM reports them.

- `IoUMeter`: referring segmentation, mmdet `RefSegMetric` (F-LMM's multiprocess_eval_refcoco.py):
  cIoU = sum I / sum U over all objects, gIoU ("mIoU") = mean per-object IoU, where an object whose
  prediction and ground truth are both empty scores 0 (mmdet: nan_to_num(0/0) = 0).
- `ReasonSegMeter`: reasoning segmentation, F-LMM's scripts/reason_seg.py (`intersectionAndUnionGPU`):
  per image, I and U are divided by the image's pixel count (pixels labelled 255 in the ground truth are
  ignored but still counted in it); gIoU = mean of I / (U + 1e-12), cIoU = mean I / (mean U + 1e-12),
  overall and for sentence ("long") and short queries.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE = 255


@dataclass
class IoUMeter:
    """Accumulates per-object intersections and unions (mmdet RefSegMetric)."""
    intersection: float = 0.0
    union: float = 0.0
    ious: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray) -> float:
        pred, target = pred.astype(bool), target.astype(bool)
        inter = float(np.logical_and(pred, target).sum())
        union = float(np.logical_or(pred, target).sum())
        iou = inter / union if union > 0 else 0.0
        self.intersection += inter
        self.union += union
        self.ious.append(iou)
        return iou

    @property
    def ciou(self) -> float:
        return self.intersection / self.union if self.union > 0 else 0.0

    @property
    def giou(self) -> float:
        return float(np.mean(self.ious)) if self.ious else 0.0

    @property
    def count(self) -> int:
        return len(self.ious)


@dataclass
class ReasonSegMeter:
    """Accumulates per-image normalised intersections and unions (F-LMM reason_seg.py)."""
    intersections: list[float] = field(default_factory=list)
    unions: list[float] = field(default_factory=list)
    is_sentence: list[bool] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray, is_sentence: bool) -> float:
        """pred: (H, W) bool; target: (H, W) uint8 with 0, 1 and IGNORE. Returns the image's IoU."""
        valid = target != IGNORE
        pred, fg = pred.astype(bool) & valid, (target == 1) & valid
        pixels = target.size
        inter = np.logical_and(pred, fg).sum() / pixels
        union = np.logical_or(pred, fg).sum() / pixels
        self.intersections.append(float(inter))
        self.unions.append(float(union))
        self.is_sentence.append(bool(is_sentence))
        return float(inter / (union + 1e-12))

    def scores(self) -> dict[str, dict[str, float]]:
        i, u, long = np.array(self.intersections), np.array(self.unions), np.array(self.is_sentence, bool)
        out = {}
        for name, keep in (("overall", np.ones_like(long)), ("long", long), ("short", ~long)):
            if keep.any():
                out[name] = {"giou": float((i[keep] / (u[keep] + 1e-12)).mean()),
                             "ciou": float(i[keep].mean() / (u[keep].mean() + 1e-12)), "count": int(keep.sum())}
        return out
