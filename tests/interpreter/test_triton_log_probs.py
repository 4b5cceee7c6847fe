"""Per-token log-probabilities and entropy through the Triton kernels (the entropy epilogue of the forward
kernel, the split merge and the dL/da kernel's entropy term) against the float64 oracle."""
import pytest
import torch

import marginkern as mk
from tests.helpers import check_special_rows_log_probs, make_case
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_log_probs import check_confident_and_flat_rows, check_log_probs_against_oracle, check_top1


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 1, 4), (19, 65, 16), (40, 1000, 32)])
@pytest.mark.parametrize("upstream_kind", ["both", "log_probs", "entropy"])
def test_log_probs_match_oracle(dtype, shape, upstream_kind):
    check_log_probs_against_oracle(dtype, shape, 0.7, DEVICE, upstream_kind)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 1, 4)])
@pytest.mark.parametrize("head", ["bias", "softcap", "bias+softcap"])
def test_biased_and_soft_capped_heads_match_oracle(dtype, shape, head):
    """The bias and softcap of the kernels' logit tile under the entropy epilogue (forward statistics, the entropy
    term of dL/da, the bias gradient), the temperature dividing after the cap."""
    check_log_probs_against_oracle(dtype, shape, 0.7, DEVICE, "both", head)


@pytest.mark.parametrize("sm_count", [1, 132])
def test_long_class_splits_and_many_splits(sm_count, monkeypatch):
    """One SM: few splits of many class tiles each (the online update of S′ and T across tiles, a later tile
    raising the max); 132: many splits of one tile each (the merge across splits)."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    check_log_probs_against_oracle(torch.float32, (5, 300, 16), 1.3, DEVICE)


def test_confident_and_flat_rows():
    check_confident_and_flat_rows(DEVICE)


def test_return_top1():
    """The row max of the forward kernel's entropy statistics (its class splits merged) against the argmax."""
    check_top1(DEVICE)


@pytest.mark.parametrize("sm_count", [1, 132])
def test_tied_maxima_leave_one_out(sm_count, monkeypatch):
    """Two classes share a row's max, far above the rest, in the same tile or in different tiles and splits:
    exactly one is left out of S′, so H = log 2 and log p_t = −log 2 (leaving both out, or none, is off by
    log 2 or gives log1p(−1))."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    log2 = torch.log(torch.tensor(2.0)).item()
    for a, b in [(3, 7), (150, 151), (5, 290), (0, 299)]:  # same 32-class tile twice, then apart
        x = torch.zeros(1, 8, device=DEVICE)
        x[0, 0] = 1.0
        w = torch.zeros(300, 8, device=DEVICE)
        w[:, 0] = -40.0
        w[a, 0] = w[b, 0] = 40.0
        log_pt, entropy = mk.log_probs_and_entropy(x, w, torch.tensor([a], device=DEVICE))
        assert abs(log_pt.item() + log2) < 1e-6, (a, b, log_pt.item())
        assert abs(entropy.item() - log2) < 1e-6, (a, b, entropy.item())


def test_special_rows_give_torchs_log_probs_and_entropy():
    check_special_rows_log_probs(DEVICE)


def test_nan_input_gives_nan():
    x, w, t = make_case(6, 40, 8, device=DEVICE)
    x = x.detach().clone()
    x[2, 3] = float("nan")
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    assert torch.isnan(log_pt[2]) and torch.isnan(entropy[2])
    assert torch.isfinite(log_pt[[0, 1, 3]]).all() and torch.isfinite(entropy[[0, 1, 3]]).all()


@pytest.mark.parametrize("sm_count", [1, 132])
def test_nan_class_split_gives_nan(sm_count, monkeypatch):
    """A whole class split of NaN logits (NaN rows of the head): tl.max skips NaN, so the split's max is −inf and
    only its S′ carries the NaN; the merge must not drop it as an empty split (found by a review)."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    x, w, _ = make_case(3, 300, 8, device=DEVICE)
    w = w.detach().clone()
    w[32:64] = float("nan")
    log_pt, entropy = mk.log_probs_and_entropy(x.detach(), w, torch.tensor([1, 5, 299], device=DEVICE))
    assert torch.isnan(log_pt).all() and torch.isnan(entropy).all()
