"""Train the grounding head on top of a frozen LMM, F-LMM's recipe.

Trainable: mask head, text layer weights, text projection, SAM prompt encoder + mask decoder.
Frozen: the whole LMM and the SAM image encoder (their outputs are cached once per sample).
Loss: BCE + Dice on the coarse masks and on the SAM-refined masks, weight 1 each. AdamW
(lr 1e-4, weight decay 0.01), linear warm-up over 3% of the steps then cosine to 0, gradient
clipping at 1. Checkpoints are safetensors and training resumes from the last one.

Two recipes (`--recipe`, defaults by data):
- `flmm` (RefCOCO-layout data): F-LMM's configs. 8 epochs, global batch 8 (F-LMM: 8 GPUs x 1 sample, so the
  loss is the mean of the samples' losses), bf16 autocast (AmpOptimWrapper), ground truth nearest-resized to
  the LMM's resized image first and both targets taken from it, one random sentence per object (chosen once).
- `tabletop` (generated scenes, the embedded model on a 2-core CPU): 2 epochs, batch 4, float32, targets from
  the full-resolution masks, the loss averaged over all masks of a batch.

    python -m flmm_ros.grounding.training.train --lmm llava-hf/llava-1.5-7b-hf --device cuda \
        --sam-checkpoint sam_vit_l_0b3195.pth --data data/coco/refcoco data/coco/refcoco+ data/coco/refcocog \
        --val-data data/coco/refcoco --out out/head
    python -m flmm_ros.grounding.training.train --lmm out/tabletop_lmm --data tabletop --train-count 4000 \
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
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..bundle import BUNDLE_FILE, is_bundle, load_components, write_bundle
from ..checkpoint import load_head, load_sam_weights, save_head
from ..config import PipelineConfig
from ..head import GroundingHead
from ..lmm import load_lmm
from ..pipeline import GroundingPipeline
from ..refiner import SamRefiner
from ..refiner_backends import make_refiner_backend
from ..sam_models import resolve_sam_arch
from .data import encode_sample, refcoco_samples, tabletop_samples
from .evaluate import evaluate_cached, format_scores
from .losses import mask_losses


@dataclass(frozen=True)
class Recipe:
    """Training defaults for one kind of data (see the module docstring)."""
    name: str
    epochs: int
    batch_size: int
    amp: str | None          # autocast dtype of the head's forward and losses ("bfloat16": F-LMM)
    targets: str             # "lmm": ground truth through the LMM's resized image (F-LMM); "image": as given
    loss_average: str        # "sample": mean of per-sample losses (F-LMM); "mask": over all masks of a batch
    lr: float = 1e-4


RECIPES = {
    "flmm": Recipe("flmm", epochs=8, batch_size=8, amp="bfloat16", targets="lmm", loss_average="sample"),
    "tabletop": Recipe("tabletop", epochs=2, batch_size=4, amp=None, targets="image", loss_average="mask"),
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


def warmup_cosine(total_steps: int, warmup_ratio: float = 0.03, start_factor: float = 1e-5):
    """LinearLR warm-up from start_factor, then cosine decay to 0 (iteration-based, like F-LMM)."""
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return start_factor + (1 - start_factor) * step / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def save_training_state(path: Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Optimizer tensors in safetensors, everything else (step, schedule, param groups) as JSON metadata."""
    opt = optimizer.state_dict()
    tensors = {f"{i}.{k}": v.contiguous() for i, s in opt["state"].items() for k, v in s.items()}
    save_file(tensors, str(path), metadata={"param_groups": json.dumps(opt["param_groups"]),
                                            "trainer": json.dumps(state)})


def load_training_state(path: Path, optimizer: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["trainer"])


def batch_loss(pipe: GroundingPipeline, samples: list, *, targets: str = "image",
               loss_average: str = "mask") -> torch.Tensor:
    """The batch's loss (see Recipe): per sample, the four mask losses averaged over its masks."""
    total, n_masks = 0, 0
    for sample in samples:
        logits = pipe.head_logits(sample.phrase_pass(), sample.prepared, sample.sam_encoding())
        target = sample.masks().to(logits.coarse.device)
        lmm_hw = sample.prepared.extra["content_hw"] if targets == "lmm" else None
        loss = sum(mask_losses(logits.coarse, logits.refined, target, lmm_hw).values())
        p = target.shape[0]
        total = total + (loss / len(samples) if loss_average == "sample" else loss * p)
        n_masks += p
    return total if loss_average == "sample" else total / n_masks


def train(pipe: GroundingPipeline, train_cache: list, val_cache: list, out_dir: Path, *, epochs: int = 1,
          batch_size: int = 4, lr: float = 1e-4, weight_decay: float = 0.01, clip: float = 1.0,
          eval_every: int = 500, save_every: int = 500, seed: int = 0, resume: bool = True,
          amp: str | None = None, targets: str = "image", loss_average: str = "mask") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    head = pipe.head
    params = trainable_parameters(head)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_cache) / batch_size)
    total = epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total))
    step, log = 0, []
    if resume and (out_dir / "trainer_state.safetensors").is_file():
        load_head(head, out_dir / "head.safetensors")
        state = load_training_state(out_dir / "trainer_state.safetensors", optimizer)
        step, log = state["step"], state["log"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total), last_epoch=step - 1)
        print(f"resumed at step {step}/{total}")

    def checkpoint():
        save_head(head, out_dir / "head.safetensors", {"step": str(step)})
        save_training_state(out_dir / "trainer_state.safetensors", optimizer, {"step": step, "log": log})

    head.train()
    bar = tqdm(total=total, initial=step, desc="train", unit="step")
    start = time.time()
    while step < total:
        epoch = step // steps_per_epoch
        order = list(range(len(train_cache)))
        random.Random(seed + epoch).shuffle(order)
        batch_ids = order[(step % steps_per_epoch) * batch_size:][:batch_size]
        autocast = torch.autocast(pipe.head_device.type, dtype=getattr(torch, amp)) if amp \
            else contextlib.nullcontext()
        with autocast:
            loss = batch_loss(pipe, [train_cache[i] for i in batch_ids], targets=targets, loss_average=loss_average)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if step % eval_every == 0 or step == total:
            head.eval()
            scores = evaluate_cached(pipe, val_cache)
            head.train()
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start,
                        **{f"{k}_{m}": v for k, s in scores.items() for m, v in s.items()}})
            tqdm.write(f"step {step}: loss {loss.item():.3f}  {format_scores(scores)}")
        if step % save_every == 0 or step == total:
            checkpoint()
    bar.close()
    head.eval()
    (out_dir / "train_log.json").write_text(json.dumps(log, indent=1))
    return log[-1] if log else {}


def cache_samples(pipe: GroundingPipeline, samples, count: int, desc: str) -> list:
    return [encode_sample(pipe, s) for s in tqdm(samples, total=count, desc=f"encode {desc}", unit="img")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lmm", required=True, help="frozen LMM (HF directory or id) or a model bundle")
    parser.add_argument("--sam-arch", default="vit_l", help="vit_b|vit_l|vit_h or a YAML file of SamArch sizes")
    parser.add_argument("--sam-checkpoint", default="", help="SAM weights (official .pth or safetensors)")
    parser.add_argument("--mask-head-base", type=int, default=64, help="U-Net base channels (F-LMM: 64)")
    parser.add_argument("--data", nargs="+", default=["tabletop"],
                        help="'tabletop' (generated scenes) or RefCOCO directories (instances.json + refs(*).p), "
                             "concatenated like F-LMM's refcoco + refcoco+ + refcocog")
    parser.add_argument("--val-data", default="", help="RefCOCO directory to validate on (default: the first --data)")
    parser.add_argument("--images", default="", help="RefCOCO images (default: <data>/images or <data>/../train2014)")
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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tabletop = args.data == ["tabletop"]
    recipe = RECIPES[args.recipe or ("tabletop" if tabletop else "flmm")]
    amp = recipe.amp if args.amp is None else (None if args.amp == "none" else args.amp)
    sam_arch = yaml.safe_load(Path(args.sam_arch).read_text()) if args.sam_arch.endswith((".yaml", ".yml")) \
        else args.sam_arch
    pipe = build_training_pipeline(args.lmm, sam_arch=sam_arch, sam_checkpoint=args.sam_checkpoint,
                                   mask_head_kwargs={"base_channels": args.mask_head_base}, device=args.device,
                                   dtype=args.dtype)
    if tabletop:
        n_train = args.train_count or 2000
        train_src = tabletop_samples(args.train_split, n_train)
        val_src = tabletop_samples(args.val_split, args.val_count, expression="first")
        n_val = args.val_count
    else:
        # F-LMM's training sets: one random sentence per object, chosen once (mmdet text_mode='random').
        train_src = [s for d in args.data for s in refcoco_samples(d, args.train_split, text_mode="random",
                                                                     images_dir=args.images, count=args.train_count)]
        val_src = list(refcoco_samples(args.val_data or args.data[0], args.val_split, images_dir=args.images,
                                       count=args.val_count))
        n_train, n_val = len(train_src), len(val_src)
    train_cache = cache_samples(pipe, train_src, n_train, "train")
    val_cache = cache_samples(pipe, val_src, n_val, "val")
    out = Path(args.out)
    print(f"recipe {recipe.name}: targets {args.targets or recipe.targets}, amp {amp}, "
          f"loss averaged over {recipe.loss_average}s")
    final = train(pipe, train_cache, val_cache, out, epochs=args.epochs or recipe.epochs,
                  batch_size=args.batch_size or recipe.batch_size, lr=args.lr or recipe.lr,
                  eval_every=args.eval_every, save_every=args.save_every, resume=not args.no_resume, amp=amp,
                  targets=args.targets or recipe.targets, loss_average=recipe.loss_average)
    print(json.dumps(final, indent=1))
    if args.bundle_out:
        write_training_bundle(pipe, args.lmm, Path(args.bundle_out), sam_arch, args.mask_head_base, final)


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
