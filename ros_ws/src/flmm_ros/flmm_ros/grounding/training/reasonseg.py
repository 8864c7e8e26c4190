"""ReasonSeg (LISA's reasoning-segmentation benchmark) as F-LMM's scripts/reason_seg.py reads and scores it.

A split directory holds `<name>.jpg` + `<name>.json` pairs; the JSON has "text" (the queries), "is_sentence"
(the query type) and "shapes" (labelme polygons). `reasonseg_mask` is LISA's `get_mask_from_json` as F-LMM
copies it: polygons sorted by area, largest first, drawn with OpenCV (outline then fill), "flag" shapes
skipped and shapes labelled "ignore" drawn as 255. The query is the first text (`--random`: one at random).
"""
from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .metrics import IGNORE


@dataclass
class ReasonSample:
    """One ReasonSeg image with its query and ground truth (0 / 1 / 255 = ignored)."""
    name: str
    image: np.ndarray          # (H, W, 3) uint8 RGB
    query: str
    is_sentence: bool
    target: np.ndarray         # (H, W) uint8


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return json.loads(path.read_text(encoding="cp1252"))    # some ReasonSeg files are cp1252


def reasonseg_mask(annotation: dict, height: int, width: int) -> np.ndarray:
    shapes = [s for s in annotation["shapes"] if s["label"].lower() != "flag"]
    areas = []
    for shape in shapes:
        tmp = np.zeros((height, width), np.uint8)
        points = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(tmp, points, True, 1, 1)
        cv2.fillPoly(tmp, points, 1)
        areas.append(tmp.sum())
    mask = np.zeros((height, width), np.uint8)
    for k in np.argsort(areas)[::-1]:
        shape = shapes[k]
        value = IGNORE if "ignore" in shape["label"].lower() else 1
        points = np.array([shape["points"]], dtype=np.int32)
        cv2.polylines(mask, points, True, value, 1)
        cv2.fillPoly(mask, points, value)
    return mask


def is_reasonseg_dir(directory: str | Path) -> bool:
    directory = Path(directory)
    return directory.is_dir() and not (directory / "instances.json").exists() and \
        any(p.with_suffix(".jpg").is_file() for p in directory.glob("*.json"))


def reasonseg_samples(directory: str | Path, *, random_query: bool = False, seed: int = 0,
                      count: int | None = None) -> Iterator[ReasonSample]:
    paths = sorted(Path(directory).glob("*.json"))[:count]
    if not paths:
        raise FileNotFoundError(f"{directory} holds no ReasonSeg .json files")
    rng = random.Random(seed)
    for path in paths:
        with Image.open(path.with_suffix(".jpg")) as img:
            image = np.asarray(img.convert("RGB"))
        annotation = _read_json(path)
        texts = annotation["text"]
        query = rng.choice(texts) if random_query else texts[0]
        yield ReasonSample(path.stem, image, query, bool(annotation["is_sentence"]),
                           reasonseg_mask(annotation, *image.shape[:2]))
