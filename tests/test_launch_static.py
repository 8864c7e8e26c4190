"""What can be checked of the launch file, YAML parameters, RViz config and package manifests without
`ros2 launch` or RViz (neither is on PyPI): read them statically and compare with the node's parameter table."""
import ast
from pathlib import Path

import pytest
import yaml
from catkin_pkg.package import parse_package
from flmm_ros import launch_args as la
from flmm_ros.ros import parameters

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / 'ros_ws' / 'src' / 'flmm_ros'
LAUNCH = PKG / 'launch' / 'grounding.launch.py'
CONFIG = PKG / 'config' / 'grounding.yaml'
RVIZ = PKG / 'rviz' / 'grounding.rviz'
# Arguments the launch file itself consumes (not handed to the node as parameters or remappings).
LAUNCH_LEVEL = set(la.LAUNCH_ARGUMENTS)


def call_name(call: ast.Call) -> str:
    return call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, 'attr', '')


def string_args_of(tree: ast.AST, function: str) -> list[str]:
    return [c.args[0].value for c in ast.walk(tree) if isinstance(c, ast.Call) and call_name(c) == function
            and c.args and isinstance(c.args[0], ast.Constant) and isinstance(c.args[0].value, str)]


def node_module_file() -> Path:
    """The module of flmm_ros/ros that names the node (NODE_NAME = '...'), wherever the node class lives."""
    for path in sorted((PKG / 'flmm_ros' / 'ros').glob('*.py')):
        for stmt in ast.parse(path.read_text()).body:
            if isinstance(stmt, ast.Assign) and any(getattr(t, 'id', None) == 'NODE_NAME' for t in stmt.targets):
                return path
    raise AssertionError('no module of flmm_ros/ros defines NODE_NAME')


def node_name() -> str:
    tree = ast.parse(node_module_file().read_text())
    return next(ast.literal_eval(s.value) for s in tree.body if isinstance(s, ast.Assign)
                and any(getattr(t, 'id', None) == 'NODE_NAME' for t in s.targets))


@pytest.fixture(scope='module')
def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text(), filename=str(LAUNCH))


@pytest.fixture(scope='module')
def node_topics() -> set[str]:
    """Relative topics the node subscribes to (second argument of create_subscription in node.py)."""
    tree = ast.parse(node_module_file().read_text())
    return {c.args[1].value for c in ast.walk(tree) if isinstance(c, ast.Call)
            and call_name(c) == 'create_subscription' and isinstance(c.args[1], ast.Constant)}


def declared_parameters() -> dict:
    return {spec.name: spec.default for spec in parameters.all_parameters()}


def test_node_subscribes_to_the_spec_topics(node_topics):
    assert node_topics == {'image', 'depth', 'camera_info', 'instruction', 'clicked_point'}


def test_every_launch_argument_maps_to_a_parameter_remapping_or_launch_setting(launch_tree, node_topics):
    declared = string_args_of(launch_tree, 'DeclareLaunchArgument')
    assert len(declared) == len(set(declared)), 'an argument is declared twice'
    assert set(la.TOPIC_ARGUMENTS) == node_topics, 'every subscribed topic is remappable'
    params = declared_parameters()
    for name, kind in la.PARAMETER_ARGUMENTS.items():
        assert name in params, f"launch argument {name} is not a node parameter"
        assert kind is type(params[name]), f"launch argument {name} converts to the wrong type"
    mapped = set(la.TOPIC_ARGUMENTS.values()) | set(la.PARAMETER_ARGUMENTS) | LAUNCH_LEVEL
    assert set(declared) == mapped, f"unmapped: {set(declared) - mapped}, undeclared: {mapped - set(declared)}"
    # The launch file reads every argument through these tables (flmm_ros.launch_args checks them).
    names = {n.id for n in ast.walk(launch_tree) if isinstance(n, ast.Name)}
    assert {'TOPIC_ARGUMENTS', 'PARAMETER_ARGUMENTS', 'LAUNCH_ARGUMENTS', 'plan'} <= names


def test_spec_launch_arguments_exist(launch_tree):
    declared = set(string_args_of(launch_tree, 'DeclareLaunchArgument'))
    assert {'namespace', 'image_topic', 'depth_topic', 'camera_info_topic', 'instruction_topic', 'params_file',
            'model', 'mask_head', 'backend', 'use_rviz', 'rviz_config', 'log_level', 'input_qos'} <= declared


def declare_call(tree: ast.Module, name: str) -> ast.Call:
    return next(c for c in ast.walk(tree) if isinstance(c, ast.Call) and call_name(c) == 'DeclareLaunchArgument'
                and c.args and getattr(c.args[0], 'value', None) == name)


def test_enumerated_arguments_declare_their_choices(launch_tree):
    for name in ('input_qos', 'log_level'):
        assert 'choices' in {k.arg for k in declare_call(launch_tree, name).keywords}, name


def test_every_launched_process_shuts_the_launch_down_when_it_exits(launch_tree):
    """No orphan: whichever process ends (or fails to start), the launch stops and takes the other with it."""
    nodes = [c for c in ast.walk(launch_tree) if isinstance(c, ast.Call) and call_name(c) == 'Node']
    assert {ast.literal_eval(k.value) for c in nodes for k in c.keywords if k.arg == 'executable'} == {
        'flmm_grounding', 'rviz2'}
    for call in nodes:
        on_exit = next((k.value for k in call.keywords if k.arg == 'on_exit'), None)
        assert isinstance(on_exit, ast.Call) and call_name(on_exit) == 'Shutdown', ast.unparse(call)[:80]


def test_processes_are_created_only_after_every_argument_is_checked(launch_tree):
    setup = next(f for f in launch_tree.body if isinstance(f, ast.FunctionDef) and f.name == '_launch_setup')
    plan_line = min(c.lineno for c in ast.walk(setup) if isinstance(c, ast.Call) and call_name(c) == 'plan')
    node_calls = [c for c in ast.walk(launch_tree) if isinstance(c, ast.Call) and call_name(c) == 'Node']
    assert all(c in list(ast.walk(setup)) and c.lineno > plan_line for c in node_calls)


def test_launch_file_starts_our_node_by_its_console_script(launch_tree):
    source = LAUNCH.read_text()
    assert "executable='flmm_grounding'" in source and 'name=NODE_NAME' in source
    assert la.NODE_NAME == node_name()
    setup = (PKG / 'setup.py').read_text()
    assert "'flmm_grounding = flmm_ros.ros.node:main'" in setup


def flatten(tree: dict, prefix: str = '') -> dict:
    """Nested YAML mappings as ROS reads them: {'tracker': {'memory': 0.8}} -> {'tracker.memory': 0.8}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value
    return flat


def test_yaml_holds_exactly_the_declared_parameters_with_their_defaults():
    document = yaml.safe_load(CONFIG.read_text())
    assert list(document) == [f'/**/{node_name()}']
    values = flatten(document[f'/**/{node_name()}']['ros__parameters'])
    params = declared_parameters()
    assert set(values) == set(params), (f"only in YAML: {set(values) - set(params)}, "
                                        f"only declared: {set(params) - set(values)}")
    for name, default in params.items():
        assert type(values[name]) is type(default), f"{name}: YAML type {type(values[name]).__name__}"
        assert values[name] == default, f"{name}: YAML {values[name]!r} != default {default!r}"
    parameters.validate(values)


def test_pipeline_parameters_are_the_pipeline_config_fields():
    from dataclasses import fields

    from flmm_ros.grounding.config import PipelineConfig
    assert [spec.name for spec in parameters.pipeline_parameters()] == [f.name for f in fields(PipelineConfig)]


def test_rviz_config_parses_and_shows_our_topics():
    config = yaml.safe_load(RVIZ.read_text())
    manager = config['Visualization Manager']
    displays = {d['Name']: d for d in manager['Displays']}
    topics = {d['Topic']['Value']: d['Class'] for d in displays.values() if 'Topic' in d}
    node = f'/{node_name()}'
    assert topics[f'{node}/overlay'] == 'rviz_default_plugins/Image'
    assert topics[f'{node}/mask'] == 'rviz_default_plugins/Image'
    assert topics[f'{node}/markers'] == 'rviz_default_plugins/MarkerArray'
    for display in displays.values():
        assert display['Class'].startswith('rviz_default_plugins/')
        if 'Topic' in display:  # what the node publishes: reliable, volatile
            assert display['Topic']['Reliability Policy'] == 'Reliable'
            assert display['Topic']['Durability Policy'] == 'Volatile'
    from flmm_ros.ros.messages import MARKER_NAMESPACE
    assert displays['Grounded objects 3D']['Namespaces'] == {MARKER_NAMESPACE: True}
    assert manager['Global Options']['Fixed Frame']


@pytest.mark.parametrize('package', ['flmm_ros', 'flmm_msgs'])
def test_package_manifests_are_valid(package):
    manifest = parse_package(str(ROOT / 'ros_ws' / 'src' / package))  # catkin_pkg checks e-mails, names
    manifest.validate()
    assert manifest.name == package
    assert all('@' in m.email for m in manifest.maintainers)
    build_type = manifest.get_build_type()
    assert build_type == ('ament_python' if package == 'flmm_ros' else 'ament_cmake')
    if package == 'flmm_ros':
        assert 'flmm_msgs' in {d.name for d in manifest.build_depends + manifest.exec_depends}


def test_interfaces_are_listed_in_cmake():
    msgs = ROOT / 'ros_ws' / 'src' / 'flmm_msgs'
    cmake = (msgs / 'CMakeLists.txt').read_text()
    files = sorted(p.relative_to(msgs).as_posix() for p in [*msgs.glob('msg/*.msg'), *msgs.glob('action/*.action')])
    assert files == ['action/Ground.action', 'msg/GroundedObject.msg', 'msg/GroundingResult.msg',
                     'msg/TrackedObject.msg', 'msg/TrackedObjects.msg']
    assert all(f'"{f}"' in cmake for f in files)


def test_built_package_installs_launch_config_and_rviz():
    """scripts/setup.sh builds the workspace; its share/ must hold the same files as the sources."""
    share = ROOT / 'ros_ws' / 'install' / 'flmm_ros' / 'share' / 'flmm_ros'
    for source in (LAUNCH, CONFIG, RVIZ):
        installed = share / source.relative_to(PKG)
        assert installed.is_file(), f"{installed} missing: run scripts/setup.sh"
        assert installed.read_text() == source.read_text(), f"{installed} is stale: run scripts/setup.sh"
