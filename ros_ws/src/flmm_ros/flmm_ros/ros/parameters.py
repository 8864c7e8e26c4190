"""The node's parameter table: every parameter with its default, description, choices and whether it may be
changed while the node runs (no rclpy here).

The pipeline's parameters are exactly PipelineConfig's fields (same names and defaults, except `model`,
whose empty default means the embedded model). config/grounding.yaml holds the same keys and values;
tests check both. `coerce` and `validate` give the one-line errors for values from YAML or `ros2 param set`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.region import PROMPTINGS as REGION_PROMPTINGS
from flmm_ros.grounding.tracking_config import RUNTIME_SETTINGS, TrackerConfig
from flmm_ros.grounding.types import GroundingError

BUSY_POLICIES = ('queue', 'preempt', 'reject')
QOS_PRESETS = ('SENSOR_DATA', 'DEFAULT', 'SYSTEM_DEFAULT', 'BEST_EFFORT', 'RELIABLE')
EMBEDDED_MODEL = 'tabletop_tiny'


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. `runtime`: `ros2 param set` may change it while the node runs (it applies from the next
    instruction); the others need a model reload or new subscriptions and are read-only."""
    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    runtime: bool = False


# Pipeline settings read per instruction (the rest shape the loaded model).
PIPELINE_RUNTIME = frozenset({'answer', 'max_new_tokens', 'phrase_mode', 'mask_threshold', 'presence_threshold',
                              'instances', 'max_instances', 'instance_threshold', 'relations'})

NODE_PARAMETERS: tuple[ParamSpec, ...] = (
    ParamSpec('busy_policy', 'queue',
              "What a new instruction does while another is running: queue (wait, at most max_queued waiting; "
              "more are answered 'busy'), preempt (stop the running one, answered 'preempted'), reject "
              "(answered 'busy').", BUSY_POLICIES, runtime=True),
    ParamSpec('max_queued', 1, "busy_policy queue: how many instructions may wait behind the running one.",
              runtime=True),
    ParamSpec('max_frame_age', 2.0,
              "An instruction is refused (error 'stale_frame') when the latest camera frame was older than this "
              "many seconds when it arrived; 0 = frames never go stale.", runtime=True),
    ParamSpec('use_3d', True,
              "Back-project each mask into 3D (centroid, size, grasp pose, markers) when depth and camera_info "
              "arrive.", runtime=True),
    ParamSpec('sync_slop', 0.05, "Largest stamp difference (s) for depth / camera_info to match an image.",
              runtime=True),
    ParamSpec('sync_queue_size', 30,
              "Depth and camera_info messages kept for stamp matching (30 = 1 s at 30 Hz: enough for the depth "
              "of the grounded frame to still be there when the model has run).", runtime=True),
    ParamSpec('publish_overlay', True,
              "Publish ~/overlay (rgb8 camera image with masks, boxes and phrases; drawn only while subscribed).",
              runtime=True),
    ParamSpec('speak', False, "Speak each answer with espeak-ng (non-blocking; newest answer wins).", runtime=True),
    ParamSpec('input_qos', 'SENSOR_DATA',
              "QoS of image, depth and camera_info subscriptions (keep-last): " + " | ".join(QOS_PRESETS) + ". "
              "SENSOR_DATA (best effort) receives from any camera; with Fast DDS the node's image and depth "
              "readers take large best-effort frames over UDP (see the README's QoS notes).",
              QOS_PRESETS),
    ParamSpec('diagnostics_period', 1.0, "Seconds between /diagnostics messages (diagnostic_updater's 1 Hz)."),
    ParamSpec('output_qos', 'DEFAULT',
              "QoS of the published outputs (keep-last 5): " + " | ".join(QOS_PRESETS) + ".", QOS_PRESETS),
    ParamSpec('region_prompting', 'crop',
              "Region input (a clicked point or a goal's point/box): how the LMM is shown the region without "
              "retraining it: crop (a crop around it; best on the embedded model), highlight (the rest of the image "
              "dimmed), marker (an ellipse drawn around it), none (the whole image).", REGION_PROMPTINGS,
              runtime=True),
    ParamSpec('region_question', '',
              "The question asked about a clicked point (~/clicked_point); empty = the model's own default.",
              runtime=True),
    ParamSpec('track_instructions', False,
              "Every successful instruction from the instruction topic also starts tracking its objects (~/tracks); "
              "action goals ask for it with their `track` field.", runtime=True),
    ParamSpec('threads', 0,
              "CPU threads of PyTorch in this node; its ONNX Runtime sessions use as many (FLMM_ROS_ORT_THREADS "
              "overrides those). 0 = auto: $OMP_NUM_THREADS when set, else half the cores (at least 1), leaving the "
              "rest to the robot's other processes. The node's OpenMP threads sleep between kernels "
              "(OMP_WAIT_POLICY=PASSIVE keeps a busy computer usable), and on a 2-core computer waking a second "
              "thread for each small kernel cost more than it gained: one thread served cached instructions in "
              "18 ms, two in 24 (BENCHMARKS.md)."),
    ParamSpec('autostart', True,
              "Configure (load the model) and activate at start. false: wait for lifecycle transitions "
              "(`ros2 lifecycle set /flmm_grounding configure`, then `activate`)."),
)


def pipeline_parameters() -> tuple[ParamSpec, ...]:
    """The pipeline's parameters: PipelineConfig's fields, with the description and choices they carry."""
    defaults = PipelineConfig()
    return tuple(ParamSpec(f.name, getattr(defaults, f.name), f.metadata['description'], f.metadata['choices'],
                           runtime=f.name in PIPELINE_RUNTIME)
                 for f in fields(PipelineConfig))


TRACKER_PREFIX = 'tracker.'
TRACKER_READ_ONLY = frozenset(RUNTIME_SETTINGS)   # they shape the tracker's SAM runtime


def tracker_parameters() -> tuple[ParamSpec, ...]:
    """The tracker's settings as `tracker.<name>` parameters (TrackerConfig's fields and descriptions)."""
    defaults = TrackerConfig()
    return tuple(ParamSpec(TRACKER_PREFIX + f.name, getattr(defaults, f.name), f.metadata['description'] + '.',
                           tuple(f.metadata['choices']), runtime=f.name not in TRACKER_READ_ONLY)
                 for f in fields(TrackerConfig))


def all_parameters() -> tuple[ParamSpec, ...]:
    return pipeline_parameters() + NODE_PARAMETERS + tracker_parameters()


SPECS: dict[str, ParamSpec] = {spec.name: spec for spec in all_parameters()}
_TYPE_NAMES = {bool: 'a boolean (true / false)', int: 'an integer', float: 'a number', str: 'a string'}


def coerce(name: str, value: Any) -> Any:
    """`value` as the parameter's declared type, or GroundingError in one line. An integer is accepted where a
    number is declared (YAML and `ros2 param set` write 2 for 2.0), a whole float where an integer is."""
    kind = type(SPECS[name].default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if type(value) is not kind:
        shown = value if not isinstance(value, (list, tuple)) else list(value)
        raise GroundingError(f"parameter {name} must be {_TYPE_NAMES[kind]}, got {shown!r} "
                             f"({type(value).__name__})")
    return value


def validate(values: dict[str, Any]) -> None:
    """Raise GroundingError naming the first parameter with a value outside its choices or range."""
    for spec in all_parameters():
        value = values[spec.name]
        if spec.choices and value not in spec.choices:
            raise GroundingError(f"parameter {spec.name}={value!r} is not one of {list(spec.choices)}")
    for name in ('max_frame_age', 'sync_slop'):
        if values[name] < 0:
            raise GroundingError(f"parameter {name} must be >= 0, got {values[name]}")
    if values['diagnostics_period'] <= 0:
        raise GroundingError(f"parameter diagnostics_period must be > 0, got {values['diagnostics_period']}")
    for name in ('max_queued', 'sync_queue_size'):
        if values[name] < 1:
            raise GroundingError(f"parameter {name} must be >= 1, got {values[name]}")
    if values['threads'] < 0:
        raise GroundingError(f"parameter threads must be >= 0 (0 = auto), got {values['threads']}")


def cpu_threads(setting: int, environ: Mapping[str, str] = os.environ, cores: int | None = None) -> int:
    """The node's PyTorch thread count for the `threads` parameter (see its description)."""
    if setting > 0:
        return setting
    value = environ.get('OMP_NUM_THREADS', '').strip()
    if value.isdigit() and int(value) > 0:
        return int(value)
    cores = cores if cores is not None else len(os.sched_getaffinity(0))
    return max(1, cores // 2)


def embedded_model_dir() -> Path:
    """The embedded default model: the installed package's share/ copy, else the source tree's."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
        try:
            installed = Path(get_package_share_directory('flmm_ros')) / 'models' / EMBEDDED_MODEL
            if installed.is_dir():
                return installed
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    return Path(__file__).resolve().parents[2] / 'models' / EMBEDDED_MODEL


def tracker_config(values: dict[str, Any]) -> TrackerConfig:
    """TrackerConfig from the node's `tracker.*` parameter values (validated)."""
    return TrackerConfig.from_dict({spec.name[len(TRACKER_PREFIX):]: values[spec.name]
                                    for spec in tracker_parameters()})


def pipeline_config(values: dict[str, Any]) -> PipelineConfig:
    """PipelineConfig from the node's parameter values; an empty model means the embedded one."""
    settings = {f.name: values[f.name] for f in fields(PipelineConfig)}
    if not settings['model']:
        settings['model'] = str(embedded_model_dir())
    return PipelineConfig.from_dict(settings)
