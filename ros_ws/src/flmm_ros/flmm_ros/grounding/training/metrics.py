"""Referring-segmentation metrics as F-LMM / mmdet RefSegMetric: cIoU = sum I / sum U, gIoU = mean IoU."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class IoUMeter:
    intersection: float = 0.0
    union: float = 0.0
    ious: list[float] = field(default_factory=list)

    def add(self, pred: np.ndarray, target: np.ndarray) -> float:
        pred, target = pred.astype(bool), target.astype(bool)
        inter = float(np.logical_and(pred, target).sum())
        union = float(np.logical_or(pred, target).sum())
        iou = inter / union if union > 0 else 1.0
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
