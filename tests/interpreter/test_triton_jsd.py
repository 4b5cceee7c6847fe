"""The generalized JSD through the Triton kernels (the teacher statistics' forward kernel, jsd_row_sums_kernel and
the dL/da kernel's JSD term) against the float64 oracle."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_jsd import (check_beta_near_endpoints, check_confident_teacher, check_converged_student,
                            check_jsd_against_oracle, check_minus_inf_logits, check_small_temperature)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 1, 4, 5), (19, 65, 16, 32)])
def test_jsd_matches_oracle(dtype, beta, shape):
    check_jsd_against_oracle(dtype, shape, beta, DEVICE)


@pytest.mark.parametrize("sm_count", [1, 132])
def test_long_class_splits_and_many_splits(sm_count, monkeypatch):
    """One SM: few splits of many tiles each; 132: many splits of one tile each (the host adds them)."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    check_jsd_against_oracle(torch.float32, (5, 300, 16, 12), 0.3, DEVICE, temperature=1.7)


def test_confident_teacher():
    check_confident_teacher(DEVICE)


def test_converged_student_keeps_its_digits():
    """The kernels' series for expm1 and log1p (Triton has neither) keep the ratio's digits as torch's do."""
    check_converged_student(DEVICE)


def test_minus_inf_logits():
    check_minus_inf_logits(DEVICE)


def test_beta_near_endpoints():
    check_beta_near_endpoints(DEVICE)


def test_small_temperature():
    check_small_temperature(DEVICE)
