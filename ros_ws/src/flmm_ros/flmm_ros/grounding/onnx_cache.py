"""The content-keyed cache of ONNX exports and engines shared by the SAM wing and the mask head: where it lives,
a fingerprint of a module's weights and structure, and exports written atomically under a key of them.

A directory is named `<prefix>-<key>`, key = a hash of the fields given (weights fingerprint, precision,
input sizes, exporter and torch versions, opset); it appears under its final name only once complete, so
processes sharing the cache (e.g. a container volume) never read half an export.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

OPSET = 17                # LayerNormalization is one op from 17 (TensorRT maps it to INormalizationLayer)
META_FILE = "meta.json"
CACHE_ENV = "FLMM_ROS_ENGINE_CACHE"

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$FLMM_ROS_ENGINE_CACHE, else `engines/cache` of the source checkout, else ~/.cache/flmm_ros/engines."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    for parent in Path(__file__).resolve().parents:
        if (parent / "engines").is_dir() and (parent / "ros_ws").is_dir():
            return parent / "engines" / "cache"
    return Path.home() / ".cache" / "flmm_ros" / "engines"


def module_fingerprint(*modules: nn.Module) -> str:
    """sha256 over the modules' structure (classes and scalar settings such as heads or window size)
    and every parameter and buffer, byte for byte."""
    digest = hashlib.sha256()
    for module in modules:
        for name, sub in module.named_modules():
            settings = {k: v for k, v in sorted(vars(sub).items())
                        if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, tuple))}
            digest.update(f"{name}:{type(sub).__name__}:{settings!r};".encode())
        for name, tensor in module.state_dict().items():
            t = tensor.detach().to("cpu").contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def onnx_sha256(path: str | os.PathLike) -> str:
    """sha256 of an ONNX graph together with its external-data file, if it has one."""
    path = Path(path)
    digest = hashlib.sha256()
    for part in (path, path.with_name(path.name + ".data")):
        if part.is_file():
            digest.update(part.name.encode())
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    digest.update(block)
    return digest.hexdigest()


def export_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def cached_export(root: Path, prefix: str, fields: dict, file_name: str, export, force: bool) -> Path:
    """The cached file for `fields`, exporting it first when absent (written atomically: a directory
    appears under its final name only once complete)."""
    final = root / f"{prefix}-{export_key(fields)}"
    if (final / file_name).is_file() and not force:
        log.info("reusing ONNX export %s", final / file_name)
        return final / file_name
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (e.g. a container volume)
    try:
        log.info("exporting %s to ONNX (%s)", prefix, final)
        export(staging / file_name)
        for part in staging.iterdir():   # some writers (onnx's external data) make files private
            if part.is_file():
                part.chmod(0o644)
        (staging / META_FILE).write_text(json.dumps(fields, indent=1, sort_keys=True))
        if final.exists() and (force or not (final / file_name).is_file()):
            shutil.rmtree(final)
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / file_name).is_file():
                raise
            log.info("another process exported %s first; using its files", final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final / file_name
