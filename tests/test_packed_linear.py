"""The LMM's linear layers on oneDNN with packed weights (lmm/packed_linear.py)."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.lmm import packed_linear
from flmm_ros.grounding.lmm.packed_linear import MIN_ROWS, PackedLinear, onednn_linear_works, pack_linears, \
    unpack_linears
from flmm_ros.grounding.pipeline import GroundingPipeline
from flmm_ros.grounding.testing import write_random_bundle

pytestmark = pytest.mark.skipif(not onednn_linear_works(), reason="this torch has no packed oneDNN linear")


class Quantized(nn.Linear):
    """Stands for bitsandbytes' and torchao's layers: subclasses of nn.Linear with their own forward."""


def test_packed_layers_compute_the_linear_and_follow_weight_changes(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8, bias=False), Quantized(8, 8))
    plain = [m for m in model if isinstance(m, nn.Linear)]
    assert pack_linears(model) == 2
    assert [type(m) for m in plain] == [PackedLinear, PackedLinear, Quantized]
    assert "_packed" in plain[0].__dict__                       # packed when switched, not in the first pass
    state = model.state_dict()
    packed_calls = []
    real = PackedLinear._packed_weight
    monkeypatch.setattr(PackedLinear, "_packed_weight", lambda self: packed_calls.append(1) or real(self))
    for rows in (1, MIN_ROWS - 1, MIN_ROWS, 200):
        x = torch.randn(2, rows, 16)
        packed_calls.clear()
        with torch.no_grad():
            expected = F.linear(F.linear(x, plain[0].weight, plain[0].bias).relu(), plain[1].weight)
            expected = F.linear(expected, plain[2].weight, plain[2].bias)
            torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        assert len(packed_calls) == (2 if 2 * rows >= MIN_ROWS else 0)   # long passes only (rows of the batch)
    with torch.no_grad():
        plain[0].weight.mul_(2.0)                               # in place: packed again, not stale
        x = torch.randn(1, 64, 16)
        torch.testing.assert_close(plain[0](x), F.linear(x, plain[0].weight, plain[0].bias), atol=1e-5, rtol=1e-5)
    x.requires_grad_()
    model(x).sum().backward()                                   # with gradients: F.linear, which has them
    assert plain[0].weight.grad is not None
    assert model.state_dict().keys() == state.keys()
    copied = copy.deepcopy(model)                               # the packed copy is left out and made again
    assert "_packed" not in copied[0].__dict__ and type(copied[0]) is PackedLinear
    with torch.no_grad():
        x = torch.randn(1, 64, 16)
        torch.testing.assert_close(copied(x), model(x), atol=1e-5, rtol=1e-5)
    assert "_packed" in copied[0].__dict__
    torch.save(model, io.BytesIO())
    assert unpack_linears(model) == plain[:2] and all(type(m) is nn.Linear for m in plain[:2])
    assert "_packed" not in plain[0].__dict__


def test_large_models_stay_unpacked(monkeypatch):
    monkeypatch.setattr(packed_linear, "MAX_PACKED_BYTES", 100)
    model = nn.Sequential(nn.Linear(16, 16))
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_the_pipeline_packs_its_lmm_on_a_cpu_and_grounds_as_before(tmp_path, family):
    bundle = write_random_bundle(tmp_path / "bundle", family=family)
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), answer=False,
                                                        engine_dir=str(tmp_path / "engines")))
    kinds = {type(m) for m in pipe.lmm.model.modules() if isinstance(m, nn.Linear)}
    assert kinds == {PackedLinear}
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    phrases = ["the red mug", "the blue ball"]
    with torch.no_grad():
        packed = pipe.ground_logits(pipe.encode(image), phrases)
        assert "_packed" in next(m for m in pipe.lmm.language_model.modules() if type(m) is PackedLinear).__dict__
        unpack_linears(pipe.lmm.model)
        plain = pipe.ground_logits(pipe.encode(image), phrases)
    torch.testing.assert_close(packed.lmm.maps, plain.lmm.maps, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(packed.coarse, plain.coarse, atol=1e-3, rtol=1e-4)
    flipped = ((packed.refined > 0) != (plain.refined > 0)).float().mean()
    assert flipped <= 1e-4                                  # at most a pixel right at the threshold


def test_backend_torch_keeps_the_lmm_on_plain_linear_layers(tmp_path):
    bundle = write_random_bundle(tmp_path / "bundle")
    pipe = GroundingPipeline.from_config(PipelineConfig(model=str(bundle), backend="torch", answer=False))
    assert {type(m) for m in pipe.lmm.model.modules() if isinstance(m, nn.Linear)} == {nn.Linear}


def test_an_onnx_export_traces_the_plain_linear(tmp_path):
    model = nn.Sequential(nn.Linear(16, 8))
    pack_linears(model)
    with torch.no_grad():
        torch.onnx.export(model, (torch.randn(1, 64, 16),), str(tmp_path / "m.onnx"), dynamo=False)
    import onnx
    assert [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node] in (["Gemm"], ["MatMul", "Add"])
