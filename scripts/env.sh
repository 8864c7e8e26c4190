# Sourced by scripts: activates .venv and, when built, the ROS 2 workspace overlay.
ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
source "$ROOT_DIR/.venv/bin/activate"
if [ -f "$ROOT_DIR/ros_ws/install/setup.bash" ]; then
  # shellcheck disable=SC1091
  source "$ROOT_DIR/ros_ws/install/setup.bash"
fi
export PYTHONPATH="$ROOT_DIR/ros_ws/src/flmm_ros${PYTHONPATH:+:$PYTHONPATH}"
