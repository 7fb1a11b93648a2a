#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the test suite (each test run starts its own Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
# mypy cannot follow setuptools' editable import hook, so it reads the same folders through links
# that give them their installed names (pushgw.gateway -> gateway/, ...).
rm -rf build/typecheck && mkdir -p build/typecheck/pushgw
for d in gateway providers queue ratelimit bench campaigns; do ln -s "$PWD/$d" "build/typecheck/pushgw/$d"; done
MYPYPATH=build/typecheck .venv/bin/mypy -p pushgw.gateway -p pushgw.providers -p pushgw.queue -p pushgw.ratelimit -p pushgw.bench -p pushgw.campaigns
echo "==> pytest"
.venv/bin/pytest "$@"
