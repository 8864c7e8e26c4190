"""TensorRT engines: version feature detection, FP32 islands, the plan cache and its stale-plan handling
(all with stand-in objects for the `tensorrt` module), and, where TensorRT and a GPU exist, real builds
checked against PyTorch."""
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from flmm_ros.grounding.sam import tensorrt as st
from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam


# ---------------------------------------------------------------- stand-ins for the tensorrt module
class _Enum(SimpleNamespace):
    """Named members with distinct int values, like the pybind enums of `tensorrt`."""

    def __init__(self, *names):
        super().__init__(**{n: i for i, n in enumerate(names)})


def fake_trt(version: int) -> SimpleNamespace:
    """The parts of `tensorrt` 10.x or 11.x that the builder code looks at."""
    builder_flags = ["TF32", "REFIT", "SPARSE_WEIGHTS"]
    if version == 10:  # removed in 11 with weak typing
        builder_flags += ["FP16", "BF16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"]
    network_flags = ["EXPLICIT_BATCH", "STRONGLY_TYPED"] if version == 10 else ["PREFER_JIT_PYTHON_PLUGINS"]
    return SimpleNamespace(
        __version__=f"{version}.3.0",
        BuilderFlag=_Enum(*builder_flags),
        NetworkDefinitionCreationFlag=_Enum(*network_flags),
        LayerType=_Enum("CONVOLUTION", "MATRIX_MULTIPLY", "ELEMENTWISE", "UNARY", "REDUCE", "NORMALIZATION",
                        "CONSTANT", "SHAPE", "SOFTMAX"),
        float32="float32", float16="float16", int64="int64", int32="int32",
    )


class FakeLayer:
    def __init__(self, name, type_, dtypes=("float32",)):
        self.name, self.type = name, type_
        self.outputs = [SimpleNamespace(dtype=d) for d in dtypes]
        self.num_outputs = len(dtypes)
        self.precision = None
        self.output_types = {}

    def get_output(self, j):
        return self.outputs[j]

    def set_output_type(self, j, dtype):
        self.output_types[j] = dtype


class FakeNetwork:
    def __init__(self, layers):
        self.layers = layers
        self.num_layers = len(layers)

    def get_layer(self, i):
        return self.layers[i]


def encoder_like_network(trt):
    """Layer names as TensorRT's ONNX parser gives them for our encoder export."""
    t = trt.LayerType
    spec = [
        ("/patch_embed/proj/Conv", t.CONVOLUTION), ("/blocks.0/norm1/LayerNormalization", t.NORMALIZATION),
        ("/blocks.0/attn/qkv/MatMul", t.MATRIX_MULTIPLY), ("/blocks.0/attn/Softmax", t.SOFTMAX),
        ("/neck/neck.0/Conv", t.CONVOLUTION),
        ("/neck/neck.1/ReduceMean", t.REDUCE), ("/neck/neck.1/Sub", t.ELEMENTWISE),
        ("/neck/neck.1/Pow", t.ELEMENTWISE), ("/neck/neck.1/ReduceMean_1", t.REDUCE),
        ("/neck/neck.1/Add", t.ELEMENTWISE), ("/neck/neck.1/Sqrt", t.UNARY), ("/neck/neck.1/Div", t.ELEMENTWISE),
        ("/neck/neck.1/Constant_output_0", t.CONSTANT), ("/neck/neck.1/Mul", t.ELEMENTWISE),
        ("/neck/neck.1/Shape", t.SHAPE, ("int64",)), ("/neck/neck.2/Conv", t.CONVOLUTION),
        ("ReduceMean_99", t.REDUCE),  # a reduction outside any module scope pins only itself
    ]
    return FakeNetwork([FakeLayer(*s) for s in spec])


# ---------------------------------------------------------------- version feature detection
def test_fp16_strategy_by_feature():
    assert st.fp16_strategy(fake_trt(10)) == "weak"
    assert st.fp16_strategy(fake_trt(11)) == "strong"
    # a 10.x build that dropped the flag is treated by what it has, not by its version string
    trt = fake_trt(10)
    del trt.BuilderFlag.FP16
    assert st.fp16_strategy(trt) == "strong"


def test_network_flags():
    trt10, trt11 = fake_trt(10), fake_trt(11)
    assert st.network_flags(trt10, strongly_typed=True) == 1 << trt10.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert st.network_flags(trt10, strongly_typed=False) == 0
    assert st.network_flags(trt11, strongly_typed=True) == 0  # always strongly typed, no flag to set


def test_fp32_islands_cover_norm_modules_only():
    trt = fake_trt(10)
    islands = {layer.name for layer in st.fp32_island_layers(encoder_like_network(trt), trt)}
    assert islands == {"/blocks.0/norm1/LayerNormalization", "/neck/neck.1/ReduceMean", "/neck/neck.1/Sub",
                       "/neck/neck.1/Pow", "/neck/neck.1/ReduceMean_1", "/neck/neck.1/Add", "/neck/neck.1/Sqrt",
                       "/neck/neck.1/Div", "/neck/neck.1/Mul", "ReduceMean_99"}


def test_pin_fp32_sets_precision_and_outputs():
    trt = fake_trt(10)
    layer = FakeLayer("/neck/neck.1/Div", trt.LayerType.ELEMENTWISE)
    st.pin_fp32([layer], trt)
    assert layer.precision == trt.float32 and layer.output_types == {0: trt.float32}


class FakeLogger:
    WARNING = 2

    def __init__(self, severity):
        self.severity = severity


class RecordingBuilder:
    """Enough of Builder / network / config / parser to record what build_serialized_engine asks for."""

    def __init__(self, trt, network):
        """Installs itself as trt.Builder (and the parser, logger and memory pool it needs)."""
        self.network, self.flags, self.config = network, None, None
        recorder = self

        class Config:
            def __init__(self):
                self.set_flags, self.cleared, self.profiles, self.builder_optimization_level = set(), set(), [], None

            def set_memory_pool_limit(self, pool, size):
                self.workspace = size

            def set_flag(self, flag):
                self.set_flags.add(flag)

            def clear_flag(self, flag):
                self.cleared.add(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

            def create_timing_cache(self, data):
                return data

            def set_timing_cache(self, cache, ignore_mismatch):
                self.timing = cache

            def get_timing_cache(self):
                return SimpleNamespace(serialize=lambda: b"timing")

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                recorder.flags = flags
                return recorder.network

            def create_builder_config(self):
                recorder.config = Config()
                return recorder.config

            def create_optimization_profile(self):
                shapes = {}
                return SimpleNamespace(set_shape=lambda name, *s: shapes.__setitem__(name, s), shapes=shapes)

            def build_serialized_network(self, network, config):
                return b"PLAN"

        trt.Logger = FakeLogger
        trt.Builder = Builder
        trt.OnnxParser = lambda network, logger: SimpleNamespace(parse_from_file=lambda path: True, num_errors=0)
        trt.MemoryPoolType = SimpleNamespace(WORKSPACE=0)


@pytest.mark.parametrize("version", [10, 11])
def test_build_uses_the_fp16_path_the_version_has(version, tmp_path):
    trt = fake_trt(version)
    network = encoder_like_network(trt)
    recorder = RecordingBuilder(trt, network)
    profiles = {"text_tokens": ((1, 1, 256), (1, 8, 256), (1, 64, 256))}
    strategy = st.fp16_strategy(trt)
    plan = st.build_serialized_engine(trt, tmp_path / "m.onnx", precision="fp16", strategy=strategy,
                                      profiles=profiles, timing_cache=tmp_path / "timing.cache")
    assert plan == b"PLAN" and (tmp_path / "timing.cache").read_bytes() == b"timing"
    assert recorder.config.profiles[0].shapes == profiles
    pinned = [layer.name for layer in network.layers if layer.precision == trt.float32]
    if version == 10:
        assert recorder.config.set_flags == {trt.BuilderFlag.FP16, trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS}
        assert recorder.flags == 0 and "/neck/neck.1/Sqrt" in pinned and "/blocks.0/attn/qkv/MatMul" not in pinned
    else:
        assert recorder.config.set_flags == set() and pinned == []  # types come from the FP16 graph


def test_fp32_build_turns_tf32_off(tmp_path):
    trt = fake_trt(10)
    recorder = RecordingBuilder(trt, encoder_like_network(trt))
    st.build_serialized_engine(trt, tmp_path / "m.onnx", precision="fp32", strategy="fp32", profiles={},
                               timing_cache=tmp_path / "t.cache")
    assert recorder.config.cleared == {trt.BuilderFlag.TF32} and recorder.config.set_flags == set()


# ---------------------------------------------------------------- cache key and stale plans
def fields(**changes):
    base = dict(onnx_sha256="a" * 64, trt_version="10.3.0", gpu_name="Orin", compute_capability="8.7",
                precision="fp16", strategy="weak", profiles={"text_tokens": ((1, 1, 256), (1, 8, 256), (1, 64, 256))},
                opt_level=3)
    return st.engine_fields(**{**base, **changes})


@pytest.mark.parametrize("change", [
    {"onnx_sha256": "b" * 64}, {"trt_version": "10.3.1"}, {"gpu_name": "NVIDIA H100 80GB HBM3"},
    {"compute_capability": "9.0"}, {"precision": "fp32"}, {"strategy": "strong"}, {"opt_level": 5},
    {"profiles": {"text_tokens": ((1, 1, 256), (1, 8, 256), (1, 128, 256))}},
])
def test_engine_key_changes_with_every_field(change):
    assert st.engine_key(fields(**change)) != st.engine_key(fields())


def test_engine_key_is_stable():
    assert st.engine_key(fields()) == st.engine_key(json.loads(json.dumps(fields())))


class Builds:
    """Stand-ins for build / deserialise / I/O check, counting builds."""

    def __init__(self, plan=b"plan-v1", deserializable=True, io_ok=True):
        self.plan, self.deserializable, self.io_ok, self.count = plan, deserializable, io_ok, 0

    def build(self):
        self.count += 1
        return self.plan

    def deserialize(self, plan):
        return {"engine": plan} if self.deserializable and plan.startswith(b"plan") else None

    def check(self, engine):
        return None if self.io_ok else "its I/O tensors are ['x'] -> ['y']"


def test_plan_is_built_once_then_reused(tmp_path):
    cache, builds = st.PlanCache(tmp_path), Builds()
    first = cache.load_or_build("image_encoder", fields(), builds.build, builds.deserialize, builds.check)
    again = cache.load_or_build("image_encoder", fields(), builds.build, builds.deserialize, builds.check)
    assert first == again == {"engine": b"plan-v1"} and builds.count == 1
    assert cache.plan_path("image_encoder", fields()).is_file()


def test_other_gpu_or_version_builds_its_own_plan(tmp_path):
    cache, builds = st.PlanCache(tmp_path), Builds()
    cache.load_or_build("image_encoder", fields(), builds.build, builds.deserialize, builds.check)
    cache.load_or_build("image_encoder", fields(gpu_name="H100"), builds.build, builds.deserialize, builds.check)
    cache.load_or_build("image_encoder", fields(trt_version="11.4.0"), builds.build, builds.deserialize,
                        builds.check)
    assert builds.count == 3 and len(list(tmp_path.glob("*.plan"))) == 3


def test_foreign_plan_under_our_name_is_rebuilt(tmp_path, caplog):
    cache, builds = st.PlanCache(tmp_path), Builds()
    cache.store("image_encoder", fields(), b"plan-from-elsewhere")
    meta_path = cache.plan_path("image_encoder", fields()).with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["fields"]["tensorrt"] = "10.0.1"  # what the copied plan was really built with
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        engine = cache.load_or_build("image_encoder", fields(), builds.build, builds.deserialize, builds.check)
    assert engine == {"engine": b"plan-v1"} and builds.count == 1
    assert "built for other settings (tensorrt)" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "no_meta", "garbage_meta"])
def test_damaged_plan_is_rebuilt(tmp_path, damage):
    cache, builds = st.PlanCache(tmp_path), Builds()
    path = cache.store("prompt_decoder", fields(), b"plan-old-and-long")
    if damage == "truncate":
        path.write_bytes(b"plan-old")
    elif damage == "no_meta":
        path.with_suffix(".json").unlink()
    else:
        path.with_suffix(".json").write_text("{not json")
    plan, why = cache.load("prompt_decoder", fields())
    assert plan is None and why
    engine = cache.load_or_build("prompt_decoder", fields(), builds.build, builds.deserialize, builds.check)
    assert engine == {"engine": b"plan-v1"} and builds.count == 1
    assert cache.load("prompt_decoder", fields())[0] == b"plan-v1"


def test_plan_that_does_not_deserialise_or_has_other_io_is_rebuilt(tmp_path, caplog):
    cache = st.PlanCache(tmp_path)
    cache.store("image_encoder", fields(), b"corrupt-but-checksummed")  # e.g. written by a buggy build
    builds = Builds()
    with caplog.at_level(logging.WARNING):
        cache.load_or_build("image_encoder", fields(), builds.build, builds.deserialize, builds.check)
    assert builds.count == 1 and "does not deserialise" in caplog.text
    wrong_io = Builds(plan=b"plan-v2", io_ok=False)
    with pytest.raises(RuntimeError, match="cannot be used: its I/O"):  # a fresh build must be usable
        cache.load_or_build("image_encoder", fields(), wrong_io.build, wrong_io.deserialize, wrong_io.check)


def test_timing_cache_is_per_gpu_and_version(tmp_path):
    cache = st.PlanCache(tmp_path)
    a = cache.timing_cache_path(fields())
    assert a.parent == tmp_path and a != cache.timing_cache_path(fields(gpu_name="H100"))
    assert a != cache.timing_cache_path(fields(trt_version="11.4.0"))
    assert a == cache.timing_cache_path(fields(onnx_sha256="c" * 64))  # shared across models


def test_unavailable_reason_here():
    assert "CUDA device" in st.tensorrt_unavailable_reason("cpu")
    if not torch.cuda.is_available():
        assert "GPU" in st.tensorrt_unavailable_reason("cuda")


# ---------------------------------------------------------------- real TensorRT (GPU machines only)
def _tensorrt_reason():
    return st.tensorrt_unavailable_reason("cuda")


needs_tensorrt = pytest.mark.skipif(_tensorrt_reason() is not None,
                                    reason=f"TensorRT engines need tensorrt + a CUDA GPU: {_tensorrt_reason()}")


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_matches_torch_and_reuses_plans(precision, tmp_path):
    from flmm_ros.grounding.sam.backends import TorchBackend
    from flmm_ros.grounding.sam.parity import parity_failures, parity_report
    torch.manual_seed(0)
    sam = build_sam(TINY_TEST_SAM).cuda()
    backend = st.TensorRTBackend(sam, device="cuda", precision=precision, cache_dir=tmp_path)
    report = parity_report(TorchBackend(sam, torch.device("cuda"), "fp32"), backend, sam, text_token_counts=(1, 8, 64))
    print(f"\nTensorRT {precision} vs torch: {report}")
    assert parity_failures(report, precision) == []
    plans = sorted(p.name for p in (tmp_path / "trt").glob("*.plan"))
    assert len(plans) == 2
    again = st.TensorRTBackend(sam, device="cuda", precision=precision, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "trt").glob("*.plan")) == plans  # reused, not rebuilt
    with pytest.raises(Exception, match="text tokens"):
        again.decode(torch.zeros(1, 32, 16, 16), torch.zeros(1, 1, 64, 64), torch.zeros(1, 4), torch.zeros(1, 65, 32))
