#!/usr/bin/env bash
# Sets up vmpool on this machine: the Debian packages its default driver
# needs (bubblewrap, passt, make, gcc, python3-venv), a virtualenv in .venv, and
# vmpool installed into it. `setup.sh dev` adds the test and lint tools.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v bwrap >/dev/null 2>&1 || need+=(bubblewrap)
command -v pasta >/dev/null 2>&1 || need+=(passt)          # jobs' own network namespace
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v nsenter >/dev/null 2>&1 || need+=(util-linux)
command -v make >/dev/null 2>&1 || need+=(make)
command -v gcc >/dev/null 2>&1 || need+=(gcc libc6-dev)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if ((${#need[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "vmpool setup: missing packages: ${need[*]}; install them as root:" >&2
    echo "  apt-get install -y ${need[*]}" >&2
    exit 1
  fi
  echo "vmpool setup: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"
.venv/bin/pip install -q -e ".${extras}"
