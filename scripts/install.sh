#!/usr/bin/env bash
# Installs marginkern in editable mode into the current Python environment, with the given extras.
# torch comes first, pinned (MARGINKERN_TORCH_VERSION overrides): the build of the C++ extension needs it
# importable (--no-build-isolation), and 2.13.0 is the build a fresh CI machine already holds (a CPU one), so
# pip takes that instead of resolving another. An installed torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python -m pip install -q --upgrade pip setuptools wheel
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==${MARGINKERN_TORCH_VERSION:-2.13.0}"
python -m pip install -q --no-build-isolation -e ".[${extras}]"
