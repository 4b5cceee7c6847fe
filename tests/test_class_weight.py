"""linear_cross_entropy's class_weight (torch's per-class `weight`): the oracle against F.cross_entropy, the op on
every CPU path (C++ tiles, PyTorch tiles, the 3-GEMM path, gradient filtering) against the oracle, torch's own
F.linear_cross_entropy, reductions, the module, autograd tooling and the refusals."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case
from tests.test_linear_ce import grads

# every term the class weights touch: the c_t-scaled target term (plain, focal, γ-CE), z-loss (c_t-scaled), the
# c_j-weighted smoothing term (with and without bias), and a softcap (without smoothing)
WEIGHTED_OPTIONS = [
    dict(), dict(label_smoothing=0.1), dict(label_smoothing=0.2, z_loss=1e-3), dict(focal_gamma=2.0),
    dict(focal_gamma=0.5, label_smoothing=0.05), dict(gamma_ce=0.5, z_loss=1e-2), dict(softcap=5.0),
]


def class_weights(C, device="cpu", dtype=torch.float32):
    """Weights in [0.1, 2.1), one class at 0 (a class turned off)."""
    c = torch.rand(C, dtype=torch.float64) * 2 + 0.1
    c[C // 2] = 0.0
    return c.to(dtype).to(device)


def check_class_weight_matches_oracle(device, dtype, opts, shape=(37, 301, 45), reductions=("mean", "sum", "none"),
                                      **knobs):
    """The library's weighted loss and gradients (input, weight, bias) against the float64 oracle on the same rounded
    inputs, at the dtype's tolerance (tests/helpers.REL_TOL)."""
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0,))
    w = (w.detach() * 0.3).to(dtype)  # logits of a few units
    b = torch.randn(C, device=device).to(dtype)
    c = class_weights(C, device)
    t[1] = C // 2  # a row whose target class weighs 0
    for reduction in reductions:
        got = grads(mk.linear_cross_entropy, x, w, t, b, class_weight=c, reduction=reduction, **opts, **knobs)
        want = grads(reference.linear_cross_entropy, x.double(), w.double(), t, b.double(), class_weight=c,
                     reduction=reduction, **opts)
        assert_close_rel(got[0], want[0], dtype, f"loss {reduction}", floor=1.0)
        for name, g, e in zip(("grad input", "grad weight", "grad bias"), got[1:], want[1:]):
            assert_close_rel(g, e, dtype, f"{name} {reduction}")


@pytest.mark.parametrize("ignore_index", [-100, 4])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
@pytest.mark.parametrize("with_bias", [False, True])
def test_oracle_matches_f_cross_entropy(ignore_index, label_smoothing, with_bias):
    x, w, t = make_case(21, 47, 9, torch.float64, ignore=(3, 7), ignore_index=ignore_index)
    b = torch.randn(47, dtype=torch.float64) if with_bias else None
    c = class_weights(47, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        kw = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)
        got = grads(lambda *a, **k: reference.linear_cross_entropy(*a, class_weight=c, class_chunk=10, **k),
                    x, w, t, b, **kw)
        want = grads(lambda a, ww, tt, bb, **k: F.cross_entropy(F.linear(a, ww, bb), tt, weight=c, **k), x, w, t, b,
                     **kw)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("opts", WEIGHTED_OPTIONS)
def test_op_matches_oracle(backend, dtype, opts, monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_class_weight_matches_oracle("cpu", dtype, opts)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("opts", [dict(label_smoothing=0.2, z_loss=1e-3), dict(focal_gamma=2.0)])
def test_three_gemm_path_and_gradient_filtering(backend, opts, monkeypatch):
    """The 3-GEMM path adds the smoothing's rank-1 dW term after its row blocks, the streaming path in its chunk
    finalizer, which gradient filtering keeps (the filter drops p-terms only)."""
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_class_weight_matches_oracle("cpu", torch.float32, opts, reductions=("mean", "sum"), logits_buffer_mb=0.01)
    check_class_weight_matches_oracle("cpu", torch.float64, opts, grad_filter_eps=1e-30)


def test_uniform_weights_are_the_unweighted_loss():
    """c ≡ 1 gives back linear_cross_entropy without weights (a test that every term's weight is in its place)."""
    x, w, t = make_case(30, 80, 12, ignore=(2,))
    b = torch.randn(80)
    for opts in WEIGHTED_OPTIONS:
        for reduction in ("mean", "none"):
            got = grads(mk.linear_cross_entropy, x, w, t, b, class_weight=torch.ones(80), reduction=reduction, **opts)
            want = grads(mk.linear_cross_entropy, x, w, t, b, reduction=reduction, **opts)
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-6)


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13 has no F.linear_cross_entropy")
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_parity_with_torch_linear_cross_entropy(label_smoothing, reduction):
    """torch's own fused op, in its chunked mode, with the same `weight`: a drop-in replacement."""
    x, w, t = make_case(64, 300, 32, ignore=(5, 9))
    c = class_weights(300)
    kw = dict(label_smoothing=label_smoothing, reduction=reduction)
    got = grads(lambda a, ww, tt, bb, **k: mk.linear_cross_entropy(a, ww, tt, class_weight=c, **k), x, w, t, None,
                **kw)
    # its chunked mode has no label smoothing (it falls back to its reference path, with a warning)
    options = torch.nn.LinearCrossEntropyOptions(acc_policy="accurate") if label_smoothing == 0 else None
    want = grads(lambda a, ww, tt, bb, **k: F.linear_cross_entropy(a, ww, tt, weight=c, options=options, **k),
                 x, w, t, None, **kw)
    for g, e in zip(got, want):  # both fp32, different accumulation orders
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("knobs", [{}, dict(logits_buffer_mb=0.01)], ids=["streaming", "3-GEMM"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_over_zero_weight_is_zero(knobs, label_smoothing):
    """"mean" divides by Σ c_t over non-ignored rows; where that is 0 (every row ignored, or every target weighing
    0) the loss and its gradients are 0, as the unweighted mean of no rows is (torch gives NaN). With smoothing the
    rows' losses are not 0 there (torch's smoothing term is not scaled by c_t): the mean must not become their sum
    (a review found it did)."""
    x, w, t = make_case(6, 40, 7, ignore=(0, 1))
    c = torch.ones(40)
    c[t[2:]] = 0.0
    for ignored in (False, True):
        tt = torch.full_like(t, -100) if ignored else t
        loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, tt, torch.randn(40), class_weight=c, z_loss=1e-3,
                                 label_smoothing=label_smoothing, **knobs)
        assert loss == 0 and not gx.any() and not gw.any() and not gb.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("knobs", [dict(reduction="none"), dict(reduction="sum"), dict(logits_buffer_mb=0.01)])
def test_no_rows(dtype, knobs):
    """N = 0 with weights and smoothing (the weighted logit sums' row blocks were range(0, 0, 0), a review found)."""
    x, w, t = make_case(0, 40, 7, dtype)
    loss, gx, gw, gb = grads(mk.linear_cross_entropy, x, w, t, torch.randn(40, dtype=dtype),
                             class_weight=class_weights(40), label_smoothing=0.1, **knobs)
    assert not loss.any() and gx.shape == (0, 7) and not gw.any() and not gb.any()


def test_sequence_inputs_and_shift():
    """(B, T, D) inputs with shift=1: the weights follow the shifted targets."""
    x = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9))
    c = class_weights(50)
    got = mk.linear_cross_entropy(x, w, labels, class_weight=c, shift=1, label_smoothing=0.1)
    want = F.cross_entropy((x[:, :-1] @ w.t()).flatten(0, 1), labels[:, 1:].flatten(), weight=c, label_smoothing=0.1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_module_keeps_the_weights_as_a_buffer():
    c = class_weights(60)
    module = mk.LinearCrossEntropyLoss(class_weight=c, label_smoothing=0.1)
    c.fill_(1.0)  # a copy: the caller's tensor may change
    assert "class_weight" in dict(module.named_buffers()) and "class_weight" in module.state_dict()
    assert "class_weight=buffer (60,)" in repr(module)
    x, w, t = make_case(10, 60, 8)
    torch.testing.assert_close(module(x, w, t), mk.linear_cross_entropy(x, w, t, class_weight=module.class_weight,
                                                                        label_smoothing=0.1))
    assert mk.LinearCrossEntropyLoss().class_weight is None


def test_opcheck_and_compile():
    x, w, t = make_case(7, 13, 5, ignore=(1,))
    b = torch.randn(13, requires_grad=True)
    c = class_weights(13)
    args = (x, w, t, b, -100, 0.1, 1e-3, None, 0.0, 0.0, None, c)
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy.default, args)
    _, lse, _ = torch.ops.marginkern.linear_cross_entropy(*args)
    bwd = (torch.rand(7), x.detach(), w.detach(), t, b.detach(), lse.detach()) + args[4:11] + (True, True, c)
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy_backward.default, bwd)
    buffered = (x, w, t, b, -100, 0.1, 1e-3, None, 0.0, 0.0, "mean", 1 << 12, True, True, True, c)
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy_buffered.default, buffered)

    step = lambda a, ww, tt, bb, cc: mk.linear_cross_entropy(a, ww, tt, bb, label_smoothing=0.1, class_weight=cc)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = grads(lambda a, ww, tt, bb: compiled(a, ww, tt, bb, c), x, w, t, b)
    want = grads(lambda a, ww, tt, bb: step(a, ww, tt, bb, c), x, w, t, b)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)


def test_gradcheck_float64():
    x, w, t = make_case(5, 8, 4, torch.float64, ignore=(1,))
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    c = class_weights(8, dtype=torch.float64)
    fn = lambda a, ww, bb: mk.linear_cross_entropy(a, ww, t, bb, label_smoothing=0.1, z_loss=0.01, focal_gamma=1.5,
                                                   class_weight=c, reduction="none")
    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("make_weight, kw, exc, match", [
    (lambda: torch.ones(5), {}, ValueError, r"class_weight must have shape \(C=9,\)"),
    (lambda: torch.ones(9, 1), {}, ValueError, r"class_weight must have shape \(C=9,\)"),
    (lambda: torch.ones(9, dtype=torch.long), {}, TypeError, "class_weight must be a floating-point tensor"),
    (lambda: [1.0] * 9, {}, TypeError, "class_weight must be a torch.Tensor or None"),
    (lambda: torch.ones(9, requires_grad=True), {}, ValueError, "class_weight receives no gradient"),
    (lambda: torch.ones(9), dict(label_smoothing=0.1, softcap=5.0), ValueError, "needs softcap=None"),
    (lambda: torch.tensor([1.0] * 8 + [-0.5]), {}, ValueError, "finite, non-negative values, got -0.5"),
    (lambda: torch.tensor([1.0] * 8 + [float("nan")]), {}, ValueError, "finite, non-negative values, got nan"),
    (lambda: torch.tensor([1.0] * 8 + [float("inf")]), {}, ValueError, "finite, non-negative values, got inf"),
    # finite in fp64, inf in the fp32 the loss computes in
    (lambda: torch.tensor([1.0] * 8 + [1e39], dtype=torch.float64), {}, ValueError, "finite, non-negative values"),
])
@pytest.mark.parametrize("buffered", [False, True])
def test_bad_class_weight_raises(make_weight, kw, exc, match, buffered):
    x, w, t = make_case(4, 9, 3)
    knobs = dict(logits_buffer_mb=1) if buffered else {}
    with pytest.raises(exc, match=match):
        mk.linear_cross_entropy(x, w, t, class_weight=make_weight(), **kw, **knobs)


def test_module_refuses_bad_class_weight():
    with pytest.raises(ValueError, match="finite, non-negative"):
        mk.LinearCrossEntropyLoss(class_weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="needs softcap=None"):
        mk.LinearCrossEntropyLoss(class_weight=torch.ones(3), label_smoothing=0.1, softcap=5.0)
