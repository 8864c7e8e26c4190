"""Pictures of a grounding result: an RGB overlay for RViz and a mono8 label image (no ROS)."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from flmm_ros.grounding.types import GroundedObject, GroundingError

# Fixed, well-separated RGB colours (Tableau 10); object k always gets PALETTE[k % len(PALETTE)].
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)


def object_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of the object at 0-based `index` (deterministic)."""
    return PALETTE[index % len(PALETTE)]


def _foreground(obj: GroundedObject, height: int, width: int) -> np.ndarray:
    mask = np.asarray(obj.mask)
    if mask.shape != (height, width):
        raise GroundingError(
            f"mask of '{obj.phrase}' has shape {mask.shape}, expected {(height, width)} (the image's)")
    return mask > 0


def draw_overlay(rgb: np.ndarray, objects: Sequence[GroundedObject], alpha: float = 0.45,
                 colours: Sequence[int] | None = None) -> np.ndarray:
    """Return a copy of `rgb` (H, W, 3 uint8) with each object's mask blended in its colour,
    the mask outline, its box and a "phrase score" label. The input is never modified.
    `colours`: each object's colour index (default: its position), e.g. a track id, so a colour stays put."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise GroundingError(f"overlay needs an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise GroundingError(f"overlay alpha must be in [0, 1], got {alpha}")
    height, width = rgb.shape[:2]
    out = rgb.copy()
    colours = list(range(len(objects))) if colours is None else list(colours)
    for index, obj in zip(colours, objects, strict=True):
        foreground = _foreground(obj, height, width)
        colour = np.array(object_colour(index), dtype=np.float32)
        blended = (1.0 - alpha) * out[foreground].astype(np.float32) + alpha * colour
        out[foreground] = np.round(blended).astype(np.uint8)
        contours, _ = cv2.findContours(foreground.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, object_colour(index), thickness=2)
    for index, obj in zip(colours, objects):  # second pass: no mask covers a box or label
        if any(obj.box):
            _draw_box_and_label(out, obj, object_colour(index))
    return out


def _draw_box_and_label(out: np.ndarray, obj: GroundedObject, colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = (int(v) for v in obj.box)
    cv2.rectangle(out, (x0, y0), (x1 - 1, y1 - 1), colour, thickness=2)  # box is x1/y1-exclusive
    text = f"{obj.phrase} {obj.score:.2f}"
    font, scale, thickness = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
    (text_w, text_h), baseline = cv2.getTextSize(text, font, scale, thickness)
    # Label on a filled tab above the box (inside it at the top edge), shifted left to stay in the image.
    tab_h = text_h + baseline + 4
    top = y0 - tab_h if y0 >= tab_h else y0
    left = max(min(x0, out.shape[1] - text_w - 4), 0)
    cv2.rectangle(out, (left, top), (left + text_w + 4, top + tab_h), colour, thickness=-1)
    cv2.putText(out, text, (left + 2, top + text_h + 2), font, scale, (255, 255, 255), thickness, cv2.LINE_AA)


def label_image(objects: Sequence[GroundedObject], shape: Sequence[int]) -> np.ndarray:
    """(H, W) uint8 label image: 0 background, k where object k (1-based) is; later objects on top.
    `shape` is the image shape; only its first two entries (H, W) are used."""
    height, width = int(shape[0]), int(shape[1])
    if len(objects) > 255:
        raise GroundingError(f"a mono8 label image holds at most 255 objects, got {len(objects)}")
    labels = np.zeros((height, width), dtype=np.uint8)
    for index, obj in enumerate(objects):
        labels[_foreground(obj, height, width)] = index + 1
    return labels
