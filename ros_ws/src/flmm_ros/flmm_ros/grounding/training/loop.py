"""The toolkit every trainer shares: learning-rate schedule, AdamW, optimizer state and checkpoint files.

Used by F-LMM's head training (`training.train`) and by the tabletop model's LMM and SAM pre-training. The
optimizer state is safetensors, never a pickle: parameter tensors under "<parameter index>.<state name>"
("0.exp_avg"), the parameter-group layout and the trainer's own state as JSON in the header. Every file of a
checkpoint is written through `write_atomically`, so an interrupted save never leaves a half-written file.
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import write_atomically

__all__ = ["ResumeError", "TrainerConfig", "WarmupCosine", "adamw", "add_config_arguments", "config_from_args", "load_optimizer_state",
           "optimizer_file", "parse_trainer_args", "run_from_command_line", "save_optimizer_state", "set_lr", "tensor_file", "text_file",
           "warmup_cosine", "write_atomically"]


class ResumeError(RuntimeError):
    """A checkpoint that this run cannot go on from; the message says why."""


@dataclass(frozen=True)
class WarmupCosine:
    """The learning-rate factor of each optimisation step (0-based): linear warm-up, then cosine decay to `floor`.

    Two warm-up rules are in use: `start_factor=None` gives the k-th warm-up step k / warmup (the tabletop
    trainers); a number gives MMEngine's LinearLR, start_factor + (1 - start_factor) * step / warmup (F-LMM).
    Callable, so it also serves as a `LambdaLR` lr_lambda.
    """
    total: int
    warmup: int
    floor: float = 0.0
    start_factor: float | None = None

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            if self.start_factor is None:
                return (step + 1) / self.warmup
            return self.start_factor + (1 - self.start_factor) * step / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_cosine(total_steps: int, warmup_ratio: float = 0.03, start_factor: float = 1e-5) -> WarmupCosine:
    """F-LMM's schedule (iteration-based): LinearLR from start_factor over `warmup_ratio` of the steps, then cosine
    to 0."""
    return WarmupCosine(total_steps, max(1, int(total_steps * warmup_ratio)), start_factor=start_factor)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999), *, decay_1d: bool = True) -> torch.optim.AdamW:
    """AdamW. With `decay_1d=False` the 1-D tensors (norms, biases) form a second group without weight decay."""
    params = list(params)
    if decay_1d:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=lr, betas=betas)


# ---- files of a checkpoint: writers for `write_atomically` ------------------------------------------------------

def tensor_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[Path], None]:
    """Writes `tensors` (e.g. a state_dict) as safetensors."""
    data = {k: v.detach().contiguous() for k, v in tensors.items()}
    return lambda path: save_file(data, str(path), metadata=metadata)


def text_file(text: str) -> Callable[[Path], None]:
    return lambda path: path.write_text(text)


def optimizer_file(optimizer: torch.optim.Optimizer, metadata: dict | None = None) -> Callable[[Path], None]:
    """Writes the optimizer's state (see the module docstring); `metadata` (JSON-able) goes into the header."""
    opt = optimizer.state_dict()
    tensors = {f"{index}.{name}": value for index, state in opt["state"].items() for name, value in state.items()}
    header = {"param_groups": json.dumps(opt["param_groups"])}
    if metadata is not None:
        header["trainer"] = json.dumps(metadata)
    return tensor_file(tensors, header)


def save_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer, metadata: dict | None = None) -> None:
    write_atomically({path: optimizer_file(optimizer, metadata)})


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore a file written by `optimizer_file` into `optimizer` and return its metadata ({} when none).

    The optimizer keeps its own parameter groups (learning rate, weight decay: the trainer sets them); the
    file's groups must hold as many tensors each. Files without a header (the SAM pre-training's before the
    toolkit) are read too.
    """
    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"the optimizer state {path} is missing")
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    groups = optimizer.state_dict()["param_groups"]
    if "param_groups" in header:
        saved = [len(g["params"]) for g in json.loads(header["param_groups"])]
        if saved != [len(g["params"]) for g in groups]:
            raise ResumeError(f"{path} is the optimizer state of other parameters (groups of {saved} tensors, "
                              f"this run has {[len(g['params']) for g in groups]})")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return json.loads(header["trainer"]) if "trainer" in header else {}


# ---- a trainer's config dataclass on the command line -------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class TrainerConfig:
    """What every step-counted trainer's config has; each field of a subclass is also a command-line option
    (`add_config_arguments`: `--batch-size` for batch_size)."""
    out: str                  # the run directory: the model, checkpoint/, the log
    restart: bool = False     # ignore an existing checkpoint
    threads: int = 1          # torch threads (on a shared CPU, fewer threads are often faster)
    seed: int = 0             # batches are a pure function of (seed, step)

    def start_run(self) -> Path:
        """Set torch's threads and seed, make the run directory; returns its checkpoint directory."""
        torch.set_num_threads(self.threads)
        torch.manual_seed(self.seed)
        Path(self.out).mkdir(parents=True, exist_ok=True)
        return Path(self.out) / "checkpoint"


def add_config_arguments(parser: argparse.ArgumentParser, config_class, helps: dict[str, str]) -> None:
    """One option per field of `config_class` (`--images-per-step` for images_per_step), its default the field's:
    the dataclass is the one place a default is written. Booleans become flags; fields without a default are
    required."""
    for f in fields(config_class):
        flag, help_text = "--" + f.name.replace("_", "-"), helps.get(f.name)
        if f.default is MISSING:
            parser.add_argument(flag, required=True, help=help_text)
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true", help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help_text)


def config_from_args(config_class, args: argparse.Namespace):
    return config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})


def parse_trainer_args(argv: list[str] | None, description: str, config_class, helps: dict[str, str],
                       add_eval_options: Callable[[argparse.ArgumentParser], None] | None = None):
    """A trainer's command line: `--eval` (only measure the saved model, on `--split`), the options
    `add_eval_options` adds, then one option per config field. Returns (config, all the arguments)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--eval", action="store_true", help="only evaluate the model saved in OUT")
    parser.add_argument("--split", default="val", choices=["val", "test"], help="with --eval: the held-out split")
    if add_eval_options is not None:
        add_eval_options(parser)
    add_config_arguments(parser, config_class, helps)
    args = parser.parse_args(argv)
    return config_from_args(config_class, args), args


def run_from_command_line(train: Callable[..., dict[str, float]], config) -> dict[str, float]:
    """`train(config)` for a command line: its scores printed, a checkpoint it cannot resume as one error line."""
    try:
        result = train(config)
    except ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps({k: round(v, 4) for k, v in result.items()}, indent=1))
    return result
