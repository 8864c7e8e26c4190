"""Safe checkpoint loading: F-LMM's released layout, official SAM files, our safetensors format."""
import json
import pathlib

import pytest
import torch
from safetensors.torch import save_file

from flmm_ros.grounding.checkpoint import (LoadReport, load_flmm_checkpoint, load_head, load_sam_weights,
                                           read_metadata, read_state_dict, save_head)
from flmm_ros.grounding.head import GroundingHead
from flmm_ros.grounding.sam.models import TINY_TEST_SAM, SamArch, build_sam
from flmm_ros.grounding.types import GroundingError

# LLaVA-1.5-7B: 32 layers x 32 heads, hidden size 4096; F-LMM uses SAM ViT-L.
LLAVA_7B = dict(in_channels=32 * 32, lmm_hidden_size=4096, num_text_layers=32, sam_arch="vit_l")


def flmm_release_state(head: GroundingHead) -> dict:
    """A fake F-LMM release for `head`'s model: what F-LMM's runner saves for FrozenLlavaSAM is only the
    trainable parameters (the LMM and the SAM image encoder are frozen; buffers are not parameters),
    with SAM under `sam.model.`. Values are fresh random numbers, so loading them is visible."""
    state = {}
    for name, p in head.named_parameters():
        if name.startswith("sam.image_encoder."):
            continue
        state[name.replace("sam.", "sam.model.", 1) if name.startswith("sam.") else name] = torch.randn_like(p)
    return state


@pytest.fixture(scope="module")
def llava_7b_flmm(tmp_path_factory):
    """A randomly initialised 7B-shaped head and a fake F-LMM release for it."""
    head = GroundingHead(**LLAVA_7B)
    state = flmm_release_state(head)
    path = tmp_path_factory.mktemp("flmm") / "frozen_llava_1_5_vicuna_7b_unet_sam_l_refcoco_png.pth"
    torch.save({"state_dict": state}, path)
    return head, state, path


def test_flmm_release_layout_is_the_documented_one(llava_7b_flmm):
    _, state, _ = llava_7b_flmm
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert shapes["mask_head.encoder.0.0.convs.0.conv.weight"] == (64, 1024, 3, 3)
    assert shapes["mask_head.encoder.3.1.convs.1.gn.bias"] == (512,)
    assert shapes["mask_head.decoder.0.upsample.interp_upsample.1.conv.weight"] == (64, 128, 1, 1)
    assert shapes["mask_head.conv_seg.weight"] == (1, 64, 1, 1)
    assert shapes["text_proj.weight"] == (256, 4096) and shapes["text_layer_weights"] == (32,)
    assert shapes["sam.model.mask_decoder.iou_token.weight"] == (1, 256)
    assert shapes["sam.model.prompt_encoder.mask_downscaling.0.weight"] == (4, 1, 2, 2)
    assert {k.split(".")[0] for k in state} == {"mask_head", "text_proj", "text_layer_weights", "sam"}
    assert {k.split(".")[2] for k in state if k.startswith("sam.")} == {"prompt_encoder", "mask_decoder"}


def test_flmm_release_loads_without_missing_or_unexpected_keys(llava_7b_flmm):
    target, state, path = llava_7b_flmm
    report = load_flmm_checkpoint(target, path)
    assert report.missing == [] and report.unexpected == [] and report.shape_mismatches == []
    assert len(report.loaded) == len(state)
    target_state = target.state_dict()
    for flmm_name, tensor in state.items():
        assert torch.equal(target_state[flmm_name.replace("sam.model.", "sam.", 1)], tensor), flmm_name
    assert "loaded" in str(report) and "missing" not in str(report)


def test_extra_lmm_keys_are_reported_not_fatal(llava_7b_flmm, tmp_path):
    target, state, _ = llava_7b_flmm
    extra = dict(state)
    extra["llava.language_model.model.norm.weight"] = torch.ones(4096)
    del extra["text_layer_weights"]
    path = tmp_path / "with_lmm.pth"
    torch.save(extra, path)  # a plain state dict, as scripts/deepspeed2torch_state_dict.py writes
    report = load_flmm_checkpoint(target, path)
    assert report.unexpected == ["llava.language_model.model.norm.weight"]
    assert report.missing == ["text_layer_weights"]
    text = str(report)
    assert "1 missing: text_layer_weights" in text and "llava.language_model.model.norm.weight" in text


def test_checkpoint_for_another_lmm_is_refused_with_the_sizes(llava_7b_flmm, tmp_path):
    target, state, _ = llava_7b_flmm
    # LLaVA-1.5-13B: 40 layers x 40 heads, hidden size 5120.
    other = dict(state)
    other["mask_head.encoder.0.0.convs.0.conv.weight"] = torch.zeros(64, 1600, 3, 3)
    other["text_proj.weight"] = torch.zeros(256, 5120)
    other["text_layer_weights"] = torch.ones(40)
    path = tmp_path / "frozen_llava_1_5_vicuna_13b.pth"
    torch.save({"state_dict": other}, path)
    before = target.text_proj.weight.clone()
    with pytest.raises(GroundingError) as error:
        load_flmm_checkpoint(target, path)
    message = str(error.value)
    assert "different LMM" in message
    assert "attention channels (LMM layers x heads): this model has 1024, the checkpoint 1600" in message
    assert "LMM hidden size: this model has 4096, the checkpoint 5120" in message
    assert "LMM layers: this model has 32, the checkpoint 40" in message
    assert torch.equal(target.text_proj.weight, before)  # nothing half-loaded


def test_a_sam_checkpoint_is_not_a_grounding_head(tmp_path):
    head = GroundingHead(6, 16, 3, TINY_TEST_SAM, {"base_channels": 8})
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(build_sam(TINY_TEST_SAM).state_dict(), path)
    with pytest.raises(GroundingError, match="not a grounding-head checkpoint.*looks like a SAM checkpoint"):
        load_flmm_checkpoint(head, path)


@pytest.mark.parametrize("name, content", [
    ("notes.pth", b"hello, this is a text file\n"),
    ("random.pth", bytes(range(256)) * 8),
    ("random.safetensors", bytes(range(256)) * 8),
    ("list.pt", None),
])
def test_files_that_are_not_checkpoints_give_clear_errors(tmp_path, name, content):
    path = tmp_path / name
    if content is None:
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(content)
    with pytest.raises(GroundingError, match=r"not a (readable PyTorch checkpoint|valid safetensors file)|no named tensors"):
        read_state_dict(path)


def test_truncated_and_missing_files(tmp_path):
    full = tmp_path / "full.pth"
    torch.save({"w": torch.randn(1000)}, full)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(GroundingError, match="corrupt, truncated"):
        read_state_dict(truncated)
    with pytest.raises(GroundingError, match="checkpoint not found"):
        read_state_dict(tmp_path / "absent.pth")
    other = tmp_path / "weights.npz"
    other.write_bytes(b"x")
    with pytest.raises(GroundingError, match="unsupported checkpoint type"):
        read_state_dict(other)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickles_with_custom_objects_are_refused_and_not_executed(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"text_layer_weights": torch.ones(3)}, "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(GroundingError, match="refusing to load .*arbitrary code"):
        read_state_dict(path)
    assert not marker.exists()


def test_wrappers_and_ddp_prefix_are_unwrapped(tmp_path):
    path = tmp_path / "wrapped.pth"
    torch.save({"meta": {"iter": 5}, "model": {"module.a": torch.ones(2), "module.b": torch.zeros(1)}}, path)
    assert set(read_state_dict(path)) == {"a", "b"}


def test_official_sam_layout_loads(tmp_path):
    source, target = build_sam(TINY_TEST_SAM), build_sam(TINY_TEST_SAM)
    path = tmp_path / "sam_vit_tiny.pth"
    torch.save(source.state_dict(), path)
    report = load_sam_weights(target, path)
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(source.state_dict())
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_sam_vit_size_mismatch_is_named(tmp_path):
    wider = SamArch(**{**TINY_TEST_SAM.to_dict(), "encoder_embed_dim": 48, "encoder_depth": 3,
                       "encoder_global_attn_indexes": (2,)})
    path = tmp_path / "sam_other.pth"
    torch.save(build_sam(wider).state_dict(), path)
    with pytest.raises(GroundingError, match=r"embed dim 48, 3 blocks\) image encoder but the model is .*embed dim 32, 2 blocks"):
        load_sam_weights(build_sam(TINY_TEST_SAM), path)


def test_sam_loader_rejects_a_head_checkpoint(tmp_path):
    path = tmp_path / "head.pth"
    torch.save({"text_proj.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(GroundingError, match="not a SAM checkpoint"):
        load_sam_weights(build_sam(TINY_TEST_SAM), path)


def tiny_head():
    return GroundingHead(6, 16, 3, TINY_TEST_SAM, {"base_channels": 8})


def test_safetensors_round_trip_is_exact(tmp_path):
    source, target = tiny_head(), tiny_head()
    with torch.no_grad():
        source.text_layer_weights.normal_()
    path = tmp_path / "head.safetensors"
    save_head(source, path, metadata={"lmm": "tiny-llava", "step": "120"})
    report = load_head(target, path)
    assert report.missing == [] and report.unexpected == []
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    meta = read_metadata(path)
    assert meta["lmm"] == "tiny-llava" and meta["step"] == "120"
    rebuilt = GroundingHead.from_config(json.loads(meta["head_config"]))
    load_head(rebuilt, path)
    assert torch.equal(rebuilt.text_layer_weights, source.text_layer_weights)
    assert not list(tmp_path.glob("*.partial"))


def test_save_without_image_encoder(tmp_path):
    source, target = tiny_head(), tiny_head()
    encoder_before = {k: v.clone() for k, v in target.sam.image_encoder.state_dict().items()}
    path = tmp_path / "head_small.safetensors"
    save_head(source, path, include_image_encoder=False)
    assert not any(k.startswith("sam.image_encoder.") for k in read_state_dict(path))
    report = load_head(target, path)
    assert report.missing == []
    assert all(torch.equal(target.sam.image_encoder.state_dict()[k], v) for k, v in encoder_before.items())
    torch.testing.assert_close(target.text_proj.weight, source.text_proj.weight, rtol=0, atol=0)


def test_load_head_strictness_and_bad_metadata(tmp_path):
    head = tiny_head()
    state = {k: v.contiguous() for k, v in head.state_dict().items() if k != "text_layer_weights"}
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    with pytest.raises(GroundingError, match="1 missing: text_layer_weights"):
        load_head(tiny_head(), path)
    assert load_head(tiny_head(), path, strict=False).missing == ["text_layer_weights"]
    with pytest.raises(GroundingError, match="str to str"):
        save_head(head, tmp_path / "x.safetensors", metadata={"step": 3})
    with pytest.raises(GroundingError, match=r"\.safetensors"):
        save_head(head, tmp_path / "x.pth")


def test_report_text_is_readable():
    report = LoadReport(loaded=["a"], missing=[f"m{i}" for i in range(12)], unexpected=["u"],
                        shape_mismatches=[("w", (2, 3), (2, 4))])
    text = str(report)
    assert text.startswith("loaded 1 tensors; 12 missing: m0, m1")
    assert "and 4 more" in text and "1 unexpected (ignored): u" in text
    assert "w expects [2, 3], file has [2, 4]" in text
