"""LLaVA-1.5's vision tower + projector on ONNX Runtime: parity with PyTorch (features, maps, masks), the
content-keyed export cache, and when the pipeline uses it."""
import numpy as np
import pytest
import torch

from flmm_ros.grounding import vision_engine
from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import LlavaAdapter
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.testing import tiny_llava, write_random_bundle
from flmm_ros.grounding.vision_engine import VisionEngine


def _image(seed=0, hw=(48, 64)):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def adapter():
    model, tokenizer, processor = tiny_llava(seed=3, layers=2, heads=4, kv_heads=2)
    return LlavaAdapter(model, tokenizer, processor)


def test_features_match_pytorch(adapter, tmp_path):
    engine = VisionEngine(adapter.model, tmp_path)
    for seed in range(3):
        prepared = adapter.prepare_image(_image(seed))
        with torch.no_grad():
            expected = adapter.image_features(prepared)
            got = engine(prepared.pixel_values)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-4
        assert expected.std() > 0


def test_export_is_cached_by_content(adapter, tmp_path, monkeypatch):
    exports = []
    real = vision_engine.export_vision
    monkeypatch.setattr(vision_engine, "export_vision", lambda *a: exports.append(a[1]) or real(*a))
    pixels = adapter.prepare_image(_image()).pixel_values
    first = VisionEngine(adapter.model, tmp_path)(pixels)
    VisionEngine(adapter.model, tmp_path)(pixels)                # same weights, same size: reused
    assert len(exports) == 1
    projector = adapter.model.model.multi_modal_projector
    with torch.no_grad():
        projector.linear_2.bias += 1.0                           # new weights: a new graph, new features
    try:
        changed = VisionEngine(adapter.model, tmp_path)(pixels)
        assert len(exports) == 2 and (changed - first).abs().max() > 0.5
    finally:
        with torch.no_grad():
            projector.linear_2.bias -= 1.0


@pytest.mark.parametrize("backend, used", [("auto", True), ("onnxruntime", True), ("torch", False)])
def test_the_pipeline_runs_it_on_a_cpu_unless_told_torch(tmp_path_factory, backend, used):
    bundle = write_random_bundle(tmp_path_factory.mktemp("bundle"))
    cache = tmp_path_factory.mktemp("engines")
    config = PipelineConfig(model=str(bundle), backend=backend, engine_dir=str(cache), answer=False)
    pipe = GroundingPipeline.from_config(config)
    assert (pipe.lmm.vision_engine is not None) == used
    if used:                                  # the same maps and masks as PyTorch's vision tower
        reference = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), backend="torch", answer=False))
        image = _image(5)
        with torch.no_grad():
            ours = pipe.ground_logits(pipe.encode(image), ["the red mug"])
            theirs = reference.ground_logits(reference.encode(image), ["the red mug"])
        assert (ours.lmm.maps - theirs.lmm.maps).abs().max() <= 1e-4
        assert torch.equal(ours.refined > 0, theirs.refined > 0)
