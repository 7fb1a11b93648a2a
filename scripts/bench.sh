#!/usr/bin/env bash
# The benchmark on this machine: set up (plus matplotlib for the plots, nginx and h2load for the fast
# sinks), then `pushgw bench` with the given options. Results: bench-results/result.json and PNG plots.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q 'matplotlib>=3.8'
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
  # A fresh machine's package lists may be stale or empty: update them when the first try fails.
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  }
fi
mkdir -p bench-results
exec .venv/bin/pushgw bench --json bench-results/result.json --plots bench-results "$@"
