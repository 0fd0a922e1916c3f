#!/usr/bin/env bash
# Makes a Docker engine reachable for vmpool and prints the DOCKER_HOST to use.
#
# If $DOCKER_HOST (or the default socket) already answers, that engine is
# used. Otherwise Debian's docker.io is installed if missing and dockerd is
# started on a private socket with --iptables=false --bridge=none (jobs use
# network "none"; a pool that allows network uses host networking only when
# configured so). scripts/docker-down.sh stops what this started.
set -euo pipefail
SOCK="${VMPOOL_DOCKER_SOCK:-/run/vmpool/docker.sock}"
STATE=/run/vmpool
mkdir -p "$STATE"

answers() { DOCKER_HOST="$1" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1; then
  if [ -n "${DOCKER_HOST:-}" ] && answers "$DOCKER_HOST"; then echo "$DOCKER_HOST"; exit 0; fi
  if [ -S /var/run/docker.sock ] && answers unix:///var/run/docker.sock; then
    echo unix:///var/run/docker.sock; exit 0
  fi
  if [ -S "$SOCK" ] && answers "unix://$SOCK"; then echo "unix://$SOCK"; exit 0; fi
fi

if ! command -v dockerd >/dev/null 2>&1; then
  [ "$(id -u)" = 0 ] || { echo "docker-up: dockerd missing; as root: apt-get install docker.io" >&2; exit 1; }
  echo "docker-up: installing docker.io" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
fi

echo "docker-up: starting dockerd on $SOCK" >&2
rm -f "$SOCK"
nohup dockerd --host "unix://$SOCK" --iptables=false --ip6tables=false --bridge=none \
  --data-root /var/lib/vmpool-docker --exec-root "$STATE/docker-exec" \
  --pidfile "$STATE/dockerd.pid" >"$STATE/dockerd.log" 2>&1 &
echo $! >"$STATE/dockerd.started-by-vmpool"
for _ in $(seq 1 120); do
  if answers "unix://$SOCK"; then echo "unix://$SOCK"; exit 0; fi
  if ! kill -0 "$(cat "$STATE/dockerd.started-by-vmpool")" 2>/dev/null; then break; fi
  sleep 0.5
done
echo "docker-up: dockerd did not come up; its log:" >&2
tail -30 "$STATE/dockerd.log" >&2
exit 1
