"""SAM's encoder attention with the relative-position terms folded into the score product (the ONNX graph's form)."""
import copy

import numpy as np
import onnx
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention

from flmm_ros.grounding.sam.backends import OnnxRuntimeBackend
from flmm_ros.grounding.sam.folded_attention import FoldedRelPosAttention, fold_rel_pos
from flmm_ros.grounding.sam.models import TINY_TEST_SAM, build_sam
from flmm_ros.grounding.sam.onnx_export import export_sam_onnx
from flmm_ros.grounding.sam.shapes import SamShapes


@pytest.fixture(scope="module")
def sam():
    """Random relative-position tables: segment-anything starts them at zero, which would hide a wrong fold."""
    torch.manual_seed(0)
    model = build_sam(TINY_TEST_SAM).eval()
    with torch.no_grad():
        for name, p in model.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5)
    return model


def test_folded_attention_computes_segment_anythings_attention(sam):
    """Windowed (padded) and global blocks, one image and a batch of window rows: the same outputs."""
    folded = fold_rel_pos(copy.deepcopy(sam.image_encoder))
    assert all(type(m) is FoldedRelPosAttention for m in folded.modules() if isinstance(m, Attention))
    assert len([m for m in folded.modules() if isinstance(m, Attention)]) == TINY_TEST_SAM.encoder_depth
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected, got = sam.image_encoder(image), folded(image)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        block = sam.image_encoder.blocks[0].attn                     # rectangular grids, several rows
        x = torch.randn(3, 5, 7, TINY_TEST_SAM.encoder_embed_dim)
        reference = copy.deepcopy(block)
        reference.rel_pos_h = torch.nn.Parameter(torch.randn(2 * 5 - 1, block.rel_pos_h.shape[1]))
        reference.rel_pos_w = torch.nn.Parameter(torch.randn(2 * 7 - 1, block.rel_pos_w.shape[1]))
        fold = fold_rel_pos(copy.deepcopy(reference))
        torch.testing.assert_close(fold(x), reference(x), atol=1e-5, rtol=1e-5)


def test_the_onnx_runtime_encoder_is_folded_and_matches_torch(sam, tmp_path):
    plain = export_sam_onnx(sam, tmp_path)                        # TensorRT's graph: segment-anything's form
    folded = export_sam_onnx(sam, tmp_path, fold_rel_pos=True)
    assert folded.encoder != plain.encoder and folded.decoder == plain.decoder

    def five_d_adds(path):   # segment-anything's rel-pos sum broadcasts over a (B, qh, qw, kh, kw) view
        graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
        ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in graph.value_info}
        return sum(n.op_type == "Add" and ranks.get(n.output[0]) == 5 for n in graph.node)

    assert five_d_adds(plain.encoder) == 2 * TINY_TEST_SAM.encoder_depth
    assert five_d_adds(folded.encoder) == 0
    image = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        expected = sam.image_encoder(image)
    got = OnnxRuntimeBackend(folded, SamShapes(sam), torch.device("cpu")).encode(image)
    assert np.abs(got.numpy() - expected.numpy()).max() < 1e-4
