"""Plain data types returned by the grounding core (no torch, no ROS)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class GroundingError(ValueError):
    """Bad input or configuration, with a message meant for the user (status topic, log)."""


class GroundingCancelled(RuntimeError):
    """Raised from a progress callback to stop a request between stages."""


@dataclass
class GroundedObject:
    phrase: str
    mask: np.ndarray            # (H, W) uint8, 0 or 255, at the input image's resolution
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive; all 0 if the mask is empty
    score: float                # mean foreground probability inside the mask (0 if empty)
    # The phrase's SAM prompt tokens (T, C) float32 (its hidden states through the text projection), kept so
    # that `tracking.ObjectTracker` can follow the object without the LMM; None when the refiner is off.
    prompt_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass
class GroundingResult:
    instruction: str
    answer: str
    phrases: list[str]
    objects: list[GroundedObject]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    frame_cached: bool = False  # True when the frame's encoding was reused
