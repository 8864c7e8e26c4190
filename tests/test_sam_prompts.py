"""SAM's prompt geometry (grounding/sam/prompts.py): frames as segment-anything's own predictor, F-LMM's prompts."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.utils.transforms import ResizeLongestSide

from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
from flmm_ros.grounding.sam.prompts import SamPromptGeometry, box_above, mask_to_box


@pytest.fixture(scope="module")
def sam():
    """Every tensor random (a fresh SAM has zero positional embeddings, which would hide frame mistakes)."""
    model = build_sam(TINY_TEST_SAM).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return model


def test_frames_are_segment_anythings_own(sam):
    """Image, box and click prompts through the geometry give what SamPredictor gives for the same prompts."""
    image = np.random.default_rng(1).integers(0, 256, (40, 72, 3), dtype=np.uint8)
    prompts = SamPromptGeometry(sam)
    predictor = SamPredictor(sam)
    with torch.no_grad():
        predictor.set_image(image)
        x, input_hw = prompts.preprocess(image)
        embedding = sam.image_encoder(x)
        assert input_hw == predictor.input_size and torch.allclose(embedding, predictor.features, atol=1e-5)
        box, clicks, labels = np.array([8.0, 5.0, 50.0, 30.0]), np.array([[20.0, 15.0], [60.0, 35.0]]), np.array([1, 0])
        expected, _, _ = predictor.predict(clicks, labels, box, multimask_output=False, return_logits=True)
        points = (prompts.scale_points(torch.from_numpy(clicks)[None].float(), image.shape[:2]), torch.from_numpy(labels)[None])
        sparse, dense = sam.prompt_encoder(points=points, masks=None,
                                           boxes=prompts.scale_boxes(torch.from_numpy(box)[None].float(), image.shape[:2]))
        low, _ = sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
        ours = prompts.postprocess(low, input_hw, image.shape[:2])[0]
    assert ours.shape == (1, 40, 72) and torch.allclose(ours, torch.from_numpy(expected), atol=1e-4)


@pytest.mark.parametrize("image_hw", [(480, 640), (640, 480), (37, 53), (8, 4000)])
def test_preprocess_is_segment_anythings_bit_for_bit(sam, image_hw):
    """The in-place normalisation and padding give exactly `sam.preprocess` of the resized image."""
    prompts = SamPromptGeometry(sam)
    image = np.random.default_rng(2).integers(0, 256, (*image_hw, 3), dtype=np.uint8)
    resized = prompts.transform.apply_image(image)
    expected = sam.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
    x, input_hw = prompts.preprocess(image)
    assert input_hw == resized.shape[:2] and torch.equal(x, expected)


@pytest.mark.parametrize("image_hw", [(480, 640), (640, 480), (37, 53), (8, 4000)])
def test_box_and_point_scaling_is_resize_longest_sides_exactly(sam, image_hw):
    """segment-anything's arithmetic (without its deepcopy), bit for bit, on floats and integers; inputs untouched."""
    prompts = SamPromptGeometry(sam)
    g = torch.Generator().manual_seed(0)
    boxes = torch.rand(5, 4, generator=g) * torch.tensor([image_hw[1], image_hw[0]] * 2)
    points = torch.randint(0, min(image_hw), (2, 3, 2), generator=g)
    kept = boxes.clone()
    assert torch.equal(prompts.scale_boxes(boxes, image_hw), prompts.transform.apply_boxes_torch(boxes, image_hw))
    assert torch.equal(prompts.scale_points(points, image_hw), prompts.transform.apply_coords_torch(points, image_hw))
    assert torch.equal(boxes, kept)


def test_box_prompts_are_flmms_mask2box_of_the_coarse_mask_at_image_size(sam):
    prompts = SamPromptGeometry(sam)
    image_hw = (32, 48)
    coarse = torch.full((2, 8, 12), -10.0)
    coarse[0, 2:5, 3:9] = 10.0                     # an object; the second map is empty
    probs = F.interpolate(coarse[None].sigmoid(), size=image_hw, mode="bilinear")[0]
    ys, xs = np.nonzero((probs[0] > 0.5).numpy())
    expected = torch.tensor([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], [0, 0, 48, 32]], dtype=torch.float32)
    # ResizeLongestSide: the long side becomes the input size, the short one is rounded (32 -> 171, not 170.7).
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(*image_hw, TINY_TEST_SAM.image_size)
    assert (new_h, new_w) == (171, 256)
    scale = torch.tensor([new_w / 48, new_h / 32, new_w / 48, new_h / 32])
    boxes = prompts.boxes(coarse.requires_grad_(), image_hw)
    assert not boxes.requires_grad                              # gradient-free, as in F-LMM
    assert torch.allclose(boxes, expected * scale)
    assert mask_to_box(torch.zeros(4, 4, dtype=torch.bool)) is None


def test_mask_to_box_is_the_box_of_every_foreground_pixel():
    """mask2box over all foreground pixels (as np.nonzero lists them), for any mask shape."""
    g = torch.Generator().manual_seed(0)
    masks = [torch.rand(37, 53, generator=g) > t for t in (0.5, 0.99, 0.9999)]
    masks += [torch.ones(5, 7, dtype=torch.bool), torch.eye(6, dtype=torch.bool).flip(0)]
    single = torch.zeros(9, 11, dtype=torch.bool)
    single[8, 0] = True
    views = [masks[0].t(), masks[1][::2, 3:]]            # strided views, as slices of a batch are
    for mask in [*masks, single, *views]:
        ys, xs = np.nonzero(mask.numpy())
        if ys.size == 0:
            assert mask_to_box(mask) is None
            continue
        expected = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert mask_to_box(mask).tolist() == [float(v) for v in expected]


def test_box_above_a_threshold_is_the_box_of_the_thresholded_map():
    """box_above(p, t) == mask_to_box(p > t), values at the threshold included, on maps and strided views."""
    g = torch.Generator().manual_seed(1)
    maps = [torch.rand(37, 53, generator=g), torch.rand(37, 53, generator=g) ** 40, torch.full((5, 7), 0.5)]
    maps += [maps[0].t(), maps[1][::2, 3:], torch.zeros(4, 4)]
    for prob in maps:
        for threshold in (0.5, 0.9, 0.999):
            expected, got = mask_to_box(prob > threshold), box_above(prob, threshold)
            assert (got is None and expected is None) or torch.equal(got, expected)


@pytest.mark.parametrize("low, pad", [(2.0, -1.0), (-5.0, -5.0)])
def test_dense_prompts_pad_with_the_lower_of_minus_one_and_the_lowest_logit(sam, low, pad):
    """F-LMM's generate_prompt_masks: the square input's padding gets min(-1, min logit); gradients flow."""
    prompts = SamPromptGeometry(sam)
    coarse = torch.full((1, 8, 16), 3.0)
    coarse[0, 0, 0] = low
    coarse.requires_grad_()
    input_hw = (TINY_TEST_SAM.image_size // 2, TINY_TEST_SAM.image_size)    # a 1:2 image: bottom half padded
    dense = prompts.dense_prompts(coarse, input_hw)
    h = prompts.mask_prompt_size[0]
    assert dense.shape == (1, 1, *prompts.mask_prompt_size) and dense.requires_grad
    assert torch.all(dense[0, 0, h // 2 + 2:] == pad)
    assert torch.allclose(dense[0, 0, h // 4:h // 2 - 2, h // 2:-2], torch.tensor(3.0))   # away from the low corner
