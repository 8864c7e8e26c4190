"""Launch arguments of flmm_grounding, checked before anything starts (no `launch` import needed).

`launch/grounding.launch.py` hands the arguments' text to `plan()` and builds its actions from the
result; where `ros2 launch` is missing (PyPI ROS wheels, the Debian test image), the same arguments
start the node directly:

    python -m flmm_ros.launch_args model:=/path/to/bundle device:=cuda input_qos:=RELIABLE

Every bad value is reported at once, in one LaunchArgumentError, before a process is started.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

NODE_NAME = 'flmm_grounding'
PACKAGE = 'flmm_ros'
# Node topic -> the launch argument naming what it is remapped to.
TOPIC_ARGUMENTS = {
    'image': 'image_topic',
    'depth': 'depth_topic',
    'camera_info': 'camera_info_topic',
    'instruction': 'instruction_topic',
    'clicked_point': 'clicked_point_topic',
}
# Launch arguments handed to the node as parameters of the same name (when not empty): name -> type.
PARAMETER_ARGUMENTS = {
    'model': str,
    'mask_head': str,
    'backend': str,
    'device': str,
    'use_3d': bool,
    'input_qos': str,
    'autostart': bool,
}
# Arguments the launch itself consumes.
LAUNCH_ARGUMENTS = ('namespace', 'params_file', 'use_rviz', 'rviz_config', 'log_level')
# What rcl accepts for --log-level, and roslaunch's boolean spellings (launch.conditions: true/false/1/0).
LOG_LEVELS = ('debug', 'info', 'warn', 'error', 'fatal')
TRUE_TEXT, FALSE_TEXT = ('true', '1'), ('false', '0')
# The node's input_qos presets (flmm_ros.ros.qos; a test keeps the two lists equal).
QOS_PRESETS = ('SENSOR_DATA', 'DEFAULT', 'SYSTEM_DEFAULT', 'BEST_EFFORT', 'RELIABLE')
CHOICES = {'log_level': LOG_LEVELS, 'input_qos': ('', *QOS_PRESETS)}


class LaunchArgumentError(ValueError):
    """A launch argument has a value the node or the launch cannot use; the message names each one."""


@dataclass
class LaunchPlan:
    """What to start, from validated arguments."""

    namespace: str
    params_file: str
    overrides: dict = field(default_factory=dict)
    remappings: list = field(default_factory=list)
    log_level: str = 'info'
    use_rviz: bool = False
    rviz_config: str = ''


def parse_bool(name: str, text: str) -> bool:
    """`true`/`false`/`1`/`0` (any case, like launch's conditions); anything else is an error, not False."""
    value = text.strip().lower()
    if value in TRUE_TEXT:
        return True
    if value in FALSE_TEXT:
        return False
    raise LaunchArgumentError(f"{name}:={text!r} is not a boolean: use true or false")


def normalize_namespace(text: str) -> str:
    """'' -> '', 'robot1' / '/robot1/' -> '/robot1'; ROS name rules (letters, digits, _, /)."""
    parts = [p for p in text.strip().split('/') if p]
    for part in parts:
        if not re.fullmatch(r'[A-Za-z_][A-Za-z0-9_]*', part):
            raise LaunchArgumentError(f"namespace:={text!r} is not a valid ROS namespace "
                                      "(letters, digits and _ separated by /, not starting with a digit)")
    return '/' + '/'.join(parts) if parts else ''


def plan(arguments: dict[str, str], *, rviz_available=None) -> LaunchPlan:
    """Check every argument (all errors in one message) and return what to start."""
    errors, overrides = [], {}
    for name, kind in PARAMETER_ARGUMENTS.items():
        text = arguments.get(name, '')
        if text == '':
            continue  # empty: the params file decides
        try:
            overrides[name] = parse_bool(name, text) if kind is bool else text
        except LaunchArgumentError as error:
            errors.append(str(error))
    for name, allowed in CHOICES.items():
        text = arguments.get(name, '')
        check = text.lower() if name == 'log_level' else text
        if check not in allowed:
            errors.append(f"{name}:={text!r} is not one of {', '.join(a for a in allowed if a)}")
    use_rviz = False
    try:
        use_rviz = parse_bool('use_rviz', arguments.get('use_rviz', 'false'))
    except LaunchArgumentError as error:
        errors.append(str(error))
    namespace = ''
    try:
        namespace = normalize_namespace(arguments.get('namespace', ''))
    except LaunchArgumentError as error:
        errors.append(str(error))
    if use_rviz and not (rviz_available or rviz2_installed)():
        errors.append("use_rviz:=true but rviz2 is not installed (apt install ros-$ROS_DISTRO-rviz2), "
                      "or start without use_rviz")
    if errors:
        raise LaunchArgumentError('invalid launch arguments: ' + '; '.join(errors))
    remappings = [(topic, arguments[arg]) for topic, arg in TOPIC_ARGUMENTS.items() if arguments.get(arg)]
    return LaunchPlan(namespace=namespace, params_file=arguments.get('params_file', ''), overrides=overrides,
                      remappings=remappings, log_level=arguments.get('log_level', 'info').lower(),
                      use_rviz=use_rviz, rviz_config=arguments.get('rviz_config', ''))


def rviz2_installed() -> bool:
    """rviz2 is a ROS package (lib/rviz2/rviz2), found through the ament index as launch_ros would."""
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_prefix
    except ImportError:
        return False
    try:
        prefix = get_package_prefix('rviz2')
    except PackageNotFoundError:
        return False
    return os.access(os.path.join(prefix, 'lib', 'rviz2', 'rviz2'), os.X_OK)


def rviz_config_for_namespace(text: str, namespace: str) -> str:
    """The RViz config with our node's topics (/flmm_grounding/...) moved under `namespace`.

    RViz configs name absolute topics; nav2 rewrites its config the same way for a namespaced robot."""
    if not namespace:
        return text
    return re.sub(rf'(\bValue:\s*)/{NODE_NAME}/', rf'\g<1>{namespace}/{NODE_NAME}/', text)


def write_rviz_config(source: str, namespace: str) -> str:
    """Path of an RViz config for `namespace`: `source` itself when nothing changes, else a rewritten copy."""
    text = Path(source).read_text()
    rendered = rviz_config_for_namespace(text, namespace)
    if rendered == text:
        return source
    handle, path = tempfile.mkstemp(prefix=f'{NODE_NAME}_', suffix='.rviz')
    with os.fdopen(handle, 'w') as out:
        out.write(rendered)
    return path


def log_level_argument(namespace: str, level: str) -> str:
    """`--log-level` value for the node's own logger ('robot1.flmm_grounding:=debug'): at debug level
    rcl/rmw (timers, discovery) would bury the node's messages, so they stay at their default."""
    logger = '.'.join([*namespace.strip('/').split('/'), NODE_NAME]).lstrip('.')
    return f'{logger}:={level}'


def default_params_file() -> str:
    """config/grounding.yaml of the installed package, else of this source tree."""
    share = Path(__file__).resolve().parents[1]  # the source tree, unless the package is installed
    try:
        from ament_index_python.packages import PackageNotFoundError, get_package_share_directory
    except ImportError:
        return str(share / 'config' / 'grounding.yaml')
    try:
        share = Path(get_package_share_directory(PACKAGE))
    except PackageNotFoundError:
        pass
    return str(share / 'config' / 'grounding.yaml')


def node_command(launch_plan: LaunchPlan, python: str = sys.executable) -> list[str]:
    """The node's command line equivalent to what the launch file starts (for hosts without `ros2 launch`)."""
    ros_args = ['--ros-args', '-r', f'__node:={NODE_NAME}',
                '--log-level', log_level_argument(launch_plan.namespace, launch_plan.log_level)]
    if launch_plan.namespace:
        ros_args += ['-r', f'__ns:={launch_plan.namespace}']
    if launch_plan.params_file:
        ros_args += ['--params-file', launch_plan.params_file]
    for name, value in launch_plan.overrides.items():
        ros_args += ['-p', f"{name}:={str(value).lower() if isinstance(value, bool) else value}"]
    for topic, target in launch_plan.remappings:
        ros_args += ['-r', f'{topic}:={target}']
    return [python, '-m', 'flmm_ros.ros.node', *ros_args]


def parse_cli(argv: list[str]) -> dict[str, str]:
    """`name:=value` words (as `ros2 launch` takes them) -> dict; unknown names are errors."""
    known = {*TOPIC_ARGUMENTS.values(), *PARAMETER_ARGUMENTS, *LAUNCH_ARGUMENTS}
    arguments = {'params_file': default_params_file(), 'log_level': 'info', 'use_rviz': 'false',
                 'clicked_point_topic': '/clicked_point'}   # where RViz's Publish Point tool publishes
    for word in argv:
        name, sep, value = word.partition(':=')
        if not sep or name not in known:
            raise LaunchArgumentError(f"{word!r}: expected name:=value with name one of {', '.join(sorted(known))}")
        arguments[name] = value
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Validate `name:=value` launch arguments and replace this process with the node."""
    try:
        launch_plan = plan(parse_cli(sys.argv[1:] if argv is None else argv))
    except LaunchArgumentError as error:
        print(f"[flmm_ros] {error}", file=sys.stderr)
        return 2
    command = node_command(launch_plan)
    print(f"[flmm_ros] no `ros2 launch` here; starting the node: {' '.join(command[1:])}", flush=True)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == '__main__':
    sys.exit(main())
