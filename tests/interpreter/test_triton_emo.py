"""EMO through the Triton kernels (cost cosines per tile) against the oracle."""
import pytest
import torch

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, check_emo_confident_rows, make_case
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_emo import check_emo_against_oracle, grads


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("anchored", [False, True])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 2, 4, 4), (19, 65, 16, 33)])
def test_emo_matches_oracle(dtype, anchored, shape):
    check_emo_against_oracle(dtype, anchored, shape, DEVICE)


def test_default_cost_is_the_weight():
    x, w, t = make_case(9, 40, 16, device=DEVICE)
    got = grads(mk.emo_cross_entropy, x, w, t)
    want = grads(reference.emo_cross_entropy, x.double(), w.double(), t)
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32, floor=1.0)


@pytest.mark.parametrize("anchored", [False, True])
def test_emo_with_long_class_splits(anchored, monkeypatch):
    """With one SM the forward runs few splits of many class tiles each: the online rescaling of Σexp and
    of the cost-weighted sum across tiles of one program (the small shapes above give each split a single
    tile, as 132 SMs want 264 programs)."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: 1)
    check_emo_against_oracle(torch.float32, anchored, (5, 300, 16, 12), DEVICE)


def test_confident_rows_keep_emo_accurate_and_non_negative():
    # the forward kernel sums p_j·(1 − cosine) over j ≠ t: no 1 − Σ p·cosine cancellation
    check_emo_confident_rows(DEVICE)
