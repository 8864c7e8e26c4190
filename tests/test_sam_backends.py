"""Refiner backends: ONNX export (cached), ONNX Runtime vs PyTorch parity, fallbacks, input checks, the CLI.

vit_b-sized parity runs ONNX Runtime on vit_b's full prompt decoder and on a vit_b-width encoder cut to
two windowed blocks (same 1024 input, patch embedding, 14-px windows with padding, rel-pos attention,
neck; the global-attention path is covered by the tiny model). The full 12-block encoder (4 global
blocks over 4096 tokens) takes about a minute to export and run on a 2-core CPU: marked slow.
"""
import importlib.util
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from flmm_ros.grounding import onnx_cache
from flmm_ros.grounding.onnx_cache import CACHE_ENV, default_cache_dir
from flmm_ros.grounding.sam.backends import OnnxRuntimeBackend, TorchBackend, make_refiner_backend
from flmm_ros.grounding.sam.parity import parity_failures, parity_report
from flmm_ros.grounding.sam.shapes import SamShapes
from flmm_ros.grounding.sam.models import SAM_PRESETS, TINY_TEST_SAM, SamArch, build_sam
from flmm_ros.grounding.sam.onnx_export import export_sam_onnx
from flmm_ros.grounding.types import GroundingError

ROOT = Path(__file__).resolve().parents[1]
VIT_B_TWO_BLOCKS = SamArch(**{**SAM_PRESETS["vit_b"].to_dict(), "encoder_depth": 2,
                              "encoder_global_attn_indexes": ()})


def _sam(arch, seed=0):
    torch.manual_seed(seed)
    sam = build_sam(arch)
    with torch.no_grad():  # SAM zero-initialises some embeddings; random values exercise every path
        for p in list(sam.prompt_encoder.parameters()) + list(sam.mask_decoder.parameters()):
            p.normal_(0, 0.2)
    return sam


@pytest.fixture(scope="module")
def tiny():
    return _sam(TINY_TEST_SAM)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(scope="module")
def tiny_backends(tiny, cache):
    return (make_refiner_backend("torch", tiny, cache_dir=cache),
            make_refiner_backend("onnxruntime", tiny, cache_dir=cache, fallback=False))


def _check_parity(sam, cache, label, text_token_counts=(1, 8, 33)):
    reference = make_refiner_backend("torch", sam, cache_dir=cache)
    candidate = make_refiner_backend("onnxruntime", sam, cache_dir=cache, fallback=False)
    assert candidate.name == "onnxruntime"
    report = parity_report(reference, candidate, sam, text_token_counts=text_token_counts)
    print(f"\n{label}: " + ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    assert parity_failures(report, "fp32") == []
    assert report["mask_iou"] >= 0.99 and report["end_to_end_mask_iou"] >= 0.99
    assert report["encoder_max_abs"] < 1e-3 and report["decoder_max_abs"] < 1e-3
    return report


def test_tiny_onnxruntime_matches_torch(tiny, cache):
    _check_parity(tiny, cache, "tiny ORT vs torch")


@pytest.mark.parametrize("num_tokens", [1, 2, 7, 64])
def test_decoder_dynamic_text_tokens(tiny_backends, num_tokens):
    torch_backend, ort_backend = tiny_backends
    g = torch.Generator().manual_seed(num_tokens)
    inputs = (torch.randn(1, 32, 16, 16, generator=g), torch.randn(1, 1, 64, 64, generator=g),
              torch.tensor([[30.0, 40.0, 200.0, 250.0]]), torch.randn(1, num_tokens, 32, generator=g))
    with torch.no_grad():
        expected = torch_backend.decode(*inputs)
    got = ort_backend.decode(*inputs)
    for e, o in zip(expected, got):
        assert o.shape == e.shape
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-4)


def test_vit_b_decoder_and_two_block_vit_b_encoder(cache):
    _check_parity(_sam(VIT_B_TWO_BLOCKS), cache, "vit_b decoder + 2-block vit_b encoder, ORT vs torch",
                  text_token_counts=(8,))


@pytest.mark.slow
def test_full_vit_b_onnxruntime_matches_torch(cache):
    _check_parity(_sam("vit_b"), cache, "vit_b ORT vs torch", text_token_counts=(8,))


def test_exported_graphs(tiny, cache):
    models = export_sam_onnx(tiny, cache)
    encoder = onnx.load(str(models.encoder), load_external_data=False)
    decoder = onnx.load(str(models.decoder))
    assert models.encoder.with_name(models.encoder.name + ".data").is_file()  # weights beside the graph
    assert all(i.domain not in ("", "ai.onnx") or i.version >= 17 for i in encoder.opset_import)

    def dims(value):
        return [d.dim_value or d.dim_param for d in value.type.tensor_type.shape.dim]

    assert [(v.name, dims(v)) for v in encoder.graph.input] == [("image", [1, 3, 256, 256])]
    assert [(v.name, dims(v)) for v in encoder.graph.output] == [("image_embeddings", [1, 32, 16, 16])]
    inputs = {v.name: dims(v) for v in decoder.graph.input}
    assert inputs == {"image_embeddings": [1, 32, 16, 16], "mask_input": [1, 1, 64, 64], "box": [1, 4],
                      "text_tokens": [1, "num_text_tokens", 32]}
    outputs = {v.name: dims(v) for v in decoder.graph.output}
    assert outputs["low_res_logits"] == [1, 1, 64, 64] and outputs["iou"] == [1, 1]
    assert not any(n.op_type == "Resize" for n in decoder.graph.node)  # no upscaling inside


def test_fp16_encoder_keeps_norm_islands_fp32(tiny, cache):
    models = export_sam_onnx(tiny, cache, "fp16")
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(models.encoder))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.value_info) + list(graph.output)}
    fp32, fp16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    by_op = {}
    for node in graph.node:
        by_op.setdefault(node.op_type, set()).update(types.get(o) for o in node.output)
    assert by_op["LayerNormalization"] == {fp32}
    assert by_op["ReduceMean"] == {fp32} and by_op["Sqrt"] == {fp32} and by_op["Pow"] == {fp32}
    assert by_op["MatMul"] == {fp16} and by_op["Conv"] == {fp16}
    assert [graph.input[0].type.tensor_type.elem_type, graph.output[0].type.tensor_type.elem_type] == [fp32, fp32]

    fp16_backend = OnnxRuntimeBackend(models, SamShapes(tiny), torch.device("cpu"))
    report = parity_report(TorchBackend(tiny, torch.device("cpu"), "fp32"), fp16_backend, tiny)
    print("\ntiny fp16-encoder ORT vs torch fp32: " + ", ".join(f"{k} {v:.3g}" for k, v in report.items()))
    assert parity_failures(report, "fp16") == []
    assert report["encoder_max_abs"] > 1e-5  # it really ran in half precision


def test_int8_encoder_is_a_cached_quantised_copy_of_the_fp32_graph(tiny, cache):
    fp32 = export_sam_onnx(tiny, cache)
    int8 = export_sam_onnx(tiny, cache, "int8")
    assert int8.precision == "int8" and int8.decoder == fp32.decoder and int8.encoder != fp32.encoder
    assert json.loads((int8.encoder.parent / "meta.json").read_text())["source"] == fp32.encoder.parent.name
    stamp = int8.encoder.stat().st_mtime_ns
    assert export_sam_onnx(tiny, cache, "int8") == int8 and int8.encoder.stat().st_mtime_ns == stamp   # cached
    ops = {n.op_type for n in onnx.load(str(int8.encoder)).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "Conv" in ops     # the patch embedding stays FP32

    quantised = make_refiner_backend("onnxruntime", tiny, precision="int8", cache_dir=cache, fallback=False)
    full = make_refiner_backend("onnxruntime", tiny, cache_dir=cache, fallback=False)
    assert quantised.precision == "int8" and full.precision == "fp32"
    image = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    a, b = quantised.encode(image), full.encode(image)
    cosine = float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
    assert cosine > 0.999 and not torch.allclose(a, b, atol=1e-4)       # close, and really quantised


def test_int8_is_only_for_onnxruntime_on_a_cpu(tiny, cache, monkeypatch, caplog):
    for name, device in (("torch", "cpu"), ("tensorrt", "cpu"), ("onnxruntime", "cuda")):
        with pytest.raises(GroundingError, match="int8 is for ONNX Runtime on a CPU"):
            make_refiner_backend(name, tiny, device=device, precision="int8", cache_dir=cache)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)     # missing: PyTorch's FP32 encoder, said so
    with caplog.at_level(logging.WARNING):
        backend = make_refiner_backend("onnxruntime", tiny, precision="int8", cache_dir=cache)
    assert backend.name == "torch" and backend.precision == "fp32"
    assert "int8 SAM encoder needs onnxruntime" in caplog.text


def test_export_cache_follows_the_weights(cache):
    sam = _sam(TINY_TEST_SAM, seed=5)
    first = export_sam_onnx(sam, cache)
    stamp = first.encoder.stat().st_mtime_ns, first.decoder.stat().st_mtime_ns
    assert export_sam_onnx(sam, cache) == first
    assert (first.encoder.stat().st_mtime_ns, first.decoder.stat().st_mtime_ns) == stamp  # not re-exported
    with torch.no_grad():
        sam.mask_decoder.iou_token.weight.add_(1.0)  # e.g. F-LMM's fine-tuned decoder
    second = export_sam_onnx(sam, cache)
    assert second.encoder == first.encoder and second.decoder != first.decoder
    with torch.no_grad():
        sam.image_encoder.neck[0].weight.mul_(2.0)
    assert export_sam_onnx(sam, cache).encoder != first.encoder
    assert export_sam_onnx(sam, cache, "fp16").encoder != first.encoder


def test_fingerprint_sees_structure_not_only_weights():
    a = build_sam(TINY_TEST_SAM)
    b = build_sam(SamArch(**{**TINY_TEST_SAM.to_dict(), "decoder_num_heads": 4}))  # same tensors, other heads
    b.load_state_dict(a.state_dict())
    assert onnx_cache.module_fingerprint(a.mask_decoder) != onnx_cache.module_fingerprint(b.mask_decoder)
    assert onnx_cache.module_fingerprint(a.image_encoder) == onnx_cache.module_fingerprint(b.image_encoder)


def test_tensorrt_falls_back_to_onnxruntime_with_a_warning(tiny, cache, caplog):
    with caplog.at_level(logging.WARNING):
        backend = make_refiner_backend("tensorrt", tiny, device="cpu", cache_dir=cache)
    assert backend.name == "onnxruntime"
    assert "'tensorrt' is unavailable" in caplog.text and "CUDA" in caplog.text


def test_no_fallback_raises_with_the_reason(tiny, cache):
    with pytest.raises(GroundingError, match="tensorrt.*CUDA device"):
        make_refiner_backend("tensorrt", tiny, device="cpu", cache_dir=cache, fallback=False)


def test_missing_onnxruntime_falls_back_to_torch(tiny, cache, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        assert make_refiner_backend("onnxruntime", tiny, cache_dir=cache).name == "torch"
    assert "onnxruntime is not installed" in caplog.text
    with pytest.raises(GroundingError, match="onnxruntime is not installed"):
        make_refiner_backend("onnxruntime", tiny, cache_dir=cache, fallback=False)


def test_bad_settings_and_inputs(tiny, tiny_backends, cache):
    with pytest.raises(GroundingError, match="unknown refiner backend"):
        make_refiner_backend("tvm", tiny, cache_dir=cache)
    with pytest.raises(GroundingError, match="precision"):
        make_refiner_backend("torch", tiny, precision="int8", cache_dir=cache)
    good = (torch.zeros(1, 32, 16, 16), torch.zeros(1, 1, 64, 64), torch.zeros(1, 4), torch.zeros(1, 3, 32))
    for backend in tiny_backends:
        with pytest.raises(GroundingError, match=r"\(1, 3, 256, 256\)"):
            backend.encode(torch.zeros(1, 3, 200, 256))
        with pytest.raises(GroundingError, match="T >= 1"):
            backend.decode(*good[:3], torch.zeros(1, 0, 32))
        with pytest.raises(GroundingError, match="mask_input"):
            backend.decode(good[0], torch.zeros(1, 1, 32, 32), *good[2:])
        with pytest.raises(GroundingError, match="text_tokens"):
            backend.decode(*good[:3], torch.zeros(1, 3, 16))


def test_torch_backend_decode_is_differentiable(tiny_backends):
    torch_backend = tiny_backends[0]
    mask_input = torch.randn(1, 1, 64, 64, requires_grad=True)
    logits, _ = torch_backend.decode(torch.randn(1, 32, 16, 16), mask_input, torch.tensor([[0.0, 0.0, 99.0, 99.0]]),
                                     torch.randn(1, 2, 32))
    logits.sum().backward()
    assert mask_input.grad.abs().sum() > 0


def test_parity_report_detects_a_wrong_backend(tiny, tiny_backends):
    torch_backend, ort_backend = tiny_backends

    class Negated:  # a backend with a sign error in its decoder
        name = "broken"
        encode = staticmethod(ort_backend.encode)

        @staticmethod
        def decode(*inputs):
            logits, iou = ort_backend.decode(*inputs)
            return -logits, iou

    report = parity_report(torch_backend, Negated(), tiny)
    assert report["mask_iou"] < 0.5 and parity_failures(report, "fp32")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == ROOT / "engines" / "cache"  # running from the source checkout


def _load_cli():
    spec = importlib.util.spec_from_file_location("build_engines", ROOT / "engines" / "build_engines.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_builds_and_checks_tiny(tmp_path, capsys):
    cli = _load_cli()
    assert cli.main(["--sam-type", "tiny", "--device", "cpu", "--precision", "fp32", "--check",
                     "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime" in out and "ok" in out and "TensorRT skipped" in out
    assert len(list((tmp_path / "onnx").glob("*/image_encoder.onnx"))) == 1
    assert cli.main(["--sam-type", "tiny", "--device", "cpu", "--tensorrt", "require",
                     "--cache-dir", str(tmp_path)]) == 2


def test_cli_loads_flmm_refiner_weights_safely(tmp_path):
    cli = _load_cli()
    sam = build_sam(TINY_TEST_SAM)
    donor = _sam(TINY_TEST_SAM, seed=3)
    flmm_state = {f"sam.model.{k}": v for k, v in donor.state_dict().items()
                  if k.startswith(("prompt_encoder.", "mask_decoder."))}
    flmm_state["text_proj.weight"] = torch.zeros(32, 8)  # other parts of a head checkpoint are ignored
    path = tmp_path / "flmm.pth"
    torch.save({"state_dict": flmm_state}, path)
    assert cli.load_sam_part(sam, path) == len(flmm_state) - 1
    assert torch.equal(sam.mask_decoder.iou_token.weight, donor.mask_decoder.iou_token.weight)
    assert not torch.equal(sam.image_encoder.neck[0].weight, donor.image_encoder.neck[0].weight)

    torch.save({"text_proj.weight": torch.zeros(2, 2)}, tmp_path / "head_only.pth")
    with pytest.raises(GroundingError, match="no SAM weights"):
        cli.load_sam_part(sam, tmp_path / "head_only.pth")
    wide = build_sam(SamArch(**{**TINY_TEST_SAM.to_dict(), "prompt_embed_dim": 64}))
    with pytest.raises(GroundingError, match="does not fit"):
        cli.load_sam_part(wide, path)
    torch.save({"state_dict": flmm_state, "hook": np.float64(1.0)}, tmp_path / "pickled.pth")
    with pytest.raises(GroundingError, match="refusing to load"):  # no unpickling of arbitrary objects
        cli.load_sam_part(sam, tmp_path / "pickled.pth")
