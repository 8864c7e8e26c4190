"""The tracker's settings (`TrackerConfig`, each with a description for the ROS parameter) and its outputs
(`TrackedObject` per object per frame, `TrackingUpdate` per frame). See `tracking.py` for the method."""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np

from .settings import from_settings, setting
from .types import GroundingError

TRACK_STATES = ("tracking", "lost")
RUNTIME_SETTINGS = ("backend", "threads", "int8_encoder")    # they shape the SAM runtime: fixed once it is made
LOST_REASONS = ("empty", "too_small", "left_view", "low_confidence", "area_jump", "colour", "appearance",
                "duplicate")


@dataclass
class TrackerConfig:
    """How objects are tracked and when one counts as lost; the names are meant as ROS parameter names.

    Every field's description (and choices) is in its metadata: `TrackerConfig.descriptions()`."""
    backend: str = setting("auto", "SAM runtime for tracking; auto = the pipeline's, but ONNX Runtime instead of "
                            "PyTorch on a CPU (about 3x faster)", ("auto", "torch", "onnxruntime", "tensorrt"))
    threads: int = setting(1, "ONNX Runtime threads on a CPU (0 = its default, one per core); 1 leaves the other "
                            "cores to instructions")
    int8_encoder: bool = setting(True, "with ONNX Runtime on a CPU: the SAM image encoder with int8 weights (~30 % "
                                  "faster, tracking quality unchanged on the generated sequences); false = FP32. "
                                  "Ignored on a GPU. Grounding always uses the full-precision encoder")
    mask_threshold: float = setting(0.5, "foreground probability threshold of the tracked masks")
    box_margin: float = setting(0.1, "the box prompt is the last mask's box grown by this fraction of its size on "
                                 "every side (room for motion)")
    search_margin: float = setting(0.5, "the new mask is cut to the last mask's box grown by this fraction of its "
                                    "size on every side (objects move little between frames)")
    motion: str = setting("template", "template: before prompting, move the last mask to where its pixels went "
                           "(masked template matching); none: prompt where it was", ("template", "none"))
    dense_prompt: str = setting("mask", "the dense prompt: mask = the recent masks as +-8 logits; logits = the "
                                 "decoder's own low-res logits of the last frame", ("mask", "logits"))
    memory: float = setting(0.8, "weight of the older masks in the dense prompt: prompt = this x (the previous "
                             "prompt, moved with the object) + (1 - this) x the new mask; 0 = the new mask alone. "
                             "Keeps one frame's error from becoming the next frame's prompt")
    colour_weight: float = setting(3.0, "weight of the colour model in the mask: each pixel's logit gets this x "
                                    "log(P(its colour | the object) / P(its colour | around it)), both from the last "
                                    "frame, clipped to +-3 (0 = SAM's mask alone). Separates touching objects that "
                                    "SAM's low-res mask blurs; colours the two share do not count")
    clean: bool = setting(True, "drop the parts of a new mask that do not overlap the last one (blobs on other "
                           "objects) and fill its holes")
    min_area: float = setting(0.0005, "lost when the mask covers less than this fraction of the image (hidden or "
                               "left the view)")
    min_confidence: float = setting(0.3, "lost when the decoder's predicted IoU of the new mask is below this")
    max_area_change: float = setting(2.0, "lost when the mask's area grows or shrinks by more than this factor "
                                      "from the previous frame; a lost object is re-found only up to this factor of "
                                      "its largest area")
    min_colour_similarity: float = setting(0.75, "lost when the colour histogram of the mask's pixels (4x4x4 RGB "
                                            "bins) matches the object's at grounding less than this (Bhattacharyya "
                                            "coefficient, 1 = the same colours)")
    min_similarity: float = setting(0.0, "lost when the cosine similarity of SAM's image embedding averaged under "
                                     "the mask to the object's at grounding is below this (0 = off: on the generated "
                                     "sequences it turned away more right masks than wrong ones)")
    min_refound_similarity: float = setting(0.8, "the same for a lost object found again (by its last prompt or "
                                             "by re-grounding): re-identifying needs more evidence than following")
    max_overlap: float = setting(0.5, "two tracks whose masks overlap by more than this IoU hold one object: the "
                                  "less confident one is lost")
    recover: bool = setting(True, "while lost, try the last good prompt on every frame (one decoder pass)")
    regrounding: str = setting("auto", "auto: ground a lost object's phrase again with the LMM; it keeps its track "
                                "id when the new mask passes the lost rule", ("auto", "off"))
    reground_every: int = setting(5, "frames between re-grounding attempts while an object is lost")

    @classmethod
    def descriptions(cls) -> dict[str, str]:
        return {f.name: f.metadata["description"] for f in fields(cls)}

    @classmethod
    def from_dict(cls, values: dict) -> TrackerConfig:
        return from_settings(cls, values, "tracker")

    def validate(self) -> None:
        for f in fields(self):
            if f.metadata["choices"] and getattr(self, f.name) not in f.metadata["choices"]:
                raise GroundingError(f"tracker {f.name} {getattr(self, f.name)!r} is not one of "
                                     f"{list(f.metadata['choices'])}")
        for name in ("min_confidence", "min_colour_similarity", "max_overlap", "memory"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise GroundingError(f"tracker {name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.mask_threshold < 1.0 or not 0.0 <= self.min_area < 1.0 or self.memory == 1.0:
            raise GroundingError("tracker mask_threshold must be in (0, 1), min_area in [0, 1), memory below 1")
        for name in ("min_similarity", "min_refound_similarity"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise GroundingError(f"tracker {name} is a cosine in [-1, 1], got {getattr(self, name)}")
        if self.max_area_change < 1.0:
            raise GroundingError(f"tracker max_area_change must be at least 1, got {self.max_area_change}")
        if not 0.0 <= self.box_margin <= self.search_margin:
            raise GroundingError("tracker margins must satisfy 0 <= box_margin <= search_margin")
        if not 0.0 <= self.colour_weight <= 10.0:      # also refuses NaN
            raise GroundingError(f"tracker colour_weight must be in [0, 10], got {self.colour_weight}")
        if self.threads < 0 or self.reground_every < 1:
            raise GroundingError("tracker threads must be >= 0 and reground_every >= 1")


@dataclass
class TrackedObject:
    """One tracked object on one frame (a snapshot: the tracker never changes it afterwards)."""
    track_id: int
    phrase: str
    state: str                      # tracking | lost
    mask: np.ndarray                # (H, W) uint8 0/255; all 0 while lost
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (x1/y1 exclusive); all 0 while lost
    score: float                    # mean foreground probability inside the mask (0 while lost)
    confidence: float               # the decoder's predicted IoU of this frame's mask (of the rejected one if lost)
    appearance: float = 1.0         # colour similarity of this frame's mask to the object at grounding
    lost_reason: str = ""           # one of LOST_REASONS while lost, else ""
    frames_lost: int = 0            # consecutive frames in state lost
    age: int = 0                    # frames tracked since grounding
    regrounded: bool = False        # this frame's mask was found by grounding the phrase again with the LMM


@dataclass
class TrackingUpdate:
    """Every tracked object on one frame, and seconds per stage (sam_encoder, motion, sam_decoder, post,
    reground: only the stages that ran). `interrupted`: the update gave way (`ObjectTracker.interrupt`) before
    any track changed; no objects, and `frame_index` is the last frame tracked."""
    frame_index: int
    objects: list[TrackedObject]
    timings: dict[str, float] = field(default_factory=dict)
    interrupted: bool = False
