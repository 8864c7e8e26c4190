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
from ..grounding.training.data import tabletop_samples
from ..grounding.training.evaluate import evaluate, whole_image_baseline
from .lmm import load_tabletop_lmm
from .train_lmm import EVAL_TYPES, eval_set
from .train_lmm import evaluate as lmm_accuracy

LMM_TEST_SCENES = 300
CHANCE = {"colour": "~1/7", "presence": "1/2", "position": "1/3", "kind": "1/6"}


def random_lmm_copy(trained: Path, out: Path, seed: int = 0) -> Path:
    """The same architecture, tokenizer and processor with freshly initialised weights."""
    model = LlavaForConditionalGeneration.from_pretrained(trained)
    torch.manual_seed(seed)
    random = LlavaForConditionalGeneration(model.config)
    shutil.copytree(trained, out, dirs_exist_ok=True)
    random.save_pretrained(out)
    return out


def scores_for(bundle: Path, count: int) -> dict:
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), answer=False))
    return evaluate(pipe, tabletop_samples("test", count, expression="first"), count)


def table(rows: dict[str, dict]) -> str:
    lines = ["| pipeline | masks | cIoU | gIoU |", "|---|---|---|---|"]
    for name, scores in rows.items():
        for kind, s in scores.items():
            lines.append(f"| {name} | {kind} | {s['ciou']:.3f} | {s['giou']:.3f} |")
    return "\n".join(lines)


def accuracy_table(acc: dict[str, float]) -> str:
    lines = ["| question type | exact-match accuracy | chance |", "|---|---|---|"]
    for t in (*EVAL_TYPES, "questions"):
        if t in acc:
            lines.append(f"| {t} | {acc[t]:.3f} | {CHANCE.get(t, '')} |")
    return "\n".join(lines)


def write_card(bundle: Path, random_bundle: Path, work: Path, count: int, build_seconds: int) -> None:
    rows = {"tabletop-tiny (trained LMM)": scores_for(bundle, count),
            "same recipe, untrained LMM": scores_for(random_bundle, count),
            "whole-image baseline": whole_image_baseline(tabletop_samples("test", count, expression="first"))}
    model, processor = load_tabletop_lmm(bundle / "lmm")
    accuracy = lmm_accuracy(model, processor, eval_set(LMM_TEST_SCENES, "test"))
    (work / "quality.json").write_text(json.dumps({"grounding": rows, "lmm_accuracy": accuracy}, indent=1))
    print(table(rows))
    print(accuracy_table(accuracy))
    card = bundle / "MODEL_CARD.md"
    text = card.read_text() if card.is_file() else ""
    marker = "## Quality"
    head = text.split(marker)[0] if marker in text else text
    card.write_text(f"{head}{marker}\n\n{count} held-out test scenes (seeds from 2,000,000; 256x256 and "
                    f"640x480 alternating), one expression per object, masks at sigmoid > 0.5:\n\n{table(rows)}\n\n"
                    f"The frozen LMM's answers on {LMM_TEST_SCENES} held-out test scenes (one question of each type "
                    f"per scene, drawn answer-balanced; greedy decoding, exact match of the whole answer; "
                    f"`python -m flmm_ros.tabletop.train_lmm --out <run> --eval --split test`):\n\n"
                    f"{accuracy_table(accuracy)}\n\n"
                    f"Build wall time (scripts/build_tabletop_model.sh, 2-core CPU): {build_seconds} s.\n")


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
    args = parser.parse_args(argv)
    if args.command == "random-lmm":
        print(random_lmm_copy(Path(args.trained), Path(args.out)))
    else:
        write_card(Path(args.bundle), Path(args.random_bundle), Path(args.work), args.count, args.build_seconds)


if __name__ == "__main__":
    main()
