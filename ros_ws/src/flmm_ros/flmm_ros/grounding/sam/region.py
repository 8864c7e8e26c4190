"""SAM segmentation of a clicked point or a drawn box (region input), on the frame's cached SAM embedding.

These are SAM's own prompts (a positive point, a box, no dense prompt), so `segment_anything`'s prompt encoder
builds them (with its padding point when there is no box, and `no_mask_embed` as the dense prompt), exactly as
`SamPredictor.predict` does. The decoder keeps its first (single-mask) output, the one F-LMM's refiner and the
tabletop SAM were trained with. It runs in PyTorch on the model whatever the refiner's runtime: one decoder pass
per request, and F-LMM's exported decoder graph has no input for "no dense prompt".
"""
from __future__ import annotations

import torch

from .refiner import SamImageEncoding, SamRefiner


@torch.no_grad()
def segment_region(refiner: SamRefiner, encoding: SamImageEncoding, point=None, box=None,
                   multimask: bool = False) -> tuple[torch.Tensor, float]:
    """Logits (H, W) over the image for a point (x, y) and/or a box (x0, y0, x1, y1) in image pixels, and SAM's
    predicted IoU. `multimask`: SAM's three outputs for an ambiguous click, keeping the best predicted IoU
    (only for a SAM trained with them)."""
    if point is None and box is None:
        raise ValueError("segment_region needs a point or a box")
    sam, prompts = refiner.sam, refiner.prompts
    device = prompts.device
    points = boxes = None
    if point is not None:
        coords = prompts.scale_points(torch.tensor([[point]], dtype=torch.float32), encoding.image_hw)
        points = (coords.to(device), torch.ones((1, 1), dtype=torch.int, device=device))
    if box is not None:
        boxes = prompts.scale_boxes(torch.tensor([box], dtype=torch.float32), encoding.image_hw).to(device)
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    low_res, iou = sam.mask_decoder(image_embeddings=encoding.embedding.to(device, torch.float32),
                                    image_pe=sam.prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense, multimask_output=multimask)
    best = int(iou[0].argmax())
    logits = prompts.postprocess(low_res[:, best:best + 1].float(), encoding.input_hw, encoding.image_hw)
    return logits[0, 0], float(iou[0, best])
