#!/usr/bin/env bash
# README command 2: set up, then lint, type-check and run the test suite (each test run starts its own Redis).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "==> ruff"
.venv/bin/ruff check .
echo "==> mypy"
# The repository root is the pushgw package and every import inside it is relative, so mypy reads the
# folders as they are (files and excludes in pyproject.toml). mypy names the package after the folder
# that holds it, so in a clone whose folder name is no Python identifier it reads a copy instead.
if [[ "$(basename "$PWD")" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  .venv/bin/mypy
else
  # The copy lives outside the clone: inside it, mypy still names the clone's folder.
  copy=$(mktemp -d)
  trap 'rm -rf "$copy"' EXIT
  mkdir "$copy/pushgw"
  git ls-files -z -- '*.py' py.typed pyproject.toml | xargs -0 cp --parents -t "$copy/pushgw"
  (cd "$copy/pushgw" && "$OLDPWD/.venv/bin/mypy")
fi
echo "==> pytest"
.venv/bin/pytest "$@"
