#!/usr/bin/env bash
# Makes `FROM debian:bookworm` resolvable without a registry: when the image is not in podman's store,
# builds a minimal Debian 12 root filesystem with debootstrap from the apt mirror this machine uses, adds
# this machine's locally installed CA certificates (so HTTPS to PyPI works inside builds behind an
# intercepting proxy) and imports it as docker.io/library/debian:bookworm. Needs root, podman, debootstrap.
set -euo pipefail
IMAGE=docker.io/library/debian:bookworm
export CONTAINERS_CONF=${CONTAINERS_CONF:-$(cd "$(dirname "$0")" && pwd)/containers.conf}

if podman image exists "$IMAGE"; then
  echo "[base_image] $IMAGE present"
  exit 0
fi
if podman pull -q "$IMAGE" >/dev/null 2>&1; then
  echo "[base_image] pulled $IMAGE"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "[base_image] error: $IMAGE cannot be pulled and debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "[base_image] error: debootstrap needs root" >&2; exit 1; }

# The Debian mirror apt already uses here (deb822 or one-line sources), else the public one.
mirror=$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d /tmp/flmm-bookworm.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
echo "[base_image] debootstrap bookworm from $mirror (~1 min)"
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
# Locally added CAs (update-ca-certificates(8): /usr/local/share/ca-certificates), also in the bundle.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
  mkdir -p "$rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import -q - localhost/debian:bookworm >/dev/null
podman tag localhost/debian:bookworm "$IMAGE"
echo "[base_image] imported $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE") bytes)"
