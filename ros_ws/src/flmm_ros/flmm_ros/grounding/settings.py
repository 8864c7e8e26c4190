"""Settings dataclasses with their documentation on the fields (PipelineConfig, TrackerConfig): each field carries
its description and choices, the one source for the ROS parameter table, the YAML and the README."""
from __future__ import annotations

from dataclasses import field, fields

from .types import GroundingError


def setting(default, description: str, choices: tuple[str, ...] = ()):
    """A dataclass field with its description and (for text settings) its allowed values in the metadata."""
    return field(default=default, metadata={"description": description, "choices": tuple(choices)})


def from_settings(cls, values: dict, what: str):
    """`cls(**values)` validated, refusing unknown names in one line (`what`: "pipeline", "tracker")."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise GroundingError(f"unknown {what} settings {unknown}; known: {sorted(known)}")
    config = cls(**values)
    config.validate()
    return config
