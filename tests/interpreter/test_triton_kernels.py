"""The Triton kernels against the plain-PyTorch tiles and the float64 oracle.

Run in its own process with TRITON_INTERPRET=1 (set before triton is imported) to execute the kernels on
the CPU, or on a CUDA machine as is. bf16 tl.dot is wrong in the interpreter (triton 3.9): bf16 runs in
tests/test_gpu.py only.
"""
import os

import pytest
import torch

import marginkern as mk
from marginkern import reference
from marginkern.engine import LogitSpec, TorchTiles
from tests.helpers import (assert_close_rel, check_chunked_margin_matches_one_chunk,
                           check_margin_fp16_under_grad_scaler, check_margin_per_row_upstream_gradient, loss_and_grads,
                           make_case)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()),
                                reason="needs TRITON_INTERPRET=1 in its own pytest process, or a GPU")
DEVICE = "cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda"
DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _force_triton(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")


def triton_tiles():
    from marginkern.dispatch import select_tiles
    return select_tiles(torch.device(DEVICE), torch.float32)


def random_spec(N, C, *, col_scale, bias, softcap, dtype=torch.float32):
    target = torch.randint(-1, C, (N,), device=DEVICE)
    return LogitSpec(
        row_scale=torch.rand(N, device=DEVICE) + 0.5,
        col_scale=(torch.rand(C, device=DEVICE) + 0.5) if col_scale else None,
        bias=torch.randn(C, device=DEVICE) if bias else None,
        softcap=softcap, target=target, target_logit=torch.randn(N, device=DEVICE) * 3)


EPILOGUES = [dict(col_scale=True, bias=False, softcap=None), dict(col_scale=False, bias=True, softcap=None),
             dict(col_scale=False, bias=True, softcap=5.0), dict(col_scale=True, bias=False, softcap=2.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", [(37, 301, 45), (1, 1, 1), (17, 33, 16), (70, 129, 3)])
def test_tiles_match_torch_tiles(dtype, epilogue, shape):
    N, C, D = shape
    x = torch.randn(N, D, device=DEVICE).to(dtype)
    w = torch.randn(C, D, device=DEVICE).to(dtype)
    spec = random_spec(N, C, **epilogue)
    tt, ref = triton_tiles(), TorchTiles()
    lse, total = tt.row_stats(x, w, spec, True)
    lse_ref, total_ref = ref.row_stats(x, w, spec, True)
    assert_close_rel(lse, lse_ref, torch.float32, "lse", floor=1.0)
    assert_close_rel(total, total_ref, torch.float32, "sum of logits", floor=float(C))
    coef_p, coef_u, target_grad = (torch.rand(N, device=DEVICE), torch.rand(N, device=DEVICE) * 0.1,
                                   torch.randn(N, device=DEVICE))
    for c0, c1 in [(0, C), (C // 3, C)]:
        got = tt.grad_logits(x, w, spec, lse_ref, coef_p, coef_u, target_grad, c0, c1)
        want = ref.grad_logits(x, w, spec, lse_ref, coef_p, coef_u, target_grad, c0, c1)
        assert got.shape == (N, c1 - c0)
        assert_close_rel(got, want, dtype, f"dL/da[{c0}:{c1}]", floor=1.0)


@pytest.mark.parametrize("epilogue", EPILOGUES)
def test_row_stats_over_long_class_splits(epilogue, monkeypatch):
    """With one SM the forward runs one split of 10 class tiles per row block: the online rescaling
    of Σexp across a program's tiles (132 SMs give the shapes above one tile per split), with the
    target column and a −inf bias tile in the middle of a split."""
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: 1)
    N, C, D = 19, 301, 24
    x, w = torch.randn(N, D, device=DEVICE), torch.randn(C, D, device=DEVICE)
    spec = random_spec(N, C, **epilogue)
    if spec.bias is not None:
        spec.bias[40:80] = -float("inf")  # a masked vocabulary range
    lse, total = triton_tiles().row_stats(x, w, spec, True)
    lse_ref, total_ref = TorchTiles().row_stats(x, w, spec, True)
    assert_close_rel(lse, lse_ref, torch.float32, "lse", floor=1.0)
    if spec.bias is None:  # Σz is −inf with a −inf bias
        assert_close_rel(total, total_ref, torch.float32, "sum of logits", floor=float(C))


@pytest.mark.parametrize("sm_count", [1, 132])
def test_special_rows_lse_is_torch_logsumexp(sm_count, monkeypatch):
    """Rows with ±inf and NaN logits (tests.helpers' SPECIAL_ROWS, spread over 300 classes of −inf: whole −inf tiles
    and splits, the specials in different ones) give torch.logsumexp's lse in the forward kernel and in its FROM_DOTS
    form, as the C++ and CUDA kernels: a +inf logit gave NaN (e^{inf − inf}) where they give +inf (review finding)."""
    import marginkern.triton_kernels.tiles as tiles_module
    from tests.helpers import SPECIAL_ROWS
    monkeypatch.setattr(tiles_module, "_sm_count", lambda device: sm_count)
    rows = torch.full((len(SPECIAL_ROWS), 300), -float("inf"), device=DEVICE)
    rows[:, ::34] = torch.tensor(list(SPECIAL_ROWS.values()), device=DEVICE)
    want = torch.logsumexp(rows.double(), 1).float()

    def no_targets(n):
        return LogitSpec(torch.ones(n, device=DEVICE), None, None, None, torch.full((n,), -1, device=DEVICE),
                         torch.zeros(n, device=DEVICE))

    tiles = triton_tiles()
    # row n's logits as x · w_j with x = 1 and w = the row (one row per call: an inf times another row's 0 is NaN)
    streamed = torch.cat([tiles.row_stats(torch.ones(1, 1, device=DEVICE), row[:, None], no_targets(1), False)[0]
                          for row in rows])
    from_dots, _ = tiles.block_row_stats(rows.clone(), no_targets(len(rows)), False)
    for got, how in ((streamed, "row_stats"), (from_dots, "block_row_stats")):
        for n, name in enumerate(SPECIAL_ROWS):
            torch.testing.assert_close(got[n], want[n], equal_nan=True, msg=f"{how}, {name} row")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("epilogue", EPILOGUES)
@pytest.mark.parametrize("shape", [(37, 301), (1, 1), (17, 33)])
def test_block_epilogue_from_dots_matches_torch_tiles(out_dtype, epilogue, shape):
    """The 3-GEMM path's block epilogue (FROM_DOTS kernels) against TorchTiles' PyTorch passes."""
    N, C = shape
    spec = random_spec(N, C, **epilogue)
    dots = torch.randn(N, C, device=DEVICE) * 3
    coef_p, coef_u, target_grad = (torch.rand(N, device=DEVICE), torch.rand(N, device=DEVICE) * 0.1,
                                   torch.randn(N, device=DEVICE))
    z = dots.clone()
    lse, total = triton_tiles().block_row_stats(z, spec, True)
    assert torch.equal(z, dots)  # the dots survive for the gradient kernel
    g = triton_tiles().block_grads_(z, spec, lse, coef_p, coef_u, target_grad, out_dtype)
    ref = dots.clone()
    lse_ref, total_ref = TorchTiles.block_row_stats(ref, spec, True)
    g_ref = TorchTiles.block_grads_(ref, spec, lse_ref, coef_p, coef_u, target_grad)
    assert g.dtype == out_dtype and g.shape == (N, C)
    assert_close_rel(lse, lse_ref, torch.float32, "lse", floor=1.0)
    assert_close_rel(total, total_ref, torch.float32, "sum of logits", floor=float(C))
    assert_close_rel(g, g_ref, out_dtype, "dL/da", floor=1.0)


OPTIONS = [
    dict(), dict(m2=0.0, m3=0.35), dict(m1=4.0, m2=0.0, scale=30.0),
    dict(m1=1.2, m2=0.3, m3=0.15, scale=32.0, label_smoothing=0.1), dict(margin_grad="straight_through"),
    dict(m1=3.0, m2=0.0, scale=1.0, normalize=False),
    dict(m1=1.5, m2=0.2, m3=0.1, scale=0.5, normalize=False, label_smoothing=0.2),
    dict(m1=4.0, m2=0.0, scale=8.0, lambda_=5.0), dict(m1=3.0, m2=0.0, scale=1.0, normalize=False, lambda_=2.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 2, 2), (19, 65, 33), (19, 65, 48)])  # D = 48: EVEN_D
def test_margin_ce_matches_oracle(dtype, opts, shape):
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=DEVICE, ignore=(0,) if N > 2 else ())
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, **opts)
    ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t, **opts)
    assert_close_rel(loss, ref, dtype, "loss", floor=64.0)
    assert_close_rel(gx, rx, dtype, "grad input")
    assert_close_rel(gw, rw, dtype, "grad weight")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_single_class_and_all_ignored(reduction):
    for (N, C, D), ignore in [((0, 5, 3), ()), ((4, 1, 5), ()), ((6, 40, 7), range(6))]:
        x, w, t = make_case(N, C, D, device=DEVICE, ignore=ignore)
        loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, reduction=reduction)
        ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t, reduction=reduction)
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert_close_rel(loss, ref, torch.float32, "loss", floor=64.0)
        assert_close_rel(gw, rw, torch.float32, "grad weight", floor=1.0)


def test_opcheck_through_triton():
    x, w, t = make_case(7, 40, 5, device=DEVICE, ignore=(1,))
    args = (x, w, t, 64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)


def test_small_gradient_buffer_streams_many_chunks():
    from marginkern.triton_kernels import TritonTiles
    check_chunked_margin_matches_one_chunk(TritonTiles(buffer_bytes=9 * 4 * 64), 9, 300, 1, 20, DEVICE)


@pytest.mark.parametrize("degenerate", ["zero embedding", "tiny embedding", "zero class centre"])
def test_fp16_degenerate_row_or_column_leaves_other_gradients_intact(degenerate):
    # One global fp16 scale of G let a single 1e12 norm scale push every other entry below fp16's range
    # (review finding). The other rows and classes must match the oracle and stay finite; the degenerate
    # row's (or class's) own gradient is ~1e12·scale, beyond fp16, so it is not checked.
    x, w, t = make_case(24, 200, 32, torch.float16, device=DEVICE)
    x, w = x.detach().clone(), w.detach().clone()
    other_classes = torch.ones(200, dtype=torch.bool, device=DEVICE)
    if degenerate == "zero embedding":
        x[0] = 0
    elif degenerate == "tiny embedding":
        x[0] = x[0] * 1e-4
    else:
        w[5] = 0
        t[t == 5] = 6
        other_classes[5] = False
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t)
    ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t)
    assert_close_rel(loss, ref, torch.float16, "loss", floor=64.0)
    assert_close_rel(gx[1:], rx[1:], torch.float16, "grad input of the other rows")
    assert_close_rel(gw[other_classes], rw[other_classes], torch.float16, "grad weight of the other classes")


def test_strided_and_broadcast_bias():
    x, w, t = make_case(11, 30, 8, device=DEVICE)
    store = torch.randn(30, 3, device=DEVICE)
    for bias in (store[:, 1], torch.tensor(0.7, device=DEVICE).expand(30)):
        got = mk.linear_cross_entropy(x, w, t, bias)
        want = reference.linear_cross_entropy(x.double(), w.double(), t, bias.double())
        assert_close_rel(got, want, torch.float32, "loss", floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 300), (1, 5), (9, 16)])
def test_row_projection_kernel(dtype, shape):
    from marginkern.engine import project_out_rows
    grad = torch.randn(*shape, device=DEVICE)
    weight = torch.randn(*shape, device=DEVICE).to(dtype)
    inv_norm = weight.float().norm(dim=1) ** -1
    want = project_out_rows(grad.double().clone(), weight.double(), inv_norm.double())
    grad = grad.clone()
    got = triton_tiles().finish_grad_rows(grad, torch.ones((), device=DEVICE), grad, weight, inv_norm)
    assert_close_rel(got, want, torch.float32, "projected rows", floor=1.0)
    # the result is orthogonal to each weight row
    assert (got.double() * weight.double()).sum(1).abs().max() < 1e-4 * weight.double().norm(dim=1).max() * got.abs().max()


def test_block_gradient_launches_split_at_the_grid_limit(monkeypatch):
    # CUDA caps grid axis 1 at 65535 blocks (8.4M classes at BLOCK_C=128): the dL/da launch of a block is
    # split into class ranges; a tiny limit makes that happen here.
    import marginkern.triton_kernels.tiles as tiles_module
    monkeypatch.setattr(tiles_module, "MAX_CLASS_TILES_PER_LAUNCH", 2)
    N, C = 5, 200
    spec = random_spec(N, C, col_scale=True, bias=True, softcap=3.0)
    dots = torch.randn(N, C, device=DEVICE) * 3
    coef_p, coef_u, target_grad = (torch.rand(N, device=DEVICE), torch.rand(N, device=DEVICE) * 0.1,
                                   torch.randn(N, device=DEVICE))
    logits = dots.clone()
    lse, _ = TorchTiles.block_row_stats(logits, spec, False)  # logits: the dots, turned into logits
    got = triton_tiles().block_grads_(dots, spec, lse, coef_p, coef_u, target_grad)
    want = TorchTiles.block_grads_(logits, spec, lse, coef_p, coef_u, target_grad)
    assert_close_rel(got, want, torch.float32, "dL/da", floor=1.0)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("project", [False, True])
@pytest.mark.parametrize("shape", [(37, 300), (1, 5), (9, 16)])
def test_finish_grad_rows_kernel(out_dtype, project, shape):
    # unscale · project · store in dW's dtype in one pass, into a row slice of a larger dW
    from marginkern.engine import finish_grad_rows
    R, D = shape
    grad = torch.randn(R, D, device=DEVICE) * 1e3  # as the engine leaves it: multiplied by the 16-bit scale
    scale = torch.tensor(1e-3 / 3, device=DEVICE)
    weight = torch.randn(R, D, device=DEVICE).to(torch.float16) if project else None
    inv_norm = weight.float().norm(dim=1) ** -1 if project else None
    projection = (weight.double(), inv_norm.double()) if project else ()
    want = finish_grad_rows(grad.double().clone(), scale.double(), torch.empty(R, D, dtype=torch.float64), *projection)
    store = torch.full((R + 4, D), 7.0, device=DEVICE).to(out_dtype)
    got = triton_tiles().finish_grad_rows(grad.clone(), scale, store[2:R + 2], weight, inv_norm)
    assert got.dtype == out_dtype and got.data_ptr() == store[2:R + 2].data_ptr()
    # one rounding to out_dtype (fp32 arithmetic before it)
    assert_close_rel(got, want, out_dtype, "finished dW rows", floor=1.0)
    assert (store[:2] == 7).all() and (store[R + 2:] == 7).all()  # rows outside the slice untouched
    # in place (out is grad itself)
    in_place = grad.clone()
    triton_tiles().finish_grad_rows(in_place, scale, in_place, weight, inv_norm)
    assert_close_rel(in_place, want, torch.float32, "in place", floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(37, 45, 20), (32, 16, 16), (1, 1, 3), (50, 70, 130)])
def test_projected_weight_grad_kernel(dtype, shape):
    """A chunk's dW GEMM with the projection fused: G a column slice of a wider buffer (as a chunk of the
    3-GEMM path's), dW written into a row slice of the whole dW, against float64 math. N, R, D not
    multiples of the blocks (and 32 = 2 × BLOCK_K: the mask-free K loop). bf16: GPU tests (module doc)."""
    from marginkern.engine import finish_grad_rows
    N, R, D = shape
    wide = torch.randn(N, R + 7, device=DEVICE).to(dtype)
    g, x = wide[:, 3:R + 3], torch.randn(N, D, device=DEVICE).to(dtype)
    weight = torch.randn(R, D, device=DEVICE).to(dtype)
    inv_norm = weight.float().norm(dim=1) ** -1
    scale = torch.tensor(0.25, device=DEVICE)
    want = finish_grad_rows(g.double().t() @ x.double(), scale.double(), torch.empty(R, D, dtype=torch.float64),
                            weight.double(), inv_norm.double())
    store = torch.full((R + 4, D), 7.0, device=DEVICE).to(dtype)
    got = triton_tiles().projected_weight_grad(g, x, weight, inv_norm, scale, store[2:R + 2])
    assert got.dtype == dtype and got.data_ptr() == store[2:R + 2].data_ptr()
    assert_close_rel(got, want, dtype, "projected dW", floor=1.0)
    assert (store[:2] == 7).all() and (store[R + 2:] == 7).all()


def test_margin_fp16_under_a_grad_scaler_scale():
    check_margin_fp16_under_grad_scaler(DEVICE)


def test_margin_per_row_upstream_gradient():
    check_margin_per_row_upstream_gradient(DEVICE)
