"""The node's parameter table: one source for descriptions and choices, validation, type coercion."""
from dataclasses import fields
from pathlib import Path

import pytest

from flmm_ros.grounding.config import PipelineConfig
from flmm_ros.grounding.types import GroundingError
from flmm_ros.ros import parameters


def defaults():
    return {spec.name: spec.default for spec in parameters.all_parameters()}


@pytest.mark.parametrize('name, value, message', [
    ('busy_policy', 'drop', 'busy_policy'), ('backend', 'tflite', 'backend'), ('input_qos', 'FAST', 'input_qos'),
    ('max_frame_age', -1.0, 'max_frame_age'), ('max_queued', 0, 'max_queued'), ('sync_slop', -0.1, 'sync_slop'),
    ('threads', -1, 'threads must be >= 0'),
])
def test_parameter_validation(name, value, message):
    values = defaults()
    parameters.validate(values)
    values[name] = value
    with pytest.raises(GroundingError, match=message):
        parameters.validate(values)


@pytest.mark.parametrize('setting, environ, cores, expected', [
    (3, {'OMP_NUM_THREADS': '8'}, 2, 3),        # set: as set
    (0, {'OMP_NUM_THREADS': '4'}, 2, 4),        # auto: the user's OMP_NUM_THREADS
    (0, {}, 2, 1), (0, {}, 1, 1), (0, {}, 8, 4),  # auto: half the cores, at least one
    (0, {'OMP_NUM_THREADS': 'lots'}, 6, 3),     # an unusable OMP_NUM_THREADS: as if unset
])
def test_threads_auto_is_omp_num_threads_else_half_the_cores(setting, environ, cores, expected):
    assert parameters.cpu_threads(setting, environ, cores) == expected


def test_empty_model_means_embedded_model():
    config = parameters.pipeline_config(defaults())
    assert config.model.endswith('models/tabletop_tiny')
    values = defaults() | {'model': '/some/bundle', 'device': 'cpu'}
    assert parameters.pipeline_config(values).model == '/some/bundle'


def test_every_parameter_has_a_description():
    names = [spec.name for spec in parameters.all_parameters()]
    assert len(names) == len(set(names))
    assert all(len(spec.description) > 15 for spec in parameters.all_parameters())


def test_pipeline_descriptions_and_choices_live_on_the_config_fields():
    for f, spec in zip(fields(PipelineConfig), parameters.pipeline_parameters(), strict=True):
        assert spec.name == f.name and spec.description == f.metadata['description']
        assert spec.choices == f.metadata['choices']


@pytest.mark.parametrize('name, value, expected', [
    ('max_frame_age', 3, 3.0), ('mask_threshold', 1, 1.0), ('max_queued', 2.0, 2), ('busy_policy', 'reject', 'reject'),
    ('use_3d', False, False)])
def test_coerce_accepts_numbers_written_either_way(name, value, expected):
    coerced = parameters.coerce(name, value)
    assert coerced == expected and type(coerced) is type(expected)


@pytest.mark.parametrize('name, value, message', [
    ('max_frame_age', 'soon', 'must be a number'), ('max_frame_age', True, 'must be a number'),
    ('max_queued', 2.5, 'must be an integer'), ('use_3d', 'maybe', 'must be a boolean'),
    ('busy_policy', 3, 'must be a string'), ('busy_policy', [1, 2], 'must be a string')])
def test_coerce_refuses_other_types_in_one_line(name, value, message):
    with pytest.raises(GroundingError, match=message) as error:
        parameters.coerce(name, value)
    assert '\n' not in str(error.value)


def test_only_settings_read_per_instruction_change_at_run_time():
    runtime = {spec.name for spec in parameters.all_parameters() if spec.runtime}
    assert {'model', 'device', 'dtype', 'backend', 'input_qos', 'output_qos', 'autostart'}.isdisjoint(runtime)
    assert {'mask_threshold', 'presence_threshold', 'instances', 'max_instances', 'instance_threshold', 'relations',
            'busy_policy', 'max_queued', 'max_frame_age', 'use_3d', 'publish_overlay', 'speak'} <= runtime


def test_the_readme_names_every_node_parameter():
    readme = (Path(__file__).resolve().parents[1] / 'README.md').read_text()
    missing = [spec.name for spec in parameters.all_parameters()
               if not spec.name.startswith(parameters.TRACKER_PREFIX) and f'`{spec.name}`' not in readme]
    assert missing == [], f"parameters the README does not name: {missing}"
    assert '`tracker.*`' in readme
