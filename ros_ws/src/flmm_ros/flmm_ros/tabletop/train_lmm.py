"""Pre-training tabletop-tiny's LMM from scratch on generated scenes, and measuring it.

    python -m flmm_ros.tabletop.train_lmm --out out/tabletop_lmm --steps 1500
    python -m flmm_ros.tabletop.train_lmm --out out/tabletop_lmm --eval      # accuracy of the saved model

Each training image carries several turns packed into one sequence (`packing.py`): the
description of the scene, sometimes a referring answer to the grounding prompt (F-LMM's prompt with
"the red mug is on the left." as the answer, so phrase tokens learn to look at their object),
and questions whose answers need the named object to be found (colour, position, count,
presence, kind, instructions). The loss is next-token cross-entropy on answer tokens only.
AdamW with linear warm-up and cosine decay; batches are a pure function of (seed, step), so a run
resumes from its last checkpoint and reproduces the same batches.

Accuracy is exact match of the whole answer under greedy decoding, computed teacher-forced: greedy
decoding returns the reference answer exactly when every reference token (and `</s>`) is the argmax
given the reference prefix, which one forward pass checks.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from .attention_check import attention_report
from .language import COLOURS, DESCRIBE_PROMPT, LOCATION_PHRASES, QAPair, position_word
from .lmm import TinyLlavaArch, arch_of, build_model, build_processor, load_tabletop_lmm, save_tabletop_lmm
from .packing import collate, pack
from .patch_probe import PatchProbe, TiedPatchProbe, patch_targets
from .scenes import SPLIT_SIZE, Scene, generate_scene, split_seeds
from .shapes import KINDS

# How often each kind of question is drawn for a training turn.
QUESTION_WEIGHTS = {"colour": 0.22, "presence": 0.2, "instruction": 0.2, "position": 0.15, "count": 0.13, "kind": 0.1}
# Small renders keep data generation cheap; evaluation also uses 480x640 (geometry scales with min(H, W)).
TRAIN_SIZES = ((256, 256), (240, 320), (192, 256))
TRAIN_SIZE_WEIGHTS = (0.3, 0.3, 0.4)
EVAL_TYPES = ("colour", "presence", "position", "count", "kind", "instruction", "describe", "refer")


def pick_balanced(qas: list[QAPair], rng: np.random.Generator) -> QAPair:
    """A question drawn by answer first: each distinct answer is equally likely.

    Without it the answer priors are a shortcut (most presence questions are "no", most counts
    "zero"), and a model that ignores the image scores well above chance."""
    answers = sorted({qa.answer for qa in qas})
    answer = answers[rng.integers(len(answers))]
    same = [qa for qa in qas if qa.answer == answer]
    return same[rng.integers(len(same))]


def refer_turns(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
    """F-LMM's grounding prompt answered by one object's expression and place."""
    named = [o for o in scene.objects if o.expressions]
    if not named:
        return []
    obj = named[rng.integers(len(named))]
    expression = obj.expressions[rng.integers(len(obj.expressions))]
    return [(DESCRIBE_PROMPT, f"{expression} is {LOCATION_PHRASES[position_word(obj.facts.cx)]}.")]


def training_turns(scene: Scene, rng: np.random.Generator, questions: int,
                   weights_by_type: dict[str, float] = QUESTION_WEIGHTS, refer_prob: float = 0.5
                   ) -> list[tuple[str, str]]:
    by_type = defaultdict(list)
    for qa in scene.questions:
        by_type[qa.type].append(qa)
    turns = [(DESCRIBE_PROMPT, scene.description)]
    if rng.random() < refer_prob:
        turns += refer_turns(scene, rng)
    types = [t for t in weights_by_type if by_type[t] and weights_by_type[t] > 0]
    weights = np.array([weights_by_type[t] for t in types])
    for t in rng.choice(types, size=questions, p=weights / weights.sum()):
        qa = pick_balanced(by_type[t], rng)
        turns.append((qa.question, qa.answer))
    return turns


def train_batch(step: int, batch_size: int, seed: int, questions: int, processor: LlavaProcessor,
                image_tokens: int, weights_by_type: dict[str, float] = QUESTION_WEIGHTS, refer_prob: float = 0.5,
                few_colours_prob: float = 0.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The batch of a training step (a pure function of (seed, step)) and its patch targets.

    With `few_colours_prob`, that share of the scenes has only one or two colours: there, objects can
    be told apart by kind alone, so the questions teach finding an object by its kind."""
    rng = np.random.default_rng([seed, step])
    seeds = rng.integers(0, SPLIT_SIZE, size=batch_size)   # train seed range
    images, seqs, targets = [], [], []
    grid = int(round(math.sqrt(image_tokens)))
    for scene_seed in seeds:
        size = TRAIN_SIZES[rng.choice(len(TRAIN_SIZES), p=TRAIN_SIZE_WEIGHTS)]
        colours = COLOURS
        if few_colours_prob and rng.random() < few_colours_prob:
            colours = tuple(rng.choice(COLOURS, size=int(rng.integers(1, 3)), replace=False))
        scene = generate_scene(int(scene_seed), size, colours)
        images.append(scene.image)
        seqs.append(pack(processor.tokenizer, image_tokens,
                         training_turns(scene, rng, questions, weights_by_type, refer_prob)))
        targets.append(patch_targets(scene, grid))
    batch = collate(seqs, processor.tokenizer.pad_token_id)
    batch["pixel_values"] = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return batch, torch.from_numpy(np.stack(targets))


def eval_set(count: int, split: str = "val") -> list[tuple[Scene, list[tuple[str, str, str]]]]:
    """Held-out scenes (fixed seeds, two image sizes) and one question of each type per scene,
    drawn answer-balanced (chance: presence 1/2, position 1/3, kind 1/6, colour ~1/7).

    The scenes keep their images only (masks dropped) to stay small in memory."""
    out = []
    for seed in split_seeds(split, count):
        scene = generate_scene(seed, (480, 640) if seed % 2 else (256, 256))
        rng = np.random.default_rng(seed)
        by_type = defaultdict(list)
        for qa in scene.questions:
            by_type[qa.type].append(qa)
        items = []
        for t in EVAL_TYPES:
            if t == "refer":
                items += [("refer", q, a) for q, a in refer_turns(scene, rng)]
            elif by_type[t]:
                qa = pick_balanced(by_type[t], rng)
                items.append((t, qa.question, qa.answer))
        out.append((Scene(scene.seed, scene.image, (), scene.questions, scene.description), items))
    return out


@torch.no_grad()
def evaluate(model: LlavaForConditionalGeneration, processor: LlavaProcessor, scenes_and_items,
             batch_size: int = 16) -> dict[str, float]:
    """Exact-match accuracy per question type (greedy decoding, checked teacher-forced)."""
    model.eval()
    image_tokens = model.config.image_seq_length
    hits, totals = defaultdict(int), defaultdict(int)
    for start in range(0, len(scenes_and_items), batch_size):
        chunk = scenes_and_items[start:start + batch_size]
        seqs = [pack(processor.tokenizer, image_tokens, [(q, a) for _, q, a in items]) for _, items in chunk]
        batch = collate(seqs, processor.tokenizer.pad_token_id)
        batch["pixel_values"] = processor.image_processor([s.image for s, _ in chunk], return_tensors="pt")["pixel_values"]
        labels = batch.pop("labels")
        predicted = model(**batch).logits.argmax(-1)
        for i, (_, items) in enumerate(chunk):
            for (qtype, _, _), (a, b) in zip(items, seqs[i].answer_spans):
                # The logit at position p predicts the token at p + 1.
                ok = bool((predicted[i, a - 1:b - 1] == labels[i, a:b]).all())
                hits[qtype] += ok
                totals[qtype] += 1
    acc = {t: hits[t] / totals[t] for t in EVAL_TYPES if totals[t]}
    acc["questions"] = sum(hits[t] for t in QUESTION_WEIGHTS) / max(1, sum(totals[t] for t in QUESTION_WEIGHTS))
    return acc


@torch.no_grad()
def generate_answer(model: LlavaForConditionalGeneration, processor: LlavaProcessor, image: np.ndarray,
                    question: str, max_new_tokens: int = 48) -> str:
    """Greedy answer to one question about one image, through the chat template (the product path)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.02) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def parse_question_weights(text: str) -> dict[str, float]:
    """"colour=0.4,presence=0.3" -> weights; types not named keep weight 0. Empty -> QUESTION_WEIGHTS."""
    if not text:
        return QUESTION_WEIGHTS
    weights = {t: 0.0 for t in QUESTION_WEIGHTS}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            raise ValueError(f"unknown question type {name.strip()!r} (known: {', '.join(weights)})")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"question weight {item!r} is not TYPE=NUMBER") from None
    if sum(weights.values()) <= 0:
        raise ValueError(f"question weights {text!r} sum to zero")
    return weights


def _save_checkpoint(ckpt_dir: Path, model, probe, optimizer, step: int, args: argparse.Namespace) -> None:
    """Written to temporary names first, so an interrupted save leaves the previous checkpoint whole."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    files = {"model.safetensors": lambda f: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f),
             "probe.safetensors": lambda f: save_file(probe.state_dict(), f),
             "optimizer.pt": lambda f: torch.save(optimizer.state_dict(), f),
             "state.json": lambda f: Path(f).write_text(json.dumps({"step": step, "args": vars(args)}, indent=1))}
    for name, write in files.items():
        write(ckpt_dir / f"{name}.tmp")
    for name in files:
        (ckpt_dir / f"{name}.tmp").replace(ckpt_dir / name)


def _arch_from_args(args: argparse.Namespace) -> TinyLlavaArch:
    return TinyLlavaArch(image_size=args.image_size, patch_size=args.patch_size,
                         vision_hidden=args.vision_hidden, vision_intermediate=4 * args.vision_hidden,
                         vision_layers=args.vision_layers, vision_heads=args.heads,
                         text_hidden=args.text_hidden, text_intermediate=args.text_intermediate,
                         text_layers=args.text_layers, text_heads=args.heads, text_kv_heads=args.kv_heads)


def _tied_probe(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> TiedPatchProbe:
    tokenizer = processor.tokenizer
    kind_ids, colour_ids = tokenizer.convert_tokens_to_ids(list(KINDS)), tokenizer.convert_tokens_to_ids(list(COLOURS))
    if tokenizer.unk_token_id in kind_ids + colour_ids:
        raise ValueError("the tokenizer lacks a kind or colour word: the tied probe needs each as one token")
    return TiedPatchProbe(model.get_input_embeddings(), kind_ids, colour_ids)


class _Trainer:
    """The model, its patch probe and the optimizer; one call of `step` is one optimisation step."""

    def __init__(self, arch: TinyLlavaArch, args: argparse.Namespace):
        if args.init:   # a second stage: go on from a saved model, with a fresh optimizer and schedule
            self.model, self.processor = load_tabletop_lmm(args.init)
        else:
            self.processor = build_processor(arch)
            self.model = build_model(arch, self.processor.tokenizer, seed=args.seed)
        self.arch = arch_of(self.model)
        self.probe = _tied_probe(self.model, self.processor) if args.tied_probe else PatchProbe(self.arch.text_hidden)
        self.params = list(self.model.parameters()) + list(self.probe.parameters())
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
        self.probe_weight = args.probe_weight
        # The projected image tokens (what the language model attends to) feed the probe.
        self._image_tokens = {}
        self.model.model.multi_modal_projector.register_forward_hook(
            lambda _m, _i, out: self._image_tokens.__setitem__("out", out))

    def load(self, ckpt_dir: Path) -> int:
        self.model.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
        self.probe.load_state_dict(load_file(ckpt_dir / "probe.safetensors"))
        self.optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", weights_only=True))
        return json.loads((ckpt_dir / "state.json").read_text())["step"]

    def step(self, batch: dict[str, torch.Tensor], targets: torch.Tensor, lr: float) -> dict[str, float]:
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        lm_loss = self.model(**batch).loss
        probe_loss = self.probe.loss(self._image_tokens["out"], targets)
        (lm_loss + self.probe_weight * probe_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": lm_loss.item(), "probe_loss": probe_loss.item(), "grad_norm": float(grad_norm)}


def train(args: argparse.Namespace) -> dict[str, float]:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt_dir = out / "checkpoint"
    trainer = _Trainer(_arch_from_args(args), args)
    arch = trainer.arch   # a second stage's arch is the saved model's
    weights_by_type = parse_question_weights(args.question_weights)
    start = 0
    if (ckpt_dir / "state.json").is_file() and not args.restart:
        start = trainer.load(ckpt_dir)
        print(f"resuming from step {start}")
    val = eval_set(args.eval_scenes)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train", mininterval=5)
    ema, t0 = None, time.perf_counter()
    with open(out / "train_log.jsonl", "a") as log:
        for step in bar:
            lr = lr_at(step, args.steps, args.lr, args.warmup)
            batch, targets = train_batch(step, args.batch_size, args.seed, args.questions, trainer.processor,
                                         arch.image_tokens, weights_by_type, args.refer_prob, args.few_colours)
            stats = trainer.step(batch, targets, lr)
            ema = stats["loss"] if ema is None else 0.95 * ema + 0.05 * stats["loss"]
            bar.set_postfix(loss=f"{ema:.3f}", probe=f"{stats['probe_loss']:.3f}", lr=f"{lr:.1e}")
            record = {"step": step + 1, **{k: round(v, 4) for k, v in stats.items()}, "lr": lr,
                      "elapsed_s": round(time.perf_counter() - t0, 1)}
            done = step + 1 == args.steps
            if (step + 1) % args.eval_every == 0 or done:
                record["val"] = {k: round(v, 3) for k, v in evaluate(trainer.model, trainer.processor, val).items()}
                tqdm.write(f"step {step + 1}: loss {ema:.3f} val {record['val']}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if (step + 1) % args.save_every == 0 or done:
                _save_checkpoint(ckpt_dir, trainer.model, trainer.probe, trainer.optimizer, step + 1, args)
    trainer.model.eval()
    save_tabletop_lmm(trainer.model, trainer.processor, out / "model")
    print(f"saved {out / 'model'}")
    return evaluate(trainer.model, trainer.processor, val)


def run_eval(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    model, processor = load_tabletop_lmm(Path(args.out) / "model")
    t0 = time.perf_counter()
    data = eval_set(args.eval_scenes, args.split)
    acc = evaluate(model, processor, data)
    print(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=1))
    print(f"{len(data)} {args.split} scenes in {time.perf_counter() - t0:.1f} s")
    for scene, items in data[:args.show]:
        for qtype, question, answer in items[:3]:
            said = generate_answer(model, processor, scene.image, question)
            print(f"[seed {scene.seed}] {question!r} -> {said!r} (reference {answer!r})")
    if args.attention:
        report = attention_report(model, processor, scenes=args.attention)
        print("phrase-to-image attention:", json.dumps(report, indent=1))
        acc.update({f"attention_{k}": v for k, v in report.items() if isinstance(v, float)})
    return acc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run directory: checkpoint/, model/, train_log.jsonl")
    p.add_argument("--eval", action="store_true", help="only evaluate the saved model in OUT/model")
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--show", type=int, default=3, help="with --eval: print generated answers for this many scenes")
    p.add_argument("--attention", type=int, default=0, metavar="SCENES",
                   help="with --eval: also measure phrase-to-image attention on this many scenes")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--questions", type=int, default=6, help="question turns packed with each image")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--probe-weight", type=float, default=0.5, help="weight of the patch kind/colour loss (0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default="", metavar="MODEL_DIR",
                   help="start from this saved model (a second training stage) instead of a fresh one")
    p.add_argument("--question-weights", default="", metavar="TYPE=W,...",
                   help=f"how often each question type is drawn (default {QUESTION_WEIGHTS})")
    p.add_argument("--few-colours", type=float, default=0.0, metavar="P",
                   help="share of training scenes drawn with only one or two colours (find objects by kind)")
    p.add_argument("--tied-probe", action="store_true",
                   help="tie the patch probe's kind/colour classes to those words' embeddings (see TiedPatchProbe)")
    p.add_argument("--refer-prob", type=float, default=0.5,
                   help="probability that an image also gets a referring turn (grounding prompt + expression)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-scenes", type=int, default=200)
    p.add_argument("--save-every", type=int, default=50)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    arch = TinyLlavaArch()
    p.add_argument("--image-size", type=int, default=arch.image_size)
    p.add_argument("--patch-size", type=int, default=arch.patch_size)
    p.add_argument("--vision-hidden", type=int, default=arch.vision_hidden)
    p.add_argument("--vision-layers", type=int, default=arch.vision_layers)
    p.add_argument("--text-hidden", type=int, default=arch.text_hidden)
    p.add_argument("--text-intermediate", type=int, default=arch.text_intermediate)
    p.add_argument("--text-layers", type=int, default=arch.text_layers)
    p.add_argument("--heads", type=int, default=arch.text_heads)
    p.add_argument("--kv-heads", type=int, default=arch.text_kv_heads)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.eval:
        run_eval(args)
    else:
        acc = train(args)
        print(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=1))


if __name__ == "__main__":
    main()
