#!/usr/bin/env bash
# Stops the dockerd that scripts/docker-up.sh started (and nothing else).
set -euo pipefail
marker=/run/vmpool/dockerd.started-by-vmpool
[ -f "$marker" ] || exit 0
pid=$(cat "$marker")
if kill -0 "$pid" 2>/dev/null; then
  kill "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  kill -9 "$pid" 2>/dev/null || true
fi
rm -f "$marker"
