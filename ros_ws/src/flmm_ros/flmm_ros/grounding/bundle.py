"""Model bundles: a frozen LMM plus its trained grounding head, in one directory.

    <bundle>/flmm_bundle.yaml   format, relative paths, SAM size, mask-head options, prompt template
    <bundle>/lmm/               the LMM in Hugging Face format (config, safetensors, tokenizer, processor)
    <bundle>/head.safetensors   GroundingHead: mask head, text projection, layer weights, SAM (all parts)

The embedded default model (`models/tabletop_tiny`) is a bundle. A plain LMM (a hub id or directory)
is used with an F-LMM checkpoint (`mask_head`) and an official SAM checkpoint instead.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from segment_anything.modeling import Sam

from .checkpoint import load_flmm_checkpoint, load_head, load_sam_part, load_sam_weights, save_head
from .config import PipelineConfig
from .head import GroundingHead
from .lmm import LMMAdapter, load_lmm, model_type_of
from .sam.models import SamArch, build_sam, resolve_sam_arch
from .types import GroundingError

BUNDLE_FILE = "flmm_bundle.yaml"
BUNDLE_FORMAT = "flmm_ros/bundle-1"
log = logging.getLogger(__name__)


def is_bundle(path: str) -> bool:
    return (Path(path) / BUNDLE_FILE).is_file()


def write_bundle(out_dir: str | Path, lmm_dir: str, head: GroundingHead, sam_arch: SamArch,
                 mask_head_kwargs: dict | None = None, template: str = "vicuna", metadata: dict | None = None) -> Path:
    """Write bundle metadata + head weights; `lmm_dir` must already hold the HF model (relative to out_dir)."""
    out = Path(out_dir)
    if not (out / lmm_dir / "config.json").is_file():
        raise GroundingError(f"{out / lmm_dir} holds no Hugging Face model")
    save_head(head, out / "head.safetensors", {k: str(v) for k, v in (metadata or {}).items()})
    spec = {"format": BUNDLE_FORMAT, "lmm": lmm_dir, "head": "head.safetensors", "sam_arch": sam_arch.to_dict(),
            "mask_head": mask_head_kwargs or {}, "template": template, "metadata": metadata or {}}
    (out / BUNDLE_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
    return out


def read_bundle_spec(path: str | os.PathLike) -> dict:
    """The parsed flmm_bundle.yaml of a bundle directory (paths in it are relative to the directory)."""
    root = Path(path)
    if not is_bundle(root):
        raise GroundingError(f"{root} is not a model bundle (no {BUNDLE_FILE})")
    try:
        spec = yaml.safe_load((root / BUNDLE_FILE).read_text())
    except yaml.YAMLError as error:
        raise GroundingError(f"{root / BUNDLE_FILE} is not valid YAML: {error}") from None
    if not isinstance(spec, dict) or spec.get("format") != BUNDLE_FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise GroundingError(f"{root / BUNDLE_FILE}: unsupported bundle format {found!r}")
    return spec


def load_bundle_sam(path: str | os.PathLike) -> Sam:
    """A bundle's SAM alone (its size and weights), e.g. to build its engines."""
    spec = read_bundle_spec(path)
    sam = build_sam(resolve_sam_arch(spec["sam_arch"]))
    load_sam_part(sam, Path(path) / spec["head"])
    return sam


def load_components(cfg: PipelineConfig) -> tuple[LMMAdapter, GroundingHead]:
    """The frozen LMM adapter and the grounding head described by the configuration, weights loaded."""
    if is_bundle(cfg.model):
        root = Path(cfg.model)
        spec = read_bundle_spec(root)
        lmm = load_lmm(str(root / spec["lmm"]), device=cfg.device, dtype=cfg.torch_dtype,
                       template=cfg.prompt_template or spec.get("template"), quantization=cfg.quantization)
        head = _new_head(lmm, resolve_sam_arch(spec["sam_arch"]), spec.get("mask_head"))
        load_head(head, root / spec["head"])
    else:
        model_type_of(cfg.model)   # a clear "not found" before anything else
        if not cfg.mask_head or not cfg.sam_checkpoint:
            raise GroundingError(f"{cfg.model!r} is a plain LMM, not a model bundle: set mask_head (an F-LMM "
                                 "checkpoint) and sam_checkpoint (an official sam_vit_*.pth)")
        lmm = load_lmm(cfg.model, device=cfg.device, dtype=cfg.torch_dtype, template=cfg.prompt_template or None,
                       quantization=cfg.quantization)
        head = _new_head(lmm, resolve_sam_arch(cfg.sam_type), None)
        log.info("SAM weights: %s", load_sam_weights(head.sam, cfg.sam_checkpoint))
    if cfg.mask_head:
        log.info("grounding head weights from %s: %s", cfg.mask_head, load_flmm_checkpoint(head, cfg.mask_head))
    return lmm, head.to(cfg.device).eval()


def _new_head(lmm: LMMAdapter, sam_arch: SamArch, mask_head_kwargs: dict | None) -> GroundingHead:
    return GroundingHead(in_channels=lmm.mask_head_channels, lmm_hidden_size=lmm.hidden_size,
                         num_text_layers=lmm.num_layers, sam_arch=sam_arch, mask_head_kwargs=mask_head_kwargs)
