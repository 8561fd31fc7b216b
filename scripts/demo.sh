#!/usr/bin/env bash
# Install (idempotent) and run the end-to-end demo on the built-in MNIST default. Args go to `spae demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
exec .venv/bin/spae demo "$@"
