"""Region input on generated scenes: click an object, ask the frozen LMM what it is, check the kind and colour.

    python -m flmm_ros.tabletop.region_eval --scenes 300 --json region.json          # embedded model, test seeds
    python -m flmm_ros.tabletop.region_eval --scenes 20 --split val --promptings crop,none

For every object of every scene, the click is the object's most interior pixel (the farthest from its outline,
where a person clicks) and `GroundingPipeline.ask_region` runs with each visual prompting (region.py), asking
the default question (F-LMM's "Please give me a description of the image."). The answer's kind and colour are
read from the phrase linked to the region (`answer_span`); no linked phrase counts as wrong. Baselines on the
same objects: the whole image with the answer's first noun phrase (no region at all), and chance (uniform over
the scene vocabulary's kinds and colours, and always naming the most frequent kind and colour among the
evaluated objects). The region's mask IoU with the object shows SAM's segmentation from the click (and from
the object's box, asked with `--box-promptings`).
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from ..grounding.config import PipelineConfig
from ..grounding.noun_phrases import noun_phrases
from ..grounding.pipeline import GroundingPipeline
from ..grounding.region import PROMPTINGS
from ..grounding.sam.region import segment_region
from .language import COLOURS, PLURALS
from .scenes import generate_scene, split_seeds
from .shapes import KINDS

EMBEDDED = Path(__file__).resolve().parents[1].parent / "models" / "tabletop_tiny"
SIZES = ((256, 256), (480, 640))       # alternating, like the model card's test scenes
FIRST_PHRASE = "whole image, first phrase"
_KIND_WORDS = {**{k: k for k in KINDS}, **{p: k for k, p in PLURALS.items()}}


@dataclass
class RegionRecord:
    """One question about one object."""
    seed: int
    object: int
    kind: str
    colour: str
    prompt: str            # point | box
    method: str            # a prompting, or FIRST_PHRASE
    mask_iou: float        # the region's mask (the result's) against the object's
    sam_iou: float         # SAM's mask from the click or box alone against the object's
    answer: str
    phrase: str            # what the answer calls the region ("" when nothing)
    said_kind: str | None
    said_colour: str | None


def click_point(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) of the mask's most interior pixel: the largest distance to a background pixel (first on ties)."""
    padded = np.pad(mask.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(distance.argmax()), distance.shape)
    return int(x), int(y)


def kind_and_colour(text: str) -> tuple[str | None, str | None]:
    """The first kind word (plurals too) and the first colour word of `text`, None where there is none."""
    words = [w.strip(".,;:!?") for w in text.lower().split()]
    kind = next((_KIND_WORDS[w] for w in words if w in _KIND_WORDS), None)
    colour = next((w for w in words if w in COLOURS), None)
    return kind, colour


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def _record(seed, k, obj, prompt, method, mask, sam_iou, answer, phrase) -> RegionRecord:
    kind, colour = kind_and_colour(phrase)
    return RegionRecord(seed, k, obj.kind, obj.colour, prompt, method, _iou(mask, obj.mask), sam_iou, answer,
                        phrase, kind, colour)


def sam_only_iou(pipe: GroundingPipeline, frame, obj, where: dict) -> float:
    """IoU with the object of SAM's mask from the click or box alone (before the LMM names the region)."""
    logits, _ = segment_region(pipe.refiner, frame.sam, where.get("point"), where.get("box"))
    return _iou((logits > 0).cpu().numpy(), obj.mask)


def evaluate_regions(pipe: GroundingPipeline, split: str = "test", scenes: int = 300, offset: int = 0,
                     promptings=PROMPTINGS, box_promptings=()) -> list[RegionRecord]:
    """One record per object, prompt and method on `scenes` generated scenes of `split`."""
    records = []
    for i, seed in enumerate(split_seeds(split, scenes, offset)):
        scene = generate_scene(seed, SIZES[i % len(SIZES)])
        frame = pipe.encode(scene.image)
        for k, obj in enumerate(scene.objects):
            asks = [("point", {"point": click_point(obj.mask)}, p) for p in promptings]
            asks += [("box", {"box": obj.box}, p) for p in box_promptings]
            sam_iou = {prompt: sam_only_iou(pipe, frame, obj, where) for prompt, where, _ in asks}
            for prompt, where, prompting in asks:
                result = pipe.ask_region(frame, prompting=prompting, **where)
                region = result.objects[0]
                phrase = region.phrase if region.answer_span is not None else ""
                mask = region.mask > 0
                records.append(_record(seed, k, obj, prompt, prompting, mask, sam_iou[prompt], result.answer, phrase))
                if prompting == "none" and prompt == "point":
                    first = noun_phrases(result.answer)
                    records.append(_record(seed, k, obj, prompt, FIRST_PHRASE, mask, sam_iou[prompt], result.answer,
                                           first[0].text if first else ""))
    return records


def summarize(records: list[RegionRecord]) -> dict[str, dict]:
    """Per prompt and method: objects, mean mask IoU, kind / colour / both accuracy; and the chance rows."""
    rows: dict[str, dict] = {}
    for key in dict.fromkeys((r.prompt, r.method) for r in records):
        group = [r for r in records if (r.prompt, r.method) == key]
        kind = np.array([r.said_kind == r.kind for r in group])
        colour = np.array([r.said_colour == r.colour for r in group])
        rows[f"{key[0]}: {key[1]}"] = {"objects": len(group), "mask_iou": float(np.mean([r.mask_iou for r in group])),
                                       "sam_iou": float(np.mean([r.sam_iou for r in group])),
                                       "kind": float(kind.mean()), "colour": float(colour.mean()),
                                       "both": float((kind & colour).mean())}
    objects = {(r.seed, r.object): r for r in records}.values()
    kinds, colours = Counter(r.kind for r in objects), Counter(r.colour for r in objects)
    pairs = Counter((r.kind, r.colour) for r in objects)
    n = max(1, len(objects))
    rows["chance: uniform"] = {"objects": len(objects), "kind": 1 / len(KINDS), "colour": 1 / len(COLOURS),
                               "both": 1 / (len(KINDS) * len(COLOURS))}
    rows["chance: most frequent"] = {"objects": len(objects), "kind": max(kinds.values(), default=0) / n,
                                     "colour": max(colours.values(), default=0) / n,
                                     "both": max(pairs.values(), default=0) / n}
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| prompt: method | objects | kind | colour | kind and colour | mask IoU (SAM alone) |",
             "|---|---|---|---|---|---|"]
    for name, s in rows.items():
        iou = f"{s['mask_iou']:.3f} ({s['sam_iou']:.3f})" if "mask_iou" in s else ""
        lines.append(f"| {name} | {s['objects']} | {s['kind']:.3f} | {s['colour']:.3f} | {s['both']:.3f} | {iou} |")
    return "\n".join(lines)


def eval_arguments(description: str, max_new_tokens: int, json_help: str) -> argparse.ArgumentParser:
    """The options the held-out evaluations share (this one and conversation_eval)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--bundle", default=str(EMBEDDED))
    parser.add_argument("--split", default="test")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--json", help=json_help)
    return parser


def report(rows: dict[str, dict], table_text: str, json_path: str | None, name: str, items: list) -> None:
    """Print the table; with --json also write the summary and every item (dataclasses) there."""
    print(table_text)
    if json_path:
        Path(json_path).write_text(json.dumps({"summary": rows, name: [asdict(i) for i in items]}, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = eval_arguments(__doc__.splitlines()[0], 48, "write the summary and every record here")
    parser.add_argument("--promptings", default=",".join(PROMPTINGS))
    parser.add_argument("--box-promptings", default="crop")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=args.bundle, max_new_tokens=args.max_new_tokens))
    split_list = lambda text: [p for p in text.split(",") if p]   # noqa: E731
    records = evaluate_regions(pipe, args.split, args.scenes, args.offset, split_list(args.promptings),
                               split_list(args.box_promptings))
    rows = summarize(records)
    report(rows, table(rows), args.json, "records", records)

if __name__ == "__main__":
    main()
