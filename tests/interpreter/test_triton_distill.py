"""Knowledge distillation through the Triton kernels (the teacher's logit tile beside the student's in the
forward kernel, the merge and the dL/da kernel) against the float64 oracle."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_distill import check_confident_teacher, check_kl_against_oracle, check_minus_inf_logits


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 1, 4, 5), (19, 65, 16, 32), (40, 1000, 32, 24)])
def test_kl_matches_oracle(dtype, direction, shape):
    check_kl_against_oracle(dtype, shape, direction, DEVICE)


@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_long_class_splits_and_many_splits(sm_count, direction, monkeypatch):
    """One SM: few splits of many tiles each (the teacher's online rescaling across tiles); 132: many splits
    of one tile each (the merge of both planes across splits)."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    check_kl_against_oracle(torch.float32, (5, 300, 16, 12), direction, DEVICE, temperature=1.7)


def test_confident_teacher_stays_exact():
    check_confident_teacher(DEVICE)


@pytest.mark.parametrize("sm_count", [1, 132])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_minus_inf_logits(sm_count, direction, monkeypatch):
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    check_minus_inf_logits(direction, DEVICE)
