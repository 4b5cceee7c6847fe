"""Top-k distillation through the Triton kernels: the forward kernel's log-sum-exp and the dL/da kernel, with the
teacher's k sparse cells scattered into each chunk's G, against the float64 oracle."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_topk_distill import check_against_oracle, check_converged_student_at_one_token


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 301, 45, 8), (3, 2, 4, 2), (19, 65, 16, 65)])
def test_topk_kl_matches_oracle(dtype, shape):
    check_against_oracle(dtype, shape, DEVICE)


def test_many_class_chunks(monkeypatch):
    """Small chunks (the Triton tiles' class_chunks follow a byte budget): cells land only in their own chunk."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module.TritonTiles, "default_buffer_bytes", staticmethod(lambda N, D: 1))
    check_against_oracle(torch.float32, (9, 200, 16, 7), DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_converged_student_at_one_token(dtype):
    """G in fp16 here (as on the GPU): the cells' totals are written whole, not −q added onto a rounded p."""
    check_converged_student_at_one_token(DEVICE, dtype)
