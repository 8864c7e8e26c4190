"""Pictures of a grounding result: an RGB overlay for RViz and a mono8 label image (no ROS)."""
from __future__ import annotations

import re
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


# The caption strip under an overlay (grounded conversation): the answer, each grounded phrase's words in its
# object's colour. OpenCV's Hershey fonts draw ASCII only; other characters come out as '?'.
CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1
CAPTION_MARGIN, CAPTION_LINE_GAP = 6, 6
CAPTION_TEXT_RGB, CAPTION_BACKGROUND_RGB = (0, 0, 0), (255, 255, 255)


def caption_layout(answer: str, objects: Sequence[GroundedObject], width: int,
                   colours: Sequence[int] | None = None) -> list[tuple[str, tuple[int, int, int], int, int]]:
    """Where the caption's words go: (word, RGB, x, baseline y) per word, wrapped to `width`. A word takes the
    colour of the object whose `answer_span` holds its first character (black when none does)."""
    colours = list(range(len(objects))) if colours is None else list(colours)
    owner = [None] * len(answer)
    for index, obj in zip(colours, objects, strict=True):
        if obj.answer_span is not None:
            start, end = obj.answer_span
            for i in range(max(0, start), min(len(answer), end)):
                owner[i] = object_colour(index)
    (_, text_h), baseline = cv2.getTextSize("Ag", CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)
    line_h = text_h + baseline + CAPTION_LINE_GAP
    space = cv2.getTextSize(" ", CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)[0][0]
    x, y, placed = CAPTION_MARGIN, CAPTION_MARGIN + text_h, []
    for match in re.finditer(r"\S+", answer):
        # A word split between a phrase and plain text ("mug," after "the red mug") is drawn in two pieces.
        pieces, start = [], match.start()
        for i in range(match.start() + 1, match.end() + 1):
            if i == match.end() or owner[i] != owner[start]:
                pieces.append((answer[start:i], owner[start] or CAPTION_TEXT_RGB))
                start = i
        word_w = sum(cv2.getTextSize(p, CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)[0][0] for p, _ in pieces)
        if x > CAPTION_MARGIN and x + word_w > width - CAPTION_MARGIN:
            x, y = CAPTION_MARGIN, y + line_h
        for text, rgb in pieces:
            placed.append((text, rgb, x, y))
            x += cv2.getTextSize(text, CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)[0][0]
        x += space
    return placed


def caption_strip(answer: str, objects: Sequence[GroundedObject], width: int,
                  colours: Sequence[int] | None = None) -> np.ndarray:
    """A white (h, width, 3) uint8 strip with the answer in black and each grounded phrase's words in its object's
    colour, underlined (`caption_layout`); h fits the wrapped text."""
    placed = caption_layout(answer, objects, width, colours)
    _, baseline = cv2.getTextSize("Ag", CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)
    bottom = max((y for *_, y in placed), default=0) + baseline + CAPTION_MARGIN
    strip = np.empty((max(bottom, 2 * CAPTION_MARGIN), width, 3), np.uint8)
    strip[:] = CAPTION_BACKGROUND_RGB
    for text, rgb, x, y in placed:
        cv2.putText(strip, text, (x, y), CAPTION_FONT, CAPTION_SCALE, rgb, CAPTION_THICKNESS, cv2.LINE_AA)
        if rgb != CAPTION_TEXT_RGB:     # a grounded phrase is underlined too, so thin letters still show it
            text_w = cv2.getTextSize(text, CAPTION_FONT, CAPTION_SCALE, CAPTION_THICKNESS)[0][0]
            cv2.line(strip, (x, y + 3), (x + text_w, y + 3), rgb, 2)
    return strip


def draw_grounded_answer(rgb: np.ndarray, answer: str, objects: Sequence[GroundedObject], alpha: float = 0.45,
                         colours: Sequence[int] | None = None) -> np.ndarray:
    """`draw_overlay` with the caption strip under it: "[the red mug] is next to [the blue bowl]", each phrase
    in its mask's colour. The result is taller than `rgb` by the strip's height."""
    overlay = draw_overlay(rgb, objects, alpha, colours)
    return np.vstack([overlay, caption_strip(answer, objects, rgb.shape[1], colours)])
