"""linear_cross_entropy through the Triton kernels (interpreter on the CPU, or a GPU) against the oracle."""
import pytest
import torch

import marginkern as mk
import marginkern.engine as engine
from marginkern import reference
from marginkern.dispatch import select_tiles
from tests.helpers import (REL_TOL, assert_close_rel, check_confident_rows_per_row_gradient,
                           check_fp16_grad_saturates_and_keeps_nan, check_offset_targets_and_shift,
                           check_sharded_linear_ce_tiles, make_case)
from tests.interpreter.test_triton_kernels import DEVICE, DTYPES, pytestmark  # noqa: F401  (same skip rule)
from tests.test_linear_ce import (OPTIONS, _log_probs_then_entropy,
                                  check_fractional_focal_with_an_ignored_row_below_zero, check_gamma_ce_extremes,
                                  check_large_softcap, grads)


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 2, 3), (21, 77, 32)])  # D = 32: EVEN_D
def test_linear_ce_matches_oracle(dtype, opts, with_bias, shape):
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=DEVICE, ignore=(0,))
    w = (w.detach() * 0.3).to(dtype)
    b = torch.randn(C, device=DEVICE).to(dtype) if with_bias else None
    got = grads(mk.linear_cross_entropy, x, w, t, b, **opts)
    want = grads(reference.linear_cross_entropy, x.double(), w.double(), t,
                 None if b is None else b.double(), **opts)
    assert_close_rel(got[0], want[0], dtype, "loss", floor=1.0)
    for name, g, e in zip(("grad input", "grad weight", "grad bias"), got[1:], want[1:]):
        assert_close_rel(g, e, dtype, name)


def test_all_ignored_and_empty():
    for (N, C, D), ignore in [((0, 5, 3), ()), ((6, 40, 7), range(6))]:
        x, w, t = make_case(N, C, D, device=DEVICE, ignore=ignore)
        loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, t, torch.randn(C, device=DEVICE), z_loss=1e-3)
        assert not loss.any() and not gx.any() and not gw.any() and not gb.any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_filtering_through_the_triton_tiles(dtype):
    # G comes out of the Triton kernel in the input dtype; the filter compares its scaled entries with eps.
    x, w, t = make_case(40, 300, 16, dtype, device=DEVICE, ignore=(3,))
    x = (x.detach().float() * 3.0).to(dtype).requires_grad_()
    b = torch.randn(300, device=DEVICE).to(dtype)
    eps = 1e-3
    with engine.count_kept_columns() as kept:
        loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, t, b, grad_filter_eps=eps)
    want = grads(reference.linear_cross_entropy, x.double(), w.double(), t, b.double())
    assert_close_rel(loss, want[0], dtype, "loss", floor=1.0)
    # beyond the dtype's tolerance, each dropped |dL/dz_nj| < eps/n_valid: |ΔdX_nd| ≤ eps/n·Σ_j |w_jd|,
    # |ΔdW_jd| ≤ eps/n·Σ_n |x_nd|, |Δdb_j| ≤ eps/n·N
    n_valid = int((t != -100).sum())
    slack = [eps / n_valid * v for v in (w.detach().double().abs().sum(0).max(),
                                         x.detach().double().abs().sum(0).max(), 40)]
    for name, g, e, extra in zip(("grad input", "grad weight", "grad bias"), (gx, gw, gb), want[1:], slack):
        err = (g.double().cpu() - e.cpu()).abs().max()
        assert err <= extra + REL_TOL[dtype] * e.abs().max(), name
    assert sum(k for _, k in kept) < sum(total for total, _ in kept)  # something was filtered


def test_fp16_focal_hard_rows_among_easy_ones_do_not_saturate():
    # review finding: the fp16 G scale took a robust (64 × median) maximum of the per-row coefficients;
    # focal γ=2 makes well-fit rows' coefficients ~3q² ≈ 1e-10, so the few hard rows' entries were clamped
    # at 65504 and their gradients came out wrong. Rows 0..27 are fit (1 − p_t ≈ 1e-5), rows 28..31 not.
    N, C, D = 32, 90, 128
    torch.manual_seed(3)
    w = torch.randn(C, D)
    t = torch.randint(0, C, (N,))
    x = torch.randn(N, D) * 0.1
    x[:28] += 0.12 * w[t[:28]]  # target logit ≈ 15, the others ≈ N(0, 1.8): 1 − p_t ≈ 1e-5
    x, w = x.half().to(DEVICE).requires_grad_(), w.half().to(DEVICE).requires_grad_()
    t = t.to(DEVICE)
    loss, gx, gw = grads(mk.linear_cross_entropy, x, w, t, None, focal_gamma=2.0)
    want = grads(reference.linear_cross_entropy, x.double(), w.double(), t, None, focal_gamma=2.0)
    assert_close_rel(gx[28:], want[1][28:], torch.float16, "grad input of the hard rows")
    assert_close_rel(gw, want[2], torch.float16, "grad weight")


@pytest.mark.parametrize("gemm_in_input_dtype", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS)
def test_buffered_path_through_the_triton_block_epilogue(monkeypatch, gemm_in_input_dtype, dtype, opts):
    # gemm_in_input_dtype forces the GPU's 16-bit G (written by the kernel, fp16 scaled and saturated)
    if gemm_in_input_dtype and dtype == torch.float32:
        pytest.skip("fp32 G either way")
    if gemm_in_input_dtype:
        monkeypatch.setattr(engine, "block_gemm_dtype", lambda x: x.dtype)
    x, w, t = make_case(37, 301, 45, dtype, device=DEVICE, ignore=(0,))
    w = (w.detach() * 0.3).to(dtype)
    b = torch.randn(301, device=DEVICE).to(dtype)
    got = grads(mk.linear_cross_entropy, x, w, t, b, logits_buffer_mb=3 * 301 * 4 * 5 / 2**20, **opts)
    want = grads(reference.linear_cross_entropy, x.double(), w.double(), t, b.double(), **opts)
    assert_close_rel(got[0], want[0], dtype, "loss", floor=1.0)
    for name, g, e in zip(("grad input", "grad weight", "grad bias"), got[1:], want[1:]):
        assert_close_rel(g, e, dtype, name)


@pytest.mark.parametrize("knobs", [dict(), dict(logits_buffer_mb=3 * 300 * 4 * 2 / 2**20)])
def test_minus_inf_bias_tail_through_the_triton_kernels(knobs):
    # review finding: a class split (or block tile) of only −inf logits made the forward kernel NaN
    x, w, t = make_case(6, 300, 8, torch.float32, device=DEVICE)
    t = t % 100
    b = torch.randn(300, device=DEVICE)
    b[100:] = -float("inf")
    got = grads(mk.linear_cross_entropy, x, w, t, b, **knobs)
    want = grads(reference.linear_cross_entropy, x.double(), w.double()[:100], t, b.double()[:100])
    assert_close_rel(got[0], want[0], torch.float32, "loss", floor=1.0)
    assert_close_rel(got[1], want[1], torch.float32, "grad input")
    assert_close_rel(got[2][:100], want[2], torch.float32, "grad weight")
    assert not got[2][100:].any()


def test_fp16_grad_saturates_and_keeps_nan():
    # review finding: tl.minimum/tl.maximum drop NaN, so the saturation turned a NaN row of G into ±65504
    from marginkern.dispatch import select_tiles
    check_fp16_grad_saturates_and_keeps_nan(select_tiles(torch.device(DEVICE), torch.float16), DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(focal_gamma=2.0), dict(focal_gamma=0.5), dict(gamma_ce=0.5)])
def test_confident_rows_keep_their_gradient(dtype, opts):
    check_confident_rows_per_row_gradient(DEVICE, dtype, opts)


def test_gamma_ce_stays_exact_near_one_and_near_zero():
    check_gamma_ce_extremes(DEVICE)


def test_large_softcap_is_as_precise_as_none():
    check_large_softcap(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0), dict(focal_gamma=2.0)])
def test_vocab_sharded_linear_ce_through_the_triton_tiles(dtype, opts):
    """marginkern.distributed.sharded_linear_cross_entropy's engine path on the Triton tiles: rows whose target
    another shard holds, a bias slice, the merged statistics (three shards in one process)."""
    check_sharded_linear_ce_tiles(select_tiles(torch.device(DEVICE), dtype), DEVICE, dtype, opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.1, z_loss=1e-3), dict(focal_gamma=2.0), dict(softcap=5.0)])
def test_class_weight_matches_oracle(dtype, opts):
    """class_weight through the Triton tiles: c_t in the per-row coefficients, the smoothing's rank-1 dW term in the
    engine loop's chunk finalizer (so dW goes the fp32-chunk way), and the 3-GEMM path."""
    from tests.test_class_weight import check_class_weight_matches_oracle
    check_class_weight_matches_oracle(DEVICE, dtype, opts, shape=(37, 301, 45), reductions=("mean", "none"))
    check_class_weight_matches_oracle(DEVICE, dtype, opts, shape=(21, 77, 32), reductions=("sum",),
                                      logits_buffer_mb=0.01)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)])
def test_returned_lse_and_its_gradient(dtype, opts):
    """return_lse=True through the Triton tiles: the lse gradient is one more p-term in coef_p."""
    from tests.test_linear_ce_lse import check_lse_and_its_gradient
    check_lse_and_its_gradient(DEVICE, dtype, opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, softcap=50.0)])
def test_token_accuracy(dtype, opts):
    """return_token_accuracy through the Triton tiles: the merge kernel's row max beside the lse."""
    from tests.test_token_accuracy import check_token_accuracy
    check_token_accuracy(DEVICE, dtype, opts)
    check_token_accuracy(DEVICE, dtype, opts, shape=(21, 2000, 32))  # several class splits


def test_token_accuracy_of_non_finite_rows():
    """The merge kernel's max skips NaN: the accuracy must not count a NaN row correct."""
    from tests.test_token_accuracy import check_non_finite_rows_are_not_correct
    check_non_finite_rows_are_not_correct(DEVICE)


@pytest.mark.parametrize("fn", [mk.linear_cross_entropy, mk.emo_cross_entropy, _log_probs_then_entropy])
def test_offset_int64_targets_with_shift(fn):
    check_offset_targets_and_shift(DEVICE, fn, torch.float32)


def test_fractional_focal_with_an_ignored_row_below_zero():
    check_fractional_focal_with_an_ignored_row_below_zero(DEVICE)


@pytest.mark.parametrize("opts", [dict(), dict(softcap=3.0, z_loss=1e-2), dict(class_weight=True)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_token_scaling_matches_oracle(opts, reduction):
    """DFT: the Triton forward's lse gives p_t (the gathered target dot beside it is PyTorch's)."""
    from tests.test_token_scaling import check_token_scaling
    check_token_scaling(DEVICE, torch.float32, opts, reduction, shape=(21, 77, 32))


@pytest.mark.parametrize("opts", [dict(token_scaling=True, softcap=3.0), dict(return_token_accuracy=True)])
def test_skipping_ignored_rows_equals_every_row(opts, monkeypatch):
    """skip_ignored_rows on the Triton tiles: the op runs the labelled rows alone, the result is the full call's."""
    from tests.helpers import record_op_rows
    from tests.test_skip_ignored_rows import check_linear_ce_equals_every_row
    check_linear_ce_equals_every_row(DEVICE, torch.float32, opts, "none", record_op_rows(monkeypatch))


@pytest.mark.parametrize("name", ["linear_ce", "linear_ce_options", "linear_ce_3_gemm"])
def test_compiled_skipping_equals_every_row(name, monkeypatch):
    """Inside torch.compile the backward op (the 3-GEMM path's forward) runs the labelled rows on the Triton tiles."""
    from tests.helpers import record_selected_rows
    from tests.test_skip_ignored_rows_compiled import check_compiled_backward_runs_the_labelled_rows
    check_compiled_backward_runs_the_labelled_rows(name, "none", record_selected_rows(monkeypatch), DEVICE)


@pytest.mark.parametrize("name", ["linear_ce_options", "log_probs_and_entropy", "emo_cross_entropy", "kl_reverse",
                                  "jsd", "topk_kl"])
def test_compiled_call_without_gradient_skips_in_its_forward(name, monkeypatch):
    """A compiled call under no_grad: the forward op runs the labelled rows on the Triton tiles."""
    from tests.helpers import record_selected_rows
    from tests.test_skip_ignored_rows_compiled import check_compiled_call_without_gradient_skips_in_its_forward
    check_compiled_call_without_gradient_skips_in_its_forward(name, False, record_selected_rows(monkeypatch), DEVICE)
