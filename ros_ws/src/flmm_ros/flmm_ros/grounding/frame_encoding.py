"""What GroundingPipeline hands between its stages: a frame's encoding (per camera frame) and the logits of one
grounding pass (per instruction)."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from .lmm import LMMFrame, PhrasePass
from .presence import foreground
from .sam.refiner import SamImageEncoding


@dataclass
class FrameEncoding:
    """Everything computed once per camera frame and shared by every instruction on it.

    `sam` may be given as a Future (`GroundingPipeline.encode` runs SAM's encoder beside the LMM): the first read
    of `frame.sam` waits for it, and raises what the encoder raised."""
    image_hw: tuple[int, int]
    lmm: LMMFrame
    sam: SamImageEncoding | None
    timings: dict[str, float] = field(default_factory=dict)
    uses: int = 0                    # instructions served so far (0 = fresh)
    image: np.ndarray | None = field(default=None, repr=False)  # the RGB frame (region input crops it)

    def __post_init__(self):
        if isinstance(self.sam, Future):
            self._pending_sam = self.sam
            del self.sam                 # so that reading it goes to __getattr__

    def __getattr__(self, name: str):
        pending = self.__dict__.get("_pending_sam")
        if name != "sam" or pending is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.sam = pending.result()      # two readers at once both wait and set the same value
        return self.sam


@dataclass
class GroundingLogits:
    """Per phrase: coarse logits over the image content and refined logits at image size (or None)."""
    coarse: torch.Tensor             # (P, h, w)
    refined: torch.Tensor | None     # (P, H, W)
    tokens: list[torch.Tensor] | None = None  # per phrase, its SAM prompt tokens (T, C) (None: no refiner)
    iou: torch.Tensor | None = None  # (P,) SAM's predicted IoU of each refined mask (None: no refiner)
    lmm: PhrasePass | None = None    # the LMM pass they came from (attention, token log-probs: presence.py)
    _foregrounds: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def refined_foreground(self, k: int, threshold: float) -> tuple[torch.Tensor, float]:
        """Phrase k's refined mask (probability > `threshold`) and its mean probability there, the object's score.
        Computed once: the objects and the presence features (presence.py) both read them."""
        if (k, threshold) not in self._foregrounds:
            self._foregrounds[k, threshold] = foreground(self.refined[k].detach().float().sigmoid(), threshold)
        return self._foregrounds[k, threshold]
