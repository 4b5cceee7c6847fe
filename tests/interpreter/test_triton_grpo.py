"""The GRPO head through the Triton kernels (its log-probabilities and entropy are log_probs_and_entropy's) against
TRL's arithmetic in float64; bf16 runs in tests/test_gpu.py (bf16 tl.dot is wrong in the interpreter)."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, pytestmark  # noqa: F401  (same skip rule)
from tests.test_grpo import check_grpo_head_against_trl

CASES = [dict(loss_type="dapo", beta=0.04, temperature=0.7),
         dict(loss_type="grpo", importance_sampling_level="sequence", epsilon_high=0.28),
         dict(loss_type="cispo", epsilon_high=5.0), dict(loss_type="bnpo", temperature=0.7, softcap=2.0)]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("options", CASES, ids=lambda o: o["loss_type"] + ("-softcap" if "softcap" in o else ""))
def test_grpo_head_matches_trl_arithmetic(options, dtype):
    check_grpo_head_against_trl(options, device=DEVICE, dtype=dtype)
