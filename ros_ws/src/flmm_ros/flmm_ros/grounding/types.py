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
    """One grounded object: a phrase's mask, or one instance of a plural phrase's, or a phrase judged absent.

    A phrase judged absent (presence below `PipelineConfig.presence_threshold`) keeps its entry with
    `found=False`, an empty mask, a zero box and score 0, so a consumer that reads only masks never acts on it.
    A plural phrase ("all the mugs") gives one object per instance, `instance` 1..N, all with the same phrase."""
    phrase: str
    mask: np.ndarray            # (H, W) uint8, 0 or 255, at the input image's resolution
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive; all 0 if the mask is empty
    score: float                # mean foreground probability inside the mask (0 if empty)
    # The phrase's SAM prompt tokens (T, C) float32 (its hidden states through the text projection), kept so
    # that `tracking.ObjectTracker` can follow the object without the LMM; None when the refiner is off.
    prompt_tokens: np.ndarray | None = field(default=None, repr=False, compare=False)
    found: bool = True          # False: the phrase is judged absent (empty mask, zero box, score 0)
    presence: float = 1.0       # probability that the phrase names something in the image (presence.py)
    instance: int = 0           # 0: a singular phrase (or an absent plural one); 1..N: instances of a plural one
    # Grounded conversation and region input: the phrase's characters [start, end) in GroundingResult.answer
    # (answer[start:end] == phrase); None when the phrase is not taken from the answer.
    answer_span: tuple[int, int] | None = None


@dataclass
class GroundingResult:
    """One instruction's outcome: the answer, the phrases, their objects (`GroundedObject`) and stage timings.
    A phrase judged absent is no error: it is listed in `not_found` and its object has `found=False`."""
    instruction: str
    answer: str
    phrases: list[str]
    objects: list[GroundedObject]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    frame_cached: bool = False  # True when the frame's encoding was reused
    not_found: list[str] = field(default_factory=list)  # the phrases judged absent, in phrase order
