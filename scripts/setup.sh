#!/usr/bin/env bash
# Sets up everything the gateway needs on a fresh machine; safe to run again (it only adds what is missing).
#  - redis-server >= 6.2 and promtool (Debian's packages when missing; else it says what to do)
#  - a virtualenv in .venv with the gateway and its test tools
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "pushgw needs Python 3.11 or newer (found: $("$PY" --version 2>&1))" >&2
  exit 1
fi

# Debian packages: redis-server (the gateway and the tests start private servers from it; its own
# service is not used) and promtool from prometheus (checks the alert rules and the metrics format).
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
if [ "${PUSHGW_SKIP_PROMTOOL:-}" != "1" ]; then command -v promtool >/dev/null 2>&1 || need+=(prometheus); fi
if [ ${#need[@]} -gt 0 ]; then
  echo "==> installing Debian packages: ${need[*]}"
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
      echo "missing ${need[*]} and this user cannot install packages: apt-get install ${need[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.pushgw-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "==> installing pushgw and its test tools into .venv"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[test]'
  touch "$stamp"
fi
