"""Region input: the click / box prompt checks and the visual prompts' geometry (grounding/region.py), and SAM's
segmentation of a click or a box (grounding/sam/region.py) against segment-anything's own predictor."""
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from flmm_ros.grounding.region import (
    HIGHLIGHT_KEEP, MARKER_RGB, MIN_CROP_FRACTION, RegionPrompt, best_match, box_iou, crop_window, draw_marker,
    highlight_region, visual_prompt)
from flmm_ros.grounding.sam.backends import TorchBackend
from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
from flmm_ros.grounding.sam.refiner import SamRefiner
from flmm_ros.grounding.sam.region import segment_region
from flmm_ros.grounding.types import GroundedObject, GroundingError


def image(hw=(60, 90), seed=0):
    return np.random.default_rng(seed).integers(0, 256, (*hw, 3), dtype=np.uint8)


# ---- prompts -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("point, box, message", [
    (None, None, "needs a point"),
    ((90, 10), None, "outside"), ((-1, 10), None, "outside"), ((5, 60), None, "outside"),
    (("a", 3), None, "2 numbers"), ((1, 2, 3), None, "2 finite numbers"), ((float("nan"), 2), None, "finite"),
    (None, (10, 10, 10, 20), "empty"), (None, (20, 10, 10, 20), "empty"), (None, (95, 0, 99, 5), "outside"),
    (None, (1, 2, 3), "4 finite numbers"),
])
def test_bad_region_prompts_are_refused_clearly(point, box, message):
    with pytest.raises(GroundingError, match=message):
        RegionPrompt.check(point, box, (60, 90))


def test_a_box_is_clipped_to_the_image_and_an_unknown_prompting_refused():
    assert RegionPrompt.check(None, (-5, -5, 30, 100), (60, 90)).box == (0.0, 0.0, 30.0, 60.0)
    with pytest.raises(GroundingError, match="prompting 'arrow' is not one of"):
        RegionPrompt.check((3, 3), None, (60, 90), "arrow")


def test_holds_means_the_click_is_inside_or_the_box_overlaps():
    mask = np.zeros((60, 90), bool)
    mask[10:30, 20:50] = True
    assert RegionPrompt.check((25, 15), None, (60, 90)).holds(mask)
    assert not RegionPrompt.check((60, 15), None, (60, 90)).holds(mask)
    assert RegionPrompt.check(None, (18, 8, 52, 32), (60, 90)).holds(mask)       # box IoU 0.71
    assert not RegionPrompt.check(None, (20, 10, 35, 20), (60, 90)).holds(mask)  # box IoU 0.25
    assert not RegionPrompt.check(None, (20, 10, 35, 20), (60, 90)).holds(np.zeros((60, 90), bool))
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_an_empty_sam_mask_falls_back_to_the_box_or_a_square_around_the_click():
    empty = GroundedObject("region", np.zeros((60, 90), np.uint8), (0, 0, 0, 0), 0.0)
    mask, box = RegionPrompt.check(None, (10.5, 20, 30, 40.2), (60, 90)).mask_and_box(empty)
    assert box == (10, 20, 30, 41) and mask.sum() == 20 * 21 and mask[20:41, 10:30].all()
    mask, box = RegionPrompt.check((45, 30), None, (60, 90)).mask_and_box(empty)   # a 6x6 square (0.1 of 60)
    assert box == (42, 27, 49, 34) and mask[30, 45] and mask.sum() == 49
    full = np.zeros((60, 90), np.uint8)
    full[5:9, 6:8] = 255
    mask, box = RegionPrompt.check((45, 30), None, (60, 90)).mask_and_box(GroundedObject("r", full, (6, 5, 8, 9), 1))
    assert box == (6, 5, 8, 9) and mask.sum() == 8


# ---- visual prompts ----------------------------------------------------------------------------------------
def test_the_crop_is_a_square_around_the_region_inside_the_image():
    window = crop_window((40, 20, 50, 30), (60, 90))          # 10 px box: 2x = 20 < 0.35 * 60 = 21
    x0, y0, x1, y1 = window
    assert x1 - x0 == y1 - y0 == 21 and x0 <= 40 and x1 >= 50 and y0 <= 20 and y1 >= 30
    assert abs((x0 + x1) / 2 - 45) <= 1 and abs((y0 + y1) / 2 - 25) <= 1
    assert crop_window((40, 20, 60, 30), (60, 90)) == (30, 5, 70, 45)            # 2 x the longer side, centred
    assert crop_window((0, 0, 10, 10), (60, 90)) == (0, 0, 21, 21)               # shifted, not cut, at an edge
    assert crop_window((80, 50, 90, 60), (60, 90)) == (69, 39, 90, 60)
    assert crop_window((0, 0, 80, 50), (60, 90)) == (0, 0, 90, 60)               # larger than the image: cut
    assert MIN_CROP_FRACTION * 60 == pytest.approx(21)


def test_visual_prompts_show_the_region_and_keep_its_mask_in_the_picture():
    rgb = image()
    mask = np.zeros((60, 90), bool)
    mask[20:30, 40:50] = True
    crop = visual_prompt(rgb, mask, (40, 20, 50, 30), "crop")
    x0, y0, x1, y1 = crop.window
    np.testing.assert_array_equal(crop.image, rgb[y0:y1, x0:x1])
    assert crop.mask.shape == crop.image.shape[:2] and crop.mask.sum() == 100
    for prompting in ("marker", "highlight", "none"):
        view = visual_prompt(rgb, mask, (40, 20, 50, 30), prompting)
        assert view.window == (0, 0, 90, 60) and view.mask is mask and view.image.shape == rgb.shape
    np.testing.assert_array_equal(visual_prompt(rgb, mask, (40, 20, 50, 30), "none").image, rgb)
    with pytest.raises(GroundingError, match="not one of"):
        visual_prompt(rgb, mask, (40, 20, 50, 30), "arrow")


def test_the_marker_is_a_red_ellipse_around_the_box_and_the_input_is_untouched():
    rgb = np.full((60, 90, 3), 128, np.uint8)
    out = draw_marker(rgb, (40, 20, 50, 30))
    assert (rgb == 128).all()
    changed = (out != 128).any(axis=2)
    ys, xs = np.nonzero(changed)
    # Half-axes 5 * 1.25 = 6 px (rounded) around the centre (45, 25); a 2 px line, anti-aliased.
    assert 37 <= xs.min() <= 39 and 51 <= xs.max() <= 53 and 17 <= ys.min() <= 19 and 31 <= ys.max() <= 33
    assert not changed[23:28, 43:48].any()                          # the object itself stays visible
    assert tuple(out[25, xs.min() + 1]) == MARKER_RGB or out[25, xs.min():xs.min() + 3, 0].max() == 255


def test_highlight_keeps_the_region_and_greys_and_darkens_the_rest():
    rgb = image()
    mask = np.zeros((60, 90), bool)
    mask[20:30, 40:50] = True
    out = highlight_region(rgb, mask)
    np.testing.assert_array_equal(out[mask], rgb[mask])
    outside = out[~mask].astype(int)
    assert (outside[:, 0] == outside[:, 1]).all() and (outside[:, 1] == outside[:, 2]).all()
    expected = np.round(rgb[~mask].astype(np.float32).mean(axis=1) * HIGHLIGHT_KEEP)
    assert np.abs(outside[:, 0] - expected).max() <= 1


def test_best_match_picks_the_mask_with_the_highest_iou_or_none():
    region = np.zeros((10, 10), bool)
    region[2:6, 2:6] = True
    masks = np.zeros((3, 10, 10), bool)
    masks[0, 0:10, 0:10] = True       # IoU 0.16
    masks[1, 2:6, 3:7] = True         # IoU 0.6
    masks[2, 8:10, 8:10] = True       # no overlap
    best, iou = best_match(masks, region)
    assert best == 1 and iou == pytest.approx(12 / 20)
    assert best_match(masks[2:], region) == (None, 0.0)
    assert best_match(np.zeros((0, 10, 10), bool), region) == (None, 0.0)


# ---- SAM from a click or a box -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam():
    """Every tensor random (a fresh SAM has zero positional embeddings, which would hide frame mistakes), large
    enough that the masks depend on the prompt (at 0.1 the logits barely change with it)."""
    model = build_sam(TINY_TEST_SAM).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    return model


@pytest.mark.parametrize("point, box", [((20.0, 15.0), None), (None, (8.0, 5.0, 50.0, 30.0)),
                                        ((20.0, 15.0), (8.0, 5.0, 50.0, 30.0))])
def test_region_masks_are_segment_anythings_own_for_a_click_and_a_box(sam, point, box):
    rgb = image((40, 72), seed=1)
    refiner = SamRefiner(sam, TorchBackend(sam, torch.device("cpu"), "fp32"))
    predictor = SamPredictor(sam)
    with torch.no_grad():
        predictor.set_image(rgb)
        expected, scores, _ = predictor.predict(None if point is None else np.array([point]),
                                                None if point is None else np.array([1]),
                                                None if box is None else np.array(box),
                                                multimask_output=False, return_logits=True)
    logits, iou = segment_region(refiner, refiner.encode(rgb), point, box)
    assert logits.shape == (40, 72) and iou == pytest.approx(float(scores[0]), rel=1e-4)
    assert torch.allclose(logits, torch.from_numpy(expected[0]), atol=1e-3)       # logits ~12 in size
    other, _ = segment_region(refiner, refiner.encode(rgb), (60.0, 30.0), None)
    assert (other - logits).abs().max() > 0.05                     # the prompt is used


def test_segment_region_needs_a_prompt(sam):
    refiner = SamRefiner(sam, TorchBackend(sam, torch.device("cpu"), "fp32"))
    with pytest.raises(ValueError, match="point or a box"):
        segment_region(refiner, refiner.encode(image()), None, None)
