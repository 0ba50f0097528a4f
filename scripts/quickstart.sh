#!/usr/bin/env bash
# Set up (if needed) and run the main job: a 4-token model and its parameter-matched
# next-token twin trained on the Python standard library, compared side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mtp demo --out "${1:-runs/demo}"
