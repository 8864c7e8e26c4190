"""Frozen LMM adapters. A new family (e.g. Qwen2.5-VL) is one new module + one line in ADAPTERS."""
from __future__ import annotations

import json
from pathlib import Path

from ..types import GroundingError
from .base import LMMAdapter, LMMFrame, PhrasePass, PreparedImage, ReasoningPass
from .llava import LlavaAdapter, LlavaPreparedImage
from .llava_next import LlavaNextAdapter, LlavaNextPreparedImage
from .prompts import GROUNDING_PROMPT, template_for

ADAPTERS: dict[str, type[LMMAdapter]] = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
}


def model_type_of(path: str) -> str:
    """The `model_type` of a local model directory or hub id (hub ids are resolved by transformers)."""
    local = Path(path).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text())["model_type"]
    if local.exists() or path.startswith(("/", ".", "~")):
        raise GroundingError(f"model {path!r} not found: no Hugging Face config.json at {local}")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(path).model_type
    except OSError as e:
        raise GroundingError(f"cannot load the LMM {path!r}: not a local model directory and not reachable "
                             f"on the hub ({e.__class__.__name__})") from e


def load_lmm(path: str, **kwargs) -> LMMAdapter:
    model_type = model_type_of(path)
    if model_type not in ADAPTERS:
        raise GroundingError(f"LMM family {model_type!r} is not supported (supported: {sorted(ADAPTERS)})")
    return ADAPTERS[model_type].from_pretrained(path, **kwargs)


__all__ = ["ADAPTERS", "GROUNDING_PROMPT", "LMMAdapter", "LMMFrame", "LlavaAdapter", "LlavaNextAdapter",
           "LlavaNextPreparedImage", "LlavaPreparedImage", "PhrasePass", "PreparedImage", "ReasoningPass", "load_lmm",
           "model_type_of", "template_for"]
