"""Parity gates between SAM runtimes: the same inputs through a reference (PyTorch fp32) and a candidate
backend, compared by embedding error and cosine, logit error, mask IoU and predicted-IoU error. Used by the
tests, engines/build_engines.py --check and bench/refiner.py."""
from __future__ import annotations

import torch
from segment_anything.modeling import Sam

from .backends import RefinerBackend
from .shapes import SamShapes

PARITY_GATES = {"fp32": {"mask_iou": 0.99, "encoder_cosine": 0.9999},
                "fp16": {"mask_iou": 0.98, "encoder_cosine": 0.999}}


def _mask_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0, b > 0
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


@torch.no_grad()
def parity_report(reference: RefinerBackend, candidate: RefinerBackend, sam: Sam,
                  text_token_counts: tuple[int, ...] = (1, 8, 33), seed: int = 0) -> dict[str, float]:
    """How closely `candidate` follows `reference` on the same random inputs.

    The decoders get the reference's embedding (decoder error alone) and, for `end_to_end_mask_iou`,
    each its own. Returns the worst value over the text-token counts for every metric."""
    shapes = SamShapes(sam)
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(1, 3, shapes.image_size, shapes.image_size, generator=g)
    ref_embedding = reference.encode(image).float().cpu()
    cand_embedding = candidate.encode(image).float().cpu()
    report = {
        "encoder_max_abs": (cand_embedding - ref_embedding).abs().max().item(),
        "encoder_cosine": torch.nn.functional.cosine_similarity(cand_embedding.flatten(), ref_embedding.flatten(),
                                                                 dim=0).item(),
        "decoder_max_abs": 0.0, "iou_pred_max_abs": 0.0, "mask_iou": 1.0, "end_to_end_mask_iou": 1.0,
    }
    mask_input = 4 * torch.randn(1, 1, *shapes.mask_hw, generator=g)
    corners = torch.rand(2, 2, generator=g) * shapes.image_size
    box = torch.cat([corners.min(0).values, corners.max(0).values])[None]
    for count in text_token_counts:
        tokens = torch.randn(1, count, shapes.embed_dim, generator=g)
        ref_logits, ref_iou = (t.float().cpu() for t in reference.decode(ref_embedding, mask_input, box, tokens))
        logits, iou = (t.float().cpu() for t in candidate.decode(ref_embedding, mask_input, box, tokens))
        own_logits = candidate.decode(cand_embedding, mask_input, box, tokens)[0].float().cpu()
        report["decoder_max_abs"] = max(report["decoder_max_abs"], (logits - ref_logits).abs().max().item())
        report["iou_pred_max_abs"] = max(report["iou_pred_max_abs"], (iou - ref_iou).abs().max().item())
        report["mask_iou"] = min(report["mask_iou"], _mask_iou(logits, ref_logits))
        report["end_to_end_mask_iou"] = min(report["end_to_end_mask_iou"], _mask_iou(own_logits, ref_logits))
    return report


def parity_failures(report: dict[str, float], precision: str) -> list[str]:
    """The gates of PARITY_GATES[precision] that `report` misses (empty: parity holds)."""
    gates = PARITY_GATES[precision]
    failures = [f"{k} {report[k]:.4f} < {gates['mask_iou']}" for k in ("mask_iou", "end_to_end_mask_iou")
                if report[k] < gates["mask_iou"]]
    if report["encoder_cosine"] < gates["encoder_cosine"]:
        failures.append(f"encoder cosine {report['encoder_cosine']:.6f} < {gates['encoder_cosine']}")
    return failures
