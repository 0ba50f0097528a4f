#!/usr/bin/env bash
# Set up (if needed) and run the test suite: CPU, float32, tiny configs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# one worker per core (tests run one torch thread each); MTP_TEST_WORKERS=0 runs them in this process
python -m pytest -q -n "${MTP_TEST_WORKERS:-auto}" --dist worksteal "$@"
