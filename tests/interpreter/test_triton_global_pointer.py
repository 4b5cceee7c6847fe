"""GlobalPointer's Triton block epilogues (line sums, gradient) against bert4keras's composition in float64."""
import pytest
import torch

import marginkern as mk
import marginkern.global_pointer as gp
import marginkern.triton_kernels.global_pointer as triton_gp
from tests.helpers import assert_close_rel, counted_launchers
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_global_pointer import inputs, naive_global_pointer


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.fixture
def launches(monkeypatch):
    """How many blocks each epilogue read (the Triton path really ran)."""
    return counted_launchers(monkeypatch, triton_gp, ("block_log_sum_exp", "block_gradient"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, masked, tril, mask_zero", [
    ((2, 9, 3, 4), True, True, False),        # a few lines, one column block
    ((1, 130, 2, 8), True, False, True),      # two column blocks (BLOCK_C 128), lines across line blocks
    ((3, 17, 2, 5), False, True, True),       # no mask
])
def test_global_pointer_epilogues(dtype, shape, masked, tril, mask_zero, launches):
    q, k, positives, mask = inputs(*shape, P=6, dtype=dtype, seed=shape[1], mask_zero=mask_zero)
    mask = mask if masked else None
    q1, k1 = q.to(DEVICE).requires_grad_(), k.to(DEVICE).requires_grad_()
    rows = mk.global_pointer_loss(q1, k1, positives.to(DEVICE), mask=None if mask is None else mask.to(DEVICE),
                                  tril=tril, mask_zero=mask_zero, reduction="none")
    grads = torch.autograd.grad(rows.sum(), (q1, k1))
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    want = naive_global_pointer(q2, k2, positives, mask, tril=tril, mask_zero=mask_zero)
    want_grads = torch.autograd.grad(want.sum(), (q2, k2))
    assert launches["block_log_sum_exp"] >= 1 and launches["block_gradient"] >= 1
    assert_close_rel(rows, want, torch.float32, "rows", floor=1.0)  # fp32 math on the (rounded) inputs
    for got, expected, name in zip(grads, want_grads, ("dq", "dk")):
        assert_close_rel(got, expected, dtype, name)


@pytest.mark.parametrize("tril", [True, False])
def test_global_pointer_epilogues_by_query_blocks(monkeypatch, launches, tril):
    """A row's logits in blocks of a few query positions (m0 > 0 in the kernels' line → (row, m) map; with tril the
    keys from n0 = m0 on)."""
    monkeypatch.setattr(gp, "GP_BLOCK_BYTES", 40 * 4 * 3)
    q, k, positives, mask = inputs(2, 40, 2, 4, P=8, dtype=torch.float32, seed=11, mask_zero=True)
    q1, k1 = q.to(DEVICE).requires_grad_(), k.to(DEVICE).requires_grad_()
    rows = mk.global_pointer_loss(q1, k1, positives.to(DEVICE), mask=mask.to(DEVICE), tril=tril, mask_zero=True,
                                  reduction="none")
    grads = torch.autograd.grad(rows.sum(), (q1, k1))
    q2, k2 = q.double().requires_grad_(), k.double().requires_grad_()
    want = naive_global_pointer(q2, k2, positives, mask, tril=tril, mask_zero=True)
    want_grads = torch.autograd.grad(want.sum(), (q2, k2))
    # 4 rows, 14 blocks of 3 query positions each
    assert launches["block_log_sum_exp"] == launches["block_gradient"] == 4 * 14
    assert_close_rel(rows, want, torch.float32, "rows", floor=1.0)
    for got, expected, name in zip(grads, want_grads, ("dq", "dk")):
        assert_close_rel(got, expected, torch.float32, name)
