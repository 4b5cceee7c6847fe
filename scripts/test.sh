#!/usr/bin/env bash
# Installs marginkern with its test dependencies and runs both test tiers:
#   1. the default tier (reference/engine, ops, compile, errors; GPU tests skip without CUDA), and the loss
#      modules again through the torch.library ops (MARGINKERN_EAGER_TWINS=0)
#   2. the Triton kernels, in their own process: TRITON_INTERPRET=1 must be set before triton is imported
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python -c "import marginkern.dispatch as d; print(d.explain())"  # which backends this build has, and why not
python -m pytest tests --ignore=tests/interpreter -q "$@"
# the ops' own autograd (what torch.compile uses) in eager mode too: by default the functions run their eager twins
MARGINKERN_EAGER_TWINS=0 python -m pytest tests/test_margin_ce.py tests/test_linear_ce.py tests/test_emo.py \
  tests/test_pairwise.py tests/test_sparse_zlpr.py tests/test_global_pointer.py tests/test_subcenters.py tests/test_log_probs.py tests/test_distill.py tests/test_jsd.py \
  tests/test_topk_distill.py tests/test_class_weight.py tests/test_linear_ce_lse.py tests/test_token_accuracy.py tests/test_token_scaling.py \
  tests/test_skip_ignored_rows.py \
  tests/test_adaptive_margins.py tests/test_hard_negatives.py tests/test_proxy_anchor.py tests/test_preference.py tests/test_grpo.py tests/test_contrastive.py \
  -q "$@"
# every kernel launch of the interpreter tier is recorded as a GPU's launcher would specialise it, then compiled for
# sm_90 (no GPU needed): the interpreter runs the kernels' Python, not Triton's compiler
launches="$(mktemp -d)/launches.json"
TRITON_INTERPRET=1 MARGINKERN_RECORD_LAUNCHES="$launches" python -m pytest tests/interpreter -q "$@"
python bench/sm90_compile.py --launches "$launches"
