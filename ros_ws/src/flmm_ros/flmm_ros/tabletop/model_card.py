"""Quality table and model card of the embedded default model (step 4 of scripts/build_tabletop_model.sh).

The table shows that the grounding comes from the LMM's attention: the same head recipe trained on an
untrained (randomly initialised) copy of the LMM, and a whole-image baseline, on the same held-out scenes.

    python -m flmm_ros.tabletop.model_card --bundle ros_ws/src/flmm_ros/models/tabletop_tiny --work out/tabletop_build
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--work", required=True, help="the build's work directory (lmm/, sam/, head/)")
    parser.add_argument("--count", type=int, default=500, help="held-out test scenes")
    parser.add_argument("--train-args", default="--mask-head-base 32 --data tabletop --train-count 800 "
                        "--val-count 40 --epochs 3 --batch-size 4 --lr 2e-4 --eval-every 100 --save-every 100 "
                        "--threads 2",
                        help="head training settings, the same as for the shipped model")
    parser.add_argument("--build-seconds", type=int, default=0)
    args = parser.parse_args(argv)
    work, bundle = Path(args.work), Path(args.bundle)

    # The same head recipe on an untrained LMM.
    random_dir = random_lmm_copy(work / "lmm" / "model", work / "random_lmm")
    random_bundle = work / "random_lmm_bundle"
    subprocess.run([sys.executable, "-m", "flmm_ros.grounding.training.train", "--lmm", str(random_dir),
                    "--sam-arch", str(work / "sam" / "sam_arch.yaml"), "--sam-checkpoint",
                    str(work / "sam" / "sam.safetensors"), "--out", str(work / "head_random_lmm"),
                    "--bundle-out", str(random_bundle), *args.train_args.split()], check=True)

    rows = {"tabletop-tiny (trained LMM)": scores_for(bundle, args.count),
            "same recipe, untrained LMM": scores_for(random_bundle, args.count),
            "whole-image baseline": whole_image_baseline(tabletop_samples("test", args.count, expression="first"))}
    model, processor = load_tabletop_lmm(bundle / "lmm")
    accuracy = lmm_accuracy(model, processor, eval_set(LMM_TEST_SCENES, "test"))
    (work / "quality.json").write_text(json.dumps({"grounding": rows, "lmm_accuracy": accuracy}, indent=1))
    print(table(rows))
    print(accuracy_table(accuracy))
    card = bundle / "MODEL_CARD.md"
    text = card.read_text() if card.is_file() else ""
    marker = "## Quality"
    head = text.split(marker)[0] if marker in text else text
    card.write_text(f"{head}{marker}\n\n{args.count} held-out test scenes (seeds from 2,000,000; 256x256 and "
                    f"640x480 alternating), one expression per object, masks at sigmoid > 0.5:\n\n{table(rows)}\n\n"
                    f"The frozen LMM's answers on {LMM_TEST_SCENES} held-out test scenes (one question of each type "
                    f"per scene, drawn answer-balanced; greedy decoding, exact match of the whole answer; "
                    f"`python -m flmm_ros.tabletop.train_lmm --out <run> --eval --split test`):\n\n"
                    f"{accuracy_table(accuracy)}\n\n"
                    f"Build wall time (scripts/build_tabletop_model.sh, 2-core CPU): {args.build_seconds} s.\n")


if __name__ == "__main__":
    main()
