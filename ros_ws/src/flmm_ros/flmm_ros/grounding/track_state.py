"""The tracker's per-object state (`Track`) and a frame's proposal for it (`Candidate`); tracking.py uses them."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .track_cues import Box
from .tracking_config import TrackedObject


@dataclass
class Candidate:
    """What one decoder pass proposes for a track on one frame, before the lost rule judges it."""
    mask: np.ndarray | None         # (H, W) bool, set by _finish
    box: Box | None                 # image pixels; None if empty
    area: int
    score: float
    confidence: float
    low_res: np.ndarray             # (h, w) float32 decoder logits in SAM's square input frame
    window: tuple[int, int, int, int] = (0, 0, 0, 0)    # x0, y0, x1, y1: the search window (mask is empty outside)
    colours: np.ndarray | None = None
    descriptor: torch.Tensor | None = None
    appearance: float = 1.0


@dataclass
class Track:
    """One tracked object's state between frames: its prompt memory, last good mask and box, appearance."""
    track_id: int
    phrase: str
    tokens: torch.Tensor            # (1, T, C) the phrase's prompt tokens
    image_hw: tuple[int, int]
    mask: np.ndarray                # (H, W) bool, the last good mask
    box: Box                        # its box in image pixels
    area: int
    largest_area: int
    prompt: np.ndarray              # (h, w) float32 dense prompt (probability memory, see TrackerConfig.memory)
    image: np.ndarray | None = None          # the last good mask's frame (template matching, colour model)
    colours: np.ndarray | None = None        # appearance at grounding
    descriptor: torch.Tensor | None = None
    state: str = "tracking"
    reason: str = ""
    frames_lost: int = 0
    age: int = 0
    out: TrackedObject | None = None

    def snapshot(self, mask: np.ndarray | None, score: float, confidence: float, appearance: float = 1.0,
                 regrounded: bool = False) -> TrackedObject:
        """This frame's TrackedObject: tracking with `mask` (the one `box` was set with), or lost (mask None)."""
        if mask is None:
            return TrackedObject(self.track_id, self.phrase, "lost", np.zeros(self.image_hw, np.uint8), (0, 0, 0, 0),
                                 0.0, confidence, appearance, self.reason, self.frames_lost, self.age)
        box = tuple(int(v) for v in self.box)
        return TrackedObject(self.track_id, self.phrase, "tracking", mask.view(np.uint8) * np.uint8(255), box, score,
                             confidence, appearance, "", 0, self.age, regrounded)
