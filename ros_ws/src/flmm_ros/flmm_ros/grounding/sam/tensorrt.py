"""TensorRT plans for SAM's two ONNX graphs: build, cache, run with torch tensors.

Building (`build_serialized_engine`, TensorRT Python API):
- the image encoder is static; the prompt decoder has one optimisation profile over the number of text
  tokens T (min 1, opt 8, max 64);
- FP16 keeps normalisation and reductions in FP32. TensorRT 10.x (JetPack 6 has 10.3) still has
  `BuilderFlag.FP16`: build the FP32 graph with FP16 allowed and FP32 pinned on those layers
  (precision constraints). TensorRT 11 removed the flag and weak typing: build strongly typed from the
  FP16 graph whose norm islands are FP32 (`sam_onnx`, precision 'fp16'). Chosen by feature, not by
  version string (`fp16_strategy`). Softmax stays FP16 (max-subtracted, its sums fit). FP32 builds turn
  TF32 off, for parity with PyTorch;
- the prompt decoder is always built FP32 (see `backends`).

Caching (`PlanCache`): `<cache_dir>/trt/<part>-<key>.plan` + `.json`, key = sha256 over the ONNX graph
(+ external data), TensorRT version, GPU name, compute capability, precision, FP16 strategy, shape
profiles and optimisation level; the JSON repeats those fields and the plan's sha256. A plan whose JSON
differs, whose bytes do not match, that does not deserialise or whose I/O differs is rebuilt, never
used. The timing cache sits beside the plans, one per GPU and TensorRT version.

Running (`TrtRunner`): torch CUDA tensors bound by address (`set_tensor_address`), enqueued with
`execute_async_v3` on torch's current stream, so the results are ordered like any torch op.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
from segment_anything.modeling import Sam

from ..onnx_cache import onnx_sha256
from ..types import GroundingError
from .onnx_export import (
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    TEXT_TOKENS,
    export_sam_onnx,
)
from .shapes import SamShapes

PLAN_FORMAT_VERSION = 1
TEXT_TOKEN_PROFILE = (1, 8, 64)        # min, opt, max phrase tokens per decoder call
DEFAULT_WORKSPACE_BYTES = 2 << 30      # Jetsons share this with the LMM
DEFAULT_OPT_LEVEL = 3                  # TensorRT's default builder optimisation level

log = logging.getLogger(__name__)


def tensorrt_unavailable_reason(device) -> str | None:
    """Why TensorRT cannot run on `device` here, or None when it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"TensorRT needs a CUDA device, the refiner device is {device}"
    if not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU and torch sees none"
    try:
        import tensorrt  # noqa: F401
    except ImportError as e:
        return f"the tensorrt Python package is not installed ({e})"
    return None


def fp16_strategy(trt) -> str:
    """'weak' (TensorRT 10.x: FP16 builder flag + FP32 precision constraints on the norm layers) or
    'strong' (TensorRT 11+: no FP16 flag; strongly typed build from the FP16 graph)."""
    return "weak" if hasattr(trt.BuilderFlag, "FP16") else "strong"


def network_flags(trt, strongly_typed: bool) -> int:
    """Network creation flags. STRONGLY_TYPED is set where the enum has it (10.x opts in; 11 accepts and
    ignores it, every network being strongly typed there)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return (1 << int(flag)) if strongly_typed and flag is not None else 0


def _scope(layer_name: str) -> str:
    """'/neck/neck.1/ReduceMean' -> '/neck/neck.1/' (the exporter names nodes after their module)."""
    head, sep, _ = layer_name.rpartition("/")
    return head + sep if head else ""


def fp32_island_layers(network, trt) -> list:
    """Layers that must stay FP32 in a weakly typed FP16 build: normalisation and reduction layers, and
    every layer of the same module (LayerNorm2d's sub, pow, eps add, sqrt and div around its means)."""
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    anchors = {trt.LayerType.NORMALIZATION, trt.LayerType.REDUCE}
    scopes = {_scope(layer.name) for layer in layers if layer.type in anchors} - {"", "/"}
    float_types = {trt.float32, trt.float16}
    islands = []
    for layer in layers:
        if layer.type not in anchors and not any(layer.name.startswith(s) for s in scopes):
            continue
        if layer.type == trt.LayerType.CONSTANT:
            continue  # weights follow their consumer
        if all(layer.get_output(j).dtype in float_types for j in range(layer.num_outputs)):
            islands.append(layer)
    return islands


def pin_fp32(layers, trt) -> None:
    for layer in layers:
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)


def engine_fields(*, onnx_sha256: str, trt_version: str, gpu_name: str, compute_capability: str,
                  precision: str, strategy: str, profiles: dict, opt_level: int) -> dict:
    """Everything a plan depends on; a plan is reused only when all of it is equal."""
    return {"format": PLAN_FORMAT_VERSION, "onnx_sha256": onnx_sha256, "tensorrt": trt_version,
            "gpu": gpu_name, "compute_capability": compute_capability, "precision": precision,
            "strategy": strategy, "opt_level": opt_level,
            "profiles": {name: [list(s) for s in shapes] for name, shapes in sorted(profiles.items())}}


def engine_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class PlanCache:
    """Serialized plans on disk, found by key and checked against their recorded fields and checksum."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def plan_path(self, part: str, fields: dict) -> Path:
        return self.directory / f"{part}-{engine_key(fields)}.plan"

    def timing_cache_path(self, fields: dict) -> Path:
        return self.directory / (f"timing-{_slug(fields['gpu'])}-sm{fields['compute_capability']}"
                                 f"-trt{fields['tensorrt']}.cache")

    def load(self, part: str, fields: dict) -> tuple[bytes | None, str]:
        """(plan, '') when a matching plan is stored, else (None, why not)."""
        plan_path = self.plan_path(part, fields)
        meta_path = plan_path.with_suffix(".json")
        if not plan_path.is_file():
            return None, "no plan built yet"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return None, f"{meta_path.name} is missing or unreadable"
        if meta.get("fields") != fields:
            changed = sorted(k for k in set(fields) | set(meta.get("fields") or {})
                             if (meta.get("fields") or {}).get(k) != fields.get(k))
            return None, f"plan was built for other settings ({', '.join(changed)})"
        plan = plan_path.read_bytes()
        if hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            return None, "plan bytes do not match their checksum (truncated or replaced)"
        return plan, ""

    def store(self, part: str, fields: dict, plan: bytes) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        plan_path = self.plan_path(part, fields)
        _write_atomic(plan_path, plan)
        meta = {"fields": fields, "plan_sha256": hashlib.sha256(plan).hexdigest()}
        _write_atomic(plan_path.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True).encode())
        return plan_path

    def load_or_build(self, part: str, fields: dict, build: Callable[[], bytes],
                      deserialize: Callable[[bytes], object], check: Callable[[object], str | None],
                      logger: logging.Logger = log):
        """The engine for `fields`: the stored plan when it is valid, else a fresh build (stored)."""
        plan, why = self.load(part, fields)
        if plan is not None:
            engine = deserialize(plan)
            problem = "it does not deserialise" if engine is None else check(engine)
            if problem is None:
                logger.info("TensorRT %s: using %s", part, self.plan_path(part, fields))
                return engine
            why = f"stored plan rejected: {problem}"
        logger.warning("TensorRT %s: building a plan (%s); this can take minutes", part, why)
        plan = build()
        engine = deserialize(plan)
        problem = "it does not deserialise" if engine is None else check(engine)
        if problem is not None:
            raise RuntimeError(f"TensorRT built a {part} plan that cannot be used: {problem}")
        path = self.store(part, fields, plan)
        logger.info("TensorRT %s: stored %s", part, path)
        return engine


def build_serialized_engine(trt, onnx_path: Path, *, precision: str, strategy: str, profiles: dict,
                            timing_cache: Path, opt_level: int = DEFAULT_OPT_LEVEL,
                            workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> bytes:
    """Parse `onnx_path` (external data beside it) and build a serialized plan."""
    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(network_flags(trt, strongly_typed=precision == "fp16" and strategy == "strong"))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    config.builder_optimization_level = opt_level
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if precision == "fp16" and strategy == "weak":
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pin_fp32(fp32_island_layers(network, trt), trt)
    if profiles:
        profile = builder.create_optimization_profile()
        for name, (min_shape, opt_shape, max_shape) in profiles.items():
            profile.set_shape(name, min_shape, opt_shape, max_shape)
        config.add_optimization_profile(profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build {onnx_path.name} (see the TensorRT log above)")
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(memoryview(plan))


def _torch_dtype(trt, dtype) -> torch.dtype:
    names = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64,
             "bool": torch.bool}
    table = {getattr(trt, name): dt for name, dt in names.items() if hasattr(trt, name)}
    if dtype not in table:
        raise RuntimeError(f"unsupported TensorRT I/O type {dtype}")
    return table[dtype]


class TrtRunner:
    """One execution context of an engine, fed and read with torch CUDA tensors."""

    def __init__(self, trt, engine, device: torch.device) -> None:
        self.trt = trt
        self.engine = engine
        self.context = engine.create_execution_context()
        self.device = device
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        bound = []  # keeps converted inputs alive until enqueued (the allocator orders reuse on this stream)
        for name in self.inputs:
            tensor = feeds[name].detach().to(self.device, self.dtypes[name]).contiguous()
            bound.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise GroundingError(f"TensorRT engine does not accept {name} of shape {tuple(tensor.shape)}")
            self.context.set_tensor_address(name, tensor.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT failed to enqueue the engine")
        return results


def io_problem(engine, trt, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> str | None:
    """None when the engine has exactly these input and output tensors."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    found_in = {n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
    found_out = set(names) - found_in
    if found_in != set(inputs) or found_out != set(outputs):
        return f"its I/O tensors are {sorted(found_in)} -> {sorted(found_out)}"
    return None


class TensorRTBackend:
    """SAM encoder + F-LMM prompt decoder as TensorRT engines on one CUDA device."""
    name = "tensorrt"

    def __init__(self, sam: Sam, *, device, precision: str = "fp16", cache_dir: str | os.PathLike,
                 opt_level: int = DEFAULT_OPT_LEVEL, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
                 logger: logging.Logger | None = None) -> None:
        import tensorrt as trt
        self.logger = logger or log
        device = torch.device(device)
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.shapes = SamShapes(sam)
        self.strategy = fp16_strategy(trt) if precision == "fp16" else "fp32"
        # A strongly typed FP16 build needs the graph that is FP16 already; the others build the FP32 one.
        encoder_onnx = "fp16" if self.strategy == "strong" else "fp32"
        models = export_sam_onnx(sam, cache_dir, encoder_onnx)
        self.plans = PlanCache(Path(cache_dir) / "trt")
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        props = torch.cuda.get_device_properties(self.device)
        common = {"trt_version": trt.__version__, "gpu_name": props.name,
                  "compute_capability": f"{props.major}.{props.minor}", "opt_level": opt_level}
        c = self.shapes.embed_dim
        token_profile = {TEXT_TOKENS: tuple((1, t, c) for t in TEXT_TOKEN_PROFILE)}
        with torch.cuda.device(self.device):  # TensorRT builds and deserialises on the current device
            encoder = self._engine(trt, "image_encoder", models.encoder, precision, {}, common,
                                   (ENCODER_INPUT,), (ENCODER_OUTPUT,), workspace_bytes)
            decoder = self._engine(trt, "prompt_decoder", models.decoder, "fp32", token_profile, common,
                                   DECODER_INPUTS, DECODER_OUTPUTS, workspace_bytes)
        self.encoder = TrtRunner(trt, encoder, self.device)
        self.decoder = TrtRunner(trt, decoder, self.device)

    def _engine(self, trt, part, onnx_path, precision, profiles, common, inputs, outputs, workspace_bytes):
        strategy = self.strategy if precision == "fp16" else "fp32"
        fields = engine_fields(onnx_sha256=onnx_sha256(onnx_path), precision=precision, strategy=strategy,
                               profiles=profiles, **common)
        timing_cache = self.plans.timing_cache_path(fields)

        def build() -> bytes:
            return build_serialized_engine(trt, onnx_path, precision=precision, strategy=strategy,
                                           profiles=profiles, timing_cache=timing_cache,
                                           opt_level=fields["opt_level"], workspace_bytes=workspace_bytes)

        def deserialize(plan: bytes):
            try:
                return self._runtime.deserialize_cuda_engine(plan)
            except Exception as e:  # some versions raise instead of returning None
                self.logger.warning("TensorRT could not deserialise the %s plan: %s", part, e)
                return None

        return self.plans.load_or_build(part, fields, build, deserialize,
                                        lambda engine: io_problem(engine, trt, inputs, outputs), self.logger)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        self.shapes.check_image(image)
        return self.encoder({ENCODER_INPUT: image})[ENCODER_OUTPUT]

    def decode(self, image_embeddings, mask_input, box, text_tokens):
        self.shapes.check_decoder_inputs(image_embeddings, mask_input, box, text_tokens)
        lo, hi = TEXT_TOKEN_PROFILE[0], TEXT_TOKEN_PROFILE[2]
        if not lo <= text_tokens.shape[1] <= hi:
            raise GroundingError(f"the TensorRT decoder takes {lo}..{hi} text tokens per phrase, "
                                 f"got {text_tokens.shape[1]}")
        out = self.decoder(dict(zip(DECODER_INPUTS, (image_embeddings, mask_input, box, text_tokens))))
        return out[DECODER_OUTPUTS[0]], out[DECODER_OUTPUTS[1]]
