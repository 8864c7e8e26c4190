#!/usr/bin/env bash
# Runs the whole test suite inside the project's environment (venv + ROS workspace overlay).
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest -q "$@" tests
