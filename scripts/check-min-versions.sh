#!/usr/bin/env bash
# The lowest dependency versions setup.cfg allows, installed into .venv-min (uv's lowest-direct resolution: each
# direct dependency at its floor, what they pull in resolved normally), then the test suite on them.
#   bash scripts/check-min-versions.sh [pytest arguments]
# Results: benchmarks/results/min_versions.md. torch stays at the CPU build this project pins (2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-min/bin/python ] || python3 -m venv .venv-min
.venv-min/bin/python -m pip install -q "torch==2.13.0" "uv>=0.4"
# pandas: the lowest-direct resolution may pick a pandas release without wheels for this Python (built from
# source, it imports without its C extension); any 2.2 release works with every floor.
.venv-min/bin/uv pip install --python .venv-min/bin/python --resolution lowest-direct "torch==2.13.0" \
    "pandas>=2.2,<3" -e ".[test]"
.venv-min/bin/uv pip list --python .venv-min/bin/python 2>/dev/null | grep -iE \
    "^(torch|diffusers|transformers|accelerate|peft|datasets|safetensors|huggingface-hub|pillow|numpy|tqdm|tensorboard|pytest|flake8) "
.venv-min/bin/python -m pytest -q "$@"
