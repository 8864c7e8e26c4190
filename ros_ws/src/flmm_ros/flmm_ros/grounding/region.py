"""Region input (AnyRef, GLaMM's region input, Ferret): the user points at something instead of naming it.

`GroundingPipeline.ask_region` segments the region with SAM from a pixel point or box (`sam/region.py`), then
asks the frozen LMM about it through a visual prompt, with no retraining:
- `crop`: the LMM sees a square crop around the region (`crop_window`: `CROP_CONTEXT` times the region's longer
  side, at least `MIN_CROP_FRACTION` of the image's shorter side, moved inside the image);
- `marker`: the whole image with a red ellipse drawn around the region (`draw_marker`, the "red circle" of
  Shtedritski et al., 2023);
- `highlight`: the whole image with everything outside the region darkened and greyed (`highlight_region`, the
  reverse-mask prompt of Fine-Grained Visual Prompting, Yang et al., 2023);
- `none`: the whole image as it is (the baseline; the frame's cached encoding is reused).
The answer's noun phrases are then grounded in the image the LMM saw (grounded conversation), and the phrase
whose mask overlaps the region most (`best_match`) is the answer's name for it: its span links the answer to
the region's object. `crop` is the default: on 600 validation scenes of the embedded model it named the clicked
object's kind and colour as often as `highlight` (0.737 and 0.734), more often than `none` and `marker` (the
model card's region-input section has the test numbers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .types import GroundingError

PROMPTINGS = ("crop", "highlight", "marker", "none")
CROP_CONTEXT = 2.0           # crop side / the region box's longer side
MIN_CROP_FRACTION = 0.35     # ... and at least this share of the image's shorter side
POINT_REGION_FRACTION = 0.1  # an empty SAM mask from a click: a square this share of the shorter side around it
MARKER_RGB = (255, 0, 0)
MARKER_MARGIN = 0.25         # the ellipse's half-axes: the box's half-sides grown by this share
HIGHLIGHT_KEEP = 0.35        # outside the region: this share of the grey level is kept


@dataclass(frozen=True)
class RegionPrompt:
    """A pixel point (x, y) and/or a box (x0, y0, x1, y1, x1/y1 exclusive) in the camera image."""
    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None

    @classmethod
    def check(cls, point, box, image_hw: tuple[int, int], prompting: str = "crop") -> "RegionPrompt":
        """The prompt, or GroundingError saying what is wrong (missing, not numbers, outside the image, empty, an
        unknown `prompting`)."""
        h, w = image_hw
        if prompting not in PROMPTINGS:
            raise GroundingError(f"prompting {prompting!r} is not one of {list(PROMPTINGS)}")
        if point is None and box is None:
            raise GroundingError("region input needs a point (x, y) or a box (x0, y0, x1, y1)")
        if point is not None:
            point = _numbers(point, 2, "point (x, y)")
            if not (0 <= point[0] < w and 0 <= point[1] < h):
                raise GroundingError(f"point {point} is outside the {w}x{h} image")
        if box is not None:
            box = _numbers(box, 4, "box (x0, y0, x1, y1)")
            x0, y0, x1, y1 = box
            if not (x1 > x0 and y1 > y0):
                raise GroundingError(f"box {box} is empty: it needs x1 > x0 and y1 > y0")
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise GroundingError(f"box {box} is outside the {w}x{h} image")
            box = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
        return cls(point, box)

    def fallback_box(self, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
        """Where the region is when SAM finds nothing: the box, or a square around the point."""
        h, w = image_hw
        if self.box is not None:
            return _int_box(self.box, image_hw)
        r = max(2.0, POINT_REGION_FRACTION * min(h, w) / 2)
        x, y = self.point
        return _int_box((x - r, y - r, x + r + 1, y + r + 1), image_hw)

    def holds(self, mask: np.ndarray) -> bool:
        """Whether a mask (bool, image size) is still the region: it covers the point, or, for a box alone, its
        box overlaps the given box at IoU >= 0.5."""
        if self.point is not None:
            x, y = (int(v) for v in self.point)
            return bool(mask[y, x])
        ys, xs = np.nonzero(mask)
        if ys.size == 0:
            return False
        return box_iou((xs.min(), ys.min(), xs.max() + 1, ys.max() + 1), self.box) >= 0.5

    def mask_and_box(self, obj) -> tuple[np.ndarray, tuple[int, int, int, int]]:
        """The region SAM segmented (a GroundedObject): its mask (bool) and box, or, when the mask is empty, the
        fallback box and a mask filling it, so the LMM is still asked about where the user pointed."""
        mask = np.asarray(obj.mask) > 0
        if mask.any():
            return mask, tuple(obj.box)
        box = self.fallback_box(mask.shape)
        mask[box[1]:box[3], box[0]:box[2]] = True
        return mask, box


def box_iou(a, b) -> float:
    """IoU of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def _numbers(values, count: int, name: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise GroundingError(f"{name} must be {count} numbers, got {values!r}") from None
    if len(out) != count or not all(math.isfinite(v) for v in out):
        raise GroundingError(f"{name} must be {count} finite numbers, got {values!r}")
    return out


def _int_box(box, image_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    h, w = image_hw
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def crop_window(box, image_hw: tuple[int, int], context: float = CROP_CONTEXT,
                min_fraction: float = MIN_CROP_FRACTION) -> tuple[int, int, int, int]:
    """A square window (x0, y0, x1, y1) centred on `box`, `context` times its longer side (at least
    `min_fraction` of the image's shorter side), shifted to lie inside the image (cut only where the image is
    smaller than the square)."""
    h, w = image_hw
    x0, y0, x1, y1 = box
    side = max(context * max(x1 - x0, y1 - y0), min_fraction * min(h, w))
    side_x, side_y = min(w, int(round(side))), min(h, int(round(side)))
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left = int(round(min(max(cx - side_x / 2, 0), w - side_x)))
    top = int(round(min(max(cy - side_y / 2, 0), h - side_y)))
    return left, top, left + side_x, top + side_y


def draw_marker(image: np.ndarray, box, margin: float = MARKER_MARGIN) -> np.ndarray:
    """A copy of `image` with a red ellipse around `box` (its half-axes the box's half-sides grown by `margin`)."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    centre = (int(round((x0 + x1) / 2)), int(round((y0 + y1) / 2)))
    axes = (max(2, int(round((x1 - x0) / 2 * (1 + margin)))), max(2, int(round((y1 - y0) / 2 * (1 + margin)))))
    out = image.copy()
    cv2.ellipse(out, centre, axes, 0, 0, 360, MARKER_RGB, thickness=max(2, round(min(h, w) / 100)),
                lineType=cv2.LINE_AA)
    return out


def highlight_region(image: np.ndarray, mask: np.ndarray, keep: float = HIGHLIGHT_KEEP) -> np.ndarray:
    """A copy of `image` where pixels outside `mask` are grey and darkened to `keep` of their brightness."""
    grey = image.astype(np.float32).mean(axis=2, keepdims=True) * keep
    return np.where(mask[..., None], image, np.round(grey).astype(np.uint8)).astype(np.uint8)


@dataclass
class RegionView:
    """The picture the LMM is asked about, and the region's mask in it."""
    image: np.ndarray       # (h, w, 3) uint8
    mask: np.ndarray        # (h, w) bool
    window: tuple[int, int, int, int]   # where the picture lies in the camera image (the whole image but for crop)


def visual_prompt(image: np.ndarray, mask: np.ndarray, box, prompting: str) -> RegionView:
    """The region (`mask`, its `box`) shown to the LMM by `prompting` (one of PROMPTINGS)."""
    h, w = image.shape[:2]
    whole = (0, 0, w, h)
    if prompting == "crop":
        x0, y0, x1, y1 = crop_window(box, (h, w))
        return RegionView(np.ascontiguousarray(image[y0:y1, x0:x1]), mask[y0:y1, x0:x1], (x0, y0, x1, y1))
    if prompting == "marker":
        return RegionView(draw_marker(image, box), mask, whole)
    if prompting == "highlight":
        return RegionView(highlight_region(image, mask), mask, whole)
    if prompting == "none":
        return RegionView(image, mask, whole)
    raise GroundingError(f"prompting {prompting!r} is not one of {list(PROMPTINGS)}")


def best_match(masks: np.ndarray, region: np.ndarray) -> tuple[int | None, float]:
    """Index of the mask (N, h, w bool) with the highest IoU with `region` (h, w bool), and that IoU; (None, 0.0)
    when no mask overlaps it."""
    if len(masks) == 0:
        return None, 0.0
    inter = (masks & region).reshape(len(masks), -1).sum(1)
    union = (masks | region).reshape(len(masks), -1).sum(1)
    iou = inter / np.maximum(union, 1)
    best = int(iou.argmax())
    return (best, float(iou[best])) if inter[best] > 0 else (None, 0.0)
