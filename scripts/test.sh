#!/usr/bin/env bash
# Set up (if needed) and run the test suite: CPU, float32, tiny configs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q "$@"
