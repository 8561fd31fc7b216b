#!/usr/bin/env bash
# Install (idempotent) and run the test suite: lint, format check, pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
status=0
.venv/bin/ruff check . && .venv/bin/ruff format --check . || status=$?
if [ "$status" -ne 0 ]; then
  echo "scripts/test.sh: lint/format check failed (run: .venv/bin/ruff check --fix . && .venv/bin/ruff format .)" >&2
  exit "$status"
fi
exec .venv/bin/pytest "$@"
