"""Quality table and model card of the embedded default model (scripts/build_tabletop_model.sh).

The table shows that the grounding comes from the LMM's attention: the same head recipe trained on an
untrained (randomly initialised) copy of the LMM, and a whole-image baseline, on the same held-out scenes.

    python -m flmm_ros.tabletop.model_card random-lmm --trained out/tabletop_build/lmm/model --out out/tabletop_build/random_lmm
    (train a head on each LMM with the same settings)
    python -m flmm_ros.tabletop.model_card card --bundle ros_ws/src/flmm_ros/models/tabletop_tiny \
        --random-bundle out/tabletop_build/random_lmm_bundle --work out/tabletop_build
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

from ..grounding.config import PipelineConfig
from ..grounding.pipeline import GroundingPipeline
from ..grounding.training.evaluate import evaluate, whole_image_baseline
from .attention_check import attention_report
from .lmm import load_tabletop_lmm
from .samples import tabletop_samples
from .train_lmm import EVAL_TYPES, eval_set
from .train_lmm import evaluate as lmm_accuracy
from .trust_eval import card_section

LMM_TEST_SCENES = 300
ATTENTION_TEST_SCENES = 150
CHANCE = {"colour": "~1/7", "presence": "1/2", "position": "1/3", "kind": "1/6"}


def random_lmm_copy(trained: Path, out: Path, seed: int = 0) -> Path:
    """The same architecture, tokenizer and processor with freshly initialised weights."""
    model = LlavaForConditionalGeneration.from_pretrained(trained)
    torch.manual_seed(seed)
    random = LlavaForConditionalGeneration(model.config)
    shutil.copytree(trained, out, dirs_exist_ok=True)
    random.save_pretrained(out)
    return out


def scores_for(bundle: Path, count: int, by_case: bool = False) -> dict:
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), answer=False))
    return evaluate(pipe, tabletop_samples("test", count, expression="first"), count, by_case=by_case)


def table(rows: dict[str, dict]) -> str:
    lines = ["| pipeline | masks | cIoU | gIoU |", "|---|---|---|---|"]
    for name, scores in rows.items():
        for kind, s in scores.items():
            lines.append(f"| {name} | {kind} | {s['ciou']:.3f} | {s['giou']:.3f} |")
    return "\n".join(lines)


def case_table(scores: dict) -> str:
    lines = ["| what else is in the scene | objects | coarse cIoU | refined cIoU |", "|---|---|---|---|"]
    for key, refined in scores.items():
        if key.startswith("refined | "):
            case = key.split(" | ", 1)[1]
            coarse = scores[f"coarse | {case}"]
            lines.append(f"| {case} | {refined['count']} | {coarse['ciou']:.3f} | {refined['ciou']:.3f} |")
    return "\n".join(lines)


def attention_table(report: dict) -> str:
    lines = ["| the phrase's object against | objects | share, mean map | share, best head |", "|---|---|---|---|"]
    for test, against in (("kind", "an object of the same colour, another kind"),
                          ("colour", "an object of the same kind, another colour")):
        lines.append(f"| {against} | {report[f'{test}_tests']} | {report[f'{test}_share_mean_map']:.3f} | "
                     f"{report[f'{test}_share_best_head']:.3f} |")
    return "\n".join(lines)


def accuracy_table(acc: dict[str, float]) -> str:
    lines = ["| question type | exact-match accuracy | chance |", "|---|---|---|"]
    for t in (*EVAL_TYPES, "questions"):
        if t in acc:
            lines.append(f"| {t} | {acc[t]:.3f} | {CHANCE.get(t, '')} |")
    return "\n".join(lines)


def write_card(bundle: Path, random_bundle: Path, work: Path, count: int, build_seconds: int,
               trust_json: Path | None = None) -> None:
    trained = scores_for(bundle, count, by_case=True)
    rows = {"tabletop-tiny (trained LMM)": {k: v for k, v in trained.items() if " | " not in k},
            "same recipe, untrained LMM": scores_for(random_bundle, count),
            "whole-image baseline": whole_image_baseline(tabletop_samples("test", count, expression="first"))}
    model, processor = load_tabletop_lmm(bundle / "lmm")
    accuracy = lmm_accuracy(model, processor, eval_set(LMM_TEST_SCENES, "test"))
    attention = attention_report(model, processor, scenes=ATTENTION_TEST_SCENES, split="test")
    (work / "quality.json").write_text(json.dumps({"grounding": rows, "by_case": trained, "lmm_accuracy": accuracy,
                                                   "attention": attention}, indent=1))
    print(table(rows))
    print(case_table(trained))
    print(accuracy_table(accuracy))
    print(attention_table(attention))
    card = bundle / "MODEL_CARD.md"
    text = card.read_text() if card.is_file() else ""
    marker = "## Quality"
    head = text.split(marker)[0] if marker in text else text
    card.write_text(f"{head}{marker}\n\n{count} held-out test scenes (seeds from 2,000,000; 256x256 and "
                    f"640x480 alternating), one expression per object, masks at sigmoid > 0.5:\n\n{table(rows)}\n\n"
                    f"The trained model's masks by what else is in the scene:\n\n{case_table(trained)}\n\n"
                    f"The frozen LMM's answers on {LMM_TEST_SCENES} held-out test scenes (one question of each type "
                    f"per scene, drawn answer-balanced; greedy decoding, exact match of the whole answer; "
                    f"`python -m flmm_ros.tabletop.train_lmm --out <run> --eval --split test`):\n\n"
                    f"{accuracy_table(accuracy)}\n\n"
                    f"Where the frozen LMM's phrase attention goes ({ATTENTION_TEST_SCENES} test scenes; F-LMM's "
                    f"grounding pass, `tabletop/attention_check.py`): the share of attention on the phrase's object "
                    f"out of the attention on it and on a look-alike (0.5 = cannot tell them apart):\n\n"
                    f"{attention_table(attention)}\n\n"
                    f"{trust_text(trust_json)}"
                    f"Build wall time (scripts/build_tabletop_model.sh, 2-core CPU): {build_seconds} s.\n")


def trust_text(trust_json: Path | None) -> str:
    """The presence / instances / answers section (issue #18) from `trust_eval evaluate --json`, if given."""
    if trust_json is None or not Path(trust_json).is_file():
        return ""
    return f"### Answers a robot can trust\n\n{card_section(json.loads(Path(trust_json).read_text()))}\n\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    random = commands.add_parser("random-lmm", help="an untrained copy of a trained tabletop LMM")
    random.add_argument("--trained", required=True)
    random.add_argument("--out", required=True)
    card = commands.add_parser("card", help="the quality table, written into the bundle's MODEL_CARD.md")
    card.add_argument("--bundle", required=True)
    card.add_argument("--random-bundle", required=True, help="the same head recipe on the untrained LMM")
    card.add_argument("--work", required=True, help="where quality.json goes")
    card.add_argument("--count", type=int, default=500, help="held-out test scenes")
    card.add_argument("--build-seconds", type=int, default=0)
    card.add_argument("--trust-json", default="", help="trust_eval evaluate --json output: presence, instances, answers")
    args = parser.parse_args(argv)
    if args.command == "random-lmm":
        print(random_lmm_copy(Path(args.trained), Path(args.out)))
    else:
        write_card(Path(args.bundle), Path(args.random_bundle), Path(args.work), args.count, args.build_seconds,
                   Path(args.trust_json) if args.trust_json else None)


if __name__ == "__main__":
    main()
