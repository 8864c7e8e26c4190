"""tabletop-tiny's SAM: its size, the kind prompts that go with it, one decoder call, saving and loading.

The model is a real `segment_anything.Sam` (`build_sam(TABLETOP_SAM)`), trained by `train_sam.py`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from segment_anything.modeling import Sam
from torch import nn

from ..grounding.checkpoint import load_sam_weights
from ..grounding.sam.models import SamArch, build_sam
from ..grounding.training.loop import tensor_file, text_file, write_atomically
from .shapes import KINDS

# 256 px input with 16 px patches (SAM's): a 16x16 embedding and 64x64 low-res masks. Masks at 64x64,
# upsampled as SAM does, still reproduce the scenes' objects at 0.98 mIoU, and 8 px patches cost 2.5x
# more per training step, which on a shared CPU means 2.5x fewer steps. 4 blocks of width 128, SAM's
# pattern of windowed (8x8 tokens) and global blocks; the decoder is SAM's at half width.
TABLETOP_SAM = SamArch(encoder_embed_dim=128, encoder_depth=4, encoder_num_heads=4,
                       encoder_global_attn_indexes=(1, 3), image_size=256, patch_size=16, window_size=8,
                       prompt_embed_dim=128, decoder_mlp_dim=512, decoder_num_heads=4, iou_head_hidden_dim=128)

SAM_FILE, ARCH_FILE, LOG_FILE = "sam.safetensors", "sam_arch.yaml", "train_log.json"
KIND_FILE = "kind_prompts.safetensors"


def kind_ids(kinds: list[str]) -> torch.Tensor:
    """Kind names -> their indices in `shapes.KINDS`; a clear error for a name not there."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown kind {unknown[0]!r}; kinds are {KINDS}")
    return torch.tensor([KINDS.index(k) for k in kinds])


class KindPrompts(nn.Module):
    """One learned sparse prompt token per object kind (`shapes.KINDS`), and a linear probe that reads each
    image-embedding cell's kind (0 = no object): its loss makes the encoder see kinds from the first steps,
    which the kind prompts alone teach it only slowly."""

    def __init__(self, dim: int):
        super().__init__()
        self.table = nn.Embedding(len(KINDS), dim)
        self.probe = nn.Conv2d(dim, len(KINDS) + 1, kernel_size=1)

    def forward(self, kinds: list[str]) -> torch.Tensor:
        """N kind names -> (N, 1, dim) tokens."""
        return self.table(kind_ids(kinds))[:, None]


def decode(sam: Sam, embedding: torch.Tensor, points=None, boxes=None, masks=None, tokens=None):
    """One decoder batch on one image's embedding; SAM's single-mask output (low-res logits, IoU).
    `tokens` (N, T, C) go after the box tokens, where F-LMM puts a phrase's."""
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=masks)
    if tokens is not None:
        sparse = torch.cat([sparse, tokens.to(sparse.dtype)], dim=1)
    return sam.mask_decoder(image_embeddings=embedding, image_pe=sam.prompt_encoder.get_dense_pe(),
                            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                            multimask_output=False)


def save_tabletop_sam(sam: Sam, arch: SamArch, out_dir: str | Path) -> None:
    """`sam.safetensors` (the whole Sam state_dict) and `sam_arch.yaml` in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.cpu() for k, v in sam.state_dict().items()}
    write_atomically({out_dir / SAM_FILE: tensor_file(weights, {"format": "segment_anything.Sam",
                                                                "arch": json.dumps(arch.to_dict())}),
                      out_dir / ARCH_FILE: text_file(yaml.safe_dump(arch.to_dict(), sort_keys=False))})


def load_tabletop_sam(out_dir: str | Path) -> Sam:
    """Rebuild the Sam saved by `save_tabletop_sam` (eval mode)."""
    out_dir = Path(out_dir)
    arch = SamArch.from_dict(yaml.safe_load((out_dir / ARCH_FILE).read_text()))
    sam = build_sam(arch)
    report = load_sam_weights(sam, out_dir / SAM_FILE)
    if report.missing or report.unexpected:
        raise ValueError(f"{out_dir / SAM_FILE} does not match {out_dir / ARCH_FILE}: {report}")
    return sam
