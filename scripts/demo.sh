#!/usr/bin/env bash
# The README's main command: set up everything, then run the fleet demo on its embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/skill-edge demo "$@"
