"""Grounded conversation on generated scenes: describe the scene, ground every noun phrase of the description.

    python -m flmm_ros.tabletop.conversation_eval --scenes 300 --json gcg.json     # embedded model, test seeds

Each scene is described with F-LMM's prompt ("Please give me a description of the image."); the scene's own
description names every object, so every object is a described object. Scores (GLaMM's grounded conversation
generation metrics, on exact instance masks):
- mask recall: the share of the scene's objects matched by a grounded phrase with mask IoU >= 0.5 (one-to-one,
  pairs taken by decreasing IoU); "with names" also needs the phrase's kind and colour words to be the object's
  (GLaMM pairs its masks with a text-similarity test; here the words are exact);
- phrase precision: the share of grounded phrases matched that way.
Rows, on the same scenes:
- `answer tokens`: `phrase_mode: conversation`, each phrase grounded from the generated answer's own tokens;
- `grounding prompt`: the same phrases grounded again the instruction-mode way (F-LMM's grounding prompt with the
  phrases as the whole answer), which loses the answer's context;
- `true description`: `ground_answer` over the scene's own description, so the LMM's description errors are out
  and only the grounding is measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..grounding.config import PipelineConfig
from ..grounding.lmm import GROUNDING_PROMPT
from ..grounding.pipeline import GroundingPipeline
from .region_eval import SIZES, eval_arguments, kind_and_colour, report
from .scenes import generate_scene, split_seeds

ROWS = ("answer tokens", "grounding prompt", "true description")
IOU_THRESHOLD = 0.5


@dataclass
class SceneScore:
    """One scene and one row: how many objects and phrases, and how many were matched."""
    seed: int
    row: str
    answer: str
    objects: int
    phrases: int
    matched: int            # pairs with IoU >= 0.5
    matched_named: int      # ... whose phrase also says the object's kind and colour


def match(pred: list[np.ndarray], truth: list[np.ndarray], threshold: float = IOU_THRESHOLD) -> list[tuple[int, int]]:
    """One-to-one (pred, truth) pairs with IoU >= threshold, taken greedily by decreasing IoU."""
    pairs = []
    for i, p in enumerate(pred):
        for j, t in enumerate(truth):
            union = (p | t).sum()
            iou = (p & t).sum() / union if union else 0.0
            if iou >= threshold:
                pairs.append((iou, i, j))
    used_p, used_t, out = set(), set(), []
    for _, i, j in sorted(pairs, reverse=True):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
            out.append((i, j))
    return out


def score_scene(seed: int, row: str, answer: str, phrases: list[str], masks: list[np.ndarray], objects) -> SceneScore:
    pairs = match(masks, [o.mask for o in objects])
    named = sum(kind_and_colour(phrases[i]) == (objects[j].kind, objects[j].colour) for i, j in pairs)
    return SceneScore(seed, row, answer, len(objects), len(phrases), len(pairs), named)


def evaluate_conversation(pipe: GroundingPipeline, split: str = "test", scenes: int = 300, offset: int = 0,
                          rows=ROWS) -> list[SceneScore]:
    """Per scene and row, the counts the scores are made of (`pipe` in phrase_mode conversation)."""
    if pipe.config.phrase_mode != "conversation":
        raise ValueError("evaluate_conversation needs a pipeline with phrase_mode 'conversation'")
    out = []
    for i, seed in enumerate(split_seeds(split, scenes, offset)):
        scene = generate_scene(seed, SIZES[i % len(SIZES)])
        frame = pipe.encode(scene.image)
        result = pipe.run(frame, GROUNDING_PROMPT)
        results = {"answer tokens": (result.answer, result.phrases, result.objects)}
        if "grounding prompt" in rows:
            regrounded = pipe.ground(frame, result.phrases) if result.phrases else []
            results["grounding prompt"] = (result.answer, result.phrases, regrounded)
        if "true description" in rows:
            truth = pipe.ground_answer(frame, scene.description)
            results["true description"] = (truth.answer, truth.phrases, truth.objects)
        for row in rows:
            answer, phrases, objects = results[row]
            out.append(score_scene(seed, row, answer, phrases, [o.mask > 0 for o in objects], scene.objects))
    return out


def summarize(scores: list[SceneScore]) -> dict[str, dict]:
    rows = {}
    for row in dict.fromkeys(s.row for s in scores):
        group = [s for s in scores if s.row == row]
        objects, phrases = sum(s.objects for s in group), sum(s.phrases for s in group)
        matched, named = sum(s.matched for s in group), sum(s.matched_named for s in group)
        rows[row] = {"scenes": len(group), "objects": objects, "phrases": phrases,
                     "mask_recall": matched / max(1, objects), "mask_recall_named": named / max(1, objects),
                     "phrase_precision": matched / max(1, phrases), "phrase_precision_named": named / max(1, phrases)}
    return rows


def table(rows: dict[str, dict]) -> str:
    lines = ["| phrases grounded from | scenes | objects | phrases | mask recall | with names | phrase precision "
             "| with names |", "|---|---|---|---|---|---|---|---|"]
    for name, s in rows.items():
        lines.append(f"| {name} | {s['scenes']} | {s['objects']} | {s['phrases']} | {s['mask_recall']:.3f} | "
                     f"{s['mask_recall_named']:.3f} | {s['phrase_precision']:.3f} | "
                     f"{s['phrase_precision_named']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = eval_arguments(__doc__.splitlines()[0], 64, "write the summary and the per-scene counts here"
                          ).parse_args(argv)
    torch.set_num_threads(1)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=args.bundle, phrase_mode="conversation",
                                                        max_new_tokens=args.max_new_tokens))
    scores = evaluate_conversation(pipe, args.split, args.scenes, args.offset)
    rows = summarize(scores)
    report(rows, table(rows), args.json, "scenes", scores)

if __name__ == "__main__":
    main()
