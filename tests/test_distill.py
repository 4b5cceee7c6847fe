"""Knowledge distillation (linear_kl_divergence): forward and reverse KL against the materialised float64
definition and the streamed oracle, every CPU backend, autograd, edge cases, opcheck, compile, errors."""
import os

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from marginkern.dispatch import BackendUnavailable
from tests.helpers import assert_close_rel, make_case


def materialised(x, w, x_t, w_t, t, temperature=1.0, direction="forward", ignore_index=-100, reduction="none"):
    """Per-row KL on the full float64 logits, with torch's own kl_div for the forward direction."""
    assert reduction == "none"
    log_p = torch.log_softmax((x.double() @ w.double().t()) / temperature, dim=1)
    log_q = torch.log_softmax((x_t.double() @ w_t.double().t()) / temperature, dim=1)
    if direction == "forward":
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(1)
    else:
        kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return torch.where(t != ignore_index, kl, 0.0)


def teacher_case(N, C, E, dtype, device="cpu", scale=1.0):
    x_t = (torch.randn(N, E, dtype=torch.float64) * scale).to(dtype).to(device)
    w_t = torch.randn(C, E, dtype=torch.float64).to(dtype).to(device)
    return x_t, w_t


def kl_and_grads(fn, x, w, x_t, w_t, t, upstream, **kw):
    """(per-row divergence, dL/dx, dL/dw) of fn (a distillation loss, or a materialised definition) for the loss
    Σ upstream·divergence."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    kl = fn(x, w, x_t, w_t, t, reduction="none", **kw)
    gx, gw = torch.autograd.grad((kl.double() * upstream).sum(), (x, w))
    return kl.detach(), gx, gw


def check_divergence_against_oracle(fn, oracle, dtype, shape, device, factor=1.0, **kw):
    """A distillation loss fn (whatever backend serves `device`) against its float64 oracle on the same rounded
    inputs: the divergence and both gradients for a random per-row upstream gradient, an ignored row included."""
    N, C, D, E = shape
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0,) if N > 2 else ())
    x_t, w_t = teacher_case(N, C, E, dtype, device)
    upstream = torch.randn(N, dtype=torch.float64)
    got = kl_and_grads(fn, x, w, x_t, w_t, t, upstream.to(device), **kw)
    want = kl_and_grads(oracle, *(v.double().cpu() for v in (x, w, x_t, w_t)), t.cpu(), upstream, **kw)
    for name, g, e in zip(("divergence", "grad input", "grad weight"), got, want):
        assert_close_rel(g, e, dtype, f"{name} ({kw})", floor=1.0, factor=factor)


def check_kl_against_oracle(dtype, shape, direction, device, temperature=0.8):
    # reverse KL's gradient p_j·(log p_j − log q_j − KL) subtracts terms as large as the logits' range (~30 here)
    # before p_j weights them: their fp32 rounding (ulp(30) ≈ 2e-6) survives the cancellation
    check_divergence_against_oracle(mk.linear_kl_divergence, reference.linear_kl_divergence, dtype, shape, device,
                                    factor=4.0 if direction == "reverse" else 1.0, temperature=temperature,
                                    direction=direction)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_oracle_matches_materialised_definition(direction, temperature):
    x, w, t = make_case(23, 70, 12, torch.float64, ignore=(4,))
    x_t, w_t = teacher_case(23, 70, 9, torch.float64)
    upstream = torch.randn(23, dtype=torch.float64)
    got = kl_and_grads(reference.linear_kl_divergence, x, w, x_t, w_t, t, upstream, temperature=temperature,
                       direction=direction, class_chunk=16)
    want = kl_and_grads(materialised, x, w, x_t, w_t, t, upstream, temperature=temperature, direction=direction)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-10)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 1, 4, 5), (19, 65, 16, 16), (1, 2, 3, 2)])
def test_op_matches_oracle(backend, dtype, direction, shape, monkeypatch):
    """Both CPU backends: the C++ kernels (csrc/cpu/distill_loss.cpp, the default) and the PyTorch tiles."""
    from marginkern import cpp_tiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_kl_against_oracle(dtype, shape, direction, "cpu")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_many_class_chunks_match_the_oracle(backend, direction, monkeypatch):
    """N = 4096 rows make each CPU backend's budget a chunk of ≤ 1024 classes: C = 3000 runs 3 chunks whose student
    and teacher sums are merged (the C++ teacher cross-sum not rescaled in the merge was 208 off in a mutation test that
    every single-chunk case passed)."""
    from marginkern import cpp_tiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_kl_against_oracle(torch.float32, (4096, 3000, 8, 6), direction, "cpu")


def test_identical_teacher_gives_zero_and_no_gradient():
    """Teacher = student: KL = 0 (clamped at 0, never −1e-7) and its gradient p − q = 0, both directions."""
    x, w, t = make_case(16, 300, 32)
    for direction in ("forward", "reverse"):
        kl, gx, gw = kl_and_grads(mk.linear_kl_divergence, x, w, x.detach(), w.detach(), t, torch.ones(16),
                                  direction=direction)
        assert (kl >= 0).all() and kl.max() < 1e-5
        assert gx.abs().max() < 1e-5 and gw.abs().max() < 1e-5


def test_teacher_gets_no_gradient_and_mean_masks_ignored_rows():
    x, w, t = make_case(10, 50, 8, ignore=(1, 7))
    x_t, w_t = (v.requires_grad_() for v in teacher_case(10, 50, 6, torch.float32))
    kl = mk.linear_kl_divergence(x, w, x_t, w_t, t)
    kl.backward()
    assert x_t.grad is None and w_t.grad is None
    rows = materialised(x, w, x_t, w_t, t)
    assert_close_rel(kl, rows.sum() / 8, torch.float32)
    assert_close_rel(mk.linear_kl_divergence(x, w, x_t, w_t, t, reduction="sum"), rows.sum(), torch.float32)
    # no target: every row counts
    assert_close_rel(mk.linear_kl_divergence(x, w, x_t, w_t), materialised(x, w, x_t, w_t, torch.zeros(10)).mean(),
                     torch.float32)


def check_token_shapes_and_shift(loss_fn):
    """A distillation loss (x, w, x_t, w_t, t, **kw) on (B, T, D) inputs with shift=1 equals it on the rows, the last
    position masked; a teacher of other leading dimensions is refused."""
    x, w, t = make_case(12, 40, 8)
    x_t, w_t = teacher_case(12, 40, 6, torch.float32)
    got = loss_fn(x.view(3, 4, 8), w, x_t.view(3, 4, 6), w_t, t.view(3, 4), reduction="none", shift=1)
    want = loss_fn(x, w, x_t, w_t, t, reduction="none").view(3, 4)
    assert got.shape == (3, 4)
    torch.testing.assert_close(got[:, :-1], want[:, :-1])
    assert (got[:, -1] == 0).all()
    with pytest.raises(ValueError, match=r"teacher_input must have shape \(3, 4\) \+ \(E,\)"):
        loss_fn(x.view(3, 4, 8), w, x_t.view(4, 3, 6), w_t, t.view(3, 4))


def test_token_shaped_inputs_and_shift():
    check_token_shapes_and_shift(mk.linear_kl_divergence)


def check_empty_and_all_ignored(loss_fn):
    """A distillation loss of no rows, and of only ignored rows, is 0 with zero gradients."""
    x, w, t = make_case(0, 10, 4)
    x_t, w_t = teacher_case(0, 10, 3, torch.float32)
    assert loss_fn(x, w, x_t, w_t, t).item() == 0.0
    x, w, t = make_case(5, 10, 4, ignore=range(5))
    x_t, w_t = teacher_case(5, 10, 3, torch.float32)
    loss = loss_fn(x, w, x_t, w_t, t)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and (gx == 0).all() and (gw == 0).all()


def test_empty_and_all_ignored():
    check_empty_and_all_ignored(mk.linear_kl_divergence)


def check_confident_teacher(device):
    """A near one-hot teacher (logits up to ±300 at T = 1) against a flat student: q underflows to 0 for most
    classes, log q reaches −600; KL and both gradients finite and at fp32's tolerance, both directions. (KL here
    is a difference of terms of ~300: computed as a softmax-weighted mean through exp(z − lse) it was 1e-3 off,
    the rounding of lse times the logits' size; as two sums with the same weights it is not.)"""
    x, w, t = make_case(16, 200, 16, device=device)
    x_t, w_t = teacher_case(16, 200, 16, torch.float32, device, scale=20.0)
    for direction in ("forward", "reverse"):
        check = kl_and_grads(mk.linear_kl_divergence, x, w, x_t, w_t, t, torch.ones(16, device=device),
                             direction=direction)
        assert all(torch.isfinite(v).all() for v in check)
        want = kl_and_grads(reference.linear_kl_divergence, *(v.double().cpu() for v in (x, w, x_t, w_t)), t.cpu(),
                            torch.ones(16, dtype=torch.float64), direction=direction)
        for g, e in zip(check, want):
            assert_close_rel(g, e, torch.float32, floor=1.0)


def test_confident_teacher_stays_exact():
    check_confident_teacher("cpu")


def test_gradcheck_float64():
    x, w, t = make_case(5, 11, 4, torch.float64, ignore=(1,))
    x_t, w_t = teacher_case(5, 11, 3, torch.float64)
    for direction in ("forward", "reverse"):
        assert torch.autograd.gradcheck(
            lambda x, w: mk.linear_kl_divergence(x, w, x_t, w_t, t, temperature=0.9, direction=direction,
                                                 reduction="none"), (x, w))


def test_opcheck():
    x, w, t = make_case(7, 33, 8, ignore=(3,))
    x_t, w_t = teacher_case(7, 33, 5, torch.float32)
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.marginkern.linear_kl_divergence, (x, w, x_t, w_t, t, 0.7, -100, reverse))
        kl, lse, lse_t = (v.detach() for v in torch.ops.marginkern.linear_kl_divergence(x, w, x_t, w_t, t, 0.7, -100,
                                                                                         reverse))
        torch.library.opcheck(torch.ops.marginkern.linear_kl_divergence_backward,
                              (torch.randn(7), x.detach(), w.detach(), x_t, w_t, t, lse, lse_t, kl, 0.7, -100, reverse,
                               True))


def check_torch_compile_fullgraph(loss, oracle):
    """loss(x, w, teacher_x, teacher_w, target) compiled with fullgraph=True: its gradients against the oracle's (the
    KL and JSD tests share it)."""
    x, w, t = make_case(9, 40, 16, ignore=(2,))
    x_t, w_t = teacher_case(9, 40, 8, torch.float32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w):
        return loss(x, w, x_t, w_t, t) * 4.0

    got = torch.autograd.grad(step(x, w), (x, w))
    want = torch.autograd.grad(oracle(x, w, x_t, w_t, t) * 4.0, (x, w))
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32)


def test_torch_compile_fullgraph():
    check_torch_compile_fullgraph(lambda *a: mk.linear_kl_divergence(*a, temperature=2.0),
                                  lambda *a: reference.linear_kl_divergence(*a, temperature=2.0))


def test_bad_arguments():
    x, w, t = make_case(3, 5, 4)
    x_t, w_t = teacher_case(3, 5, 2, torch.float32)
    with pytest.raises(ValueError, match="direction must be"):
        mk.linear_kl_divergence(x, w, x_t, w_t, t, direction="js")
    with pytest.raises(ValueError, match=r"teacher_input must have shape \(N=3, E\)"):
        mk.linear_kl_divergence(x, w, x_t[:2], w_t, t)
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(C=5, E=2\)"):
        mk.linear_kl_divergence(x, w, x_t, w_t[:4], t)
    with pytest.raises(TypeError, match="teacher_input must have the dtype of input"):
        mk.linear_kl_divergence(x, w, x_t.double(), w_t, t)
    with pytest.raises(ValueError, match="temperature must lie in"):
        mk.linear_kl_divergence(x, w, x_t, w_t, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"target must have shape \(N=3,\)"):
        mk.linear_kl_divergence(x, w, x_t, w_t, torch.tensor([0, 1]))
    # target only masks: a value other than ignore_index is not a class to check
    assert torch.isfinite(mk.linear_kl_divergence(x, w, x_t, w_t, torch.tensor([0, 5, 1])))


def test_forced_cuda_backend_refuses_with_a_reason(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "cuda")
    x, w, t = make_case(3, 5, 4)
    x_t, w_t = teacher_case(3, 5, 2, torch.float32)
    with pytest.raises(BackendUnavailable, match="cuda"):
        mk.linear_kl_divergence(x, w, x_t, w_t, t)


def test_confident_teacher_on_both_cpu_backends(cpu_backend):
    check_confident_teacher("cpu")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_nan_gives_nan(backend, monkeypatch):
    from marginkern import cpp_tiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x, w, t = make_case(4, 600, 8)
    x_t, w_t = teacher_case(4, 600, 6, torch.float32)
    x = x.detach().clone()
    x[1, 2] = float("nan")
    w_t = w_t.clone()
    w_t[590] = float("nan")  # a NaN teacher class: every row's KL is NaN
    kl = mk.linear_kl_divergence(x, w, x_t, w_t, t, reduction="none")
    assert torch.isnan(kl).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_minus_inf_logits(backend, direction, monkeypatch):
    from marginkern import cpp_tiles
    from marginkern.engine import TorchTiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    monkeypatch.setattr(TorchTiles, "class_chunks", lambda self, N, C, x, bytes_per_class=0:
                        [(c0, min(C, c0 + 32)) for c0 in range(0, C, 32)])
    check_minus_inf_logits(direction, "cpu")


def check_minus_inf_logits(direction, device):
    """−inf logits (a masked vocabulary tail), also filling whole class chunks, never give 0·(−inf) = NaN where the
    KL is finite (found by a review): the teacher's −inf where the student's are finite (forward KL finite, its
    gradient too: the teacher gets none), and both heads −inf on a common tail (the value; −inf weights of the
    student's own make dX = G·W NaN in any implementation, torch's included). float64 on the CPU, float32 in
    the Triton kernels."""
    dtype = torch.float64 if device == "cpu" and os.environ.get("MARGINKERN_BACKEND") != "triton" else torch.float32
    torch.manual_seed(5)
    N, C = 6, 100
    x, x_t = torch.randn(N, 4, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)
    x[:, 0], x_t[:, 0] = x[:, 0].abs() + 0.5, x_t[:, 0].abs() + 0.5
    w, w_t = torch.randn(C, 4, dtype=torch.float64), torch.randn(C, 3, dtype=torch.float64)
    if direction == "forward":
        w_t[40:, 0] = -float("inf")
        upstream = torch.randn(N, dtype=torch.float64)
        got = kl_and_grads(mk.linear_kl_divergence, *(v.to(dtype).to(device) for v in (x, w, x_t, w_t)), None,
                           upstream.to(device))
        want = kl_and_grads(materialised_masked, x, w, x_t, w_t, None, upstream)
        for name, g, e in zip(("kl", "grad input", "grad weight"), got, want):
            assert_close_rel(g, e, dtype, name, floor=1.0)
    w[70:, 0], w_t[70:, 0] = -float("inf"), -float("inf")
    got = mk.linear_kl_divergence(*(v.to(dtype).to(device) for v in (x, w, x_t, w_t)), direction=direction,
                                  reduction="none")
    assert_close_rel(got, materialised_masked(x, w, x_t, w_t, None, direction), dtype, "kl", floor=1.0)


def materialised_masked(x, w, x_t, w_t, t, direction="forward", reduction="none"):
    """The float64 definition with 0·log 0 = 0 (a −inf logit's class has probability 0 and adds nothing), written
    so that autograd's unselected branch holds no inf either (its 0 gradient times inf would be NaN)."""
    log_p = torch.log_softmax(x @ w.t(), dim=1)
    log_q = torch.log_softmax(x_t @ w_t.t(), dim=1)
    a, b = (log_q, log_p) if direction == "forward" else (log_p, log_q)
    counts = a > -float("inf")
    a, b = torch.where(counts, a, 0.0), torch.where(counts, b, 0.0)
    return torch.where(counts, a.exp() * (a - b), 0.0).sum(1)


def test_no_target_with_ignore_index_zero_counts_every_row():
    x, w, _ = make_case(6, 30, 4)
    x_t, w_t = teacher_case(6, 30, 3, torch.float32)
    kl = mk.linear_kl_divergence(x, w, x_t, w_t, ignore_index=0, reduction="none")
    assert (kl > 0).all()
