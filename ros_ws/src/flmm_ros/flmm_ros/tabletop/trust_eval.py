"""Answers a robot can trust, on held-out tabletop scenes (issue #18): presence calibration and evaluation.

    python -m flmm_ros.tabletop.trust_eval calibrate --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --split val --count 600 --write
    python -m flmm_ros.tabletop.trust_eval evaluate --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --split test --count 500 --json out/trust_test.json
    python -m flmm_ros.tabletop.trust_eval plural-head --model <bundle> --head out/head_plural/head.safetensors

`plural-head` stores a head trained with plural phrases (`head_cli train --group-count`) as the bundle's plural
head (grounding/plural_head.py).

`calibrate` collects the presence features (grounding/presence.py) of named and absent phrases on scenes of one
split and fits the logistic regression; `--write` stores it in the bundle's flmm_bundle.yaml (`presence`).
Phrases: per ordinary scene, one random expression of each object (present) and the scene's absent expressions
(`Scene.absent`: absent colour + kind, kind, colour, relation, plural); per instance scene, one plural expression
naming every object of its kind (present, plural).

`evaluate` runs each phrase as an instruction ("pick up <phrase>") through the product path (`run`) and reports:
- presence: false-positive rate on absent phrases, miss rate on present ones at the configured threshold, the ROC
  area, and the lowest false-positive rate at a miss rate of at most 5 %, by kind of absent phrase;
- instances: precision and recall at IoU 0.5 on instance scenes (2-4 objects of the named kind), by whether
  two of them touch;
- answers: agreement of the spoken answer with the published objects (answers.agrees) for the grounded answer and
  the LMM's own, over the instructions above, "is there ...?" and "how many ...?" questions; accuracy (same_answer)
  of both on the LMM's held-out questions (train_lmm.eval_set, by type);
- single-object referring cIoU (the card's number; the first expression of each object).
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from tqdm import tqdm

from ..grounding.answers import agrees, answer_claims, question_kind
from ..grounding.bundle import BUNDLE_FILE, load_components
from ..grounding.checkpoint import load_head
from ..grounding.config import PipelineConfig
from ..grounding.instances import is_plural, presence_probe
from ..grounding.pipeline import GroundingPipeline
from ..grounding.plural_head import write_plural_head
from ..grounding.presence import (
    DEFAULT_QUESTION,
    PresenceCalibration,
    PresenceJudge,
    fit_calibration,
    indefinite,
)
from ..grounding.training.evaluate import evaluate as referring_scores
from .language import PLURALS
from .samples import tabletop_samples
from .scenes import generate_instance_scene, generate_scene, split_seeds
from .train_lmm import eval_set

QUESTIONS = (DEFAULT_QUESTION, "is there {phrase}?")   # presence-question templates the calibration chooses from
SIZES = ((256, 256), (480, 640))
VERB = "pick up"
MAX_MISS = 0.05


def presence_items_of(seed: int, i: int):
    """An ordinary scene's (seed, image, [(phrase, present, reason)]): one random expression per object, and its
    absent expressions."""
    scene = generate_scene(seed, SIZES[i % 2])
    rng = random.Random(seed)
    items = [(rng.choice(o.expressions), True, "present") for o in scene.objects if o.expressions]
    # Relations are rare among random expressions; every one that holds is asked too, beside those that do not.
    items += [(e, True, "present, relation") for o in scene.objects for e in o.expressions
              if " next to " in e and (e, True, "present") not in items]
    yield seed, scene.image, items + [(a.expression, False, a.reason) for a in scene.absent]


def presence_items(split: str, count: int):
    """(seed, image, [(phrase, present, reason)]) for `count` ordinary and `count` instance scenes."""
    for i, seed in enumerate(split_seeds(split, count)):
        yield from presence_items_of(seed, i)
    for i, seed in enumerate(split_seeds(split, count)):
        scene, _, phrase = instance_scene(seed, SIZES[i % 2])
        if phrase:
            yield seed, scene.image, [(phrase, True, "present, plural")]


def instance_scene(seed: int, size):
    """An instance scene, its kind and one plural expression naming every object of that kind (None if < 2)."""
    scene, kind = generate_instance_scene(seed, size)
    targets = tuple(i for i, o in enumerate(scene.objects) if o.kind == kind)
    names = [g.expression for g in scene.groups if g.targets == targets and PLURALS[kind] in g.expression
             or g.targets == targets and g.expression.startswith("every")]
    return scene, kind, (random.Random(seed).choice(names) if names and len(targets) >= 2 else None)


# ---- calibration -----------------------------------------------------------------------------------------------
def collect_features(pipe: GroundingPipeline, split: str, count: int) -> tuple[list[dict], list[int], list[str]]:
    """Presence features of every phrase (the product path's grounding pass); `lmm_yes | <question>` for each
    candidate question."""
    judges = {q: PresenceJudge(pipe.lmm, PresenceCalibration.lmm_only(q)) for q in QUESTIONS}
    rows, labels, reasons = [], [], []
    for _, image, items in tqdm(list(presence_items(split, count)), desc="features", unit="scene"):
        frame = pipe.encode(image)
        for phrase, present, reason in items:
            probe = presence_probe(phrase)
            with torch.no_grad():
                logits = pipe.ground_logits(frame, [phrase])
                values = pipe.presence_features(frame, [phrase], logits, judges[QUESTIONS[0]])[0]
                for q, judge in judges.items():
                    values[f"lmm_yes | {q}"] = judge.lmm_yes(frame.lmm, probe)
            rows.append(values)
            labels.append(int(present))
            reasons.append(reason)
    return rows, labels, reasons


def roc_auc(scores, labels) -> float:
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


def operating_point(scores, labels, max_miss: float = MAX_MISS) -> dict:
    """The highest threshold with a miss rate <= max_miss on present phrases, and its false-positive rate."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos = np.sort(s[y])
    threshold = float(pos[int(np.floor(max_miss * len(pos)))]) if len(pos) else 0.0
    return {"threshold": threshold, "miss": float((s[y] < threshold).mean()),
            "false_positive": float((s[~y] >= threshold).mean())}


def calibrate(pipe: GroundingPipeline, split: str, count: int) -> PresenceCalibration:
    """Fit on `split` with both classes weighted equally (P = 0.5: as likely there as not); the presence question
    whose yes / no separates the phrases best is kept."""
    rows, labels, _ = collect_features(pipe, split, count)
    aucs = {q: roc_auc([r[f"lmm_yes | {q}"] for r in rows], labels) for q in QUESTIONS}
    best = max(QUESTIONS, key=aucs.get)
    for r in rows:
        r["lmm_yes"] = r[f"lmm_yes | {best}"]
    first = split_seeds(split, 1)[0]
    source = (f"tabletop {split} scenes from seed {first}: {count} ordinary + {count} instance scenes, "
              f"{sum(labels)} present and {len(labels) - sum(labels)} absent phrases")
    fitted = fit_calibration(rows, labels, question=best, source=source, balance=True)
    probs = [fitted.probability(r) for r in rows]
    metrics = {"auc": roc_auc(probs, labels), "at_5pct_miss": operating_point(probs, labels),
               "question_auc": aucs}
    return PresenceCalibration(fitted.features, fitted.mean, fitted.scale, fitted.weights, fitted.bias,
                               fitted.question, fitted.source, json.loads(json.dumps(metrics)))


def write_calibration(bundle: Path, calibration, key: str = "presence") -> None:
    """Store a calibration (anything with `to_spec`) in the bundle's flmm_bundle.yaml under `key` (the rest kept as
    it is): the presence calibration, or the instance filter (`instances`)."""
    spec_file = bundle / BUNDLE_FILE
    spec = yaml.safe_load(spec_file.read_text())
    spec[key] = calibration.to_spec()
    spec_file.write_text(yaml.safe_dump(spec, sort_keys=False))


# ---- evaluation ------------------------------------------------------------------------------------------------
def matched(preds: list[np.ndarray], targets: list[np.ndarray], min_iou: float = 0.5) -> int:
    """True positives of a greedy one-to-one matching by IoU (highest first), each pair at IoU >= min_iou."""
    return len(matched_predictions(preds, targets, min_iou))


def matched_predictions(preds: list[np.ndarray], targets: list[np.ndarray], min_iou: float = 0.5) -> set[int]:
    """The predictions `matched` counts: greedy one-to-one by IoU, highest first (ties: the earlier prediction)."""
    pairs = []
    for i, p in enumerate(preds):
        for j, t in enumerate(targets):
            inter = np.logical_and(p, t).sum()
            iou = inter / max(1, np.logical_or(p, t).sum())
            if iou >= min_iou:
                pairs.append((iou, i, j))
    used_p, used_t = set(), set()
    for _, i, j in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        if i not in used_p and j not in used_t:
            used_p.add(i)
            used_t.add(j)
    return used_p


def touching(masks: list[np.ndarray]) -> bool:
    """Whether two of the masks touch or overlap (within 2 px)."""
    grown = [cv2.dilate(m.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0 for m in masks]
    return any((grown[a] & masks[b]).any() for a in range(len(masks)) for b in range(len(masks)) if a != b)


class _Tally:
    """Counts by group: presence decisions, agreement, instance matches."""

    def __init__(self):
        self.n = defaultdict(float)
        self.scores: list[float] = []     # presence probability of each phrase run
        self.labels: list[int] = []       # 1: it names something in the scene

    def phrase(self, result, present: bool, reason: str) -> None:
        self.scores.append(max(o.presence for o in result.objects))
        self.labels.append(int(present))
        self.add(f"{reason} | n")
        self.add(f"{reason} | found", any(o.found for o in result.objects))

    def add(self, key: str, value: float = 1.0) -> None:
        self.n[key] += value

    def rate(self, num: str, den: str) -> float:
        return self.n[num] / self.n[den] if self.n[den] else float("nan")


def _agreement(pipe, frame, instruction: str, tally: _Tally, group: str):
    """Run one instruction; count whether the grounded answer and the LMM's own agree with its objects."""
    result = pipe.run(frame, instruction)
    tally.add(f"{group} | n")
    tally.add(f"{group} | grounded", agrees(instruction, result.answer, result.phrases, result.objects))
    tally.add(f"{group} | lmm", agrees(instruction, pipe.answer(frame, instruction), result.phrases, result.objects))
    return result


def evaluate_presence(pipe: GroundingPipeline, split: str, count: int, tally: _Tally) -> None:
    """Each phrase of the ordinary scenes as an instruction, and (singular ones) as an "is there ...?" question."""
    for i, seed in enumerate(tqdm(split_seeds(split, count), desc="presence", unit="scene")):
        _, image, phrases = next(presence_items_of(seed, i))
        frame = pipe.encode(image)
        for phrase, present, reason in phrases:
            tally.phrase(_agreement(pipe, frame, f"{VERB} {phrase}", tally, "instruction"), present, reason)
            if not is_plural(phrase):
                _agreement(pipe, frame, f"is there {indefinite(phrase)}?", tally, "presence question")


def presence_scores(tally: _Tally, threshold: float) -> dict:
    reasons = sorted({k.split(" | ")[0] for k in tally.n if k.endswith(" | found")})
    absent = [r for r in reasons if not r.startswith("present")]
    n = lambda rs, what: sum(tally.n[f"{r} | {what}"] for r in rs)
    present = [r for r in reasons if r.startswith("present")]
    return {"threshold": threshold, "present": int(n(present, "n")), "absent": int(n(absent, "n")),
            "miss_rate": 1 - n(present, "found") / max(1, n(present, "n")),
            "false_positive_rate": n(absent, "found") / max(1, n(absent, "n")),
            "roc_auc": roc_auc(tally.scores, tally.labels), "at_5pct_miss": operating_point(tally.scores, tally.labels),
            "found_rate_by_kind": {r: tally.rate(f"{r} | found", f"{r} | n") for r in reasons}}


def evaluate_instances(pipe: GroundingPipeline, split: str, count: int, tally: _Tally) -> dict:
    for i, seed in enumerate(tqdm(split_seeds(split, count), desc="instances", unit="scene")):
        scene, kind, phrase = instance_scene(seed, SIZES[i % 2])
        if phrase is None:
            continue
        frame = pipe.encode(scene.image)
        result = _agreement(pipe, frame, f"{VERB} {phrase}", tally, "instruction, plural")
        tally.phrase(result, True, "present, plural")
        _agreement(pipe, frame, f"how many {PLURALS[kind]} are there?", tally, "count question")
        preds = [o.mask > 0 for o in result.objects if o.found]
        targets = [o.mask for o in scene.objects if o.kind == kind]
        case = "touching" if touching(targets) else "apart"
        tp = matched(preds, targets)
        for key in ("all", case):
            tally.add(f"inst {key} | scenes")
            tally.add(f"inst {key} | tp", tp)
            tally.add(f"inst {key} | pred", len(preds))
            tally.add(f"inst {key} | gt", len(targets))
    return {key: {"scenes": int(tally.n[f"inst {key} | scenes"]),
                  "precision": tally.rate(f"inst {key} | tp", f"inst {key} | pred"),
                  "recall": tally.rate(f"inst {key} | tp", f"inst {key} | gt")} for key in ("all", "touching", "apart")}


def same_answer(question: str, answer: str, reference: str) -> bool:
    """Whether an answer says what the reference says: for "is there"/"how many" questions the claim (yes/no, the
    number; the grounded answer may go on after it: "yes, on the left"), otherwise the exact text."""
    if question_kind(question) in ("presence", "count"):
        return answer_claims(question, answer) == answer_claims(question, reference)
    return answer == reference


def answer_accuracy(pipe: GroundingPipeline, split: str, scenes: int) -> dict:
    """Accuracy by question type of the grounded answer and of the LMM's own (greedy) answer (same_answer)."""
    hits, totals = defaultdict(int), defaultdict(int)
    for scene, items in tqdm(eval_set(scenes, split), desc="answers", unit="scene"):
        frame = pipe.encode(scene.image)
        for qtype, question, reference in items:
            if qtype in ("describe", "refer"):
                continue   # not instructions about objects (the LMM's description is not grounded here)
            totals[qtype] += 1
            hits[f"grounded | {qtype}"] += same_answer(question, pipe.run(frame, question).answer, reference)
            hits[f"lmm | {qtype}"] += same_answer(question, pipe.answer(frame, question), reference)
    return {source: {**{t: hits[f"{source} | {t}"] / totals[t] for t in totals},
                     "all": sum(hits[f"{source} | {t}"] for t in totals) / max(1, sum(totals.values()))}
            for source in ("grounded", "lmm")}


def evaluate(pipe: GroundingPipeline, split: str, count: int, answer_scenes: int = 300) -> dict:
    tally = _Tally()
    t0 = time.time()
    evaluate_presence(pipe, split, count, tally)
    out = {"split": split, "scenes": count, "instances": evaluate_instances(pipe, split, count, tally),
           "presence": presence_scores(tally, pipe.config.presence_threshold)}
    groups = sorted({k.split(" | ")[0] for k in tally.n if k.endswith(" | grounded")})
    out["agreement"] = {g: {"n": int(tally.n[f"{g} | n"]), "grounded": tally.rate(f"{g} | grounded", f"{g} | n"),
                            "lmm": tally.rate(f"{g} | lmm", f"{g} | n")} for g in groups}
    n = sum(tally.n[f"{g} | n"] for g in groups)
    out["agreement"]["all"] = {"n": int(n), **{s: sum(tally.n[f"{g} | {s}"] for g in groups) / max(1, n)
                                              for s in ("grounded", "lmm")}}
    out["answer_accuracy"] = answer_accuracy(pipe, split, answer_scenes) if answer_scenes else {}
    out["referring"] = referring_scores(pipe, tabletop_samples(split, count, expression="first"), count)
    out["seconds"] = round(time.time() - t0)
    return out


def card_section(scores: dict) -> str:
    """The model card's section on presence, instances and answers (MODEL_CARD.md), from `evaluate`'s scores."""
    p, inst, agree, acc = scores["presence"], scores["instances"], scores["agreement"], scores["answer_accuracy"]
    op, split, n = p["at_5pct_miss"], scores["split"], scores["scenes"]
    intro = (f"Held-out {split} scenes: {n} ordinary scenes (a random expression of each object, and the scene's "
             f"absent expressions) and {n} instance scenes (2-4 objects of one kind, half of them side by side); "
             f"every phrase as the instruction \"{VERB} <phrase>\" through `run` (`python -m "
             f"flmm_ros.tabletop.trust_eval evaluate --split {split} --count {n}`).")
    absent = (f"**Absent targets** ({p['present']} present and {p['absent']} absent phrases, threshold "
              f"{p['threshold']}): false-positive rate **{p['false_positive_rate']:.3f}**, miss rate "
              f"**{p['miss_rate']:.3f}**, ROC area {p['roc_auc']:.3f}; at a miss rate of {op['miss']:.3f} "
              f"(threshold {op['threshold']:.3f}) the false-positive rate is {op['false_positive']:.3f}.")
    lines = [intro, "", absent, "", "| phrases | judged present |", "|---|---|"]
    lines += [f"| {kind} | {rate:.3f} |" for kind, rate in p["found_rate_by_kind"].items()]
    lines += ["", "**Instances** (\"pick up all the mugs\" and the like; precision and recall at IoU 0.5):", "",
              "| instance scenes | scenes | precision | recall |", "|---|---|---|---|"]
    lines += [f"| {key} | {v['scenes']} | {v['precision']:.3f} | {v['recall']:.3f} |" for key, v in inst.items()]
    agreement = ("**The answer agrees with the published objects** (`answers.agrees`: the presence it states, the "
                 "number for \"how many\"):")
    lines += ["", agreement, "", "| instructions | count | grounded answer | the LMM's own answer |",
              "|---|---|---|---|"]
    lines += [f"| {g} | {v['n']} | {v['grounded']:.3f} | {v['lmm']:.3f} |" for g, v in agree.items()]
    if acc:
        types = [t for t in acc["grounded"] if t != "all"] + ["all"]
        accuracy = ("**Accuracy of the spoken answer** on the LMM's held-out questions (`train_lmm.eval_set`, as "
                    "in the LMM table; descriptions and referring turns left out; yes/no and count answers scored "
                    "by their claim, the others by exact match: `same_answer`):")
        lines += ["", accuracy, "", "| question type | grounded answer | the LMM's own answer |", "|---|---|---|"]
        lines += [f"| {t} | {acc['grounded'][t]:.3f} | {acc['lmm'][t]:.3f} |" for t in types]
    ref = scores["referring"]["refined"]
    referring = (f"Single-object referring masks on the same ordinary scenes (first expressions): refined cIoU "
                 f"{ref['ciou']:.3f} ({ref['count']} objects).")
    lines += ["", referring]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("calibrate", "evaluate"):
        sub = commands.add_parser(name)
        sub.add_argument("--model", required=True, help="model bundle")
        sub.add_argument("--split", default="val" if name == "calibrate" else "test")
        sub.add_argument("--count", type=int, default=600 if name == "calibrate" else 500,
                         help="ordinary scenes (and as many instance scenes)")
        sub.add_argument("--threads", type=int, default=1)
    plural = commands.add_parser("plural-head", help="store a plural-trained head in the bundle")
    plural.add_argument("--model", required=True, help="model bundle")
    plural.add_argument("--head", required=True, help="head.safetensors trained with plural phrases")
    commands.choices["calibrate"].add_argument("--write", action="store_true",
                                               help="store the calibration in the bundle's flmm_bundle.yaml")
    commands.choices["evaluate"].add_argument("--answer-scenes", type=int, default=300,
                                              help="scenes of LMM questions for the answer accuracy (0: skip)")
    commands.choices["evaluate"].add_argument("--presence-threshold", type=float, default=None)
    commands.choices["evaluate"].add_argument("--json", default="", help="also write the scores here")
    args = parser.parse_args(argv)
    if args.command == "plural-head":
        _, head = load_components(PipelineConfig(model=args.model))
        load_head(head, args.head)
        print(f"plural head written to {write_plural_head(args.model, head)}")
        return
    torch.set_num_threads(args.threads)
    settings = {"model": args.model}
    if getattr(args, "presence_threshold", None) is not None:
        settings["presence_threshold"] = args.presence_threshold
    pipe = GroundingPipeline.from_config(PipelineConfig(**settings))
    if args.command == "calibrate":
        calibration = calibrate(pipe, args.split, args.count)
        print(yaml.safe_dump(calibration.to_spec(), sort_keys=False))
        if args.write:
            write_calibration(Path(args.model), calibration)
            print(f"written to {Path(args.model) / BUNDLE_FILE}")
        return
    scores = evaluate(pipe, args.split, args.count, args.answer_scenes)
    print(json.dumps(scores, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
