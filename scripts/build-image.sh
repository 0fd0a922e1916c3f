#!/usr/bin/env bash
# Builds vmpool's base grading image with no registry: a debootstrap
# "minbase" Debian root file system with make, gcc, libc6-dev and python3,
# plus the grading user `autograde`, imported with `docker import`.
# Skipped when the image already exists (--force rebuilds).
#
# The Debian mirror and suite are taken from this machine's own apt sources.
#   DOCKER_HOST=unix:///run/vmpool/docker.sock scripts/build-image.sh [IMAGE] [--force]
set -euo pipefail
IMAGE="${1:-vmpool/grader:latest}"
FORCE="${2:-}"

if [ "$FORCE" != "--force" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build-image: $IMAGE exists" >&2
  exit 0
fi
[ "$(id -u)" = 0 ] || { echo "build-image: debootstrap needs root" >&2; exit 1; }
command -v debootstrap >/dev/null 2>&1 || {
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

# The first Debian mirror and suite this machine's apt uses (deb822 or one-line format).
mirror="" suite=""
if compgen -G "/etc/apt/sources.list.d/*.sources" >/dev/null; then
  for f in /etc/apt/sources.list.d/*.sources; do
    m=$(awk '/^URIs:/ {print $2; exit}' "$f")
    s=$(awk '/^Suites:/ {print $2; exit}' "$f")
    case "$m" in *debian-security*|"") continue ;; esac
    if grep -q '^Types:.*deb' "$f"; then mirror=$m suite=$s; break; fi
  done
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  read -r mirror suite < <(awk '$1=="deb" && $2 !~ /security/ {print $2, $3; exit}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] && [ -n "$suite" ] || { echo "build-image: no Debian mirror in apt sources" >&2; exit 1; }
echo "build-image: debootstrap $suite from $mirror" >&2

root=$(mktemp -d /var/tmp/vmpool-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=make,gcc,libc6-dev,python3 "$suite" "$root" "$mirror" \
  >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; exit 1; }
rm -f "$root.log"
chroot "$root" useradd --create-home --shell /bin/sh autograde
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin
tar -C "$root" -c . | docker import \
  --change 'CMD ["tail", "-f", "/dev/null"]' \
  --change 'LABEL vmpool.image=grader' - "$IMAGE" >/dev/null
echo "build-image: built $IMAGE ($(docker image inspect --format '{{.Size}}' "$IMAGE") bytes)" >&2
