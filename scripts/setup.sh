#!/usr/bin/env bash
# Idempotent setup of a fresh Debian 12 / Python 3.11 machine: .venv with pinned dependencies,
# then the ROS 2 workspace (scripts/setup_ros.sh). A re-run on a set-up machine takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi

# Reinstall only when requirements.txt changed (stamp = its hash).
stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned Python dependencies (first time: ~2 min)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$want" > "$stamp"
else
  echo "[setup] Python dependencies up to date"
fi

if [ -f scripts/setup_ros.sh ]; then
  bash scripts/setup_ros.sh
fi
echo "[setup] done ($ROOT)"
