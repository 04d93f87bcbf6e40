#!/usr/bin/env bash
# The README's test command: set up everything, then run the whole suite (no GPU, no ../shared needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec .venv/bin/python -m pytest -q -ra "$@"
