#!/usr/bin/env bash
# The LLM benchmark's peers as wheels in ./wheels (git-ignored), for the offline GPU machine (Python 3.12):
# both are pure Python and need only torch and triton, which that machine has. Run here, then name
# `wheels` in the device tool's `carry`; scripts/gpu_session.sh installs them into /tmp/peers.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d wheels \
  "liger-kernel==${LIGER_VERSION:-0.8.5}" "cut-cross-entropy==${CCE_VERSION:-25.1.1}"
ls -l wheels
