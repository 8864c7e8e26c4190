"""SAM's prompt encoder + mask decoder with F-LMM's prompts, as one traceable module.

F-LMM (`mask_refiner.py::SAMWrapper.forward`) prompts SAM with a dense mask (the coarse logits), a box
(two corner tokens) and the projected phrase tokens appended after the box tokens, and keeps the single
mask output. `segment_anything.PromptEncoder.forward` branches on which prompts are present and writes
into tensors in place; this module does the same arithmetic for exactly F-LMM's prompt set with no
data-dependent control flow, so it exports to ONNX with a dynamic number of text tokens.
"""
from __future__ import annotations

import torch
from segment_anything.modeling import Sam
from torch import nn

# SAM's learned sparse embeddings: 0/1 negative/positive point, 2/3 box top-left/bottom-right corner.
_BOX_CORNER_EMBEDDINGS = (2, 3)


class SamPromptDecoder(nn.Module):
    """SAM prompt encoder + mask decoder with F-LMM's prompts, in one traceable forward (shares sam's params)."""

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.prompt_encoder = sam.prompt_encoder
        self.mask_decoder = sam.mask_decoder

    def forward(self, image_embeddings: torch.Tensor, mask_input: torch.Tensor, box: torch.Tensor,
                text_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (1, C, h, w); mask_input (1, 1, 4h, 4w) logits; box (1, 4) x0, y0, x1, y1 in
        the SAM input frame; text_tokens (1, T, C). Returns low-res logits (1, 1, 4h, 4w) and IoU (1, 1)."""
        pe = self.prompt_encoder
        input_h, input_w = pe.input_image_size
        # Corners are (x, y): x over the input width, y over the height; +0.5 = pixel centre, as SAM does.
        # Divided by Python numbers, not a new tensor: no host-to-device copy (CUDA graphs cannot capture one).
        corners = box.reshape(-1, 2, 2) + 0.5
        corners = torch.stack([corners[..., 0] / float(input_w), corners[..., 1] / float(input_h)], dim=-1)
        corner_tokens = pe.pe_layer._pe_encoding(corners.to(torch.float))
        corner_tokens = corner_tokens + torch.cat([pe.point_embeddings[i].weight for i in _BOX_CORNER_EMBEDDINGS])
        sparse = torch.cat([corner_tokens, text_tokens], dim=1)
        dense = pe.mask_downscaling(mask_input)
        masks, iou = self.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        # multimask_output=False: SAM's first mask token is the single-mask output.
        return masks[:, 0:1], iou[:, 0:1]
