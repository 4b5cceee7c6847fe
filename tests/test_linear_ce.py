"""linear_cross_entropy: the oracle against materialised float64 math and F.cross_entropy, and the op
(engine + plain-PyTorch tiles) against the oracle; autograd, opcheck, compile, errors."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case


def naive_linear_ce(x, w, t, b=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None,
                    focal_gamma=0.0, gamma_ce=0.0, reduction="mean"):
    """Materialised float64 logits and the §4 definitions, written independently of marginkern."""
    logits = x.double() @ w.double().t()
    if b is not None:
        logits = logits + b.double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = t != ignore_index
    logp = torch.log_softmax(logits, dim=1)
    logp_t = logp.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
    p_t = logp_t.exp()
    if focal_gamma > 0:
        term = -((1 - p_t) ** focal_gamma) * logp_t
    elif gamma_ce > 0:  # float64: its rounding over 1 − γ stays < 1e-8 relative for 1 − γ ≥ 1e-8
        term = -torch.log(gamma_ce + (1 - gamma_ce) * p_t) / (1 - gamma_ce)
    else:
        term = -logp_t
    loss = (1 - label_smoothing) * term + label_smoothing * (-logp).mean(1)
    loss = loss + z_loss * torch.logsumexp(logits, 1) ** 2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum().clamp_min(1)


OPTIONS = [
    dict(), dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=5.0), dict(focal_gamma=2.0),
    dict(focal_gamma=0.5, label_smoothing=0.05), dict(gamma_ce=0.3), dict(gamma_ce=0.5, z_loss=1e-2, softcap=3.0),
    dict(label_smoothing=0.2, z_loss=1e-3, softcap=10.0, focal_gamma=1.0),
]


def check_gamma_ce_extremes(device):
    """γ-CE in fp32 against materialised float64 at both ends. As γ → 1 (→ 1 − p_t): log(γ + (1−γ)p_t)/(1−γ) would
    divide fp32's rounding of the log by 1 − γ (4% off at γ = 1 − 1e-6, 0 instead of ≈ 0.8 at 1 − 1e-8). As γ → 0
    with p_t → 0 (rows whose target is their smallest logit, p_t ~ 1e-7 to 1e-18): log1p(−(1−γ)(1−p_t)) subtracted
    numbers within 1e-7 of 1 (1% off in the loss, 11% in dL/dz_t at γ = p_t = 1e-7)."""
    x, w, t = make_case(13, 29, 8, device=device, ignore=(2,))
    b = torch.randn(29, device=device)
    for gamma in (0.999, 1 - 1e-6, 1 - 1e-8):
        for opts in (dict(gamma_ce=gamma), dict(gamma_ce=gamma, label_smoothing=0.1, z_loss=1e-3)):
            got = grads(mk.linear_cross_entropy, x, w, t, b, **opts)
            want = grads(naive_linear_ce, x.cpu(), w.cpu(), t.cpu(), b.cpu(), **opts)
            for name, g, e in zip(("loss", "grad input", "grad weight", "grad bias"), got, want):
                assert_close_rel(g, e, torch.float32, f"{name} at {opts}", floor=1e-2)
    x = x.detach() * torch.linspace(1.0, 3.0, 13, device=device)[:, None]  # p_t of the smallest logit: 1e-7 … 1e-18
    t = torch.where(t >= 0, (x @ w.detach().t() + b).argmin(1), t)
    for gamma in (1e-7, 1e-6, 1e-4):
        got = grads(mk.linear_cross_entropy, x, w, t, b, gamma_ce=gamma, reduction="none")
        want = grads(naive_linear_ce, x.cpu(), w.cpu(), t.cpu(), b.cpu(), gamma_ce=gamma, reduction="none")
        for name, g, e in zip(("loss", "grad input", "grad weight", "grad bias"), got, want):
            assert_close_rel(g, e, torch.float32, f"{name} at gamma_ce={gamma}", floor=1e-2)


def check_large_softcap(device):
    """A softcap far above the logits (cap·tanh(z/cap) ≈ z) in fp32 against materialised float64, as precise as no
    softcap: the kernels' tanh was 1 − 2/(e^{2u} + 1), ~1e-7 off in absolute terms near 0, i.e. cap·1e-7 on every
    logit (2e-4 in the loss at cap = 1e4)."""
    x, w, t = make_case(16, 64, 16, device=device, ignore=(2,))
    w = w.detach() / 4
    for softcap in (30.0, 1e3, 1e4, 1e5):
        got = grads(mk.linear_cross_entropy, x, w, t, None, softcap=softcap, reduction="none")
        want = grads(naive_linear_ce, x.cpu(), w.cpu(), t.cpu(), None, softcap=softcap, reduction="none")
        for name, g, e in zip(("loss", "grad input", "grad weight"), got, want):
            assert_close_rel(g, e, torch.float32, f"{name} at softcap={softcap}", floor=1.0)


def grads(fn, x, w, t, b, **kw):
    leaves = [v.detach().requires_grad_() for v in (x, w) + ((b,) if b is not None else ())]
    loss = fn(leaves[0], leaves[1], t, leaves[2] if b is not None else None, **kw)
    return (loss.detach(),) + torch.autograd.grad(loss.sum(), leaves)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_oracle_matches_materialised_float64(opts, with_bias):
    x, w, t = make_case(21, 47, 9, torch.float64, ignore=(3,))
    b = torch.randn(47, dtype=torch.float64) if with_bias else None
    got = grads(lambda *a, **k: reference.linear_cross_entropy(*a, class_chunk=10, **k), x, w, t, b, **opts)
    want = grads(naive_linear_ce, x, w, t, b, **opts)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1), dict(reduction="sum"), dict(reduction="none"),
                                dict(ignore_index=4)])
def test_parity_with_f_cross_entropy(kw):
    x, w, t = make_case(33, 77, 16, torch.float32, ignore=(2, 9), ignore_index=kw.get("ignore_index", -100))
    b = torch.randn(77)
    got = grads(mk.linear_cross_entropy, x, w, t, b, **kw)
    want = grads(lambda a, c, tt, bb, **k: F.cross_entropy(F.linear(a, c, bb), tt, **k), x, w, t, b, **kw)
    for g, e in zip(got, want):  # both fp32: the two accumulation orders differ by a few ulps of the sums
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 2, 3), (64, 1029, 17)])
def test_op_matches_oracle(dtype, opts, shape):
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, ignore=(0,))
    w = (w.detach() * 0.3).to(dtype)  # logits of a few units, as in a trained LM head
    b = torch.randn(C).to(dtype)
    got = grads(mk.linear_cross_entropy, x, w, t, b, **opts)
    want = grads(reference.linear_cross_entropy, x.double(), w.double(), t, b.double(), **opts)
    assert got[1].dtype == dtype and got[2].dtype == dtype and got[3].dtype == dtype
    assert_close_rel(got[0], want[0], dtype, "loss", floor=1.0)
    for name, g, e in zip(("grad input", "grad weight", "grad bias"), got[1:], want[1:]):
        assert_close_rel(g, e, dtype, name)


@pytest.mark.parametrize("opts", OPTIONS)
def test_single_class_is_finite(opts):
    # one class: p_t = 1 exactly, where (1 − p_t)^γ with γ < 1 has an infinite slope times log p_t = 0
    x, w, t = make_case(4, 1, 5)
    for fn in (mk.linear_cross_entropy, reference.linear_cross_entropy):
        loss, gx, gw, gb = grads(fn, x, w, t, torch.randn(1), **opts)
        assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
        assert torch.isfinite(gb).all()


def check_fractional_focal_with_an_ignored_row_below_zero(device="cpu"):
    """A fractional focal γ with an ignored row whose logits are all negative (lse < 0): its placeholder target logit
    0 made 1 − p_t < 0 and (1 − p_t)^γ NaN, which the row's zero upstream gradient did not cancel (0·NaN) and the
    backward GEMM spread into every dW row (a fuzzing review). The gradients equal the valid row's alone."""
    x = torch.ones(2, 1, device=device)
    w = torch.tensor([[-1.0], [-2.0]], device=device)
    t = torch.tensor([0, -100], device=device)
    for gamma in (0.5, 3.7):
        for opts in (dict(), dict(logits_buffer_mb=1), dict(label_smoothing=0.1, z_loss=1e-3)):
            got = grads(mk.linear_cross_entropy, x, w, t, None, reduction="sum", focal_gamma=gamma, **opts)
            want = grads(mk.linear_cross_entropy, x[:1], w, t[:1], None, reduction="sum", focal_gamma=gamma,
                         **opts)
            torch.testing.assert_close(got[0], want[0])
            assert torch.equal(got[1][1], torch.zeros_like(got[1][1])), (gamma, opts, got[1])
            torch.testing.assert_close(got[1][:1], want[1])
            torch.testing.assert_close(got[2], want[2])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_fractional_focal_with_an_ignored_row_below_zero(backend, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_fractional_focal_with_an_ignored_row_below_zero()


def test_empty_and_all_ignored():
    for (N, C, D), ignore in [((0, 5, 3), ()), ((6, 40, 7), range(6))]:
        x, w, t = make_case(N, C, D, ignore=ignore)
        for reduction in ("mean", "sum", "none"):
            loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, t, torch.randn(C), reduction=reduction,
                                     z_loss=1e-3, label_smoothing=0.1)
            assert torch.isfinite(loss).all() and not loss.any() and not gx.any() and not gw.any() and not gb.any()


def test_non_contiguous_inputs_and_upstream_gradient():
    # peers' bugs: transposed inputs (TransformerEngine#2734), strided/stride-0 grad_output (verl#6960, quack#126)
    x, w, t = make_case(24, 50, 12)
    xt = x.detach().t().contiguous().t()          # same values, column-major
    wt = w.detach().t().contiguous().t()
    assert not xt.is_contiguous() and not wt.is_contiguous()
    upstream = torch.randn(48)[::2]                # strided grad_output for reduction="none"
    a = [v.clone().requires_grad_() for v in (xt, wt)]
    b = [v.detach().clone().requires_grad_() for v in (x, w)]
    la = mk.linear_cross_entropy(a[0], a[1], t, reduction="none")
    lb = F.cross_entropy(b[0] @ b[1].t(), t, reduction="none")
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    for p, q in zip(torch.autograd.grad(la, a, upstream), torch.autograd.grad(lb, b, upstream)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    x, w, t = make_case(5, 8, 4, torch.float64, ignore=(1,))
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    fn = lambda a, c, bb: mk.linear_cross_entropy(a, c, t, bb, label_smoothing=0.1, z_loss=0.01, softcap=2.0,
                                                  focal_gamma=1.5)
    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_opcheck():
    x, w, t = make_case(7, 13, 5, ignore=(1,))
    b = torch.randn(13, requires_grad=True)
    for bias in (b, None):
        args = (x, w, t, bias, -100, 0.1, 1e-3, 4.0, 0.0, 0.2)
        torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy.default, args)
        _, lse, _ = torch.ops.marginkern.linear_cross_entropy(*args)
        bwd = (torch.rand(7), x.detach(), w.detach(), t, None if bias is None else bias.detach(), lse.detach()) + args[4:]
        torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy_backward.default, bwd)


@pytest.mark.parametrize("knobs", [dict(softcap=5.0), dict(logits_buffer_mb=0.01)], ids=["streaming", "3-GEMM"])
def test_torch_compile_fullgraph(knobs):
    x, w, t = make_case(12, 40, 8, ignore=(3,))
    b = torch.randn(40)
    step = lambda a, c, tt, bb: mk.linear_cross_entropy(a, c, tt, bb, z_loss=1e-3, **knobs) + 1.0
    got = grads(torch.compile(step, fullgraph=True), x, w, t, b)
    want = grads(step, x, w, t, b)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", [None, "reference"])
def test_gamma_ce_stays_exact_near_one_and_near_zero(monkeypatch, backend):
    if backend:
        monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_gamma_ce_extremes("cpu")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_large_softcap_is_as_precise_as_none(monkeypatch, backend):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_large_softcap("cpu")


def test_module():
    loss_fn = mk.LinearCrossEntropyLoss(z_loss=1e-3, label_smoothing=0.1)
    x, w, t = make_case(9, 30, 6)
    torch.testing.assert_close(loss_fn(x, w, t), mk.linear_cross_entropy(x, w, t, z_loss=1e-3, label_smoothing=0.1))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(z_loss=-1.0), ValueError, "z_loss"), (dict(softcap=0.0), ValueError, "softcap"),
    (dict(focal_gamma=-1.0), ValueError, "focal_gamma"), (dict(gamma_ce=1.0), ValueError, "gamma_ce"),
    (dict(focal_gamma=2.0, gamma_ce=0.5), ValueError, "cannot be combined"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"), (dict(reduction="batchmean"), ValueError, "reduction"),
    (dict(bias=torch.zeros(7)), ValueError, "bias"), (dict(bias=torch.zeros(6, dtype=torch.float64)), TypeError, "bias"),
])
def test_bad_options_raise_naming_the_argument(kw, exc, match):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(exc, match=match):
        mk.linear_cross_entropy(x, w, t, **kw)


def test_bad_target_raises():
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(ValueError, match="target"):
        mk.linear_cross_entropy(x, w, t + 6)


@pytest.mark.parametrize("fn", [mk.linear_cross_entropy, mk.emo_loss, mk.emo_cross_entropy])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_and_sequence_dimensions(fn, reduction):
    # LM heads see (B, T, D) hidden states and (B, T) labels; the loss is that of the flattened tokens
    x, w, t = make_case(2 * 5, 40, 8, ignore=(3,))
    got_x = x.detach().reshape(2, 5, 8).requires_grad_()
    got = fn(got_x, w, t.reshape(2, 5), reduction=reduction)
    want = fn(x, w, t, reduction=reduction)
    assert got.shape == ((2, 5) if reduction == "none" else ())
    torch.testing.assert_close(got.reshape(-1) if reduction == "none" else got, want)
    g, = torch.autograd.grad(got.sum(), got_x)
    e, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g.reshape(-1, 8), e)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 5\)"):
        fn(got_x, w, t)


def _log_probs_then_entropy(*args, reduction, **kw):
    """log_probs_and_entropy as one tensor, for the shift test: log p_t then H, stacked on a last dimension."""
    return torch.stack(mk.log_probs_and_entropy(*args, **kw), dim=-1)


@pytest.mark.parametrize("fn", [mk.linear_cross_entropy, mk.emo_loss, mk.emo_cross_entropy, _log_probs_then_entropy])
@pytest.mark.parametrize("uint8_labels", [False, True])
def test_shift_is_the_loss_of_the_shifted_tokens(fn, uint8_labels):
    """shift=1 on (B, T) labels as a causal LM has them: position i predicts label i + 1, the last position is
    ignored (0 in "none"), and nothing else changes; the same as slicing the hidden states and the labels."""
    B, T, D, C = 3, 6, 8, 40
    x, w, t = make_case(B * T, C, D, ignore=(4,))
    t = t.reshape(B, T)
    if uint8_labels:
        t = torch.where(t < 0, 0, t).to(torch.uint8)
    hidden = x.detach().reshape(B, T, D).requires_grad_()
    got = fn(hidden, w, t, reduction="none", shift=1)
    sliced = hidden[:, :-1]
    want = fn(sliced, w, t[:, 1:].long(), reduction="none")
    torch.testing.assert_close(got[:, :-1], want)
    assert (got[:, -1] == 0).all()
    g, = torch.autograd.grad(got.sum(), hidden)
    e, = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g, e)
    assert (g[:, -1] == 0).all()
    # a 1-D target is one sequence; shift ≥ T ignores everything; shift 0 changes nothing
    flat = fn(x, w, t[0].long().repeat(B)[:B * T], reduction="none", shift=2)
    assert (flat[-2:] == 0).all()
    assert (fn(hidden, w, t, reduction="none", shift=T + 3) == 0).all()
    torch.testing.assert_close(fn(hidden, w, t.long(), reduction="none", shift=0), fn(hidden, w, t.long(), reduction="none"))


def test_shift_keeps_the_target_dtype_check():
    """A float or bool target is refused with shift as without it (.long() would truncate it silently: a review)."""
    x, w, t = make_case(2 * 7, 37, 8)
    hidden, labels = x.detach().reshape(2, 7, 8), t.reshape(2, 7)
    for bad in (labels.float() + 0.7, labels > 5):
        for fn in (mk.linear_cross_entropy, mk.emo_loss, mk.log_probs_and_entropy):
            with pytest.raises(TypeError, match="target must hold integer class indices"):
                fn(hidden, w, bad, shift=1)


@pytest.mark.parametrize("shift, exc, match", [(-1, ValueError, "shift must be ≥ 0"), (1.0, TypeError, "shift must be an int")])
def test_bad_shift(shift, exc, match):
    x, w, t = make_case(4, 9, 4)
    for fn in (mk.linear_cross_entropy, mk.emo_loss, mk.log_probs_and_entropy):
        with pytest.raises(exc, match=match):
            fn(x, w, t, shift=shift)
    with pytest.raises(exc, match=match):
        mk.LinearCrossEntropyLoss(shift=shift)
    with pytest.raises(exc, match=match):
        mk.EMOLoss(shift=shift)


def test_modules_take_shift():
    x, w, t = make_case(2 * 5, 40, 8)
    hidden, labels = x.detach().reshape(2, 5, 8), t.reshape(2, 5)
    torch.testing.assert_close(mk.LinearCrossEntropyLoss(shift=1)(hidden, w, labels),
                               mk.linear_cross_entropy(hidden, w, labels, shift=1))
    torch.testing.assert_close(mk.EMOLoss(shift=1)(hidden, w, labels), mk.emo_cross_entropy(hidden, w, labels, shift=1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_plain_weight_grad_is_written_by_its_gemm(dtype):
    """Linear CE's dW needs no unscaling or projection: with G in the weight's dtype (as the GPU tiles give
    it) each chunk's GEMM writes dW directly, no fp32 chunk is finished, and the whole chunk budget goes to
    G. The result matches the fp32-chunk path to the dtype's rounding."""
    from marginkern.engine import TorchTiles, gpu_grad_dtype, streaming_grads
    from marginkern.linear_ce import LinearCEOptions, _row_coefficients, _TargetLogits, linear_ce_forward

    class GpuLikeTiles(TorchTiles):  # G in x's dtype, as TritonTiles/CudaTiles return it
        budgets, finished = [], 0
        grad_dtype = staticmethod(gpu_grad_dtype)

        def grad_logits(self, x, *args, **kwargs):
            return super().grad_logits(x, *args, **kwargs).to(x.dtype)

        def class_chunks(self, N, C, x, bytes_per_class=0):
            self.budgets.append(bytes_per_class)
            return super().class_chunks(N, C, x, bytes_per_class)

        def finish_grad_rows(self, *args):
            GpuLikeTiles.finished += 1
            from marginkern.engine import finish_grad_rows
            return finish_grad_rows(*args)

    x, w, t = make_case(11, 700, 16, dtype, ignore=(4,), requires_grad=False)
    opts = LinearCEOptions(-100, 0.0, 0.0, None, 0.0, 0.0)
    tiles = GpuLikeTiles(buffer_bytes=11 * 4 * 200)  # several chunks
    loss, lse = linear_ce_forward(x, w, t, None, opts, tiles)
    tgt = _TargetLogits(x, w, t, None, opts)
    coefs = _row_coefficients(tgt, slice(None), torch.full_like(lse, 0.1), lse, opts, 700)[:3]  # no rank-1 term
    _, grad_w, _ = streaming_grads(x, w, tgt.spec, lse, *coefs, tiles)
    assert grad_w.dtype == dtype and GpuLikeTiles.finished == 0 and tiles.budgets[-1] == 0
    reference_tiles = GpuLikeTiles.__bases__[0](buffer_bytes=11 * 4 * 200)
    budgets = []
    reference_tiles.class_chunks = lambda N, C, x, bytes_per_class=0: (
        budgets.append(bytes_per_class) or TorchTiles.class_chunks(reference_tiles, N, C, x, bytes_per_class))
    _, grad_w_fp32_chunks, _ = streaming_grads(x, w, tgt.spec, lse, *coefs, reference_tiles)
    assert_close_rel(grad_w, grad_w_fp32_chunks, dtype, "dW", floor=1e-6)
    # TorchTiles' G is fp32: a bf16 weight then takes the fp32 chunk path, and its budget counts that chunk
    assert budgets == [16 * 4 if dtype == torch.bfloat16 else 0]


DYNAMIC_STEPS = {
    "linear": lambda x, w, t, eps: mk.linear_cross_entropy(x, w, t, label_smoothing=eps, z_loss=1e-3),
    "linear 3-GEMM": lambda x, w, t, eps: mk.linear_cross_entropy(x, w, t, label_smoothing=eps, logits_buffer_mb=0.01),
    "margin": lambda x, w, t, eps: mk.margin_cross_entropy(x, w, t, label_smoothing=eps),
    "emo": lambda x, w, t, eps: mk.emo_cross_entropy(x, w, t),
}


@pytest.mark.parametrize("loss", sorted(DYNAMIC_STEPS))
def test_torch_compile_dynamic_shapes(loss):
    # unsloth's setting (llm_ce_anchors.md: compile fragility): dynamic=True traces the batch size and the
    # Python float argument as symbols; the option checks must not break the graph (math.isfinite did)
    step = DYNAMIC_STEPS[loss]
    compiled = torch.compile(step, dynamic=True, fullgraph=True)
    for n, eps in ((12, 0.1), (20, 0.2), (7, 0.1)):
        x, w, t = make_case(n, 40, 8, ignore=(3,))
        got = grads(lambda a, c, tt, _: compiled(a, c, tt, eps), x, w, t, None)
        want = grads(lambda a, c, tt, _: step(a, c, tt, eps), x, w, t, None)
        for g, e in zip(got, want):
            if e is not None:
                torch.testing.assert_close(g, e)


def test_losses_return_fp32_for_16bit_inputs():
    x, w, t = make_case(9, 30, 6, torch.bfloat16)
    for fn in (mk.linear_cross_entropy, mk.emo_cross_entropy, mk.emo_loss):
        for reduction in ("mean", "none"):
            assert fn(x, w, t, reduction=reduction).dtype == torch.float32, (fn.__name__, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", [dict(), dict(focal_gamma=2.0), dict(focal_gamma=0.5), dict(gamma_ce=0.5)])
def test_confident_rows_keep_their_gradient(dtype, opts):
    # focal γ < 1: the slope's (1 − p_t)^{γ−1} grows without bound as p_t → 1 (seed_losses.md)
    from tests.helpers import check_confident_rows_per_row_gradient
    check_confident_rows_per_row_gradient("cpu", dtype, opts)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0), dict(gamma_ce=0.5)])
def test_vocab_sharded_engine_path_on_cpu_tiles(backend, dtype, opts, monkeypatch):
    """marginkern.distributed.sharded_linear_cross_entropy's engine path (three shards in one process; the gloo
    tests in test_distributed.py run the collectives) on the C++ and PyTorch tiles."""
    from marginkern.dispatch import _why_not, select_tiles
    from tests.helpers import check_sharded_linear_ce_tiles
    reason = _why_not(backend, torch.device("cpu"), dtype)
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    tiles = select_tiles(torch.device("cpu"), dtype)
    assert tiles.name == backend, tiles.name
    check_sharded_linear_ce_tiles(tiles, "cpu", dtype, opts)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("opts", [dict(focal_gamma=2.0), dict(gamma_ce=0.5), dict(z_loss=1e-2)])
def test_masked_first_token_with_ignored_rows_stays_finite(backend, opts, monkeypatch):
    """bias[0] = −inf (token 0 masked, never a target) with ignored rows: an ignored row's target logit is 0, not
    row 0's −inf, whose focal/γ-CE coefficient 0·(−inf) made every gradient NaN on the C++ path (a review)."""
    from marginkern.dispatch import _why_not
    reason = _why_not(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x, w, t = make_case(7, 5, 4, torch.float64, ignore=(2, 5))
    t = torch.where(t == 0, 1, t).masked_fill(t == -100, -100)
    b = torch.randn(5, dtype=torch.float64)
    b[0] = -float("inf")
    loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, t, b, **opts)
    assert all(torch.isfinite(g).all() for g in (loss, gx, gw, gb))
    # the definition: the counted rows over the classes 1..C−1 (class 0's probability is exactly 0)
    valid = t != -100
    want_loss, want_gx, want_gw, want_gb = grads(naive_linear_ce, x[valid], w[1:], t[valid] - 1, b[1:], **opts)
    assert (gx[~valid] == 0).all() and (gw[0] == 0).all() and gb[0] == 0
    for g, e in zip((loss, gx[valid], gw[1:], gb[1:]), (want_loss, want_gx, want_gw, want_gb)):
        assert torch.allclose(g, e, atol=1e-10), (g, e)


def test_oracle_gamma_ce_gradient_where_one_minus_gamma_rounds_to_one():
    """γ < 3e-8 rounds 1 − γ to 1 in fp32, so where p_t underflows (1−γ)(1 − p_t) is exactly 1: the oracle's unused
    log1p branch has an infinite slope there, and torch.where's zero gradient times it was NaN. Its gradient equals
    the library's."""
    x = torch.tensor([[40.0, 0.0], [0.0, 3.0]])
    w, t = torch.eye(2), torch.tensor([1, 1])  # row 0: p_t = e^-40 underflows to 0 in fp32
    for gamma in (1e-8, 2e-8):
        want = grads(reference.linear_cross_entropy, x, w, t, None, gamma_ce=gamma)
        got = grads(mk.linear_cross_entropy, x, w, t, None, gamma_ce=gamma)
        assert all(torch.isfinite(g).all() for g in want)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)
