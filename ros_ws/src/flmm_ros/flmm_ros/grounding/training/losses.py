"""F-LMM's mask losses (mmdet CrossEntropyLoss(use_sigmoid) + DiceLoss(naive_dice, eps=1)), weight 1 each."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean binary cross-entropy per mask, averaged over masks. logits/target: (N, H, W)."""
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1).mean()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Naive dice: 1 - (2 sum(p t) + eps) / (sum p + sum t + eps) per mask, averaged over masks."""
    p, t = logits.sigmoid().flatten(1), target.flatten(1)
    return (1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) {0, 1} masks -> (N, *size), nearest (how F-LMM resizes its ground truth)."""
    return F.interpolate(masks[:, None].float(), size=size, mode="nearest")[:, 0]


def mask_losses(coarse: torch.Tensor, refined: torch.Tensor | None, target: torch.Tensor,
                lmm_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Coarse logits vs the ground truth resized to their grid; refined logits vs the ground truth at their size.

    With `lmm_hw` (F-LMM's recipe) the ground truth is first nearest-resized to the LMM's resized image (F-LMM's
    `data_sample['masks']`, e.g. 336x223 for a 640x426 image on LLaVA-1.5) and both targets are resized from
    that, so even the refined target has the LMM's resolution. Without it, both come from `target` itself.
    """
    if lmm_hw is not None:
        target = resize_masks(target, tuple(lmm_hw))
    small = resize_masks(target, tuple(coarse.shape[-2:]))
    losses = {"loss_mask": bce_loss(coarse, small), "loss_dice": dice_loss(coarse, small)}
    if refined is not None:
        full = resize_masks(target, tuple(refined.shape[-2:])) if lmm_hw is not None else target
        losses["sam_loss_mask"] = bce_loss(refined, full)
        losses["sam_loss_dice"] = dice_loss(refined, full)
    return losses
