"""RefCOCO / RefCOCO+ / RefCOCOg as F-LMM reads them (mmdet 3.3 `RefCocoDataset` + `LoadAnnotations`).

The original layout is read directly, no conversion:

    <dir>/instances.json     COCO instances (images, annotations with polygon segmentations)
    <dir>/refs(unc).p        the refs: a pickled list of {"ref_id", "ann_id", "image_id", "split",
                             "sentences": [{"raw", "sent", ...}], ...} (refcocog: refs(umd).p)
    images                   COCO train2014 (F-LMM: data/coco/train2014 beside data/coco/refcoco)

`refs.json` (the same list as JSON, as our tabletop export writes it) is read too. The pickle is loaded by
`load_refs_pickle` with an unpickler that refuses every class and function (`find_class` always raises): only
plain containers, strings and numbers can come out of it, so a crafted file cannot run code.

What one evaluation item is, as in mmdet's RefCocoDataset with F-LMM's `text_mode='select_first'`:
- one item per image that has a ref in the split; its objects are the split's refs' annotations, one per
  annotation id (a later ref of the same annotation replaces the earlier one's sentences, as mmdet's
  `ann.update(ref)` does), in order of first appearance;
- per object one text, the first sentence's `raw` text lower-cased (`random`: one chosen at random once,
  F-LMM's training default; `original`: every sentence, each its own entry with the same mask);
- its mask is the annotation's segmentation rasterised as pycocotools does it (`coco_mask`, a transcription of
  maskApi.c's rleFrPoly), at the image's size, polygons with fewer than 3 points or an odd count left out.
"""
from __future__ import annotations

import json
import pickle
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

TEXT_MODES = ("select_first", "random", "original")
REFS_FILES = ("refs(unc).p", "refs(umd).p", "refs(google).p", "refs.json")


class _PlainUnpickler(pickle.Unpickler):
    """Loads lists, dicts, tuples, strings and numbers; any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a refs file holds only plain "
                                     "lists, dicts, strings and numbers")


def load_refs_pickle(path: str | Path) -> list:
    """The refs list of a RefCOCO `refs(*).p` (a Python 2 pickle), without ever constructing an object."""
    with open(path, "rb") as f:
        refs = _PlainUnpickler(f).load()
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, found {type(refs).__name__}")
    return refs


def find_refs_file(directory: Path) -> Path:
    """The refs file of a RefCOCO directory: refs(unc).p (refcoco, refcoco+), refs(umd).p (refcocog, F-LMM's
    choice over google), or refs.json."""
    for name in REFS_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} is not a RefCOCO directory: none of {list(REFS_FILES)} is there")


def _polygon_counts(xy: Sequence[float], h: int, w: int) -> list[int]:
    """pycocotools' rleFrPoly (common/maskApi.c): RLE counts of one polygon [x0, y0, x1, y1, ...]."""
    scale = 5.0
    k = len(xy) // 2
    x = [int(scale * xy[2 * j] + 0.5) for j in range(k)]      # C casts truncate towards zero, as int() does
    y = [int(scale * xy[2 * j + 1] + 0.5) for j in range(k)]
    x.append(x[0])
    y.append(y[0])
    us, vs = [], []
    for j in range(k):   # dense points along each edge of the 5x upsampled polygon
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx == dy == 0:       # C divides 0 by 0 here; the point never reaches the output
            us.append(np.array([xs]))
            vs.append(np.array([ys]))
            continue
        if dx >= dy:
            s = (ye - ys) / dx
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # Points where the column changes, downsampled: each starts or ends a run in its column.
    j = np.flatnonzero(u[1:] != u[:-1]) + 1
    xd = (np.where(u[j] < u[j - 1], u[j], u[j] - 1) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.ceil(np.clip((np.minimum(v[j], v[j - 1]) + 0.5) / scale - 0.5, 0, h))
    a = np.sort(np.append(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), h * w))
    a = np.diff(a, prepend=0).tolist()
    counts, i = [a[0]], 1
    while i < len(a):    # a zero-length run merges its neighbours
        if a[i] > 0:
            counts.append(a[i])
            i += 1
        else:
            i += 1
            if i < len(a):
                counts[-1] += a[i]
                i += 1
    return counts


def _string_counts(s: str) -> list[int]:
    """pycocotools' rleFrString: the compressed RLE string -> counts."""
    counts, p = [], 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def decode_counts(counts: Sequence[int], h: int, w: int) -> np.ndarray:
    """Column-major runs alternating 0, 1, 0, ... -> (h, w) bool mask."""
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}x{w}={h * w}")
    return flat.reshape((h, w), order="F")


def coco_mask(segmentation, h: int, w: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as mmdet's LoadAnnotations decodes it."""
    if isinstance(segmentation, dict):
        counts = segmentation["counts"]
        rh, rw = segmentation["size"]
        return decode_counts(_string_counts(counts) if isinstance(counts, str) else counts, rh, rw)
    mask = np.zeros((h, w), bool)
    for polygon in segmentation:
        if len(polygon) % 2 == 0 and len(polygon) >= 6:    # mmdet drops the others
            mask |= decode_counts(_polygon_counts([float(c) for c in polygon], h, w), h, w)
    return mask


@dataclass
class RefItem:
    """One image of a split with its objects' texts and annotations (masks are decoded by `load`)."""
    image_id: int
    file_name: str
    height: int
    width: int
    texts: list[str]
    segmentations: list

    def load(self, images_dir: str | Path) -> tuple[np.ndarray, list[np.ndarray]]:
        """The RGB image (PIL, as F-LMM loads it; EXIF orientation ignored) and the masks at its size."""
        path = Path(images_dir) / self.file_name
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
        h, w = rgb.shape[:2]
        return rgb, [coco_mask(seg, h, w) for seg in self.segmentations]


def read_split(directory: str | Path, split: str, text_mode: str = "select_first", refs_file: str = "",
               seed: int = 0) -> list[RefItem]:
    """The items of one split, mmdet RefCocoDataset's `load_data_list` (see the module docstring)."""
    directory = Path(directory)
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text mode {text_mode!r} is not one of {list(TEXT_MODES)}")
    if not (directory / "instances.json").is_file():
        raise FileNotFoundError(f"{directory} is not a RefCOCO directory: instances.json is missing")
    refs_path = directory / refs_file if refs_file else find_refs_file(directory)
    refs = json.loads(refs_path.read_text()) if refs_path.suffix == ".json" else load_refs_pickle(refs_path)
    instances = json.loads((directory / "instances.json").read_text())
    images = {img["id"]: img for img in instances["images"]}
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    by_ann: dict[int, dict] = {}
    for ref in refs:
        if ref["split"] == split:
            by_ann[ref["ann_id"]] = ref     # dict order: first appearance; value: the last ref
    if not by_ann:
        raise ValueError(f"no refs in split {split!r} of {refs_path}")
    rng = random.Random(seed)
    items: dict[int, RefItem] = {}
    for ann_id, ref in by_ann.items():
        ann = anns[ann_id]
        image = images[ann["image_id"]]
        texts = [s["raw"].lower() for s in ref["sentences"]]
        chosen = {"select_first": texts[:1], "random": [texts[rng.randrange(len(texts))]], "original": texts}
        item = items.setdefault(image["id"], RefItem(image["id"], image["file_name"], image["height"],
                                                     image["width"], [], []))
        item.texts += chosen[text_mode]
        item.segmentations += [ann["segmentation"]] * len(chosen[text_mode])
    return list(items.values())


def default_images_dir(directory: str | Path) -> Path:
    """<dir>/images (our exports), else F-LMM's layout: data/coco/train2014 beside data/coco/<dataset>."""
    directory = Path(directory)
    return directory / "images" if (directory / "images").is_dir() else directory.parent / "train2014"


def iter_images(items: list[RefItem], images_dir: str | Path) -> Iterator[tuple[RefItem, np.ndarray, list]]:
    for item in items:
        image, masks = item.load(images_dir)
        yield item, image, masks

