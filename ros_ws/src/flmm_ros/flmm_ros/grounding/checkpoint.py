"""Loading and saving grounding-head and SAM weights, safely.

Nothing here unpickles arbitrary objects: `.pth/.pt/.bin/.ckpt` files go through
`torch.load(weights_only=True)` (tensors and plain containers only) and our own format is safetensors.

Layouts understood by `load_flmm_checkpoint`:
- F-LMM's released `.pth` (a state dict, possibly under 'state_dict'): `mask_head.*`, `text_proj.*`,
  `text_layer_weights`, `sam.model.prompt_encoder.*`, `sam.model.mask_decoder.*`. F-LMM saves only
  trainable parameters, so the SAM image encoder and SAM's buffers are not in it: they come from the
  official SAM checkpoint (`load_sam_weights`), and are never reported missing.
- ours (`save_head`): the same names with `sam.` instead of `sam.model.`, in safetensors.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from segment_anything.modeling import Sam

from .head import GroundingHead
from .sam.models import SAM_PRESETS
from .types import GroundingError

HEAD_FORMAT = "flmm_ros.grounding_head.v1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model", "module")
_SAM_PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")

# Head keys whose shapes tell which LMM a checkpoint was trained for: key -> (dim, meaning).
_LMM_SHAPE_KEYS = {
    "mask_head.encoder.0.0.convs.0.conv.weight": (1, "attention channels (LMM layers x heads)"),
    "text_proj.weight": (1, "LMM hidden size"),
    "text_layer_weights": (0, "LMM layers"),
}


@dataclass
class LoadReport:
    """What a load did. Shapes are (expected by the model, found in the file)."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for title, names in (("missing", self.missing), ("unexpected (ignored)", self.unexpected)):
            if names:
                lines.append(f"{len(names)} {title}: {_short_list(names)}")
        if self.shape_mismatches:
            items = [f"{k} expects {list(e)}, file has {list(f)}" for k, e, f in self.shape_mismatches]
            lines.append(f"{len(items)} shape mismatches: {_short_list(items)}")
        return "; ".join(lines)


def _short_list(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` or weights-only PyTorch file, unwrapped from 'state_dict'/'model'/'module'."""
    path = Path(path)
    if not path.is_file():
        raise GroundingError(f"checkpoint not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error type for corrupt headers
            raise GroundingError(f"{path} is not a valid safetensors file ({e})") from None
    if suffix not in TORCH_SUFFIXES:
        raise GroundingError(f"unsupported checkpoint type {path.name!r}: "
                             f"use .safetensors or {', '.join(TORCH_SUFFIXES)}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        message = str(e)
        found = re.search(r"Unsupported global: GLOBAL (\S+)", message)
        if found:
            raise GroundingError(
                f"refusing to load {path}: it contains Python objects beyond tensors (it references "
                f"{found.group(1)}) and unpickling them could run arbitrary code. Only plain state dicts "
                "are accepted: extract the 'state_dict' in a trusted environment or convert it to "
                "safetensors.") from None
        raise GroundingError(f"{path} is not a readable PyTorch checkpoint (corrupt, truncated or another "
                             f"kind of file; {type(e).__name__})") from None
    return _tensors_of(obj, path)


def _tensors_of(obj, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(obj, dict):
        wrapper = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if wrapper is None:
            break
        obj = obj[wrapper]
    items = obj.items() if isinstance(obj, dict) else []
    tensors = {k: v for k, v in items if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise GroundingError(f"{path} holds no named tensors (found {type(obj).__name__}): not a model checkpoint")
    if all(k.startswith("module.") for k in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _compare(model_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor],
             optional: set[str]) -> LoadReport:
    report = LoadReport()
    for key, expected in model_state.items():
        if key not in file_state:
            if key not in optional:
                report.missing.append(key)
        elif file_state[key].shape != expected.shape:
            report.shape_mismatches.append((key, tuple(expected.shape), tuple(file_state[key].shape)))
        else:
            report.loaded.append(key)
    report.unexpected = [k for k in file_state if k not in model_state]
    return report


def _apply(module: torch.nn.Module, file_state: dict[str, torch.Tensor], report: LoadReport) -> None:
    module.load_state_dict({k: file_state[k] for k in report.loaded}, strict=False)


def _lmm_mismatch_hint(report: LoadReport) -> str:
    hints = []
    for key, expected, found in report.shape_mismatches:
        if key in _LMM_SHAPE_KEYS:
            dim, meaning = _LMM_SHAPE_KEYS[key]
            if len(expected) > dim and len(found) > dim and expected[dim] != found[dim]:
                hints.append(f"{meaning}: this model has {expected[dim]}, the checkpoint {found[dim]}")
    if not hints:
        return ""
    return "it was trained for a different LMM (" + "; ".join(hints) + "); use the checkpoint made for this LMM. "


def _load_head_state(head: GroundingHead, file_state: dict[str, torch.Tensor], path: Path,
                     optional: set[str], strict: bool = False) -> LoadReport:
    model_state = head.state_dict()
    report = _compare(model_state, file_state, optional)
    if not report.loaded and not report.shape_mismatches:
        hint = ""
        if any(k.startswith(_SAM_PARTS) for k in file_state):
            hint = " It looks like a SAM checkpoint: pass it as the SAM weights instead."
        raise GroundingError(f"{path} is not a grounding-head checkpoint: none of its {len(file_state)} keys "
                             f"(e.g. {_short_list(sorted(file_state), 3)}) matches mask_head.*, text_proj.*, "
                             f"text_layer_weights or sam.*.{hint}")
    if report.shape_mismatches:
        raise GroundingError(f"{path} does not fit this grounding head: {_lmm_mismatch_hint(report)}{report}")
    if strict and (report.missing or report.unexpected):
        raise GroundingError(f"{path} does not match this grounding head: {report}")
    _apply(head, file_state, report)
    return report


def _image_encoder_keys(head: GroundingHead) -> set[str]:
    return {k for k in head.state_dict() if k.startswith("sam.image_encoder.")}


def head_state_from_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A grounding head's tensors with our names: F-LMM's `sam.model.*` become `sam.*` (the one place that
    maps F-LMM's key prefixes; ours pass through)."""
    return {("sam." + k[len("sam.model."):] if k.startswith("sam.model.") else k): v
            for k, v in read_state_dict(path).items()}


def load_sam_part(sam: Sam, path: str | os.PathLike) -> int:
    """Load the SAM tensors of a grounding-head checkpoint (F-LMM's `.pth`: usually the prompt encoder and mask
    decoder only; or ours) into `sam`. Returns how many tensors were loaded."""
    path = Path(path)
    state = {k[len("sam."):]: v for k, v in head_state_from_file(path).items()
             if k.startswith("sam.") and k[len("sam."):].startswith(_SAM_PARTS)}
    if not state:
        raise GroundingError(f"{path} holds no SAM weights (keys sam.model.* or sam.* of a grounding head)")
    expected = sam.state_dict()
    wrong = [f"{k}: file {tuple(v.shape)}, model {tuple(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    unknown = [k for k in state if k not in expected]
    if wrong or unknown:
        raise GroundingError(f"{path} does not fit this SAM ({'; '.join(wrong + unknown)[:500]}): "
                             "choose the SAM type it was trained with")
    sam.load_state_dict(state, strict=False)
    return len(state)


def load_flmm_checkpoint(head: GroundingHead, path: str | os.PathLike) -> LoadReport:
    """Load F-LMM's released `.pth` (or our safetensors) into `head`; see the module docstring."""
    path = Path(path)
    file_state = head_state_from_file(path)
    sam_buffers = {"sam." + name for name, _ in head.sam.named_buffers()}
    return _load_head_state(head, file_state, path, optional=_image_encoder_keys(head) | sam_buffers)


def load_sam_weights(sam: Sam, path: str | os.PathLike) -> LoadReport:
    """Load an official `sam_vit_{b,l,h}_*.pth` (keys image_encoder.*, prompt_encoder.*, mask_decoder.*)."""
    path = Path(path)
    file_state = read_state_dict(path)
    if not any(k.startswith(_SAM_PARTS) for k in file_state):
        raise GroundingError(f"{path} is not a SAM checkpoint: expected keys image_encoder.*, prompt_encoder.*, "
                             "mask_decoder.* (official sam_vit_*.pth), found e.g. "
                             f"{_short_list(sorted(file_state), 3)}")
    model_state = sam.state_dict()
    file_vit, model_vit = _vit_size(file_state), _vit_size(model_state)
    if file_vit is not None and file_vit != model_vit:
        raise GroundingError(f"{path} holds a SAM {_vit_name(file_vit)} image encoder but the model is "
                             f"{_vit_name(model_vit)}: choose the SAM type that matches the checkpoint")
    report = _compare(model_state, file_state, optional=set())
    if report.shape_mismatches:
        raise GroundingError(f"{path} does not fit this SAM model: {report}")
    _apply(sam, file_state, report)
    return report


def _vit_size(state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(embed dim, number of blocks) of a SAM image encoder in a state dict."""
    patch = state.get("image_encoder.patch_embed.proj.weight")
    if patch is None:
        return None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k))}
    return patch.shape[0], len(blocks)


def _vit_name(size: tuple[int, int] | None) -> str:
    if size is None:
        return "(no image encoder)"
    for name, arch in SAM_PRESETS.items():
        if (arch.encoder_embed_dim, arch.encoder_depth) == size:
            return f"{name} (embed dim {size[0]}, {size[1]} blocks)"
    return f"custom size (embed dim {size[0]}, {size[1]} blocks)"


def save_head(head: GroundingHead, path: str | os.PathLike, metadata: dict[str, str] | None = None,
              include_image_encoder: bool = True) -> None:
    """Write the whole head to safetensors, with `head.config` and `metadata` (str -> str) in the header.

    `include_image_encoder=False` leaves out the frozen SAM image encoder (it then comes from the
    official SAM checkpoint), which makes files for large SAMs much smaller.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise GroundingError(f"grounding heads are saved as .safetensors, got {path.name!r}")
    header = {"format": HEAD_FORMAT, "head_config": json.dumps(head.config, sort_keys=True)}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise GroundingError(f"checkpoint metadata must map str to str, got {key!r}: {type(value).__name__}")
        if key in header:
            raise GroundingError(f"metadata key {key!r} is reserved")
    header.update(metadata or {})
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in head.state_dict().items()
               if include_image_encoder or not k.startswith("sam.image_encoder.")}
    write_atomically({path: lambda tmp: save_file(tensors, str(tmp), metadata=header)})


def write_atomically(files: Mapping[str | os.PathLike, Callable[[Path], None]]) -> None:
    """`files[path](tmp)` writes each file to a temporary name beside it; once all are written and flushed to
    disk they are renamed over the real names, in order. A reader, or a run resumed after a crash, finds every
    file whole: the previous version or the new one, never half of one. For several files of one checkpoint,
    name last the one that records the step."""
    staged: list[tuple[Path, Path]] = []
    try:
        for path, write in files.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            staged.append((path.with_name(path.name + ".partial"), path))
            write(staged[-1][0])
            fd = os.open(staged[-1][0], os.O_RDONLY)
            try:
                os.fsync(fd)       # the data reaches the disk before the rename does
            finally:
                os.close(fd)
        for tmp, path in staged:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        raise


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (with 'head_config' for our heads)."""
    path = Path(path)
    if not path.is_file():
        raise GroundingError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise GroundingError(f"{path} is not a valid safetensors file ({e})") from None


def load_head(head: GroundingHead, path: str | os.PathLike, strict: bool = True) -> LoadReport:
    """Load a file written by `save_head`. The SAM image encoder may be absent (then it is left as is).

    With `strict`, any other missing or unexpected key is an error (and nothing is loaded).
    """
    path = Path(path)
    return _load_head_state(head, read_state_dict(path), path, optional=_image_encoder_keys(head), strict=strict)
