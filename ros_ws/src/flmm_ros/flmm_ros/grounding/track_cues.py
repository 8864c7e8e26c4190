"""Small image operations the tracker uses between SAM passes (NumPy / OpenCV / torch, no model).

- `estimate_shift`: where an object's pixels went from one frame to the next (masked template matching), so
  the prompt is placed where the object is now, not where it was (motion-compensated prompt);
- `clean_mask`: drop the blobs of a new mask that do not overlap the last mask, fill its holes;
  `largest_component`: a re-grounded mask's main part;
- `colour_histogram` / `histogram_similarity`: an appearance check that tells one object from another;
- `colour_log_ratio`: per pixel, how much more likely its colour is on the object than around it (a colour model
  from the last frame that sharpens the decoder's mask where SAM's low-res logits blur two touching objects);
- `embedding_descriptor`: SAM's image embedding pooled under a mask (a second appearance check);
- `grow_box`, `mask_box`, `boxes_meet`, `shift_mask`, `warp_prompt`, `mask_iou`, `mask_bounds`, `touches_border`:
  box and map geometry (boxes as numbers: `Box`).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

COLOUR_BINS = 4     # per RGB channel: coarse enough for lighting changes, fine enough to tell colours apart
MODEL_BITS = 4      # the colour model's (`colour_log_ratio`) 2^4 = 16 bins per RGB channel: finer than the check's
MODEL_BINS = 2 ** MODEL_BITS
MIN_MODEL_PIXELS = 16
MODEL_PIXELS = 512 * 512   # a larger window's colour model reads every n-th pixel (colour_log_ratio)
_NEAR = np.ones((5, 5), np.uint8)     # the colour model's "around the object": over 2 px from its mask


Box = tuple[float, float, float, float]     # x0, y0, x1, y1 in image pixels (x1, y1 exclusive)


def grow_box(box: Box, margin: float, image_hw: tuple[int, int]) -> Box:
    """`box` grown by `margin` of its width / height on every side, clipped to the image. The tracker keeps its boxes
    as numbers: torch operations on 4-element tensors cost more than the arithmetic."""
    h, w = image_hw
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    return (min(max(x0 - margin * bw, 0.0), w), min(max(y0 - margin * bh, 0.0), h),
            min(max(x1 + margin * bw, 0.0), w), min(max(y1 + margin * bh, 0.0), h))


def mask_box(mask: np.ndarray) -> Box | None:
    """The box of a boolean (H, W) mask (F-LMM's mask2box: x1, y1 exclusive); None if it is empty."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    return float(x0), float(y0), float(x1), float(y1)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def boxes_meet(a: Box, b: Box) -> bool:
    """Whether two boxes share a pixel."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def touches_border(box: Box, image_hw: tuple[int, int], pixels: int = 2) -> bool:
    """Whether a box comes within `pixels` of the image's edge."""
    h, w = image_hw
    x0, y0, x1, y1 = box
    return x0 <= pixels or y0 <= pixels or x1 >= w - pixels or y1 >= h - pixels


def shift_mask(mask: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """A boolean (H, W) mask moved by whole pixels (rounded); what leaves the image is dropped."""
    h, w = mask.shape
    ix, iy = int(round(dx)), int(round(dy))
    out = np.zeros_like(mask)
    if abs(ix) >= w or abs(iy) >= h:
        return out
    src = mask[max(0, -iy):h - max(0, iy), max(0, -ix):w - max(0, ix)]
    out[max(0, iy):max(0, iy) + src.shape[0], max(0, ix):max(0, ix) + src.shape[1]] = src
    return out


def warp_prompt(prompt: np.ndarray, old_box: Box, new_box: Box, fill: float = 0.0) -> np.ndarray:
    """Move and scale an (h, w) float32 map so that `old_box` lands on `new_box` (boxes in the map's own normalised
    [-1, 1] coordinates, as torch's affine_grid reads them); `fill` is what comes in from outside. Bilinear: the
    numbers of torch's affine_grid + grid_sample (align_corners=False), in one OpenCV call."""
    (ox0, oy0, ox1, oy1), (nx0, ny0, nx1, ny1) = old_box, new_box
    h, w = prompt.shape
    sx, sy = (ox1 - ox0) / max(nx1 - nx0, 1e-6), (oy1 - oy0) / max(ny1 - ny0, 1e-6)
    tx, ty = (ox0 + ox1) / 2 - (nx0 + nx1) / 2 * sx, (oy0 + oy1) / 2 - (ny0 + ny1) / 2 * sy
    # normalised x_in = sx x_out + tx in pixel centres (align_corners=False: x = (2 p + 1) / w - 1)
    bx, by = (sx * (1 - w) + (tx + 1) * w - 1) / 2, (sy * (1 - h) + (ty + 1) * h - 1) / 2
    matrix = np.array([[sx, 0.0, bx], [0.0, sy, by]])
    return cv2.warpAffine(prompt, matrix, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=fill)


def clean_mask(mask: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The connected parts of `mask` that mostly (>= half) overlap `previous`, always keeping the one that
    overlaps it most (the largest when none does), with holes filled. Blobs on other objects go; a new mask
    split in two by an occluder keeps both parts."""
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    if count > 2:
        size = np.bincount(labels.ravel(), minlength=count)
        overlap = np.bincount(labels[previous], minlength=count)
        keep = overlap >= 0.5 * size
        keep[int(np.argmax(overlap[1:] if overlap[1:].any() else size[1:])) + 1] = True
        keep[0] = False
        mask = keep[labels]
    count, labels = cv2.connectedComponents((~mask).astype(np.uint8), connectivity=4)
    if count > 2:   # background parts that do not touch the image border are holes
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        hole = np.ones(count, bool)
        hole[border] = False
        hole[0] = False
        mask = mask | hole[labels]
    return mask


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected part of a boolean mask (a grounded mask's stray blobs on other objects go)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)), without overflow warnings for large negative x."""
    return 0.5 * (1 + np.tanh(0.5 * x))


def mask_bounds(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), the rows and columns a boolean mask spans (ends exclusive); None if it is empty. From the
    mask's row and column "any": ~10x cheaper than listing its pixels with nonzero."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def colour_histogram(image: np.ndarray, mask: np.ndarray) -> np.ndarray | None:
    """Normalised RGB histogram (COLOUR_BINS per channel) of the pixels under `mask`; None if it is empty."""
    bounds = mask_bounds(mask)
    if bounds is None:
        return None
    y0, y1, x0, x1 = bounds
    hist = cv2.calcHist([np.ascontiguousarray(image[y0:y1, x0:x1])], [0, 1, 2],
                        np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8), [COLOUR_BINS] * 3,
                        [0, 256] * 3).ravel()
    return hist / max(1.0, float(hist.sum()))


def colour_log_ratio(previous: np.ndarray, previous_mask: np.ndarray, image: np.ndarray,
                     limit: float = 3.0) -> np.ndarray | None:
    """(h, w) float32: for each pixel of `image`, log P(its colour | object) - log P(its colour | surroundings),
    clipped to +-limit. The two colour models come from the last frame (`previous`, the same window of the image,
    RGB uint8): the object's pixels (`previous_mask`) and the window's pixels more than 2 px clear of them. A colour
    that both share scores about 0, so the ratio only speaks where colour tells the object from its surroundings.
    None when either side has fewer than MIN_MODEL_PIXELS pixels. A window over MODEL_PIXELS pixels is read every
    `step` pixels and the ratio resized back (bilinear): the cost stays that of a 512 x 512 window (~2 ms)."""
    near = cv2.dilate(previous_mask.astype(np.uint8), _NEAR)
    step = max(1, math.ceil(math.sqrt(previous_mask.size / MODEL_PIXELS)))
    obj, around = previous_mask[::step, ::step], near[::step, ::step] == 0
    bins = _colour_bins(previous[::step, ::step])
    counts = [np.bincount(bins[m], minlength=MODEL_BINS ** 3) for m in (obj, around)]
    totals = [int(c.sum()) for c in counts]
    if min(totals) < MIN_MODEL_PIXELS:
        return None
    eps = 1.0 / MODEL_BINS ** 3
    ratio = (np.log(counts[0] / totals[0] + eps) - np.log(counts[1] / totals[1] + eps)).clip(-limit, limit)
    ratio = ratio.astype(np.float32)
    out = np.take(ratio, _colour_bins(image[::step, ::step]))
    if step > 1:
        out = cv2.resize(out, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return out


def _colour_bins(rgb: np.ndarray) -> np.ndarray:
    """(h, w) uint16 bin of each RGB uint8 pixel: the top MODEL_BITS bits of each channel (bit shifts, each channel
    widened on its own: 5x faster than integer arithmetic on the whole array)."""
    q = rgb >> (8 - MODEL_BITS)
    return (q[..., 0].astype(np.uint16) << (2 * MODEL_BITS)) | (q[..., 1].astype(np.uint16) << MODEL_BITS) | q[..., 2]


def histogram_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Bhattacharyya coefficient of two normalised histograms: 1 = the same colours, 0 = none shared."""
    return float(np.sqrt(a * b).sum())


def embedding_descriptor(embedding: torch.Tensor, low_res: np.ndarray) -> torch.Tensor | None:
    """SAM's (1, C, h, w) image embedding averaged under a mask given as (4h, 4w) low-res logits of the same square
    frame (each cell weighted by its mean probability); unit norm, None if the mask is empty."""
    low_res = torch.from_numpy(np.ascontiguousarray(low_res))[None, None].to(embedding.device)
    weights = F.adaptive_avg_pool2d(low_res.float().sigmoid(), embedding.shape[-2:])
    total = weights.sum()
    if total <= 1e-6:
        return None
    return F.normalize((embedding.float() * weights).sum(dim=(0, 2, 3)) / total, dim=0)


def estimate_shift(previous: np.ndarray, image: np.ndarray, mask: np.ndarray, box: tuple[int, int, int, int],
                   work_side: int = 48) -> tuple[float, float]:
    """(dx, dy) in pixels that moves the object's pixels (`mask` over `previous`, inside `box`) onto `image`.

    Masked normalised cross-correlation (so a changed background does not count) over shifts up to half the
    object's size, on images scaled so that the object is at most `work_side` px (fast), refined to sub-pixel
    by a parabola through the best score and its neighbours. (0, 0) when the object is too small to match."""
    h, w = mask.shape
    x0, y0, x1, y1 = max(0, box[0]), max(0, box[1]), min(w, box[2]), min(h, box[3])
    if x1 - x0 < 4 or y1 - y0 < 4:
        return 0.0, 0.0
    radius = max(4, (max(x1 - x0, y1 - y0) + 1) // 2)
    scale = min(1.0, work_side / max(x1 - x0, y1 - y0))
    template = _grey(previous[y0:y1, x0:x1])          # one channel: three times cheaper, as precise here
    tmask = mask[y0:y1, x0:x1].astype(np.uint8)
    search = cv2.copyMakeBorder(_grey(image[max(0, y0 - radius):y1 + radius, max(0, x0 - radius):x1 + radius]),
                                max(0, radius - y0), max(0, y1 + radius - h), max(0, radius - x0),
                                max(0, x1 + radius - w), cv2.BORDER_REPLICATE)
    if scale < 1.0:
        size = (max(4, round((x1 - x0) * scale)), max(4, round((y1 - y0) * scale)))
        template = cv2.resize(template, size, interpolation=cv2.INTER_AREA)
        tmask = cv2.resize(tmask, size, interpolation=cv2.INTER_NEAREST)
        search = cv2.resize(search, (size[0] + 2 * round(radius * scale), size[1] + 2 * round(radius * scale)),
                            interpolation=cv2.INTER_AREA)
    if cv2.countNonZero(tmask) < 8:
        return 0.0, 0.0
    scores = cv2.matchTemplate(np.ascontiguousarray(search), np.ascontiguousarray(template), cv2.TM_CCOEFF_NORMED,
                               mask=tmask)
    np.nan_to_num(scores, copy=False, nan=-1.0, posinf=-1.0, neginf=-1.0)
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    fx = ix + _parabola_peak(scores[iy, ix - 1:ix + 2]) if 0 < ix < scores.shape[1] - 1 else float(ix)
    fy = iy + _parabola_peak(scores[iy - 1:iy + 2, ix]) if 0 < iy < scores.shape[0] - 1 else float(iy)
    centre_x, centre_y = (scores.shape[1] - 1) / 2, (scores.shape[0] - 1) / 2    # score of no shift
    return float((fx - centre_x) / scale), float((fy - centre_y) / scale)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb


def _parabola_peak(three: np.ndarray) -> float:
    a, b, c = (float(v) for v in three)
    d = a - 2 * b + c
    return 0.0 if d >= 0 else float(np.clip(0.5 * (a - c) / d, -0.5, 0.5))
