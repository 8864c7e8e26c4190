"""The tracker's cheaper SAM resizes (grounding/sam/resize.py) against the resizes they replace."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
from flmm_ros.grounding.sam.prompts import SamPromptGeometry
from flmm_ros.grounding.sam.resize import SamResizeMaps, resize_image

# (SAM input size, low-res / prompt size, image size): the tiny and the real (1024) SAM, odd and extreme shapes
GEOMETRIES = [(256, 64, (480, 640)), (1024, 256, (480, 640)), (1024, 256, (1080, 1920)), (256, 64, (300, 200)),
              (1024, 256, (333, 499)), (256, 64, (7, 7)), (1024, 256, (8, 4000))]


def _maps(size, low, image_hw):
    input_hw = ResizeLongestSide.get_preprocess_shape(*image_hw, size)
    return SamResizeMaps(size, (low, low), input_hw, image_hw, (low, low)), input_hw


def _windows(image_hw):
    h, w = image_hw
    return [(0, 0, w, h), (w // 3, h // 4, w // 2 + 1, h - 1), (w - 1, h - 1, w, h), (0, 0, 1, h)]


@pytest.mark.parametrize("size, low, image_hw", GEOMETRIES)
def test_postprocess_window_is_sams_postprocess_masks_cut_to_the_window(size, low, image_hw):
    maps, input_hw = _maps(size, low, image_hw)
    logits = torch.randn(low, low, generator=torch.Generator().manual_seed(0)) * 10
    up = F.interpolate(logits[None, None], (size, size), mode="bilinear", align_corners=False)
    full = F.interpolate(up[..., :input_hw[0], :input_hw[1]], image_hw, mode="bilinear", align_corners=False)[0, 0]
    for x0, y0, x1, y1 in _windows(image_hw):
        got = maps.postprocess(logits.numpy(), (x0, y0, x1, y1))
        assert got.shape == (y1 - y0, x1 - x0) and got.dtype == np.float32
        # float rounding of the same weights: ~1e-5 of the logits' range (40), not a shifted pixel
        assert np.allclose(got, full[y0:y1, x0:x1].numpy(), atol=2e-3, rtol=0), (x0, y0, x1, y1)


@pytest.mark.parametrize("size, low, image_hw", GEOMETRIES)
@pytest.mark.parametrize("kind", ["blob", "empty", "whole image"])
def test_mask_prompt_is_dense_prompts_of_the_masks_logits(size, low, image_hw, kind):
    """The dense prompt of a +-8 mask, also when the mask is the whole image (then the padding is -1, not -8)."""
    sam = build_sam(TINY_TEST_SAM) if size == TINY_TEST_SAM.image_size else None
    maps, input_hw = _maps(size, low, image_hw)
    h, w = image_hw
    generator = torch.Generator().manual_seed(1)
    for x0, y0, x1, y1 in _windows(image_hw) if kind == "blob" else [(0, 0, w, h)]:
        mask = torch.zeros(image_hw, dtype=torch.bool)
        if kind == "blob":
            mask[y0:y1, x0:x1] = torch.rand(y1 - y0, x1 - x0, generator=generator) > 0.3
        elif kind == "whole image":
            mask[:] = True
        logits = torch.where(mask, 8.0, -8.0)[None]
        expected = _dense_prompts(logits, input_hw, size, low) if sam is None else \
            SamPromptGeometry(sam).dense_prompts(logits, input_hw)
        got = maps.mask_prompt(mask[y0:y1, x0:x1].numpy(), (x0, y0, x1, y1), 8.0)
        assert got.shape == (low, low) and got.dtype == np.float32, (x0, y0, x1, y1)
        assert np.allclose(got, expected[0, 0].numpy(), atol=1e-3, rtol=0), (x0, y0, x1, y1)


def _dense_prompts(coarse, input_hw, size, low):
    """SamPromptGeometry.dense_prompts for a SAM of any input size (its arithmetic, without a model)."""
    pad = min(-1.0, coarse.min().item())
    masks = F.interpolate(coarse[:, None].float(), size=input_hw, mode="bilinear")
    masks = F.pad(masks, (0, size - input_hw[1], 0, size - input_hw[0]), value=pad)
    return F.interpolate(masks, size=(low, low), mode="bilinear")


@pytest.mark.parametrize("image_hw, size", [((480, 640), 256), ((480, 640), 1024), ((333, 517), 256), ((37, 53), 256)])
def test_torch_image_resize_is_within_a_grey_level_or_two_of_pils(image_hw, size):
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    ramp = (np.add.outer(np.arange(image_hw[0]), np.arange(image_hw[1]))[..., None] * [1, 2, 3] % 256).astype(np.uint8)
    for image in (noise, ramp):
        expected = ResizeLongestSide(size).apply_image(image).astype(int)
        got = resize_image(image, expected.shape[:2]).permute(1, 2, 0).numpy().astype(int)
        diff = np.abs(got - expected)
        assert got.shape == expected.shape and diff.max() <= 2 and diff.mean() < 0.05
    read_only = noise.copy()
    read_only.flags.writeable = False             # as a view of a message buffer is
    assert torch.equal(resize_image(read_only, expected.shape[:2]), resize_image(noise, expected.shape[:2]))


def test_preprocess_with_torchs_resize_is_close_to_pils_and_a_wrong_name_is_refused():
    prompts = SamPromptGeometry(build_sam(TINY_TEST_SAM))
    image = np.random.default_rng(4).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exact, hw = prompts.preprocess(image)
    fast, fast_hw = prompts.preprocess(image, resize="torch")
    # one grey level is 1 / std ~ 0.017 after normalisation
    assert fast_hw == hw and fast.shape == exact.shape and (fast - exact).abs().max() < 0.04
    with pytest.raises(ValueError, match="resize must be"):
        prompts.preprocess(image, resize="cv2")


def test_the_pipeline_resizes_sams_input_as_configured(tmp_path):
    """`sam_resize`: torch by default, PIL (F-LMM's input bit for bit) on request; anything else is refused."""
    from pathlib import Path

    from flmm_ros.grounding.config import PipelineConfig
    from flmm_ros.grounding.pipeline import GroundingPipeline
    from flmm_ros.grounding.types import GroundingError
    bundle = str(Path(__file__).resolve().parents[1] / "ros_ws/src/flmm_ros/models/tabletop_tiny")
    image = np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8)   # downscaled: they differ
    for resize in ("torch", "pil"):
        config = PipelineConfig(model=bundle, answer=False, engine_dir=str(tmp_path), backend="torch",
                                **({} if resize == "torch" else {"sam_resize": resize}))
        pipe = GroundingPipeline.from_config(config)
        with torch.no_grad():
            expected = pipe.refiner.encode(image, resize).embedding
            other = pipe.refiner.encode(image, "pil" if resize == "torch" else "torch").embedding
            got = pipe.encode(image).sam.embedding
        assert torch.equal(got, expected) and not torch.equal(got, other)
    with pytest.raises(GroundingError, match="sam_resize 'cv2' is not one of"):
        PipelineConfig(model=bundle, sam_resize="cv2").validate()
