#!/usr/bin/env bash
# Installs marginkern in editable mode into the current Python environment, with the given extras.
# torch is pinned first: an unpinned torch requirement would pull a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${MARGINKERN_TORCH_VERSION:-2.13.0}"
python -m pip install -q --no-build-isolation -e ".[${extras}]"
