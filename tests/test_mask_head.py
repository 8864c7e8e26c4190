"""F-LMM's U-Net mask head (mmseg UNet layout), its input pipeline, and GroundingHead."""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from flmm_ros.grounding.head import GroundingHead
from flmm_ros.grounding.mask_head import UNetHead
from flmm_ros.grounding.sam.models import TINY_TEST_SAM
from flmm_ros.grounding.types import GroundingError


def mmseg_unet_layout(in_channels, base=64, stages=4):
    """Keys and shapes of mmseg 1.x UNet(strides 1, 2 convs, MaxPool downsampling, GN, InterpConv)
    + F-LMM's conv_seg, written out from mmseg's constructor (an independent description)."""
    layout = {}

    def conv_module(prefix, cin, cout, k):
        layout[f"{prefix}.conv.weight"] = (cout, cin, k, k)  # bias='auto': no bias before a norm
        layout[f"{prefix}.gn.weight"] = (cout,)
        layout[f"{prefix}.gn.bias"] = (cout,)

    cin = in_channels
    for i in range(stages):
        width = base * 2 ** i
        block = f"encoder.{i}.0" if i == 0 else f"encoder.{i}.1"  # encoder.{i}.0 is the MaxPool for i > 0
        conv_module(f"{block}.convs.0", cin, width, 3)
        conv_module(f"{block}.convs.1", width, width, 3)
        if i > 0:
            skip = width // 2
            conv_module(f"decoder.{i - 1}.conv_block.convs.0", 2 * skip, skip, 3)
            conv_module(f"decoder.{i - 1}.conv_block.convs.1", skip, skip, 3)
            conv_module(f"decoder.{i - 1}.upsample.interp_upsample.1", width, skip, 1)
        cin = width
    layout["conv_seg.weight"] = (1, base, 1, 1)
    layout["conv_seg.bias"] = (1,)
    return layout


def reference_forward(sd, maps, base=64, stages=4):
    """F-LMM UNetHead.forward re-derived with functional ops from the state dict."""
    def cm(x, prefix, k):
        x = F.conv2d(x, sd[f"{prefix}.conv.weight"], padding=k // 2)
        return F.relu(F.group_norm(x, 1, sd[f"{prefix}.gn.weight"], sd[f"{prefix}.gn.bias"]))

    h, w = maps.shape[-2:]
    x = maps / maps.sum((-2, -1), keepdim=True).clamp(min=1e-12)
    x = F.interpolate(x, scale_factor=max(1.0, 64 / max(h, w)), mode="bilinear")
    h, w = x.shape[-2:]
    d = 2 ** (stages - 1)
    x = F.pad(x, (0, math.ceil(w / d) * d - w, 0, math.ceil(h / d) * d - h))
    skips = []
    for i in range(stages):
        if i > 0:
            x = F.max_pool2d(x, 2)
        block = f"encoder.{i}.0" if i == 0 else f"encoder.{i}.1"
        x = cm(cm(x, f"{block}.convs.0", 3), f"{block}.convs.1", 3)
        skips.append(x)
    for i in reversed(range(stages - 1)):
        up = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        up = cm(up, f"decoder.{i}.upsample.interp_upsample.1", 1)
        x = torch.cat([skips[i], up], dim=1)
        x = cm(cm(x, f"decoder.{i}.conv_block.convs.0", 3), f"decoder.{i}.conv_block.convs.1", 3)
    return F.conv2d(x[..., :h, :w], sd["conv_seg.weight"], sd["conv_seg.bias"])


def attention_maps(n, c, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, c, h * w, generator=g), dim=-1).view(n, c, h, w)


@pytest.mark.parametrize("in_channels", [1024, 7])
def test_state_dict_matches_mmseg_unet_layout(in_channels):
    head = UNetHead(in_channels)
    got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert got == mmseg_unet_layout(in_channels)


def test_llava_7b_head_size_matches_flmm():
    head = UNetHead(1024)  # 32 layers x 32 heads
    n = sum(p.numel() for p in head.parameters())
    assert n == sum(math.prod(s) for s in mmseg_unet_layout(1024).values())
    assert abs(n - 7.77e6) < 0.01e6  # research/flmm.md §2: ~7.18M + 576 * C_in


def test_norms_are_affine_single_group_and_init_like_mmseg():
    head = UNetHead(8)
    norms = [m for m in head.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 4 * 2 + 3 * 3
    assert all(m.num_groups == 1 and m.affine for m in norms)
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in norms)
    assert torch.all(head.conv_seg.bias == 0)


def test_forward_matches_functional_reference():
    torch.manual_seed(0)
    head = UNetHead(6, base_channels=16).eval()
    for p in head.parameters():  # non-trivial norms so the reference also checks GN affine use
        p.data.normal_(0, 0.3)
    maps = attention_maps(2, 6, 24, 24)
    with torch.no_grad():
        got = head(maps)
        want = reference_forward(head.state_dict(), maps, base=16)
    assert got.shape == (2, 1, 64, 64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("hw, out_hw", [((24, 24), (64, 64)), ((32, 32), (64, 64)), ((28, 28), (64, 64)),
                                        ((20, 30), (42, 64)), ((64, 64), (64, 64)), ((80, 72), (80, 72)),
                                        ((49, 49), (63, 63))])
def test_output_size_follows_flmm_upsampling(hw, out_hw):
    head = UNetHead(3, base_channels=8).eval()
    with torch.no_grad():
        out = head(attention_maps(1, 3, *hw))
    assert out.shape == (1, 1, *out_hw)
    assert torch.isfinite(out).all()


def test_maps_are_normalised_by_their_sum():
    head = UNetHead(4, base_channels=8).eval()
    maps = attention_maps(1, 4, 24, 24)
    scaled = maps * torch.tensor([1.0, 0.5, 0.1, 0.9]).view(1, 4, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(head(maps), head(scaled), rtol=1e-4, atol=1e-5)
        zero = head(torch.zeros(1, 4, 24, 24))
    assert torch.isfinite(zero).all()
    unnormalised = UNetHead(4, base_channels=8, normalize_input=False).eval()
    unnormalised.load_state_dict(head.state_dict())
    with torch.no_grad():
        assert not torch.allclose(unnormalised(maps), unnormalised(scaled), atol=1e-3)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(4, 24, 24), "(N, C, h, w)"),
    (torch.rand(1, 5, 24, 24), "built for 4 attention channels"),
    (torch.rand(1, 4, 24, 24) + 1.5, "[0, 1]"),
    (-torch.rand(1, 4, 24, 24) - 0.1, "[0, 1]"),
    (torch.full((1, 4, 24, 24), float("nan")), "NaN"),
    (torch.rand(0, 4, 24, 24), "empty"),
])
def test_bad_input_is_rejected_clearly(bad, message):
    head = UNetHead(4, base_channels=8)
    with pytest.raises(GroundingError, match=re.escape(message)):
        head(bad)


def test_head_trains_and_runs_in_bfloat16():
    head = UNetHead(4, base_channels=8)
    out = head(attention_maps(2, 4, 24, 24))
    out.mean().backward()
    assert head.encoder[0][0].convs[0].conv.weight.grad.abs().sum() > 0
    head_bf16 = UNetHead(4, base_channels=8).to(torch.bfloat16).eval()
    with torch.no_grad():
        assert head_bf16(attention_maps(1, 4, 24, 24)).dtype == torch.bfloat16


# GroundingHead: the trainable F-LMM parts together.

def tiny_head(**kwargs):
    return GroundingHead(in_channels=6, lmm_hidden_size=16, num_text_layers=3, sam_arch=TINY_TEST_SAM,
                         mask_head_kwargs={"base_channels": 8}, **kwargs)


def test_grounding_head_names_and_frozen_image_encoder():
    head = tiny_head()
    keys = head.state_dict().keys()
    assert "text_layer_weights" in keys and "text_proj.weight" in keys
    assert "mask_head.encoder.0.0.convs.0.conv.weight" in keys
    assert {k.split(".")[1] for k in keys if k.startswith("sam.")} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    assert head.text_proj.out_features == TINY_TEST_SAM.prompt_embed_dim
    assert torch.equal(head.text_layer_weights.data, torch.ones(3))
    assert not any(p.requires_grad for p in head.sam.image_encoder.parameters())
    assert all(p.requires_grad for p in head.sam.mask_decoder.parameters())
    head.train()
    assert head.mask_head.training and not head.sam.image_encoder.training
    rebuilt = GroundingHead.from_config(head.config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in head.state_dict().items()}


def test_text_embeddings_mix_layers_with_softmax_weights_then_project():
    head = tiny_head()
    hidden = torch.randn(3, 5, 16)
    with torch.no_grad():
        # Equal logits: the plain mean over layers.
        torch.testing.assert_close(head.text_embeddings(hidden), head.text_proj(hidden.mean(0)))
        # One dominant logit: that layer alone.
        head.text_layer_weights.copy_(torch.tensor([0.0, 30.0, 0.0]))
        torch.testing.assert_close(head.text_embeddings(hidden), head.text_proj(hidden[1]), rtol=1e-4, atol=1e-5)
        out = head.text_embeddings(hidden.to(torch.bfloat16))
    assert out.shape == (5, TINY_TEST_SAM.prompt_embed_dim) and out.dtype == torch.float32


def test_text_embeddings_reject_wrong_shapes():
    head = tiny_head()
    with pytest.raises(GroundingError, match="3 LMM layers, got 4"):
        head.text_embeddings(torch.randn(4, 5, 16))
    with pytest.raises(GroundingError, match="hidden size 16, got 32"):
        head.text_embeddings(torch.randn(3, 5, 32))
