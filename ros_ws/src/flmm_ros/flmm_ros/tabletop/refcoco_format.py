"""Writing generated scenes as a RefCOCO-style data set, and reading any such data set back.

Layout of an exported directory (JSON only, nothing pickled)::

    DIR/images/<image_id>.png       RGB images (PNG, lossless)
    DIR/instances.json              COCO-style: {"info", "categories", "images", "annotations"}
    DIR/refs.json                   RefCOCO-style refs: a list of
                                    {"ref_id", "ann_id", "image_id", "category_id", "split",
                                     "sent_ids", "sentences": [{"sent_id", "sent", "raw", "tokens"}],
                                     "answer"}   (answer: the robot's sentence about the object)
    DIR/questions.json              [{"image_id", "question", "answer", "type", "ann_id" (or null)}]

- images: {"id", "file_name", "height", "width", "seed", "split"}; the image id is the scene seed.
- annotations: {"id", "image_id", "category_id", "bbox" [x, y, w, h], "area", "iscrowd": 0,
  "colour", "segmentation"}; the segmentation is COCO's *uncompressed* RLE of the visible pixels,
  {"size": [h, w], "counts": [...]}: run lengths over the mask flattened in column-major (Fortran)
  order, starting with a run of zeros (possibly empty). pycocotools reads it with frPyObjects.
- categories: the object kinds, ids 1..6 in `shapes.KINDS` order.
- split: "train" | "val" | "test", from the seed range (`scenes.split_of_seed`).

This differs from the original RefCOCO only in that refs are JSON (the original is a pickle) and that
masks are RLE instead of polygons. The evaluation and training tools read both layouts with
`flmm_ros.grounding.training.refcoco` (F-LMM's protocol; the original pickle through a restricted
unpickler). `load_refcoco_format` here returns every sentence of every object (for checking an export);
polygons are rasterised as pycocotools does (`coco_mask`).
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
from tqdm import tqdm

from ..grounding.training.refcoco import coco_mask
from .scenes import generate_scene, split_of_seed, split_seeds
from .shapes import KINDS


@dataclass
class RefImage:
    image_id: int
    file_name: str
    split: str
    image: np.ndarray                         # (H, W, 3) uint8 RGB
    refs: list[tuple[str, np.ndarray]]         # (expression, (H, W) bool mask), one per sentence


def mask_to_rle(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a boolean mask."""
    flat = np.asarray(mask, bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


def rle_to_mask(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, str):
        raise ValueError("compressed RLE strings are not supported: store uncompressed counts")
    values = np.arange(len(counts)) % 2 == 1        # runs alternate 0, 1, 0, ...
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts sum to {flat.size}, expected {h}x{w}={h * w}")
    return flat.reshape((h, w), order="F")


def segmentation_to_mask(segmentation, height: int, width: int) -> np.ndarray:
    """An annotation's mask from uncompressed RLE or from COCO polygons (pycocotools' rasterisation)."""
    if isinstance(segmentation, dict):
        return rle_to_mask(segmentation)
    return coco_mask(segmentation, height, width)


def export_refcoco_format(out_dir: str | Path, seeds: Iterable[int], size: tuple[int, int] = (480, 640),
                          progress: bool = False) -> dict[str, int]:
    """Renders the scenes of `seeds` and writes them; returns counts of images, annotations, refs."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    images, annotations, refs, questions = [], [], [], []
    for seed in tqdm(list(seeds), desc="export", disable=not progress):
        scene = generate_scene(seed, size)
        split = split_of_seed(seed)
        file_name = f"{seed:08d}.png"
        cv2.imwrite(str(out_dir / "images" / file_name), cv2.cvtColor(scene.image, cv2.COLOR_RGB2BGR))
        h, w = scene.image.shape[:2]
        images.append({"id": seed, "file_name": file_name, "height": h, "width": w, "seed": seed, "split": split})
        ann_ids = []
        for k, obj in enumerate(scene.objects):
            ann_id = seed * 10 + k
            ann_ids.append(ann_id)
            x0, y0, x1, y1 = obj.box
            category = KINDS.index(obj.kind) + 1
            annotations.append({"id": ann_id, "image_id": seed, "category_id": category,
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": int(obj.mask.sum()), "iscrowd": 0,
                                "colour": obj.colour, "segmentation": mask_to_rle(obj.mask)})
            if obj.expressions:
                sent_ids = [ann_id * 100 + j for j in range(len(obj.expressions))]  # < 100 expressions
                refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": seed, "category_id": category,
                             "split": split, "sent_ids": sent_ids, "answer": obj.answer,
                             "sentences": [{"sent_id": sid, "sent": e, "raw": e, "tokens": e.split()}
                                           for sid, e in zip(sent_ids, obj.expressions)]})
        for qa in scene.questions:
            questions.append({"image_id": seed, "question": qa.question, "answer": qa.answer, "type": qa.type,
                              "ann_id": None if qa.target is None else ann_ids[qa.target]})
    instances = {"info": {"description": "flmm_ros generated tabletop scenes", "size": list(size)},
                 "categories": [{"id": i + 1, "name": k} for i, k in enumerate(KINDS)],
                 "images": images, "annotations": annotations}
    (out_dir / "instances.json").write_text(json.dumps(instances))
    (out_dir / "refs.json").write_text(json.dumps(refs))
    (out_dir / "questions.json").write_text(json.dumps(questions))
    return {"images": len(images), "annotations": len(annotations), "refs": len(refs)}


def load_refcoco_format(data_dir: str | Path, split: str | None = None) -> Iterator[RefImage]:
    """Each image of the data set (optionally one split) with its (expression, mask) pairs."""
    data_dir = Path(data_dir)
    for name in ("instances.json", "refs.json"):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"{data_dir} is not a RefCOCO-format directory: {name} is missing")
    instances = json.loads((data_dir / "instances.json").read_text())
    refs = json.loads((data_dir / "refs.json").read_text())
    annotations = {a["id"]: a for a in instances["annotations"]}
    refs_by_image = defaultdict(list)
    for ref in refs:
        if split is None or ref["split"] == split:
            refs_by_image[ref["image_id"]].append(ref)
    for info in instances["images"]:
        image_refs = refs_by_image.get(info["id"])
        if not image_refs:
            continue
        path = data_dir / "images" / info["file_name"]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot read image {path}")
        h, w = info["height"], info["width"]
        pairs = []
        for ref in image_refs:
            mask = segmentation_to_mask(annotations[ref["ann_id"]]["segmentation"], h, w)
            pairs += [(s["sent"], mask) for s in ref["sentences"]]
        yield RefImage(info["id"], info["file_name"], image_refs[0]["split"], cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), pairs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Export generated tabletop scenes in RefCOCO format.")
    p.add_argument("--out", required=True)
    p.add_argument("--train", type=int, default=1000, help="number of train scenes (seeds 0..)")
    p.add_argument("--val", type=int, default=200, help="number of val scenes (seeds 1000000..)")
    p.add_argument("--test", type=int, default=200, help="number of test scenes (seeds 2000000..)")
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    args = p.parse_args(argv)
    seeds = [s for split in ("train", "val", "test") for s in split_seeds(split, getattr(args, split))]
    counts = export_refcoco_format(args.out, seeds, tuple(args.size), progress=True)
    print(f"wrote {counts} to {args.out}")


if __name__ == "__main__":
    main()
