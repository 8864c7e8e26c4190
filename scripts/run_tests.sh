#!/usr/bin/env bash
# Runs the whole test suite inside the project's environment (venv + ROS workspace overlay).
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# The tests and the nodes they start share the CPU: sleeping (not spinning) OpenMP threads keep one from
# starving the other (the node sets the same for itself; see flmm_ros/ros/node.py).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec python -m pytest -q "$@" tests
