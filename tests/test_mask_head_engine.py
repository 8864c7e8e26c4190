"""The U-Net mask head on ONNX Runtime: parity with UNetHead (<= 1e-4 in logits, the same masks), the
content-keyed export cache, input checks, and the CPU session settings."""
import pytest
import torch

from flmm_ros.grounding import mask_head_engine, onnx_runtime
from flmm_ros.grounding.mask_head import UNetHead
from flmm_ros.grounding.mask_head_engine import MaskHeadEngine
from flmm_ros.grounding.types import GroundingError


def _head(in_channels=16, base_channels=8, seed=0):
    torch.manual_seed(seed)
    head = UNetHead(in_channels, base_channels=base_channels).eval()
    with torch.no_grad():   # GroupNorm starts at weight 1, bias 0; random affine values exercise more of it
        for m in head.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1, 0.3)
                m.bias.normal_(0, 0.3)
    return head


def _maps(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h * w, generator=g).softmax(-1).reshape(n, c, h, w)   # attention-like rows


@pytest.mark.parametrize("in_channels,base,hw,counts", [
    (16, 32, (12, 12), (1, 3)),        # the embedded tabletop-tiny head: 4 layers x 4 heads, 12x12 tokens
    (8, 8, (24, 24), (1, 2, 5)),       # LLaVA-1.5's 24x24 grid
    (8, 8, (9, 13), (2,)),             # not a multiple of 8 after upsampling: padding and crop in the graph
    (8, 8, (80, 72), (1,)),            # larger than 64: no upsampling
])
def test_engine_matches_unet_head(tmp_path, in_channels, base, hw, counts):
    head = _head(in_channels, base)
    engine = MaskHeadEngine(head, tmp_path)
    for n in counts:
        maps = _maps(n, in_channels, *hw, seed=n)
        with torch.no_grad():
            expected = head(maps)
        got = engine(maps)
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert (got - expected).abs().max().item() <= 1e-4
        assert torch.equal(got > 0, expected > 0)                 # identical masks


def test_export_is_cached_by_content(tmp_path, monkeypatch):
    exports = []
    real_export = mask_head_engine.export_mask_head
    monkeypatch.setattr(mask_head_engine, "export_mask_head", lambda *a: exports.append(a[1]) or real_export(*a))
    head, maps = _head(), _maps(1, 16, 12, 12)
    MaskHeadEngine(head, tmp_path)(maps)
    MaskHeadEngine(head, tmp_path)(maps)                         # same weights, same size: reused
    assert exports == [(64, 64)]
    MaskHeadEngine(head, tmp_path)(_maps(1, 16, 24, 24))         # 24x24 upsamples to 64x64 too: reused
    MaskHeadEngine(head, tmp_path)(_maps(1, 16, 80, 80))         # another size: a new graph
    assert exports == [(64, 64), (80, 80)]
    with torch.no_grad():
        head.conv_seg.bias += 1.0                                # new weights: a new graph, new logits
    engine = MaskHeadEngine(head, tmp_path)
    got = engine(maps)
    assert exports == [(64, 64), (80, 80), (64, 64)]
    with torch.no_grad():
        assert (got - head(maps)).abs().max().item() <= 1e-4
    assert len(list((tmp_path / "onnx").glob("mask_head-*"))) == 3


@pytest.mark.parametrize("bad,message", [
    (torch.rand(1, 15, 12, 12), "built for 16 attention channels"),
    (torch.rand(16, 12, 12), r"shaped \(N, C, h, w\)"),
    (torch.full((1, 16, 12, 12), 2.0), r"probabilities in \[0, 1\]"),
    (torch.full((1, 16, 12, 12), float("nan")), "NaN"),
])
def test_bad_maps_are_rejected_like_the_torch_head(tmp_path, bad, message):
    with pytest.raises(GroundingError, match=message):
        MaskHeadEngine(_head(), tmp_path)(bad)


def test_only_a_unet_head_is_accepted(tmp_path):
    with pytest.raises(GroundingError, match="needs a UNetHead"):
        MaskHeadEngine(torch.nn.Linear(2, 2), tmp_path)


def test_sessions_do_not_spin_and_follow_torchs_thread_count(monkeypatch):
    monkeypatch.delenv(onnx_runtime.THREADS_ENV, raising=False)
    options = onnx_runtime.session_options()
    assert options.intra_op_num_threads == torch.get_num_threads()
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "1")
    assert onnx_runtime.session_options().intra_op_num_threads == 1
    monkeypatch.setenv(onnx_runtime.THREADS_ENV, "two")
    with pytest.raises(GroundingError, match="positive integer"):
        onnx_runtime.session_options()
