"""Pre-training tabletop-tiny's LMM from scratch on generated scenes, and measuring it.

    python -m flmm_ros.tabletop.train_lmm --out out/tabletop_lmm --steps 1500
    python -m flmm_ros.tabletop.train_lmm --out out/tabletop_lmm --eval      # accuracy of the saved model

Each training image carries several turns packed into one sequence (`packing.py`): the
description of the scene, sometimes a referring answer to the grounding prompt (F-LMM's prompt with
"the red mug is on the left." as the answer, so phrase tokens learn to look at their object),
and questions whose answers need the named object to be found (colour, position, count,
presence, kind, instructions). The loss is next-token cross-entropy on answer tokens only.
AdamW with linear warm-up and cosine decay (the shared toolkit, `grounding/training/loop.py`); batches are a
pure function of (seed, step), so a run resumes from its last checkpoint (safetensors, written atomically) and
reproduces the same batches.

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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from ..grounding.training.loop import (ResumeError, TrainerConfig, WarmupCosine, adamw, load_optimizer_state,
                                       optimizer_file, parse_trainer_args, run_from_command_line, set_lr, tensor_file,
                                       text_file, write_atomically)
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


@dataclass(frozen=True, kw_only=True)
class LmmTrainConfig(TrainerConfig):
    """One LMM pre-training run (see the module docstring)."""
    # what one step sees: scenes, each packed with its description, questions and maybe a referring turn
    steps: int = 1500
    batch_size: int = 16
    questions: int = 6
    question_weights: str = ""
    refer_prob: float = 0.5
    few_colours: float = 0.0
    # AdamW (betas 0.9, 0.98), warm-up then cosine to 2 % of the peak; the patch probe's loss weight
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.05
    probe_weight: float = 0.5
    tied_probe: bool = False
    # how often (in steps) to evaluate and to write the checkpoint; a second stage starts from `init`
    eval_every: int = 250
    eval_scenes: int = 200
    save_every: int = 50
    init: str = ""
    threads: int = 2
    # the model's size (a second stage takes the saved model's)
    image_size: int = TinyLlavaArch.image_size
    patch_size: int = TinyLlavaArch.patch_size
    vision_hidden: int = TinyLlavaArch.vision_hidden
    vision_layers: int = TinyLlavaArch.vision_layers
    text_hidden: int = TinyLlavaArch.text_hidden
    text_intermediate: int = TinyLlavaArch.text_intermediate
    text_layers: int = TinyLlavaArch.text_layers
    heads: int = TinyLlavaArch.text_heads
    kv_heads: int = TinyLlavaArch.text_kv_heads

    def arch(self) -> TinyLlavaArch:
        return TinyLlavaArch(image_size=self.image_size, patch_size=self.patch_size,
                             vision_hidden=self.vision_hidden, vision_intermediate=4 * self.vision_hidden,
                             vision_layers=self.vision_layers, vision_heads=self.heads,
                             text_hidden=self.text_hidden, text_intermediate=self.text_intermediate,
                             text_layers=self.text_layers, text_heads=self.heads, text_kv_heads=self.kv_heads)


HELP = {"out": "run directory: checkpoint/, model/, train_log.jsonl",
        "questions": "question turns packed with each image",
        "probe_weight": "weight of the patch kind/colour loss (0 = off)",
        "init": "start from this saved model directory (a second training stage) instead of a fresh one",
        "question_weights": f"how often each question type is drawn, TYPE=W,... (default {QUESTION_WEIGHTS})",
        "few_colours": "share of training scenes drawn with only one or two colours (find objects by kind)",
        "tied_probe": "tie the patch probe's kind/colour classes to those words' embeddings (see TiedPatchProbe)",
        "refer_prob": "probability that an image also gets a referring turn (grounding prompt + expression)",
        "restart": "ignore an existing checkpoint"}
CHECKPOINT_FILES = ("model.safetensors", "probe.safetensors", "optimizer.safetensors", "state.json")


def _tied_probe(model: LlavaForConditionalGeneration, processor: LlavaProcessor) -> TiedPatchProbe:
    tokenizer = processor.tokenizer
    kind_ids, colour_ids = tokenizer.convert_tokens_to_ids(list(KINDS)), tokenizer.convert_tokens_to_ids(list(COLOURS))
    if tokenizer.unk_token_id in kind_ids + colour_ids:
        raise ValueError("the tokenizer lacks a kind or colour word: the tied probe needs each as one token")
    return TiedPatchProbe(model.get_input_embeddings(), kind_ids, colour_ids)


class _Trainer:
    """The model, its patch probe and the optimizer; one call of `step` is one optimisation step."""

    def __init__(self, config: LmmTrainConfig):
        if config.init:   # a second stage: go on from a saved model, with a fresh optimizer and schedule
            self.model, self.processor = load_tabletop_lmm(config.init)
        else:
            self.processor = build_processor(config.arch())
            self.model = build_model(config.arch(), self.processor.tokenizer, seed=config.seed)
        self.arch = arch_of(self.model)
        self.probe = _tied_probe(self.model, self.processor) if config.tied_probe else PatchProbe(self.arch.text_hidden)
        self.params = list(self.model.parameters()) + list(self.probe.parameters())
        self.optimizer = adamw(self.params, config.lr, config.weight_decay, betas=(0.9, 0.98))
        self.probe_weight = config.probe_weight
        # The projected image tokens (what the language model attends to) feed the probe.
        self._image_tokens = {}
        self.model.model.multi_modal_projector.register_forward_hook(
            lambda _m, _i, out: self._image_tokens.__setitem__("out", out))

    def load(self, ckpt_dir: Path) -> int:
        if (ckpt_dir / "optimizer.pt").is_file() and not (ckpt_dir / "optimizer.safetensors").is_file():
            raise ResumeError(f"{ckpt_dir} holds a pickled optimizer state (optimizer.pt), which is no longer read "
                              "(optimizer states are safetensors only): start again with --restart")
        self.model.load_state_dict(load_file(ckpt_dir / "model.safetensors"))
        self.probe.load_state_dict(load_file(ckpt_dir / "probe.safetensors"))
        load_optimizer_state(ckpt_dir / "optimizer.safetensors", self.optimizer)
        return json.loads((ckpt_dir / "state.json").read_text())["step"]

    def save(self, ckpt_dir: Path, step: int, config: LmmTrainConfig) -> None:
        state = json.dumps({"step": step, "args": asdict(config)}, indent=1)
        writers = (tensor_file(self.model.state_dict()), tensor_file(self.probe.state_dict()),
                   optimizer_file(self.optimizer), text_file(state))
        write_atomically({ckpt_dir / name: write for name, write in zip(CHECKPOINT_FILES, writers)})

    def step(self, batch: dict[str, torch.Tensor], targets: torch.Tensor, lr: float) -> dict[str, float]:
        self.model.train()
        set_lr(self.optimizer, lr)
        lm_loss = self.model(**batch).loss
        probe_loss = self.probe.loss(self._image_tokens["out"], targets)
        (lm_loss + self.probe_weight * probe_loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": lm_loss.item(), "probe_loss": probe_loss.item(), "grad_norm": float(grad_norm)}


def train(config: LmmTrainConfig) -> dict[str, float]:
    """Train (or go on from OUT/checkpoint), save the model to OUT/model; the final accuracies.
    Raises ResumeError for a checkpoint that cannot be resumed."""
    ckpt_dir, out = config.start_run(), Path(config.out)
    trainer = _Trainer(config)
    arch = trainer.arch   # a second stage's arch is the saved model's
    weights_by_type = parse_question_weights(config.question_weights)
    schedule = WarmupCosine(config.steps, config.warmup, floor=0.02)
    start = 0
    if (ckpt_dir / "state.json").is_file() and not config.restart:
        start = trainer.load(ckpt_dir)
        print(f"resuming from step {start}")
    val = eval_set(config.eval_scenes)
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train", mininterval=5)
    ema, t0 = None, time.perf_counter()
    with open(out / "train_log.jsonl", "a") as log:
        for step in bar:
            lr = config.lr * schedule(step)
            batch, targets = train_batch(step, config.batch_size, config.seed, config.questions, trainer.processor,
                                         arch.image_tokens, weights_by_type, config.refer_prob, config.few_colours)
            stats = trainer.step(batch, targets, lr)
            ema = stats["loss"] if ema is None else 0.95 * ema + 0.05 * stats["loss"]
            bar.set_postfix(loss=f"{ema:.3f}", probe=f"{stats['probe_loss']:.3f}", lr=f"{lr:.1e}")
            record = {"step": step + 1, **{k: round(v, 4) for k, v in stats.items()}, "lr": lr,
                      "elapsed_s": round(time.perf_counter() - t0, 1)}
            done = step + 1 == config.steps
            if (step + 1) % config.eval_every == 0 or done:
                record["val"] = {k: round(v, 3) for k, v in evaluate(trainer.model, trainer.processor, val).items()}
                tqdm.write(f"step {step + 1}: loss {ema:.3f} val {record['val']}")
            log.write(json.dumps(record) + "\n")
            log.flush()
            if (step + 1) % config.save_every == 0 or done:
                trainer.save(ckpt_dir, step + 1, config)
    trainer.model.eval()
    save_tabletop_lmm(trainer.model, trainer.processor, out / "model")
    print(f"saved {out / 'model'}")
    return evaluate(trainer.model, trainer.processor, val)


def run_eval(out: str, *, split: str = "val", scenes: int = 200, show: int = 3, attention: int = 0,
             threads: int = 2) -> dict[str, float]:
    """Accuracy of the model saved in OUT/model; `show` scenes' generated answers, `attention` scenes' report."""
    torch.set_num_threads(threads)
    model, processor = load_tabletop_lmm(Path(out) / "model")
    t0 = time.perf_counter()
    data = eval_set(scenes, split)
    acc = evaluate(model, processor, data)
    print(json.dumps({k: round(v, 4) for k, v in acc.items()}, indent=1))
    print(f"{len(data)} {split} scenes in {time.perf_counter() - t0:.1f} s")
    for scene, items in data[:show]:
        for qtype, question, answer in items[:3]:
            said = generate_answer(model, processor, scene.image, question)
            print(f"[seed {scene.seed}] {question!r} -> {said!r} (reference {answer!r})")
    if attention:
        report = attention_report(model, processor, scenes=attention)
        print("phrase-to-image attention:", json.dumps(report, indent=1))
        acc.update({f"attention_{k}": v for k, v in report.items() if isinstance(v, float)})
    return acc


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--show", type=int, default=3, help="with --eval: print generated answers for this many scenes")
    p.add_argument("--attention", type=int, default=0, metavar="SCENES",
                   help="with --eval: also measure phrase-to-image attention on this many scenes")


def main(argv: list[str] | None = None) -> None:
    config, args = parse_trainer_args(argv, __doc__.split("\n")[0], LmmTrainConfig, HELP, _eval_options)
    if args.eval:
        run_eval(config.out, split=args.split, scenes=config.eval_scenes, show=args.show, attention=args.attention,
                 threads=config.threads)
        return
    run_from_command_line(train, config)


if __name__ == "__main__":
    main()
