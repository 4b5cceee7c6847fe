#!/usr/bin/env bash
# One visit to the GPU machine (no network; torch/triton/pytest already there, DESIGN.md §8), in stages
# that each fit the device tool's 10-minute limit:
#   bash scripts/gpu_session.sh tests   # editable install (offline, builds marginkern._C_cuda too) + GPU test tier
#   bash scripts/gpu_session.sh triton-tier  # the interpreter tier's Triton tests, compiled for the GPU
#   bash scripts/gpu_session.sh sanitize  # compute-sanitizer memcheck/racecheck over the CUDA ops' tests (csrc/cuda)
#   bash scripts/gpu_session.sh face    # face-recognition benchmarks
#   bash scripts/gpu_session.sh llm     # LLM linear-CE benchmarks: marginkern, naive, torch.compile, floor
#   bash scripts/gpu_session.sh knobs   # linear CE's 3-GEMM mode and gradient filtering (+ filter error)
#   bash scripts/gpu_session.sh peers   # the same cases for liger-kernel and cut-cross-entropy (./wheels)
#   bash scripts/gpu_session.sh emo     # EMO + CE: marginkern, naive, torch.compile, floor
#   bash scripts/gpu_session.sh cosent  # CoSENT from embeddings: marginkern, sentence-transformers, read floor
#   bash scripts/gpu_session.sh micro   # pytest-benchmark micro-benchmarks of the engine's steps (bench/test_microbench.py)
#   bash scripts/gpu_session.sh sweep   # block-size sweep of the Triton kernels (bench/sweep_triton_configs.py)
# Logs and results go to $OUT (the device tool brings that folder back); commit bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/marginkern-gpu}"
mkdir -p "$OUT"
stage="${1:-tests}"

python -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install-$stage.log" 2>&1 \
  || { echo "editable install failed, see install-$stage.log"; tail -20 "$OUT/install-$stage.log"; }
if [ -d wheels ]; then  # optional peers, carried as pure-Python wheels
  python -m pip install -q --no-deps --no-index wheels/*.whl >> "$OUT/install-$stage.log" 2>&1 || true
fi
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/device.txt" 2>&1

case "$stage" in
  tests)
    python -c "import marginkern.dispatch as d; print(d.explain('cuda'))" 2>&1 | tee "$OUT/backends.txt"
    timeout 560 python -m pytest tests/test_gpu.py -q -rs 2>&1 | tee "$OUT/gpu-tests.log" | tail -30
    ;;
  triton-tier)
    timeout 560 python -m pytest tests/interpreter -q -rs 2>&1 | tee "$OUT/triton-tier.log" | tail -30
    ;;
  sanitize)
    # the small-shape op tests of the CUDA kernels under memcheck (out-of-bounds / misaligned accesses)
    # and racecheck (the forward kernel's shared-memory reduction)
    for tool in memcheck racecheck; do
      timeout 270 compute-sanitizer --tool "$tool" --error-exitcode 1 python -m pytest tests/test_gpu.py -q -x \
        -k "cuda_ops_match and (float32 or bfloat16) or special_values or saturates and cuda" 2>&1 \
        | tee "$OUT/sanitize-$tool.log" | tail -8
    done
    ;;
  face|llm|knobs|peers|emo|cosent)
    # each measurement gets 240 s so that one stage fits the device tool's 600 s per command
    case "$stage" in
      face|emo|cosent) args=(--cases "$stage") ;;
      llm) args=(--cases llm --providers "marginkern,marginkern cuda,naive,torch.compile,3-GEMM floor") ;;
      knobs) args=(--cases llm --providers "marginkern 3-GEMM,marginkern 3-GEMM 4GB,marginkern filtered,3-GEMM floor")
             timeout 200 python bench/grad_filter_error.py 2>&1 | tee "$OUT/grad-filter.log" | tail -12 ;;
      peers) args=(--cases llm --providers "liger-kernel,cut-cross-entropy,cut-cross-entropy exact,3-GEMM floor") ;;
    esac
    python bench/run.py "${args[@]}" --tag "$stage" --timeout 240 2>&1 | tee "$OUT/bench-$stage.log" | tail -40
    cp -r bench/results "$OUT/"
    ;;
  micro)
    timeout 560 python -m pytest bench/test_microbench.py --benchmark-only -q \
      --benchmark-json "$OUT/microbench.json" 2>&1 | tee "$OUT/microbench.log" | tail -15
    ;;
  sweep)
    timeout 560 python bench/sweep_triton_configs.py --case "${2:-arcface-1M}" 2>&1 | tee "$OUT/sweep.log" | tail -8
    cp -r bench/results "$OUT/"
    ;;
  *)
    echo "unknown stage $stage (tests|triton-tier|sanitize|face|llm|knobs|peers|emo|cosent|micro|sweep)"; exit 2 ;;
esac
