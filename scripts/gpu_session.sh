#!/usr/bin/env bash
# One visit to the GPU machine (no network; torch/triton/pytest already there, DESIGN.md §8), in stages
# that each fit the device tool's 10-minute limit:
#   bash scripts/gpu_session.sh visit   # ONE short visit (~9 min): the Triton GPU tests, issue 5's memcheck, the size and
#                                       # memory tests, the quick tile sweep, the headline benchmarks with the sweep's
#                                       # fastest configs (and the peers, if ./wheels was carried), then the CUDA
#                                       # backend's tests and a profile; each step under a time budget; everything in
#                                       # $OUT/visit.tgz
#   bash scripts/gpu_session.sh tests   # GPU test tier (extensions, marginkern._C_cuda too, built in place first)
#   bash scripts/gpu_session.sh triton-tier  # the interpreter tier's Triton tests, compiled for the GPU
#   bash scripts/gpu_session.sh sanitize  # compute-sanitizer memcheck/racecheck over the CUDA ops' tests (csrc/cuda)
#   bash scripts/gpu_session.sh face    # face-recognition benchmarks
#   bash scripts/gpu_session.sh llm     # LLM linear-CE benchmarks: marginkern, naive, torch.compile, floor
#   bash scripts/gpu_session.sh knobs   # linear CE's 3-GEMM mode and gradient filtering (+ filter error)
#   bash scripts/gpu_session.sh peers   # the same cases for liger-kernel and cut-cross-entropy (./wheels, from
#                                       # scripts/fetch_peer_wheels.sh; name `wheels` in the device tool's carry)
#   bash scripts/gpu_session.sh emo     # EMO + CE: marginkern, naive, torch.compile, floor
#   bash scripts/gpu_session.sh cosent  # CoSENT from embeddings: marginkern, sentence-transformers, read floor
#   bash scripts/gpu_session.sh micro   # pytest-benchmark micro-benchmarks of the engine's steps (bench/test_microbench.py)
#   bash scripts/gpu_session.sh sweep   # block-size sweep of the Triton kernels (bench/sweep_triton_configs.py)
# Logs and results go to $OUT (the device tool brings that folder back); commit bench/results/<device>/.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)  # the visit's budget (VISIT_S) counts from here: the set-up below is part of it
OUT="${OUT:-/tmp/marginkern-gpu}"
stage="${1:-tests}"
REAL_OUT="$OUT"
# A visit writes its logs and results to a folder of its own and packs it into $REAL_OUT/visit.tgz after every
# step (the device tool brings back at most 8 files, and nothing of a command cut at its limit but what is
# already there): a visit stopped at any point still brings back everything up to its last finished step.
if [ "$stage" = visit ]; then OUT=/tmp/visit-out; rm -rf "$OUT"; fi
mkdir -p "$OUT" "$REAL_OUT"
pack() {  # after every step's pipeline (its tee has then written the step's log to the end)
  [ "$stage" = visit ] || return 0
  # tar exits 1 when a file changed while it read it (the background build's log): the archive is still
  # good. The part file sits beside the archive, so the rename is atomic (no half-copied visit.tgz).
  tar czf "$REAL_OUT/visit.tgz.part" -C "$OUT" . 2>> "$OUT/pack.log"
  if [ $? -le 1 ]; then mv "$REAL_OUT/visit.tgz.part" "$REAL_OUT/visit.tgz"; else echo "pack failed" >> "$OUT/visit.log"; fi
  cp "$OUT/visit.log" "$REAL_OUT/visit.log" 2>/dev/null; return 0
}
SANITIZER=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")

# No pip install: the machine is offline and pip's editable install wants setuptools from the network
# (PEP 517 build isolation). The source tree is used as it is: the Triton package linked where the
# installed layout has it (setup.py's package_dir), the extensions built in place.
ln -sfn ../triton_kernels marginkern/triton_kernels
build_extensions() { MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace; }
if [ "$stage" != visit ]; then  # (visit builds them in a copy, beside its first tests)
  build_extensions > "$OUT/build-$stage.log" 2>&1 || { echo "extension build failed"; tail -20 "$OUT/build-$stage.log"; }
fi
if compgen -G "wheels/*.whl" > /dev/null; then  # the optional peers (scripts/fetch_peer_wheels.sh, carried)
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/peers \
    wheels/*.whl >> "$OUT/install-$stage.log" 2>&1 && export PYTHONPATH="/tmp/peers${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi; python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"; } \
  > "$OUT/device.txt" 2>&1

left() { echo $(( ${VISIT_S:-540} - ($(date +%s) - T0) )); }  # seconds of the visit's budget still left
log() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/visit.log"; }
# run "$@" with a timeout of min(cap, what is left minus a reserve); skipped when under 20 s would be left
budgeted() {
  local cap=$1 reserve=$2; shift 2
  local t=$(( $(left) - reserve )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then log "skipped (no time left): $*"; return 0; fi
  log "start (timeout ${t}s): $*"; timeout "$t" "$@"; log "rc=$? after: $*"
}
visit_build_extensions() {
  local repo=$PWD
  rm -rf /tmp/mkext && cp -r . /tmp/mkext && cd /tmp/mkext && MAX_JOBS=8 build_extensions > "$OUT/build.log" 2>&1
  for so in marginkern/_C*.so; do  # a new file moved into place: a test process may have the old one mapped
    cp "$so" "$repo/$so.tmp" && mv "$repo/$so.tmp" "$repo/$so"
  done 2>> "$OUT/build.log"
  touch /tmp/mkext.done
}
bench() {  # bench <cases> <case names> <providers> <cap s> <tag> <reserve s: kept for the steps after it>
  # (a step cut by its cap keeps what it measured: run.py rewrites its JSON after every measurement)
  budgeted "$4" "$6" python bench/run.py --cases "$1" --only "$2" --providers "$3" --tag "$5" --timeout 120 \
    --out-dir "$OUT/results" 2>&1 | tee -a "$OUT/bench.log" | grep -v "^\s*$" | tail -12
  pack
}

case "$stage" in
  visit)
    # Priorities, each step's cap and the reserve it leaves for the steps after it (seconds of VISIT_S): the
    # default backend's GPU tests, issue 5's memcheck, the size and memory tests, the tile sweep, the
    # benchmarks (face, LLM with the peers, EMO, CoSENT, then Gemma), then what time is left: the opt-in CUDA
    # backend's tests and a profile. A step that ends early gives its time to the next. A benchmark worker
    # took ~11 s on the first visit (process start, imports, compiles, ≥ 10 timed calls): the provider lists
    # are sized to the caps. Results land in results/ of the archive (copy them to bench/results/<device>/).
    rm -f /tmp/mkext.done; visit_build_extensions &
    export PYTHONUNBUFFERED=1
    xdist=(); python -c "import xdist" 2>/dev/null && xdist=(-n 8)  # parallel Triton compiles
    budgeted 110 410 python -m pytest tests/test_gpu.py -q -rs "${xdist[@]}" --durations=8 \
      -k "(triton or speed_paths or cosent_million) and not beyond_int32 and not memory_is_bounded" 2>&1 \
      | tee "$OUT/tests-triton.log" | tail -15
    pack
    while [ ! -f /tmp/mkext.done ] && [ "$(left)" -gt 400 ]; do sleep 2; done
    log "extensions: $(ls marginkern/*.so 2>&1 | tr '\n' ' ')"; tail -5 "$OUT/build.log"
    python -c "import marginkern.dispatch as d; print(d.explain('cuda'))" 2>&1 | tee "$OUT/backends.txt"
    pack
    # issue 5: compute-sanitizer memcheck of the hand-written CUDA kernels, on their plain fp32 op tests
    budgeted 70 330 "$SANITIZER" --tool memcheck --error-exitcode 1 python -m pytest tests/test_gpu.py -q -x \
      -k "cuda_ops_match and float32 and plain or special_values" 2>&1 | tee "$OUT/sanitize-memcheck.log" | tail -5
    pack
    budgeted 60 270 python -m pytest tests/test_gpu.py -q -rs --durations=4 -k "beyond_int32 or memory_is_bounded" \
      2>&1 | tee "$OUT/tests-big.log" | tail -10
    pack
    # the Triton tile configs, then the benchmarks with each family's fastest one (the default where the sweep
    # did not get to a case)
    budgeted 60 210 python bench/sweep_triton_configs.py --quick --case arcface-1M,llama3-8b --best-out "$OUT/best.txt" \
      --out-dir "$OUT/results" \
      2>&1 | tee "$OUT/sweep.log" | tail -7
    pack
    face_cfg=$(awk '$1 == "arcface-1M" {print $2}' "$OUT/best.txt" 2>/dev/null)
    llm_cfg=$(awk '$1 == "llama3-8b" {print $2}' "$OUT/best.txt" 2>/dev/null)
    log "configs: face ${face_cfg:-default}, llm ${llm_cfg:-default}"
    MARGINKERN_TRITON_CONFIG="$face_cfg" \
      bench face arcface-1M,face-small-100k "marginkern,marginkern graphed,3-GEMM floor" 75 face 135
    # the peers' rows are skipped unless their wheels were carried (scripts/fetch_peer_wheels.sh)
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench llm llama3-8b \
      "marginkern,marginkern 3-GEMM,liger-kernel,cut-cross-entropy,3-GEMM floor" 70 llm 65
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench emo emo-llama3-8b "marginkern,3-GEMM floor" 30 emo 35
    bench cosent cosent-65k "marginkern,read both once" 30 cosent 5
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench llm gemma2-2b "marginkern,3-GEMM floor" 30 llm-gemma 5
    # face-small through torch.library's op dispatch (MARGINKERN_EAGER_TWINS=0): what the eager twins save on
    # a GPU host, beside the face step's `marginkern` and `graphed`
    MARGINKERN_TRITON_CONFIG="$face_cfg" bench face face-small-100k "marginkern via ops" 20 face-ops 5
    # sub-center ArcFace (K = 3 over 300k rows) against pytorch-metric-learning's formulation and the floor
    MARGINKERN_TRITON_CONFIG="$face_cfg" bench face face-subcenter3-100k \
      "marginkern sub-center,naive sub-center,3-GEMM floor" 35 face-subcenter 5
    # per-token log-probs + entropy (RL policy step; log_probs_and_entropy) at Llama-3-8B shapes
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench rl rl-llama3-8b "marginkern,3-GEMM floor" 25 rl 5
    # knowledge distillation (linear_kl_divergence: both heads' tiles) at Llama-3-8B shapes
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench kd kd-llama3-8b "marginkern,3-GEMM floor" 25 kd 5
    # the generalized JSD (linear_jsd, β = 0.5) against Liger's fused linear JSD (when its wheel was carried)
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench kd kd-llama3-8b "marginkern jsd,liger-kernel jsd" 30 kd-jsd 5
    # the issues' targets against this visit's results (CPU only, about a second)
    python bench/check_targets.py "$OUT/results" 2>&1 | tee "$OUT/targets.txt"
    pack
    budgeted 60 5 python -m pytest tests/test_gpu.py -q -rs "${xdist[@]}" --durations=5 \
      -k "not triton and not beyond_int32 and not memory_is_bounded" 2>&1 | tee "$OUT/tests-cuda.log" | tail -15
    pack
    MARGINKERN_TRITON_CONFIG="$face_cfg" budgeted 30 5 python bench/profile_step.py face face-small-100k marginkern \
      "3-GEMM floor" 2>&1 | tee -a "$OUT/profile.log" | grep -A6 "=="
    # last, only with time to spare: AdaFace's per-row margins against the official head's formulation
    MARGINKERN_TRITON_CONFIG="$face_cfg" bench face face-adaface-100k "marginkern adaface,naive adaface,3-GEMM floor" \
      30 face-adaface 5
    # and CurricularFace's hard-negative re-weighting against the official head's formulation
    MARGINKERN_TRITON_CONFIG="$face_cfg" bench face face-curricular-100k \
      "marginkern curricularface,naive curricularface,3-GEMM floor" 30 face-curricular 5
    # and a teacher's top-k (linear_topk, inference) at Llama-3-8B's head against the materialised logits
    budgeted 40 5 python bench/topk_inference.py --n 8192 --d 4096 --c 128256 --dtype bfloat16 2>&1 \
      | tee "$OUT/topk-inference.txt"
    pack
    # Proxy-Anchor over a million proxies: the Triton chunk epilogues against PyTorch's, and the floor
    bench proxy proxy-anchor-1M "marginkern,marginkern pytorch epilogue,3-GEMM floor" 35 proxy 5
    # DPO (precomputed reference log-probabilities) at Llama-3-8B's head against Liger's chunked DPO
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench dpo dpo-llama3-8b "marginkern,liger-kernel dpo,3-GEMM floor" 30 dpo 5
    # SigLIP and CLIP at B = 32768 pairs (D = 768), SupCon over 32768 views (D = 128): the chunk epilogues against
    # open_clip's formulations, the official SupConLoss and the floor
    bench contrastive siglip-32k,clip-32k,supcon-32k "marginkern,naive,3-GEMM floor" 45 contrastive 5
    # GlobalPointer (GPLinker-like: 48 heads, L = 512) against bert4keras's composition, torch.compile of it, the floor
    bench gp gp-duie-512 "marginkern,bert4keras,torch.compile,3-bmm floor" 30 gp 5
    # SFT (half the tokens ignored) at Llama-3-8B's head: skip_ignored_rows against every row, CCE (which leaves
    # ignored rows out too), the floor of the labelled rows, and compiled (the backward alone skips; runs last)
    MARGINKERN_TRITON_CONFIG="$llm_cfg" bench sft sft-llama3-8b \
      "marginkern,marginkern every row,cut-cross-entropy,3-GEMM floor,marginkern compiled" 75 sft 5
    ;;
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
    timeout 560 python bench/sweep_triton_configs.py --case "${2:-arcface-1M,llama3-8b}" ${3:-} 2>&1 | tee "$OUT/sweep.log" | tail -8
    cp -r bench/results "$OUT/"
    ;;
  *)
    echo "unknown stage $stage (visit|tests|triton-tier|sanitize|face|llm|knobs|peers|emo|cosent|micro|sweep)"; exit 2 ;;
esac
if [ "$stage" = visit ]; then
  log "done"; wait  # for the extension build, if the tests outran it
  pack
fi
