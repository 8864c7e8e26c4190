"""F-LMM's head training and evaluation on the generated tabletop scenes (the embedded model's recipe).

The grounding core's tools (`flmm_ros.grounding.training.train` / `.evaluate`) read RefCOCO and ReasonSeg;
this front end gives them the scenes instead, with the same options (no --data):

    python -m flmm_ros.tabletop.head_cli train --lmm out/tabletop_lmm --train-count 4000 \
        --sam-checkpoint out/tabletop_sam/sam.safetensors --sam-arch out/tabletop_sam/sam_arch.yaml --out out/head
    python -m flmm_ros.tabletop.head_cli evaluate --model ros_ws/src/flmm_ros/models/tabletop_tiny \
        --split test --count 500 --by-case

Training defaults to the `tabletop` recipe and 2000 training scenes (one random expression per object);
validation and evaluation take each object's first expression (F-LMM's `select_first`). Evaluation defaults to
500 test scenes.
"""
from __future__ import annotations

import sys

from ..grounding.training import evaluate, train
from .samples import mixed_samples, tabletop_samples

TRAIN_SCENES, EVAL_SCENES = 2000, 500


def train_main(argv: list[str] | None = None) -> dict:
    parser = train.build_parser(__doc__)
    parser.add_argument("--group-count", type=int, default=0,
                        help="also this many instance scenes with plural phrases (union targets), interleaved")
    args = parser.parse_args(argv)

    def scenes() -> train.Sources:
        n_train = args.train_count or TRAIN_SCENES
        source = mixed_samples(args.train_split, n_train, args.group_count) if args.group_count \
            else tabletop_samples(args.train_split, n_train)
        return (source, n_train + args.group_count,
                tabletop_samples(args.val_split, args.val_count, expression="first"), args.val_count)

    return train.run(args, "tabletop", scenes)


def evaluate_main(argv: list[str] | None = None) -> dict:
    parser = evaluate.build_parser(__doc__)
    parser.add_argument("--by-case", action="store_true",
                        help="also score objects by what else is in the scene (same colour, same kind)")
    args = parser.parse_args(argv)
    count = EVAL_SCENES if args.count is None else args.count
    return evaluate.run(args, lambda: tabletop_samples(args.split or "test", count, expression="first"), count,
                        by_case=args.by_case)


COMMANDS = {"train": train_main, "evaluate": evaluate_main}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m flmm_ros.tabletop.head_cli {{{','.join(COMMANDS)}}} [options] "
                 "(--help after the command lists them)")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
