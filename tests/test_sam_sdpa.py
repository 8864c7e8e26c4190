"""SAM's image-encoder attention on scaled_dot_product_attention: the same embeddings as segment-anything's own
attention (windowed and global blocks, relative positions), and switchable back."""
import torch
from segment_anything.modeling.image_encoder import Attention

from flmm_ros.grounding.sam.models import SAM_PRESETS, TINY_TEST_SAM, SamArch, build_sam
from flmm_ros.grounding.sam.sdpa import SdpaAttention, use_sdpa

# vit_b's width, heads, 14-token windows (padded) and rel-pos, cut to three blocks (the last one global), 448 px.
VIT_B_THREE_BLOCKS = SamArch(**{**SAM_PRESETS["vit_b"].to_dict(), "encoder_depth": 3,
                                "encoder_global_attn_indexes": (2,), "image_size": 448})


def test_sdpa_encoder_gives_segment_anythings_embeddings():
    for arch in (TINY_TEST_SAM, VIT_B_THREE_BLOCKS):
        torch.manual_seed(0)
        encoder = build_sam(arch).image_encoder.eval()
        with torch.no_grad():    # relative positions start at zero; random values make the bias matter
            for name, p in encoder.named_parameters():
                if "rel_pos" in name:
                    p.normal_(0, 0.5)
        image = torch.randn(1, 3, arch.image_size, arch.image_size)
        with torch.no_grad():
            expected = encoder(image)
            use_sdpa(encoder)
            assert {type(m) for m in encoder.modules() if isinstance(m, Attention)} == {SdpaAttention}
            got = encoder(image)
            use_sdpa(encoder, False)
            assert {type(m) for m in encoder.modules() if isinstance(m, Attention)} == {Attention}
            again = encoder(image)
        assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
        assert torch.equal(again, expected)
