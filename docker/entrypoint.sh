#!/usr/bin/env bash
# Entrypoint of every flmm_ros image (Dockerfile, Dockerfile.jetson, Dockerfile.debian).
#
#   <no arguments> | name:=value ...   ros2 launch flmm_ros grounding.launch.py name:=value ...
#                                      (where `ros2 launch` is missing, e.g. the Debian image built on
#                                      PyPI ROS wheels: the same arguments start the node directly)
#   demo [options]                     the project's demo (python -m flmm_ros.demo)
#   healthcheck [options]              exit 0 when the node is in the ROS graph (the images' HEALTHCHECK)
#   <any other command>                run it in the sourced environment (bash, ros2 topic list, ...)
set -eo pipefail
FLMM_ROOT=${FLMM_ROOT:-/flmm_ros}

# ROS 2 from apt (official ros: and Jetson images); its setup scripts read unset variables, hence no -u.
if [ -n "${ROS_DISTRO:-}" ] && [ -f "/opt/ros/${ROS_DISTRO}/setup.bash" ]; then
  # shellcheck disable=SC1090
  source "/opt/ros/${ROS_DISTRO}/setup.bash"
fi
if [ -f "$FLMM_ROOT/.venv/bin/activate" ]; then
  # The project's own environment (scripts/setup.sh: .venv with the PyPI ROS wheels + the workspace overlay).
  # shellcheck disable=SC1091
  source "$FLMM_ROOT/scripts/env.sh"
elif [ -f "$FLMM_ROOT/ros_ws/install/setup.bash" ]; then
  # shellcheck disable=SC1091
  source "$FLMM_ROOT/ros_ws/install/setup.bash"
fi

has_ros2_launch() {
  command -v ros2 >/dev/null && python3 -c 'import launch_ros' >/dev/null 2>&1
}

if [ $# -eq 0 ] || [[ "$1" == *:=* ]]; then
  if has_ros2_launch; then
    exec ros2 launch flmm_ros grounding.launch.py "$@"
  fi
  exec python3 -m flmm_ros.launch_args "$@"
fi
if [ "$1" = healthcheck ]; then
  shift
  exec python3 -m flmm_ros.healthcheck "$@"
fi
if [ "$1" = demo ]; then
  shift
  cd "$FLMM_ROOT"
  exec python3 -m flmm_ros.demo "$@"
fi
exec "$@"
