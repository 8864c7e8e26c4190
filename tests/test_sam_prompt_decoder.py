"""SamPromptDecoder: the same numbers as segment_anything's own prompt encoder + mask decoder calls."""
import pytest
import torch

from flmm_ros.grounding.sam.prompt_decoder import SamPromptDecoder
from flmm_ros.grounding.sam.models import SAM_PRESETS, TINY_TEST_SAM, SamArch, build_sam

# vit_b's prompt encoder and mask decoder; a 1-block encoder keeps the build fast (the decoder does not see it).
VIT_B_DECODER = SamArch(**{**SAM_PRESETS["vit_b"].to_dict(), "encoder_depth": 1, "encoder_global_attn_indexes": (0,)})


def _randomise_prompt_weights(sam):
    """SAM initialises some embeddings to the same values; random ones make the comparison meaningful."""
    with torch.no_grad():
        for p in list(sam.prompt_encoder.parameters()) + list(sam.mask_decoder.parameters()):
            p.normal_(0, 0.2)


def _inputs(sam, num_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    pe = sam.prompt_encoder
    h, w = pe.image_embedding_size
    size = pe.input_image_size[0]
    return (torch.randn(1, pe.embed_dim, h, w, generator=g),
            3 * torch.randn(1, 1, *pe.mask_input_size, generator=g),
            torch.tensor([[0.1 * size, 0.25 * size, 0.6 * size, 0.9 * size]]),
            torch.randn(1, num_tokens, pe.embed_dim, generator=g))


def _segment_anything_reference(sam, image_embeddings, mask_input, box, text_tokens):
    """F-LMM's SAMWrapper.forward sequence on segment_anything's public modules."""
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=mask_input)
    sparse = torch.cat([sparse, text_tokens], dim=1)
    return sam.mask_decoder(image_embeddings=image_embeddings, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)


def _sam(arch):
    torch.manual_seed(0)
    model = build_sam(arch)
    _randomise_prompt_weights(model)
    return model


@pytest.fixture(scope="module")
def sam():
    return _sam(TINY_TEST_SAM)


@pytest.fixture(scope="module")
def vit_b_sam():
    return _sam(VIT_B_DECODER)


@pytest.mark.parametrize("num_tokens", [1, 2, 9, 64])
def test_equals_segment_anything_call_sequence(sam, num_tokens):
    _check_equal(sam, num_tokens)


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_equals_segment_anything_call_sequence_vit_b(vit_b_sam, num_tokens):
    _check_equal(vit_b_sam, num_tokens)


def _check_equal(sam, num_tokens):
    inputs = _inputs(sam, num_tokens)
    with torch.no_grad():
        logits, iou = SamPromptDecoder(sam)(*inputs)
        ref_logits, ref_iou = _segment_anything_reference(sam, *inputs)
    mask_hw = tuple(sam.prompt_encoder.mask_input_size)
    assert logits.shape == (1, 1, *mask_hw) and iou.shape == (1, 1)
    assert torch.equal(logits, ref_logits)
    assert torch.equal(iou, ref_iou)


def test_every_prompt_changes_the_output(sam):
    """Box, dense mask and text tokens all reach the mask (no prompt silently dropped)."""
    decoder = SamPromptDecoder(sam)
    base = _inputs(sam, 3)
    with torch.no_grad():
        reference = decoder(*base)[0]
        for index in (1, 2, 3):
            changed = list(base)
            changed[index] = changed[index] * 0.5 + 1.0
            assert not torch.allclose(decoder(*changed)[0], reference), f"input {index} has no effect"


def test_shares_parameters_with_sam(sam):
    decoder = SamPromptDecoder(sam)
    assert decoder.prompt_encoder is sam.prompt_encoder and decoder.mask_decoder is sam.mask_decoder
    inputs = _inputs(sam, 2)
    with torch.no_grad():
        before = decoder(*inputs)[0].clone()
        sam.mask_decoder.iou_token.weight.add_(0)  # same values: same output
        assert torch.equal(decoder(*inputs)[0], before)
        saved = sam.mask_decoder.mask_tokens.weight.clone()
        sam.mask_decoder.mask_tokens.weight.mul_(2.0)
        changed = decoder(*inputs)[0]
        sam.mask_decoder.mask_tokens.weight.copy_(saved)
    assert not torch.equal(changed, before)


def test_differentiable_for_training():
    torch.manual_seed(0)
    sam = build_sam(TINY_TEST_SAM)
    image_embeddings, mask_input, box, text_tokens = _inputs(sam, 4)
    mask_input.requires_grad_(True)
    text_tokens.requires_grad_(True)
    logits, iou = SamPromptDecoder(sam)(image_embeddings, mask_input, box, text_tokens)
    (logits.sum() + iou.sum()).backward()
    assert mask_input.grad.abs().sum() > 0
    assert text_tokens.grad.abs().sum() > 0
    assert sam.mask_decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    assert sam.prompt_encoder.mask_downscaling[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in sam.image_encoder.parameters())
