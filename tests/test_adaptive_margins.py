"""Per-row margins (m2, m3 as (N,) tensors) and the losses built on them: AdaFace, MagFace, ElasticFace
(marginkern/adaptive_margins.py), on the CPU backends. The interpreter tier and the GPU tier run the same helper
(tests.helpers.check_row_margins_match_oracle) on the Triton kernels."""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from tests.helpers import (check_nan_margin_on_an_ignored_row, check_row_margins_match_oracle, make_case,
                           materialised_row_margin_ce)
from tests.test_subcenters import backend  # noqa: F401 (the fixture: each CPU backend in turn)

ROW_OPTIONS = [dict(), dict(normalize=False), dict(lambda_=0.5, label_smoothing=0.1),
               dict(margin_grad="straight_through"), dict(subcenters=3)]
ROW_IDS = ["arcface-like", "l-softmax", "lambda-smoothing", "straight-through", "subcenters"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("options", ROW_OPTIONS, ids=ROW_IDS)
def test_row_margins_match_the_materialised_definition(backend, dtype, options):
    check_row_margins_match_oracle("cpu", dtype, **options)


def test_row_margins_over_many_class_chunks(backend):
    """N = 4096 rows: each CPU backend streams C = 3000 classes in 3 chunks."""
    check_row_margins_match_oracle("cpu", torch.float32, N=4096, C=3000, D=8)


def test_constant_row_margins_equal_the_scalar_margins(backend):
    x, w, t = make_case(40, 70, 16, ignore=(2,))
    for m2, m3 in ((0.5, 0.0), (0.0, 0.35), (0.3, 0.2)):
        want = mk.margin_cross_entropy(x, w, t, m2=m2, m3=m3, reduction="none")
        got = mk.margin_cross_entropy(x, w, t, m2=torch.full((40,), m2), m3=torch.full((40,), m3), reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        mixed = mk.margin_cross_entropy(x, w, t, m2=torch.full((40,), m2), m3=m3, reduction="none")
        torch.testing.assert_close(mixed, want, rtol=1e-6, atol=1e-6)


def test_reference_margin_gradients_pass_gradcheck():
    """The oracle's own margin gradients (margin.MarginPsi) against finite differences, with negative m2 (φ < 0
    on rows with a small angle: the branch k = −1 of ψ)."""
    x, w, t = make_case(6, 9, 5, torch.float64, ignore=(2,))
    x = (x.detach() + 3 * w.detach()[t.clamp_min(0)]).requires_grad_()  # small target angles
    m2 = torch.tensor([-0.9, 0.3, -0.2, 0.6, 0.0, 1.1], dtype=torch.float64, requires_grad=True)
    m3 = torch.rand(6, dtype=torch.float64, requires_grad=True)
    for normalize in (True, False):
        def loss(a, b, c, d):
            return reference.margin_cross_entropy(a, b, t, scale=4.0 if normalize else 1.0, m2=c, m3=d,
                                                  normalize=normalize, lambda_=0.3, label_smoothing=0.1)
        assert torch.autograd.gradcheck(loss, (x, w, m2, m3))


def test_op_gradcheck_with_row_margins(backend):
    x, w, t = make_case(7, 5, 4, torch.float64, ignore=(1,))
    m2 = (torch.rand(7, dtype=torch.float64) - 0.5).requires_grad_()
    m3 = torch.rand(7, dtype=torch.float64, requires_grad=True)
    for normalize in (True, False):
        def loss(a, b, c, d):
            return mk.margin_cross_entropy(a, b, t, scale=4.0 if normalize else 1.0, m1=1.0 if normalize else 2.0,
                                           m2=c, m3=d, normalize=normalize, lambda_=0.3, label_smoothing=0.1)
        assert torch.autograd.gradcheck(loss, (x, w, m2, m3))


def test_negative_angular_margins_take_the_monotone_branch(backend):
    """m2 < 0 with θ_y < |m2| (AdaFace's clear samples): φ < 0, where ψ = 2 − cos φ − m3 continues the curve
    (continuous, decreasing in θ) rather than reflecting it."""
    x, w, t = make_case(5, 7, 6, torch.float64)
    x = (w.detach()[t] + 1e-3 * x.detach()).requires_grad_()  # θ_y ≈ 1e-3
    m2 = torch.full((5,), -0.3, dtype=torch.float64)
    got = mk.margin_cross_entropy(x, w, t, scale=2.0, m2=m2, m3=0.0, reduction="none")
    want = materialised_row_margin_ce(x, w, t, m2, torch.zeros(5, dtype=torch.float64), 2.0)
    torch.testing.assert_close(got.mean(), want)
    plain = mk.margin_cross_entropy(x, w, t, scale=2.0, m2=0.0, m3=0.0, reduction="none")
    assert (got < plain).all()  # a negative margin makes the target easier


def test_opcheck_with_row_margins():
    x, w, t = make_case(7, 13, 5, torch.float32, ignore=(1,))
    margins = torch.randn(7, 2) * 0.3
    args = (x, w, t, 64.0, 1.0, 0.0, 0.0, True, True, 0.1, -100, 1, 0.0, margins)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)
    loss, lse, row_state, col_norm = torch.ops.marginkern.margin_cross_entropy(*args)
    bwd_args = ((torch.rand(7), x.detach(), w.detach(), t, lse.detach(), row_state, col_norm) + args[3:11]
                + (True, 1, 0.0, margins))
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy_backward.default, bwd_args)


def test_compile_fullgraph_with_row_margins():
    x, w, t = make_case(12, 40, 8, ignore=(3,))
    m2 = (torch.rand(12) * 0.5).requires_grad_()

    def step(a, b, c):
        return mk.margin_cross_entropy(a, b, t, scale=16.0, m2=c, m3=0.1)
    eager = torch.autograd.grad(step(x, w, m2), (x, w, m2))
    compiled = torch.autograd.grad(torch.compile(step, fullgraph=True)(x, w, m2), (x, w, m2))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_bad_row_margins_are_named():
    x, w, t = make_case(4, 6, 3)
    with pytest.raises(ValueError, match=r"m2 must be a number or a float tensor of shape \(N=4,\)"):
        mk.margin_cross_entropy(x, w, t, m2=torch.zeros(5))
    with pytest.raises(ValueError, match="m3 must be a number or a float tensor"):
        mk.margin_cross_entropy(x, w, t, m3=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="m2 must be on input's device"):
        mk.margin_cross_entropy(x, w, t, m2=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match=r"row_margins must be a \(4, 2\) torch.float32 tensor"):
        torch.ops.marginkern.margin_cross_entropy(x, w, t, 64.0, 1.0, 0.0, 0.0, True, True, 0.0, -100, 1, 0.0,
                                                  torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"m2 must lie in \[0.0, inf\)"):  # a float m2 stays a margin ≥ 0
        mk.margin_cross_entropy(x, w, t, m2=-0.1)


# ---------------------------------------------------------------------------------------------------- AdaFace

def official_adaface(x, weight, t, m=0.4, h=0.333, s=64.0, eps=1e-3, mean=20.0, std=100.0, t_alpha=0.01):
    """AdaFace's official head (mk-minchul/AdaFace head.py) and its statistics update, on the full logits."""
    norms = x.norm(dim=1, keepdim=True)
    cosine = ((x / norms) @ F.normalize(weight, dim=1).T).clamp(-1 + eps, 1 - eps)
    safe = norms.clamp(0.001, 100).detach()
    mean = safe.mean() * t_alpha + (1 - t_alpha) * mean
    std = safe.std() * t_alpha + (1 - t_alpha) * std
    z = ((safe - mean) / (std + eps) * h).clamp(-1, 1)
    one_hot = torch.zeros_like(cosine).scatter_(1, t[:, None], 1.0)
    theta = (cosine.acos() + one_hot * (-m * z)).clamp(eps, math.pi - eps)
    logits = (theta.cos() - one_hot * (m + m * z)) * s
    return F.cross_entropy(logits, t), mean, std


def test_adaface_matches_the_official_head(backend):
    """Where the official clips do not act (θ_y + g_angle inside [ε, π − ε], cosines inside ±(1 − ε)): loss,
    gradients and the updated statistics, two steps in a row."""
    loss = mk.AdaFaceLoss(16, 50).double()
    mean, std = 20.0, 100.0
    for step in range(2):
        t = torch.randint(0, 50, (64,))
        x = (torch.randn(64, 16, dtype=torch.float64) * 40 * torch.rand(64, 1, dtype=torch.float64)).requires_grad_()
        got = loss(x, t)
        got_grads = torch.autograd.grad(got, (x, loss.weight))
        x2, w2 = x.detach().requires_grad_(), loss.weight.detach().requires_grad_()
        want, mean, std = official_adaface(x2, w2, t, mean=mean, std=std)
        want_grads = torch.autograd.grad(want, (x2, w2))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
        for g, e in zip(got_grads, want_grads):
            torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-12)
        torch.testing.assert_close(loss.batch_mean, mean.reshape(1), rtol=1e-12, atol=0)
        torch.testing.assert_close(loss.batch_std, std.reshape(1), rtol=1e-12, atol=0)


def test_adaface_statistics():
    """Eval mode leaves μ, σ alone; ignored rows do not count; a one-row batch moves μ only (the official head's
    std() of one row is NaN, and its margins NaN from then on); they are saved in the state dict."""
    loss = mk.AdaFaceLoss(8, 10, t_alpha=0.5)
    x, t = torch.randn(6, 8) * 3, torch.randint(0, 10, (6,))
    loss.eval()
    loss(x, t)
    assert loss.batch_mean.item() == 20.0 and loss.batch_std.item() == 100.0
    loss.train()
    t_ignored = t.clone()
    t_ignored[:2] = -100
    loss(x, t_ignored)
    norms = x[2:].norm(dim=1)
    torch.testing.assert_close(loss.batch_mean, 0.5 * norms.mean().reshape(1) + 10.0)
    torch.testing.assert_close(loss.batch_std, 0.5 * norms.std().reshape(1) + 50.0)
    before = loss.batch_std.clone()
    one = loss(x[:1], t[:1])
    assert torch.isfinite(one) and torch.equal(loss.batch_std, before)
    assert {"batch_mean", "batch_std"} <= set(loss.state_dict())
    loss(x, torch.full((6,), -100))  # nothing to count: nothing moves, no NaN
    assert torch.isfinite(loss.batch_mean).all() and torch.isfinite(loss.batch_std).all()


def test_adaface_margins_follow_the_norm():
    """ẑ = 1 (a clear, high-norm sample) gives m2 = −m, m3 = 2m; ẑ = −1 (low norm) gives m2 = m, m3 = 0 (ArcFace's)."""
    loss = mk.AdaFaceLoss(4, 3, margin=0.4, h=1.0)
    loss.eval()
    loss.batch_mean.fill_(10.0)
    loss.batch_std.fill_(1.0)
    x = torch.tensor([[100.0, 0, 0, 0], [0.5, 0, 0, 0]])
    margins = loss._step_options(x, torch.tensor([0, 1]))
    torch.testing.assert_close(margins["m2"], torch.tensor([-0.4, 0.4]))
    torch.testing.assert_close(margins["m3"], torch.tensor([0.8, 0.0]))


# ---------------------------------------------------------------------------------------------------- MagFace

def official_magface(x, weight, t, s=64.0, l_m=0.45, u_m=0.8, l_a=10.0, u_a=110.0, lambda_g=35.0):
    """MagFace's MagLinear + MagLoss (IrvingMeng/MagFace models/magface.py), easy margin, on the full logits."""
    norm = x.norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (norm - l_a) + l_m
    cos = (F.normalize(x) @ F.normalize(weight, dim=1).T).clamp(-1, 1)
    cos_m = cos * torch.cos(margin) - torch.sqrt(1.0 - cos ** 2) * torch.sin(margin)
    cos_m = torch.where(cos > 0, cos_m, cos)
    one_hot = torch.zeros_like(cos).scatter_(1, t[:, None], 1.0)
    logits = s * (one_hot * cos_m + (1 - one_hot) * cos)
    return F.cross_entropy(logits, t) + lambda_g * (norm / u_a ** 2 + 1 / norm).mean()


def test_magface_matches_the_official_loss(backend):
    """Targets with cos θ_y > 0 (where MagLinear's easy margin does not act), norms on both sides of the clamp:
    loss and gradients, the margin's own gradient into ‖x‖ included."""
    loss = mk.MagFaceLoss(16, 50).double()
    with torch.no_grad():
        loss.weight.normal_()
    t = torch.randint(0, 50, (64,))
    direction = F.normalize(loss.weight.detach()[t] + 0.3 * torch.randn(64, 16, dtype=torch.float64), dim=1)
    x = (direction * (5 + 120 * torch.rand(64, 1, dtype=torch.float64))).requires_grad_()
    got = loss(x, t)
    got_grads = torch.autograd.grad(got, (x, loss.weight))
    x2, w2 = x.detach().requires_grad_(), loss.weight.detach().requires_grad_()
    want = official_magface(x2, w2, t)
    want_grads = torch.autograd.grad(want, (x2, w2))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-13)


def test_magface_reductions_and_ignored_rows():
    loss = mk.MagFaceLoss(8, 10, reduction="none")
    x, t = torch.randn(5, 8) * 20, torch.randint(0, 10, (5,))
    t[1] = -100
    rows = loss(x, t)
    assert rows[1] == 0.0
    loss.options["reduction"] = "sum"
    torch.testing.assert_close(loss(x, t), rows.sum())
    loss.options["reduction"] = "mean"
    torch.testing.assert_close(loss(x, t), rows.sum() / 4)


# ---------------------------------------------------------------------------------------------------- ElasticFace

@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_elastic_margins_are_drawn_per_row_in_training(kind):
    cls, name = (mk.ElasticArcFaceLoss, "m2") if kind == "arc" else (mk.ElasticCosFaceLoss, "m3")
    loss = cls(8, 20, std=0.1)
    x, t = torch.randn(16, 8), torch.randint(0, 20, (16,))
    torch.manual_seed(3)
    got = loss(x, t)
    torch.manual_seed(3)
    margins = loss.margin + 0.1 * torch.randn(16)
    other = {"m2": 0.0, "m3": 0.0} if kind == "arc" else {"m2": 0.0}
    want = mk.margin_cross_entropy(x, loss.weight, t, scale=64.0, **{**other, name: margins})
    torch.testing.assert_close(got, want)
    loss.eval()  # the mean margin: ArcFace's resp. CosFace's loss
    plain = (mk.ArcFaceLoss if kind == "arc" else mk.CosFaceLoss)(8, 20, margin=loss.margin)
    plain.load_state_dict(loss.state_dict())
    torch.testing.assert_close(loss(x, t), plain(x, t))


def test_module_arguments_are_checked():
    with pytest.raises(TypeError, match="normalize cannot be set here"):
        mk.AdaFaceLoss(8, 10, normalize=False)
    with pytest.raises(ValueError, match=r"h must lie in \(0.0, inf\)"):
        mk.AdaFaceLoss(8, 10, h=0.0)
    with pytest.raises(ValueError, match=r"upper_norm must lie in \(10.0, inf\)"):
        mk.MagFaceLoss(8, 10, upper_norm=10.0)
    with pytest.raises(ValueError, match=r"std must lie in \[0.0, inf\)"):
        mk.ElasticArcFaceLoss(8, 10, std=-1.0)
    assert "t_alpha=0.01" in repr(mk.AdaFaceLoss(8, 10)) and "lambda_g=35.0" in repr(mk.MagFaceLoss(8, 10))


def test_row_margin_gradient_is_not_differentiable_again():
    """create_graph=True: the margins' gradient has no second derivative here (as the rest of the op's backward),
    so asking for one raises instead of following its sin φ term alone (a reviewer's run got wrong numbers)."""
    x, w, t = make_case(4, 6, 3, torch.float64)
    m2 = torch.rand(4, dtype=torch.float64, requires_grad=True)
    loss = mk.margin_cross_entropy(x, w, t, scale=8.0, m2=m2, m3=0.0)
    grad = torch.autograd.grad(loss, m2, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="does not require grad"):
        torch.autograd.grad(grad.sum(), m2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_adaface_statistics_keep_their_precision_under_module_casts(dtype):
    """.to(bf16) must not cast μ, σ: in bf16 μ = 20 has a spacing of 0.125, and t_alpha·(25 − 20) = 0.05 would be
    lost every step (a reviewer's 300 steps left μ at exactly 20.0)."""
    loss = mk.AdaFaceLoss(8, 10).to(dtype)
    assert loss.weight.dtype == dtype
    assert loss.batch_mean.dtype == loss.batch_std.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = (25 * F.normalize(torch.randn(16, 8, dtype=torch.float64), dim=1)).to(dtype)
    loss(x, torch.randint(0, 10, (16,)))
    assert 20.0 < loss.batch_mean.item() < 20.1


@pytest.mark.parametrize("cls", [mk.AdaFaceLoss, mk.MagFaceLoss, mk.ElasticArcFaceLoss, mk.CurricularFaceLoss,
                                 mk.MVSoftmaxLoss], ids=lambda c: c.__name__)
def test_modules_compile_fullgraph(cls):
    """torch.compile(fullgraph=True) of each module: the eager loss and gradients (AdaFace's statistics and
    CurricularFace's t move the same; ElasticFace's draws replayed from one seed, with Inductor's fallback_random:
    its own generator draws other numbers, as for any torch.randn in a compiled graph)."""
    import torch._inductor.config as inductor_config
    x, t = 5 * torch.randn(12, 8), torch.randint(0, 10, (12,))
    eager, compiled = cls(8, 10), cls(8, 10)
    compiled.load_state_dict(eager.state_dict())
    results = []
    for module, wrap in ((eager, lambda m: m), (compiled, lambda m: torch.compile(m, fullgraph=True))):
        torch.manual_seed(1)
        xs = x.clone().requires_grad_()
        with inductor_config.patch(fallback_random=True):
            loss = wrap(module)(xs, t)
        results.append((loss,) + torch.autograd.grad(loss, (xs, module.weight)))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.state_dict(), eager.state_dict())


@pytest.mark.parametrize("normalize", [True, False])
def test_a_nan_margin_on_an_ignored_row_stays_there(backend, normalize):
    """An ignored row's margin is never used: NaN there (a reviewer's case: 0·NaN in the unnormalised radial term and
    the margins' gradient) must not reach any gradient."""
    check_nan_margin_on_an_ignored_row("cpu", torch.float64, normalize)


def test_margins_alone_skip_the_pass_over_the_classes(backend, monkeypatch):
    """Only the margins need a gradient (a margin schedule learnt with a frozen model): their gradient equals the
    full backward's, and the backward op (an O(N·C·D) pass) does not run."""
    import marginkern.ops as ops
    x, w, t = make_case(7, 11, 5, torch.float64, ignore=(1,), requires_grad=False)
    m2 = (torch.rand(7, dtype=torch.float64) - 0.5).requires_grad_()
    full = torch.autograd.grad(mk.margin_cross_entropy(x.clone().requires_grad_(), w, t, scale=8.0, m2=m2), m2)[0]
    calls = []
    backward = ops._IMPLEMENTATIONS["margin_cross_entropy_backward"]
    monkeypatch.setitem(ops._IMPLEMENTATIONS, "margin_cross_entropy_backward",
                        lambda *args: calls.append(1) or backward(*args))
    alone = torch.autograd.grad(mk.margin_cross_entropy(x, w, t, scale=8.0, m2=m2), m2)[0]
    assert not calls
    torch.testing.assert_close(alone, full, rtol=1e-14, atol=0)
