#!/usr/bin/env bash
# Installs marginkern with the benchmark extras and runs the benchmark harness on whatever device is
# present (CUDA if available, else the CPU with smaller default sizes). Results go to bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh "triton,bench"
python bench/run.py "$@"
