"""backend: auto (the default): on a CPU the SAM encoder / decoder and the U-Net mask head run on ONNX Runtime, with
the masks PyTorch computes; PyTorch when onnxruntime is missing, on CUDA, with backend: torch, and whenever
gradients are on (training)."""
import logging
import sys

import numpy as np
import pytest
import torch

from flmm_ros.grounding import phrases as phrase_rules
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.mask_head_engine import MaskHeadEngine
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.presence import foreground
from flmm_ros.grounding.sam.backends import make_refiner_backend, resolve_backend
from flmm_ros.grounding.testing import write_random_bundle

INSTRUCTION = "put the red mug in the bowl"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return str(write_random_bundle(tmp_path_factory.mktemp("engines") / "bundle"))


def make(bundle, tmp_path, **settings):
    return GroundingPipeline.from_config(PipelineConfig(model=bundle, engine_dir=str(tmp_path), answer=False,
                                                        **settings))


def image(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (60, 90, 3), dtype=np.uint8)


def test_auto_means_onnx_runtime_on_a_cpu_and_torch_on_cuda():
    assert PipelineConfig().backend == "auto"
    assert resolve_backend("auto", "cpu") == "onnxruntime"
    assert resolve_backend("auto", torch.device("cuda", 1)) == "torch"
    assert [resolve_backend(n, "cpu") for n in ("torch", "onnxruntime", "tensorrt")] == ["torch", "onnxruntime",
                                                                                           "tensorrt"]


def test_default_pipeline_on_a_cpu_computes_the_torch_masks_on_onnx_runtime(bundle, tmp_path):
    auto, torch_pipe = make(bundle, tmp_path), make(bundle, tmp_path, backend="torch")
    assert auto.refiner.backend.name == "onnxruntime" and isinstance(auto.mask_head_engine, MaskHeadEngine)
    assert torch_pipe.refiner.backend.name == "torch" and torch_pipe.mask_head_engine is None
    phrases = phrase_rules.phrases_from_instruction(INSTRUCTION)
    for seed in range(3):
        logits = []
        for pipe in (auto, torch_pipe):
            with torch.no_grad():
                logits.append(pipe.ground_logits(pipe.encode(image(seed)), phrases))
        (a, t) = logits
        assert (a.coarse - t.coarse).abs().max().item() <= 1e-4
        assert (a.refined - t.refined).abs().max().item() <= 1e-3
        assert torch.equal(a.coarse > 0, t.coarse > 0)
        mismatch = ((a.refined > 0) != (t.refined > 0)).float().mean().item()
        assert mismatch <= 1e-3                       # pixels right at the threshold may round either way
    onnx_files = {p.parent.name.split("-")[0] for p in (tmp_path / "onnx").glob("*/*.onnx")}
    assert onnx_files == {"mask_head", "image_encoder", "prompt_decoder", "vision"}


def test_gradients_run_the_torch_mask_head(bundle, tmp_path):
    """The engine holds a snapshot of the weights and no gradients: training must never reach it."""
    pipe = make(bundle, tmp_path)
    calls = []
    real = pipe.mask_head_engine.__call__
    pipe.mask_head_engine = lambda maps: calls.append(1) or real(maps)
    frame = pipe.encode(image())
    with torch.no_grad():
        lmm_out = pipe.lmm.phrase_pass(frame.lmm, ["the red mug"])
        pipe.head_logits(lmm_out, frame.lmm.prepared, frame.sam)
    assert calls == [1]
    coarse = pipe.head_logits(lmm_out, frame.lmm.prepared, frame.sam).coarse   # gradients on
    assert calls == [1] and coarse.requires_grad


def test_without_onnxruntime_everything_falls_back_to_torch(bundle, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # `import onnxruntime` raises ImportError
    with caplog.at_level(logging.WARNING):
        pipe = make(bundle, tmp_path)
    assert pipe.refiner.backend.name == "torch" and pipe.mask_head_engine is None
    assert "mask head runs on PyTorch: onnxruntime is not installed" in caplog.text
    assert "onnxruntime is not installed" in caplog.text and pipe.run(image(), "pick the mug").objects


def test_explicit_backends_and_devices(bundle, tmp_path):
    assert make(bundle, tmp_path, backend="onnxruntime").mask_head_engine is not None
    assert make(bundle, tmp_path, backend="tensorrt").mask_head_engine is not None   # SAM falls back to ORT here
    tiny_sam = make(bundle, tmp_path, refine=False)
    assert tiny_sam.refiner is None and tiny_sam.mask_head_engine is not None
    assert make_refiner_backend("auto", tiny_sam.head.sam, cache_dir=tmp_path).name == "onnxruntime"


def test_objects_keep_their_box_and_mean_foreground_probability(bundle, tmp_path):
    """The published box is that of every mask pixel and the score their mean probability, as np.nonzero and
    a masked mean give them."""
    pipe = make(bundle, tmp_path)
    g = torch.Generator().manual_seed(1)
    probs = [torch.rand(30, 40, generator=g), torch.zeros(30, 40), torch.rand(30, 40, generator=g) ** 8]
    for prob in probs:
        obj = pipe._object("the mug", *foreground(prob, pipe.config.mask_threshold))
        fg = prob > pipe.config.mask_threshold
        ys, xs = np.nonzero(fg.numpy())
        if ys.size == 0:
            assert obj.box == (0, 0, 0, 0) and obj.score == 0.0 and not obj.mask.any()
            continue
        assert obj.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert obj.score == pytest.approx(float(prob[fg].mean()), abs=1e-6)
        assert (obj.mask == fg.numpy() * 255).all()


def test_llava_15_exports_its_mask_head_graph_when_the_pipeline_is_made(bundle, tmp_path, monkeypatch):
    """The first instruction does not pay for the export (LLaVA-1.5's maps always have one size)."""
    pipe = make(bundle, tmp_path)
    assert len(pipe.mask_head_engine.session._sessions) == 1
    from flmm_ros.grounding import mask_head_engine, onnx_runtime
    monkeypatch.setattr(mask_head_engine, "export_mask_head", lambda *a: pytest.fail("exported at run time"))
    monkeypatch.setattr(onnx_runtime, "cpu_session", lambda *a: pytest.fail("new session at run time"))
    assert pipe.run(image(), "pick the mug").objects
