#!/usr/bin/env bash
# The demo: the flmm_grounding node on the embedded default model, asked "pick the red mug".
set -eo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m flmm_ros.demo "$@"
