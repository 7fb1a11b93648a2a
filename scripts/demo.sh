#!/usr/bin/env bash
# README command 1: set up, then run the main job on the embedded default (private Redis, local provider fakes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/pushgw demo "$@"
