#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up, then the default test suite.
# Slow tests (training, tuning) are deselected by default; run them with: pytest -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${PYTHON:-python3}"
exec "$PY" -m pytest -q "$@"
