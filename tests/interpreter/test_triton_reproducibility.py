"""tests/test_reproducibility.py's steps through the Triton kernels (interpreter on the CPU, or a GPU): bit-identical
again and under torch.use_deterministic_algorithms(True), whose NaN-filled new tensors catch a kernel that reads
memory it never wrote."""
import pytest
import torch

from tests.interpreter.test_triton_kernels import DEVICE, pytestmark  # noqa: F401  (same skip rule)
from tests.test_reproducibility import STEPS, check_reproducible


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name", sorted(STEPS))
def test_bit_identical_again_and_in_deterministic_mode(name, dtype, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")
    check_reproducible(name, DEVICE, dtype)
