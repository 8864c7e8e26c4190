"""Training tabletop-tiny's SAM-architecture refiner from scratch on generated scenes.

    python -m flmm_ros.tabletop.train_sam --out out/tabletop_sam --steps 7000
    python -m flmm_ros.tabletop.train_sam --out out/tabletop_sam --eval     # mIoU of the saved model

The model is a real `segment_anything.Sam` (`build_sam(TABLETOP_SAM)`). Later, F-LMM style, its image
encoder is frozen and its prompt encoder + mask decoder are fine-tuned to refine the mask head's
coarse masks. Here all of it learns to segment tabletop objects from SAM-style prompts; every object
gets four, each type one decoder batch per image:
- box: the object's box, jittered (SAM: noise of 10% of the box side);
- points: 1-3 clicks, the first positive, later ones positive in the object or negative just around it;
- coarse + box: F-LMM's refiner prompt. A coarse logit map like the mask head's (the object's mask at a
  low resolution, shifted, scaled, grown or shrunk, blurred, with holes, leaks onto other objects and
  noise) becomes the dense prompt, and the box is thresholded from it, both through `SamRefiner`, the
  product's own code (whole image when nothing passes the threshold);
- coarse + box + kind: SAM's text prompt (SAM paper §7.5) in miniature. The coarse map also covers
  objects of other kinds (mostly of the same colour: a frozen LMM's attention finds colour more easily
  than kind), and one learned token per kind (`KindPrompts`) goes after the box tokens, where F-LMM puts
  the phrase's tokens. To pick the named object the encoder has to see what kind each object is, and
  the decoder to read a token that names it; F-LMM's head then learns to say the kind through its text
  projection. A linear probe on the image embedding, trained to read each cell's kind, teaches the encoder
  to see kinds sooner. The kind table and probe are training aids, saved beside the model, not part of it.
Images go through SAM's own path: `ResizeLongestSide`, `sam.preprocess` (normalise, pad bottom/right).
The image encoder runs once per image.
Loss on the single-mask output (`multimask_output=False`, SAM's first mask token) at the low-res mask
size: BCE + Dice (F-LMM's losses) against the visible mask resized the same way, plus the MSE of the
IoU head against the IoU the mask actually reached, plus the kind probe's cross-entropy. AdamW, linear
warm-up, cosine decay, gradient clipping; batches are a pure function of (seed, step), so a run resumes
from its last checkpoint and reproduces the same batches.

The parts: the model, its kind prompts and file layout (`sam_model.py`), the prompts (`sam_prompt_sampling.py`),
the measurements (`sam_eval.py`); here the loss and the training loop (the shared toolkit,
`grounding/training/loop.py`). Output in OUT: `sam.safetensors` (a Sam state_dict: image_encoder.*,
prompt_encoder.*, mask_decoder.*,
loadable with `grounding.checkpoint.load_sam_weights`), `sam_arch.yaml` (`SamArch.to_dict()`),
`kind_prompts.safetensors` (kind tokens and probe, for `--eval`) and `train_log.json`; `load_tabletop_sam(OUT)`
rebuilds the model.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from segment_anything.modeling import Sam
from torch import nn
from tqdm import tqdm

from ..grounding.checkpoint import load_sam_weights
from ..grounding.sam.models import SamArch, build_sam
from ..grounding.sam.prompts import SamPromptGeometry
from ..grounding.training.loop import (ResumeError, TrainerConfig, WarmupCosine, adamw, load_optimizer_state,
                                       optimizer_file, parse_trainer_args, run_from_command_line, set_lr, tensor_file,
                                       text_file, write_atomically)
from .sam_eval import binary_iou, eval_set, evaluate, evaluate_saved, scenes_fingerprint
from .sam_model import (KIND_FILE, LOG_FILE, SAM_FILE, TABLETOP_SAM, KindPrompts, decode, kind_ids,
                        save_tabletop_sam)
from .sam_prompt_sampling import PromptSample, training_samples

KIND_PROBE_WEIGHT = 0.5
OPTIMIZER_FILE, STATE_FILE = "optimizer.safetensors", "state.json"


# ----------------------------------------------------------------------------------------------------- loss

def low_res_targets(masks: np.ndarray, prompts: SamPromptGeometry, input_hw: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) bool -> (N, 1, h, w) coverage in [0, 1] on the decoder's low-res grid (resized, padded)."""
    s = prompts.image_size
    t = F.interpolate(torch.from_numpy(masks).float()[:, None], size=input_hw, mode="area")
    t = F.pad(t, (0, s - input_hw[1], 0, s - input_hw[0]))
    return F.interpolate(t, size=prompts.mask_prompt_size, mode="area")


def prompt_batches(sam: Sam, kind_prompts: KindPrompts, prompts: SamPromptGeometry, embedding: torch.Tensor,
                   sample: PromptSample, input_hw: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(low-res logits, predicted IoU) of every object, for each prompt type of one image."""
    image_hw = sample.image.shape[:2]
    boxes = prompts.scale_boxes(torch.from_numpy(sample.boxes), image_hw)
    coords = prompts.scale_points(torch.from_numpy(sample.points), image_hw)
    return [
        decode(sam, embedding, boxes=prompts.boxes(sample.coarse, image_hw),
               masks=prompts.dense_prompts(sample.coarse, input_hw)),
        decode(sam, embedding, boxes=boxes),
        decode(sam, embedding, points=(coords, torch.from_numpy(sample.point_labels))),
        decode(sam, embedding, boxes=prompts.boxes(sample.confusable, image_hw),
               masks=prompts.dense_prompts(sample.confusable, input_hw), tokens=kind_prompts(sample.kinds)),
    ]


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """F-LMM's naive Dice (eps 1) per mask."""
    p, t = logits.sigmoid().flatten(1), targets.flatten(1)
    return 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)


def cell_kinds(target: torch.Tensor, kinds: list[str], grid: tuple[int, int]) -> torch.Tensor:
    """(N, 1, h, w) low-res coverage of N objects -> (gh, gw) class per embedding cell: 1 + the kind index of
    the object covering most of it, or 0 where no object covers 30 %."""
    cover = F.adaptive_avg_pool2d(target, grid)[:, 0]
    best, index = cover.max(dim=0)
    labels = (kind_ids(kinds) + 1)[index]
    return torch.where(best >= 0.3, labels, torch.zeros_like(labels))


def training_loss(sam: Sam, kind_prompts: KindPrompts, prompts: SamPromptGeometry, samples: list[PromptSample],
                  probe_weight: float = KIND_PROBE_WEIGHT) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over every prompt of BCE + Dice + IoU-head MSE, plus the kind probe's cross-entropy over the
    embedding cells; the encoder runs once for all images."""
    inputs = [prompts.preprocess(s.image) for s in samples]
    embeddings = sam.image_encoder(torch.cat([x for x, _ in inputs]))
    logits, ious, targets, cells = [], [], [], []
    for i, (sample, (_, input_hw)) in enumerate(zip(samples, inputs)):
        target = low_res_targets(sample.masks, prompts, input_hw)
        cells.append(cell_kinds(target, sample.kinds, embeddings.shape[-2:]))
        for batch_logits, batch_iou in prompt_batches(sam, kind_prompts, prompts, embeddings[i:i + 1], sample,
                                                      input_hw):
            logits.append(batch_logits)
            ious.append(batch_iou[:, 0])
            targets.append(target)
    logits, ious, targets = torch.cat(logits), torch.cat(ious), torch.cat(targets)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").flatten(1).mean(1)
    dice = dice_loss(logits, targets)
    reached = binary_iou(logits.detach() > 0, targets > 0.5)
    iou_mse = (ious - reached) ** 2
    probe = F.cross_entropy(kind_prompts.probe(embeddings), torch.stack(cells))
    loss = (bce + dice + iou_mse).mean() + probe_weight * probe
    return loss, {"bce": bce.mean().item(), "dice": dice.mean().item(), "iou_mse": iou_mse.mean().item(),
                  "kind_probe": probe.item(), "train_iou": reached.mean().item(), "prompts": len(logits)}


# --------------------------------------------------------------------------------------------- training

@dataclass(frozen=True, kw_only=True)
class SamTrainConfig(TrainerConfig):
    """One SAM pre-training run (see the module docstring)."""
    # what one step sees: images from the generated scenes, each with every prompt of its objects
    steps: int = 7000
    images_per_step: int = 1
    kind_probe_weight: float = KIND_PROBE_WEIGHT
    # AdamW (no decay on norms and biases), warm-up then cosine to 2 % of the peak, clipping
    lr: float = 8e-4
    warmup: int = 200
    weight_decay: float = 0.05
    clip: float = 1.0
    # how often (in steps) to log window means, to evaluate and to write the checkpoint
    log_every: int = 50
    eval_every: int = 500
    eval_scenes: int = 60
    save_every: int = 100


HELP = {"out": "run directory: sam.safetensors, sam_arch.yaml, train_log.json, checkpoint/",
        "clip": "gradient norm clipping",
        "kind_probe_weight": "weight of the per-cell kind probe's loss on the image embedding (0: none)",
        "eval_every": "a multiple of --log-every", "restart": "ignore an existing checkpoint"}


def _resume(ckpt_dir: Path, sam: Sam, kind_prompts: KindPrompts, optimizer, fingerprint: str) -> tuple[int, list]:
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    if state.get("scenes") != fingerprint:
        raise ResumeError(f"{ckpt_dir} was trained on other scenes (the scene generator changed since): "
                          "start again with --restart")
    if not (ckpt_dir / KIND_FILE).is_file():
        raise ResumeError(f"{ckpt_dir} has no {KIND_FILE} (it was trained before kind prompts): "
                          "start again with --restart")
    load_sam_weights(sam, ckpt_dir / SAM_FILE)
    kind_prompts.load_state_dict(load_file(ckpt_dir / KIND_FILE))
    load_optimizer_state(ckpt_dir / OPTIMIZER_FILE, optimizer)
    return state["step"], state["history"]


def _save_checkpoint(ckpt_dir: Path, sam: Sam, kind_prompts: KindPrompts, optimizer, step: int,
                     history: list[dict], fingerprint: str) -> None:
    write_atomically({ckpt_dir / SAM_FILE: tensor_file(sam.state_dict()),
                      ckpt_dir / KIND_FILE: tensor_file(kind_prompts.state_dict()),
                      ckpt_dir / OPTIMIZER_FILE: optimizer_file(optimizer),
                      ckpt_dir / STATE_FILE: text_file(json.dumps({"step": step, "history": history,
                                                                   "scenes": fingerprint}))})


def train(config: SamTrainConfig, arch: SamArch = TABLETOP_SAM) -> dict[str, float]:
    """Train (or go on from OUT/checkpoint) and write the model to OUT; the final validation scores.
    Raises ResumeError for a checkpoint that cannot be resumed."""
    ckpt_dir, out = config.start_run(), Path(config.out)
    sam = build_sam(arch)
    kind_prompts = KindPrompts(arch.prompt_embed_dim)
    trained = nn.ModuleList([sam, kind_prompts])
    prompts = SamPromptGeometry(sam)
    optimizer = adamw(trained.parameters(), config.lr, config.weight_decay, decay_1d=False)
    schedule = WarmupCosine(config.steps, config.warmup, floor=0.02)
    start, history, fingerprint = 0, [], scenes_fingerprint()
    if (ckpt_dir / STATE_FILE).is_file() and not config.restart:
        start, history = _resume(ckpt_dir, sam, kind_prompts, optimizer, fingerprint)
        print(f"resuming from step {start}")
    val = eval_set(config.eval_scenes)
    trained.train()
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train sam", mininterval=10)
    # elapsed_s counts training time over resumed runs too
    ema, window = None, []
    t0 = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    for step in bar:
        lr = config.lr * schedule(step)
        set_lr(optimizer, lr)
        samples = training_samples(step, config.seed, config.images_per_step)
        loss, parts = training_loss(sam, kind_prompts, prompts, samples, config.kind_probe_weight)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trained.parameters(), config.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        window.append({"loss": loss.item(), "grad_norm": grad_norm, **parts})
        bar.set_postfix(loss=f"{ema:.3f}", iou=f"{parts['train_iou']:.2f}", lr=f"{lr:.1e}", refresh=False)
        done = step + 1 == config.steps
        if (step + 1) % config.log_every == 0 or done:  # the log keeps window means, so it stays small
            record = {"step": step + 1, "lr": lr, "elapsed_s": round(time.perf_counter() - t0, 1)}
            record.update({k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]})
            window = []
            if (step + 1) % config.eval_every == 0 or done:
                record["val"] = {k: round(v, 4) for k, v in evaluate(sam, kind_prompts, val).items()}
                tqdm.write(f"step {step + 1}: loss {ema:.3f} val {record['val']}")
            history.append(record)
        if (step + 1) % config.save_every == 0 or done:
            _save_checkpoint(ckpt_dir, sam, kind_prompts, optimizer, step + 1, history, fingerprint)
    trained.eval()
    final = history[-1]["val"] if history and "val" in history[-1] else evaluate(sam, kind_prompts, val)
    save_tabletop_sam(sam, arch, out)
    log = {"arch": arch.to_dict(), "args": asdict(config), "steps": config.steps, "scenes": fingerprint,
           "train_wall_s": history[-1]["elapsed_s"] if history else 0.0,
           "val": final, "history": history}
    write_atomically({out / KIND_FILE: tensor_file(kind_prompts.state_dict()),
                      out / LOG_FILE: text_file(json.dumps(log, indent=1))})
    print(f"saved {out / SAM_FILE}")
    return final


def main(argv: list[str] | None = None) -> None:
    config, args = parse_trainer_args(argv, __doc__.split("\n")[0], SamTrainConfig, HELP)
    if args.eval:
        torch.set_num_threads(config.threads)
        evaluate_saved(config.out, args.split, config.eval_scenes)
        return
    run_from_command_line(train, config)


if __name__ == "__main__":
    main()
