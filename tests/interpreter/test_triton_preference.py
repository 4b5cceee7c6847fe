"""The preference heads through the Triton kernels (their log-probabilities are log_probs_and_entropy's) against
TRL's arithmetic in float64; bf16 runs in tests/test_gpu.py (bf16 tl.dot is wrong in the interpreter)."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, pytestmark  # noqa: F401  (same skip rule)
from tests.test_preference import check_orpo_near_certain_completions, check_paired_head_against_trl

CASES = [("dpo", dict(loss_type="sigmoid", rpo_alpha=0.5)), ("dpo", dict(loss_type="ipo")), ("orpo", dict()),
         ("simpo", dict()), ("dpo", dict(loss_type="sigmoid", ld_alpha=0.4, use_weighting=True, rpo_alpha=0.5)),
         ("dpo", dict(use_weighting=True, softcap=2.0))]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0] + "".join(f"-{k}={v}" for k, v in c[1].items()))
def test_paired_heads_match_trl_arithmetic(case, dtype):
    check_paired_head_against_trl(*case, device=DEVICE, dtype=dtype)


def test_orpo_on_near_certain_completions_is_exact():
    check_orpo_near_certain_completions(DEVICE)
