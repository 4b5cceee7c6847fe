#!/usr/bin/env bash
# Installs marginkern with its test dependencies and runs both test tiers:
#   1. the default tier (reference/engine, ops, compile, errors; GPU tests skip without CUDA)
#   2. the Triton kernels, in their own process: TRITON_INTERPRET=1 must be set before triton is imported
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -c "import marginkern.dispatch as d; print(d.explain())"  # which backends this build has, and why not
python -m pytest tests --ignore=tests/interpreter -q "$@"
TRITON_INTERPRET=1 python -m pytest tests/interpreter -q "$@"
