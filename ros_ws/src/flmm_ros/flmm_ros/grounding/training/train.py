"""Train the grounding head on top of a frozen LMM, F-LMM's recipe.

Trainable: mask head, text layer weights, text projection, SAM prompt encoder + mask decoder.
Frozen: the whole LMM and the SAM image encoder (their outputs are cached once per sample).
Loss: BCE + Dice on the coarse masks and on the SAM-refined masks, weight 1 each. AdamW
(lr 1e-4, weight decay 0.01), linear warm-up over 3% of the steps then cosine to 0, gradient
clipping at 1 (the shared toolkit, `loop.py`). Checkpoints are safetensors, written atomically, and training
resumes from the last one.

Two recipes (`--recipe`, defaults by data):
- `flmm` (RefCOCO-layout data): F-LMM's configs. 8 epochs, global batch 8 (F-LMM: 8 GPUs x 1 sample, so the
  loss is the mean of the samples' losses), bf16 autocast (AmpOptimWrapper), ground truth nearest-resized to
  the LMM's resized image first and both targets taken from it, one random sentence per object (chosen once).
- `tabletop` (generated scenes, the embedded model on a 2-core CPU): 2 epochs, batch 4, float32, targets from
  the full-resolution masks, the loss averaged over all masks of a batch. The generated scenes are trained on
  through `python -m flmm_ros.tabletop.head_cli train` (the same options, the scenes instead of --data).

    python -m flmm_ros.grounding.training.train --lmm llava-hf/llava-1.5-7b-hf --device cuda \
        --sam-checkpoint sam_vit_l_0b3195.pth --data data/coco/refcoco data/coco/refcoco+ data/coco/refcocog \
        --val-data data/coco/refcoco --out out/head
    python -m flmm_ros.tabletop.head_cli train --lmm out/tabletop_lmm --train-count 4000 \
        --sam-checkpoint out/tabletop_sam/sam.safetensors --sam-arch out/tabletop_sam/sam_arch.yaml --out out/head
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from ..bundle import BUNDLE_FILE, is_bundle, load_components, write_bundle
from ..checkpoint import load_head, load_sam_weights, save_head
from ..config import PipelineConfig
from ..head import GroundingHead
from ..lmm import load_lmm
from ..pipeline import GroundingPipeline
from ..sam.refiner import SamRefiner
from ..sam.backends import make_refiner_backend
from ..sam.models import resolve_sam_arch
from .data import encode_sample, refcoco_samples
from .evaluate import evaluate_cached, format_scores
from .loop import adamw, load_optimizer_state, save_optimizer_state, set_lr, text_file, warmup_cosine, write_atomically
from .losses import mask_losses

HEAD_FILE, STATE_FILE, LOG_FILE = "head.safetensors", "trainer_state.safetensors", "train_log.json"


@dataclass(frozen=True)
class HeadTrainConfig:
    """One head-training run (see the module docstring); `RECIPES` holds the two recipes' values."""
    epochs: int = 1
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    clip: float = 1.0            # gradient-norm clipping
    eval_every: int = 500
    save_every: int = 500
    seed: int = 0
    resume: bool = True          # go on from the checkpoint in the output directory, if there is one
    amp: str | None = None       # autocast dtype of the head's forward and losses ("bfloat16": F-LMM)
    targets: str = "image"       # "lmm": ground truth through the LMM's resized image (F-LMM); "image": as given
    loss_average: str = "mask"   # "sample": mean of per-sample losses (F-LMM); "mask": over all masks of a batch

    def __post_init__(self):
        if self.targets not in ("lmm", "image"):
            raise ValueError(f"targets must be 'lmm' or 'image', got {self.targets!r}")
        if self.loss_average not in ("sample", "mask"):
            raise ValueError(f"loss_average must be 'sample' or 'mask', got {self.loss_average!r}")
        if self.amp not in (None, "bfloat16", "float16"):
            raise ValueError(f"amp must be None, 'bfloat16' or 'float16', got {self.amp!r}")


RECIPES = {
    "flmm": HeadTrainConfig(epochs=8, batch_size=8, amp="bfloat16", targets="lmm", loss_average="sample"),
    "tabletop": HeadTrainConfig(epochs=2, batch_size=4, amp=None, targets="image", loss_average="mask"),
}


def build_training_pipeline(lmm: str, *, sam_arch: str | dict = "vit_l", sam_checkpoint: str = "",
                            mask_head_kwargs: dict | None = None, device: str = "cpu",
                            dtype: str = "auto") -> GroundingPipeline:
    """A pipeline whose head is trainable: from a bundle (its head is the start point) or a plain LMM."""
    cfg = PipelineConfig(model=lmm, device=device, dtype=dtype)
    if is_bundle(lmm):
        adapter, head = load_components(cfg)
    else:
        adapter = load_lmm(lmm, device=device, dtype=cfg.torch_dtype)
        head = GroundingHead(adapter.mask_head_channels, adapter.hidden_size, adapter.num_layers,
                             resolve_sam_arch(sam_arch), mask_head_kwargs).to(device)
        if sam_checkpoint:
            print(f"SAM weights from {sam_checkpoint}: {load_sam_weights(head.sam, sam_checkpoint)}")
    refiner = SamRefiner(head.sam, make_refiner_backend("torch", head.sam, device=device))
    return GroundingPipeline(adapter, head, refiner, cfg)


def trainable_parameters(head: GroundingHead) -> list[torch.nn.Parameter]:
    modules = [head.mask_head, head.text_proj, head.sam.prompt_encoder, head.sam.mask_decoder]
    return [head.text_layer_weights] + [p for m in modules for p in m.parameters()]


def batch_loss(pipe: GroundingPipeline, samples: list, *, targets: str = "image",
               loss_average: str = "mask") -> torch.Tensor:
    """The batch's loss (see Recipe): per sample, the four mask losses averaged over its masks."""
    total, n_masks = 0, 0
    for sample in samples:
        logits = pipe.head_logits(sample.phrase_pass(), sample.prepared, sample.sam_encoding())
        target = sample.masks().to(logits.coarse.device)
        lmm_hw = sample.prepared.content_hw if targets == "lmm" else None
        loss = sum(mask_losses(logits.coarse, logits.refined, target, lmm_hw).values())
        p = target.shape[0]
        total = total + (loss / len(samples) if loss_average == "sample" else loss * p)
        n_masks += p
    return total if loss_average == "sample" else total / n_masks


def train(pipe: GroundingPipeline, train_cache: list, val_cache: list, out_dir: Path,
          config: HeadTrainConfig = HeadTrainConfig()) -> dict:
    """Train the head on cached samples; checkpoints (head + optimizer state) in `out_dir`. The last log record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    head = pipe.head
    params = trainable_parameters(head)
    optimizer = adamw(params, config.lr, config.weight_decay)
    steps_per_epoch = math.ceil(len(train_cache) / config.batch_size)
    total = config.epochs * steps_per_epoch
    schedule = warmup_cosine(total)
    step, log = 0, []
    if config.resume and (out_dir / STATE_FILE).is_file():
        load_head(head, out_dir / HEAD_FILE)
        state = load_optimizer_state(out_dir / STATE_FILE, optimizer)
        step, log = state["step"], state["log"]
        print(f"resumed at step {step}/{total}")

    def checkpoint():   # the optimizer state records the step: written last
        save_head(head, out_dir / HEAD_FILE, {"step": str(step)})
        save_optimizer_state(out_dir / STATE_FILE, optimizer, {"step": step, "log": log})

    head.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    start = time.time()
    while step < total:
        epoch = step // steps_per_epoch
        order = list(range(len(train_cache)))
        random.Random(config.seed + epoch).shuffle(order)
        batch_ids = order[(step % steps_per_epoch) * config.batch_size:][:config.batch_size]
        autocast = torch.autocast(pipe.head_device.type, dtype=getattr(torch, config.amp)) if config.amp \
            else contextlib.nullcontext()
        lr = config.lr * schedule(step)
        set_lr(optimizer, lr)
        with autocast:
            loss = batch_loss(pipe, [train_cache[i] for i in batch_ids], targets=config.targets,
                              loss_average=config.loss_average)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.clip)
        optimizer.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        if step % config.eval_every == 0 or step == total:
            head.eval()
            scores = evaluate_cached(pipe, val_cache)
            head.train()
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start,
                        **{f"{k}_{m}": v for k, s in scores.items() for m, v in s.items()}})
            tqdm.write(f"step {step}: loss {loss.item():.3f}  {format_scores(scores)}")
        if step % config.save_every == 0 or step == total:
            checkpoint()
    bar.close()
    head.eval()
    write_atomically({out_dir / LOG_FILE: text_file(json.dumps(log, indent=1))})
    return log[-1] if log else {}


def cache_samples(pipe: GroundingPipeline, samples, count: int, desc: str) -> list:
    return [encode_sample(pipe, s) for s in tqdm(samples, total=count, desc=f"encode {desc}", unit="img")]


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options of every head training; where the samples come from is added by each front end (`main` here:
    RefCOCO; `flmm_ros.tabletop.head_cli`: the generated scenes)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmm", required=True, help="frozen LMM (HF directory or id) or a model bundle")
    parser.add_argument("--sam-arch", default="vit_l", help="vit_b|vit_l|vit_h or a YAML file of SamArch sizes")
    parser.add_argument("--sam-checkpoint", default="", help="SAM weights (official .pth or safetensors)")
    parser.add_argument("--mask-head-base", type=int, default=64, help="U-Net base channels (F-LMM: 64)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                        help="flmm (default for RefCOCO data) or tabletop (default for tabletop); see above")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--train-count", type=int, default=None,
                        help="tabletop: training scenes (2000); RefCOCO: at most this many images per directory")
    parser.add_argument("--val-count", type=int, default=100, help="validation scenes / images")
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's (1e-4)")
    parser.add_argument("--amp", choices=["bfloat16", "none"], default=None, help="default: the recipe's")
    parser.add_argument("--targets", choices=["lmm", "image"], default=None, help="default: the recipe's")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="LMM dtype (auto: bfloat16 on CUDA as F-LMM, else float32)")
    parser.add_argument("--out", required=True, help="output directory (head.safetensors, trainer state, log)")
    parser.add_argument("--bundle-out", default="", help="also write a complete model bundle here")
    parser.add_argument("--no-resume", action="store_true")
    return parser


def config_from_args(args: argparse.Namespace, recipe: str) -> HeadTrainConfig:
    """The recipe (`--recipe`, else `recipe`) with the options given on the command line."""
    base = RECIPES[args.recipe or recipe]
    amp = base.amp if args.amp is None else (None if args.amp == "none" else args.amp)
    return replace(base, epochs=args.epochs or base.epochs, batch_size=args.batch_size or base.batch_size,
                   lr=args.lr or base.lr, eval_every=args.eval_every, save_every=args.save_every,
                   resume=not args.no_resume, amp=amp, targets=args.targets or base.targets)


Sources = tuple[object, int, object, int]   # training samples and their count, validation samples and their count


def run(args: argparse.Namespace, recipe: str, sources: Callable[[], Sources]) -> dict:
    """Build the pipeline, cache the frozen features of `sources()`, train, and write the bundle if asked."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = config_from_args(args, recipe)
    sam_arch = yaml.safe_load(Path(args.sam_arch).read_text()) if args.sam_arch.endswith((".yaml", ".yml")) \
        else args.sam_arch
    pipe = build_training_pipeline(args.lmm, sam_arch=sam_arch, sam_checkpoint=args.sam_checkpoint,
                                   mask_head_kwargs={"base_channels": args.mask_head_base}, device=args.device,
                                   dtype=args.dtype)
    train_src, n_train, val_src, n_val = sources()
    train_cache = cache_samples(pipe, train_src, n_train, "train")
    val_cache = cache_samples(pipe, val_src, n_val, "val")
    print(f"recipe {args.recipe or recipe}: targets {config.targets}, amp {config.amp}, "
          f"loss averaged over {config.loss_average}s")
    final = train(pipe, train_cache, val_cache, Path(args.out), config)
    print(json.dumps(final, indent=1))
    if args.bundle_out:
        write_training_bundle(pipe, args.lmm, Path(args.bundle_out), sam_arch, args.mask_head_base, final)
    return final


def main(argv=None) -> None:
    parser = build_parser()
    parser.add_argument("--data", nargs="+", required=True,
                        help="RefCOCO directories (instances.json + refs(*).p), concatenated like F-LMM's "
                             "refcoco + refcoco+ + refcocog")
    parser.add_argument("--val-data", default="", help="RefCOCO directory to validate on (default: the first --data)")
    parser.add_argument("--images", default="", help="RefCOCO images (default: <data>/images or <data>/../train2014)")
    args = parser.parse_args(argv)
    if "tabletop" in args.data and not Path("tabletop").is_dir():
        parser.error("--data tabletop: the generated scenes are trained on with python -m flmm_ros.tabletop.head_cli "
                     "train (the same options, without --data)")

    def refcoco() -> Sources:
        # F-LMM's training sets: one random sentence per object, chosen once (mmdet text_mode='random').
        train_src = [s for d in args.data for s in refcoco_samples(d, args.train_split, text_mode="random",
                                                                     images_dir=args.images, count=args.train_count)]
        val_src = list(refcoco_samples(args.val_data or args.data[0], args.val_split, images_dir=args.images,
                                       count=args.val_count))
        return train_src, len(train_src), val_src, len(val_src)

    run(args, "flmm", refcoco)


def write_training_bundle(pipe: GroundingPipeline, lmm: str, bundle: Path, sam_arch, base: int, final: dict) -> None:
    """A self-contained bundle: the LMM copied beside the trained head."""
    bundle.mkdir(parents=True, exist_ok=True)
    source = Path(lmm) / yaml.safe_load((Path(lmm) / BUNDLE_FILE).read_text())["lmm"] if is_bundle(lmm) else Path(lmm)
    if source.resolve() != (bundle / "lmm").resolve():
        shutil.copytree(source, bundle / "lmm", dirs_exist_ok=True)
    write_bundle(bundle, "lmm", pipe.head, resolve_sam_arch(sam_arch), {"base_channels": base},
                 template=pipe.lmm.template, metadata={k: round(v, 4) if isinstance(v, float) else v
                                                        for k, v in final.items()})


if __name__ == "__main__":
    main()
