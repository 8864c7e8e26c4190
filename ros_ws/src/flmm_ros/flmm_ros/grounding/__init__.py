"""The F-LMM grounding core: (image, instruction) -> answer + one mask per grounded phrase. No ROS, no tabletop.

    from flmm_ros.grounding import GroundingPipeline, PipelineConfig

    pipe = GroundingPipeline.from_config(PipelineConfig(model="ros_ws/src/flmm_ros/models/tabletop_tiny"))
    result = pipe.run(pipe.encode(rgb), "pick the red mug")     # GroundingResult, one GroundedObject per phrase

The names in `__all__` are the public API. They are loaded on first use, so that importing the plain types
(`flmm_ros.grounding.types`: what the ROS client and message conversion need) does not load torch.
"""
from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

_EXPORTS = {
    "FrameEncoding": "pipeline",
    "GroundedObject": "types",
    "GroundingCancelled": "types",
    "GroundingError": "types",
    "GroundingPipeline": "pipeline",
    "GroundingResult": "types",
    "ObjectTracker": "tracking",
    "PipelineConfig": "config",
    "TrackedObject": "tracking_config",
    "TrackerConfig": "tracking_config",
    "TrackingUpdate": "tracking_config",
}
__all__ = sorted(_EXPORTS)


class _TorchaoImportNoise(logging.Filter):
    """transformers imports torchao whenever it is installed (for `quantization`), and torchao 0.18's import logs two
    deprecation warnings about its Enum classes through torch's pytree logger in every process; drop just those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass and is now natively supported" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_TorchaoImportNoise())

if TYPE_CHECKING:   # what type checkers and editors see; at run time `__getattr__` imports on first use
    from .config import PipelineConfig
    from .pipeline import FrameEncoding, GroundingPipeline
    from .tracking import ObjectTracker
    from .tracking_config import TrackedObject, TrackerConfig, TrackingUpdate
    from .types import GroundedObject, GroundingCancelled, GroundingError, GroundingResult


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value     # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
