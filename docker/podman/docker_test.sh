#!/usr/bin/env bash
# `make docker-test`: builds docker/Dockerfile.debian with podman (the project's own setup inside an image
# from debian:bookworm), runs `make demo` in it and checks the demo's output, then starts the default
# entrypoint (the node) and waits for the image's HEALTHCHECK to pass. Prints build time and image size;
# logs and a summary go to out/docker-test/.
#
# Needs podman (installed with apt when missing and run as root). Where no registry is reachable,
# docker/podman/base_image.sh makes debian:bookworm with debootstrap. pip inside the build sees the same
# local wheel mirrors as this machine (pip config: find-links, file:// extra indexes), mounted read-only,
# so the pinned torch wheels are not downloaded again.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
HERE=$ROOT/docker/podman
IMAGE=${FLMM_TEST_IMAGE:-localhost/flmm_ros:debian}
OUT=$ROOT/out/docker-test
CONTAINER=flmm-docker-test-$$
export CONTAINERS_CONF=${CONTAINERS_CONF:-$HERE/containers.conf}
mkdir -p "$OUT"

if ! command -v podman >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[docker-test] installing podman, debootstrap and runc (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman debootstrap runc >/dev/null
  else
    echo "[docker-test] error: podman is needed (apt-get install podman debootstrap runc)" >&2
    exit 1
  fi
fi
bash "$HERE/base_image.sh"

# This machine's pip mirrors, for the build (its pip config lives outside the image).
pip_conf() { python3 -m pip config get "global.$1" 2>/dev/null || true; }
build_args=(--build-arg "PIP_EXTRA_INDEX_URL=$(pip_conf extra-index-url | tr '\n' ' ')"
            --build-arg "PIP_FIND_LINKS=$(pip_conf find-links | tr '\n' ' ')")
index=$(pip_conf index-url)
[ -n "$index" ] && build_args+=(--build-arg "PIP_INDEX_URL=$index")
mounts=()
for location in $(pip_conf extra-index-url) $(pip_conf find-links) $index; do
  dir=${location#file://}
  [[ "$location" == http* ]] && continue
  [ "$(basename "$dir")" = simple ] && dir=$(dirname "$dir")  # the index's links point into its parent
  [ -d "$dir" ] && mounts+=(-v "$dir:$dir:ro")
done

echo "[docker-test] podman build -f docker/Dockerfile.debian -t $IMAGE (first time: several minutes)"
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
start=$(date +%s)
# FLMM_DOCKER_NO_CACHE=1: a cold build (no cached layers), for timing.
cache=(); [ -n "${FLMM_DOCKER_NO_CACHE:-}" ] && cache=(--no-cache)
podman build --format docker --network host "${cache[@]}" "${mounts[@]}" "${build_args[@]}" \
  -f docker/Dockerfile.debian -t "$IMAGE" . 2>&1 | tee "$OUT/build.log" | grep -E '^(STEP|COMMIT|\[setup)' || true
[ "${PIPESTATUS[0]}" = 0 ] || { echo "[docker-test] build failed; see $OUT/build.log" >&2; exit 1; }
build_seconds=$(( $(date +%s) - start ))
# The previous build of this tag (7 GB) is now untagged: remove it unless it is still the same image.
current=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then podman rmi "$previous" >/dev/null 2>&1 || true; fi
size_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "[docker-test] built in ${build_seconds} s; image size $(( size_bytes / 1000000 )) MB"

# No systemd here to time health checks: the demo runs without one, the node's runs on demand
# (podman healthcheck run) and podman's complaints about the missing systemd timers are dropped.
run_opts=(--network host)
no_timer_noise() { grep -v 'unable to get systemd connection' >&2 || true; }
echo "[docker-test] podman run --rm --network host $IMAGE make demo"
rm -rf "$OUT/demo" && mkdir -p "$OUT/demo"
start=$(date +%s)
podman run --rm "${run_opts[@]}" --no-healthcheck -v "$OUT/demo:/flmm_ros/out/demo" "$IMAGE" make demo 2>&1 \
  | tee "$OUT/demo.log"
demo_rc=${PIPESTATUS[0]}
demo_seconds=$(( $(date +%s) - start ))
[ "$demo_rc" = 0 ] || { echo "[docker-test] demo exited with $demo_rc" >&2; exit 1; }
# The demo's own lines, one grounded object named by the instruction, and the overlay it wrote.
for pattern in '^asking: "pick the red mug"$' '^objects: 1$' "^  1\. 'the red mug' score 0\.[0-9]+ box " \
               '^overlay saved to out/demo/overlay.png$'; do
  grep -qE "$pattern" "$OUT/demo.log" || { echo "[docker-test] demo output lacks /$pattern/" >&2; exit 1; }
done
[ -s "$OUT/demo/overlay.png" ] || { echo "[docker-test] the demo wrote no overlay image" >&2; exit 1; }

echo "[docker-test] HEALTHCHECK without a node: must fail"
podman run -d --name "$CONTAINER-idle" "${run_opts[@]}" -e ROS_DOMAIN_ID=$(( 100 + $$ % 100 )) "$IMAGE" \
  sleep 120 >/dev/null 2> >(no_timer_noise)
if podman healthcheck run "$CONTAINER-idle" >/dev/null 2>&1; then
  podman rm -f "$CONTAINER-idle" >/dev/null 2>&1
  echo "[docker-test] the health check passed with no node running" >&2; exit 1
fi
podman rm -f "$CONTAINER-idle" >/dev/null 2>&1

echo "[docker-test] default entrypoint (the node), then its HEALTHCHECK"
domain=$(( 100 + $$ % 100 ))
podman run -d --name "$CONTAINER" "${run_opts[@]}" -e ROS_DOMAIN_ID=$domain \
  -e ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST "$IMAGE" >/dev/null 2> >(no_timer_noise)
trap 'podman rm -f "$CONTAINER" >/dev/null 2>&1 || true' EXIT
healthy=no
for _ in $(seq 1 30); do
  if podman healthcheck run "$CONTAINER" >/dev/null 2>&1; then healthy=yes; break; fi
  [ "$(podman inspect --format '{{.State.Running}}' "$CONTAINER")" = true ] || break
  sleep 2
done
podman logs "$CONTAINER" > "$OUT/node.log" 2>&1
[ "$healthy" = yes ] || { echo "[docker-test] the node never became healthy; see $OUT/node.log" >&2; exit 1; }
start=$(date +%s)
podman stop -t 20 "$CONTAINER" >/dev/null 2> >(no_timer_noise)
stop_seconds=$(( $(date +%s) - start ))
node_rc=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
podman logs "$CONTAINER" > "$OUT/node.log" 2>&1
[ "$node_rc" = 0 ] || { echo "[docker-test] the node exited with $node_rc on stop; see $OUT/node.log" >&2; exit 1; }

{
  echo "image: $IMAGE (docker/Dockerfile.debian, from debian:bookworm)"
  echo "build: ${build_seconds} s"
  echo "size: ${size_bytes} bytes ($(( size_bytes / 1000000 )) MB)"
  echo "demo: ${demo_seconds} s, exit 0; $(grep -E "^  1\\. " "$OUT/demo.log")"
  echo "node: healthy, stopped cleanly in ${stop_seconds} s (exit 0)"
} | tee "$OUT/summary.txt"
echo "[docker-test] passed"
