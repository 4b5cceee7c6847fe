"""Hard-negative re-weighting (margin_cross_entropy's hard_negatives) and the losses built on it: CurricularFace and
MV-Softmax (marginkern/hard_negatives.py), on the CPU backends (the C++ margin step and the PyTorch tiles). The interpreter tier and the GPU tier run the same
helper (tests.helpers.check_hard_negatives_match_oracle) on the Triton kernels."""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from marginkern.dispatch import BackendUnavailable
from tests.helpers import (assert_close_rel, check_hard_negatives_match_oracle, hard_negative_case, make_case,
                           materialised_hard_negative_ce)
from tests.test_subcenters import backend  # noqa: F401 (the fixture: each CPU backend in turn)

CASES = [dict(), dict(coefficients=(0.0, 1.12, 0.12), m2=0.0, m3=0.35, label_smoothing=0.1),
         dict(coefficients=(1.0, 0.6, 0.0), as_tensor=False), dict(coefficients=(-0.5, 1.3, 0.25), m3=0.1),
         dict(subcenters=3), dict(coefficients=(0.0, 0.0, 0.0), threshold=0.1, m2=0.0, m3=0.35),
         dict(coefficients=(0.5, 0.8, 0.1), threshold=0.1, as_tensor=False, subcenters=3)]
CASE_IDS = ["curricular", "mv-am-smoothing", "floats", "any-quadratic", "subcenters", "interclass-filtering",
            "fixed-threshold-subcenters"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_hard_negatives_match_the_materialised_definition(backend, dtype, case):
    check_hard_negatives_match_oracle("cpu", dtype, **dict(case))


def test_hard_negatives_over_many_class_chunks(backend):
    """N = 4096 rows: each CPU backend streams C = 3000 classes in several chunks."""
    check_hard_negatives_match_oracle("cpu", torch.float32, N=4096, C=3000, D=8)


def test_identity_coefficients_change_nothing(backend):
    """(a, b, d) = (0, 1, 0) re-weights nothing: the plain margin loss on the same backend, bit for bit in float64."""
    x, w, t = make_case(30, 41, 12, torch.float64, ignore=(4,))
    plain = mk.margin_cross_entropy(x, w, t, scale=16.0, reduction="none")
    same = mk.margin_cross_entropy(x, w, t, scale=16.0, reduction="none", hard_negatives=(0.0, 1.0, 0.0))
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    # no non-target cosine lies above 1.5 (the case has no embedding parallel to a centre)
    same = mk.margin_cross_entropy(x, w, t, scale=16.0, reduction="none", hard_negatives=(0.0, 0.0, 0.0),
                                   hard_negative_threshold=1.5)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)


def test_the_cpp_tiles_decline_them_in_the_sharded_loss(monkeypatch):
    """The C++ whole-step margin op has hard negatives; the C++ tile ops (the class-sharded loss's loop) do not, and a
    forced cpp backend says so there."""
    from marginkern import cpp_tiles
    from marginkern.distributed import _tiles
    from marginkern.margin_ce import MarginOptions
    if cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", "cpp")
    opts = MarginOptions.of(64.0, 1.0, 0.5, 0.0, True, True, 0.0, -100)
    with pytest.raises(BackendUnavailable, match="MARGINKERN_BACKEND=cpp .* no hard-negative re-weighting"):
        _tiles(torch.zeros(2, 3), opts, torch.zeros(3))


def test_the_extension_tiles_refuse_a_spec_with_them():
    """A LogitSpec with hard negatives reaching the C++/CUDA tile ops (which would ignore them) is refused."""
    from marginkern import cpp_tiles
    from marginkern.engine import HardNegatives, LogitSpec
    spec = LogitSpec(torch.ones(3), None, None, None, torch.zeros(3, dtype=torch.long), torch.zeros(3),
                     hard_negatives=HardNegatives(torch.zeros(3), torch.zeros(3), 1.0))
    with pytest.raises(ValueError, match="C\\+\\+ and CUDA tiles has no hard-negative re-weighting"):
        cpp_tiles._spec_args(spec)


def test_nothing_is_hard_on_an_ignored_row():
    """An ignored row's threshold is +inf (its T is 0 by convention, and would otherwise mark half its classes)."""
    from marginkern.engine import HardNegatives, LogitSpec, TorchTiles
    hard = HardNegatives(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([math.inf, 0.0]), 1.0)
    spec = LogitSpec(torch.ones(2), None, None, None, torch.tensor([-1, 0]), torch.tensor([0.0, 0.5]),
                     hard_negatives=hard)
    x, w = torch.tensor([[1.0], [1.0]]), torch.tensor([[0.25], [0.75]])
    z, chain, _, _ = TorchTiles.logits(x, w, spec, 0, 2)
    torch.testing.assert_close(z, torch.tensor([[0.25, 0.75], [0.5, 2.5]]))  # row 1: target, then 2·0.75 + 1
    # (the target cell's dz/da is re-weighted too: unused, its dL/da is the loss's target_grad)
    torch.testing.assert_close(chain, torch.tensor([[1.0, 1.0], [2.0, 2.0]]))


def test_op_gradcheck_with_hard_negatives(backend):
    """Away from the mask's steps (no logit within 1e-3 of its row's threshold), finite differences see the
    re-weighted slope."""
    x, w, t = hard_negative_case(8, 6, 5, torch.float64, ignore=(1,))
    hard = torch.tensor([1.0, 0.4, 0.1], dtype=torch.float64)

    def loss(a, b):
        return mk.margin_cross_entropy(a, b, t, scale=4.0, m2=0.3, m3=0.1, label_smoothing=0.1, hard_negatives=hard)
    cos = F.normalize(x, dim=1) @ F.normalize(w, dim=1).T
    psi = torch.cos(torch.acos(cos.gather(1, t.clamp_min(0)[:, None])) + 0.3) - 0.1
    assert (cos - psi).abs().min() > 1e-3
    assert torch.autograd.gradcheck(loss, (x, w))


@pytest.mark.parametrize("hard", [[1.0, 0.3, 0.0], [0.0, 0.0, 0.0, 0.2]], ids=["target-threshold", "fixed-threshold"])
def test_opcheck_with_hard_negatives(hard):
    x, w, t = make_case(7, 13, 5, torch.float32, ignore=(1,))
    hard = torch.tensor(hard)
    args = (x, w, t, 64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100, 1, 0.0, None, hard)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)
    loss, lse, row_state, col_norm = torch.ops.marginkern.margin_cross_entropy(*args)
    bwd_args = ((torch.rand(7), x.detach(), w.detach(), t, lse.detach(), row_state, col_norm) + args[3:11]
                + (True, 1, 0.0, None, hard))
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy_backward.default, bwd_args)


def test_compile_fullgraph_reads_the_coefficients_as_a_tensor():
    """CurricularFace's t changes every step: as a tensor it is a graph input, so a new value neither recompiles nor
    is baked in."""
    from torch._dynamo.testing import CompileCounter
    x, w, t = make_case(12, 40, 8, ignore=(3,))
    counter = CompileCounter()

    def step(a, b, hard):
        return mk.margin_cross_entropy(a, b, t, scale=16.0, hard_negatives=hard)
    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for value in (0.1, 0.35):
        hard = torch.tensor([1.0, value, 0.0])
        eager = torch.autograd.grad(step(x, w, hard), (x, w))
        got = torch.autograd.grad(compiled(x, w, hard), (x, w))
        for e, c in zip(eager, got):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 1


def test_curricular_face_compiles_once_over_batch_sizes():
    """The target cosines' row blocks are one block under torch.compile: a Python loop over N fixed it in the graph (a
    recompile per batch size)."""
    from torch._dynamo.testing import CompileCounter
    counter = CompileCounter()
    torch.manual_seed(0)
    head = mk.CurricularFaceLoss(16, 50, scale=16.0)
    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend=counter)
    for n in (7, 13, 29, 61):
        compiled(torch.randn(n, 16), torch.randint(0, 50, (n,)))
    assert counter.frame_count == 1


def test_bad_hard_negatives_are_named():
    x, w, t = make_case(4, 6, 3)
    with pytest.raises(ValueError, match=r"hard_negatives must be three floats \(a, b, d\) or a float tensor"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=torch.zeros(4))
    with pytest.raises(ValueError, match="hard_negatives must be three floats"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=(1.0, 0.0))
    with pytest.raises(ValueError, match="hard_negatives must be three floats"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="hard_negatives' b must be a finite number"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=(1.0, math.nan, 0.0))
    with pytest.raises(ValueError, match="hard_negatives must be on input's device"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="hard_negatives needs normalize=True"):
        mk.margin_cross_entropy(x, w, t, normalize=False, m2=0.0, hard_negatives=(1.0, 0.0, 0.0))
    for bad in (torch.zeros(3, dtype=torch.float64), torch.zeros(5), torch.zeros(1, 3)):
        with pytest.raises(ValueError, match=r"hard_negatives must be a \(3,\) \(a, b, d\) or \(4,\) \(a, b, d, "
                                             r"threshold\) torch.float32 tensor"):
            torch.ops.marginkern.margin_cross_entropy(x, w, t, 64.0, 1.0, 0.5, 0.0, True, True, 0.0, -100, 1, 0.0,
                                                      None, bad)
    with pytest.raises(ValueError, match="hard_negative_threshold needs hard_negatives"):
        mk.margin_cross_entropy(x, w, t, hard_negative_threshold=0.3)
    with pytest.raises(ValueError, match="hard_negative_threshold must be a finite number"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=(0.0, 0.0, 0.0), hard_negative_threshold=math.nan)
    with pytest.raises(TypeError, match="hard_negative_threshold must be a real number"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=(0.0, 0.0, 0.0), hard_negative_threshold=torch.tensor(0.3))


# ------------------------------------------------------------------------------------------------ CurricularFace

def official_curricularface(x, weight, labels, t, m=0.5, s=64.0):
    """HuangYG123/CurricularFace's head (head/metrics.py), its kernel (D, C) as weightᵀ, in float64: (loss, new t)."""
    cos_m, sin_m = math.cos(m), math.sin(m)
    threshold, mm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    cos_theta = (F.normalize(x) @ F.normalize(weight, dim=1).T).clamp(-1, 1)
    target_logit = cos_theta[torch.arange(x.shape[0]), labels].view(-1, 1)
    sin_theta = torch.sqrt(1.0 - target_logit ** 2)
    cos_theta_m = target_logit * cos_m - sin_theta * sin_m
    mask = cos_theta > cos_theta_m
    final_target_logit = torch.where(target_logit > threshold, cos_theta_m, target_logit - mm)
    with torch.no_grad():
        t = target_logit.mean() * 0.01 + (1 - 0.01) * t
    cos_theta = torch.where(mask, cos_theta * (t + cos_theta), cos_theta)
    cos_theta = cos_theta.scatter(1, labels.view(-1, 1), final_target_logit)
    return F.cross_entropy(s * cos_theta, labels), t


def test_curricularface_matches_the_official_head():
    """Two training steps from the same weights, in float64, where θ_y + m < π (the official head's fallback does
    not act): the loss, both gradients and t after each step."""
    torch.manual_seed(0)
    loss = mk.CurricularFaceLoss(12, 30, dtype=torch.float64)
    weight = loss.weight.detach().clone().requires_grad_()
    t_official = torch.zeros(1, dtype=torch.float64)
    for step in range(2):
        labels = torch.randint(0, 30, (24,))
        near = (torch.arange(24) % 2 == 0)[:, None]  # half the rows near their centre: hard negatives are few there
        x = torch.randn(24, 12, dtype=torch.float64) + near * 3.0 * F.normalize(weight.detach()[labels], dim=1)
        x.requires_grad_()
        got = loss(x, labels)
        got_grads = torch.autograd.grad(got, (x, loss.weight))
        x2 = x.detach().clone().requires_grad_()
        want, t_official = official_curricularface(x2, weight, labels, t_official)
        want_grads = torch.autograd.grad(want, (x2, weight))
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for g, e in zip(got_grads, want_grads):
            assert_close_rel(g, e, torch.float64)
        torch.testing.assert_close(loss.t, t_official.reshape(1))
        with torch.no_grad():  # the next step from moved weights, on both sides
            loss.weight -= 0.5 * got_grads[1]
            weight -= 0.5 * got_grads[1]
    assert loss.t.item() > 0  # the near rows dominate the mean target cosine


def test_curricularface_t_over_valid_rows_only():
    x, w, t = make_case(10, 8, 6, ignore=(2, 5))
    loss = mk.CurricularFaceLoss(6, 8, momentum=0.5)
    with torch.no_grad():
        loss.weight.copy_(w)
    loss(x, t)
    valid = t != -100
    cos = (F.normalize(x.detach(), dim=1) * F.normalize(w.detach()[t.clamp_min(0)], dim=1)).sum(1)
    torch.testing.assert_close(loss.t, 0.5 * cos[valid].mean().reshape(1))
    before = loss.t.clone()
    loss(x, torch.full_like(t, -100))  # nothing valid: t stays
    torch.testing.assert_close(loss.t, before)
    loss.eval()
    loss(x, t)
    torch.testing.assert_close(loss.t, before)
    with pytest.raises(ValueError):  # a step that raises leaves t as it was
        loss.train()(x, torch.full_like(t, 8))
    torch.testing.assert_close(loss.t, before)
    loss.reset_parameters()
    assert loss.t.item() == 0.0
    assert "t" in loss.state_dict()


def test_curricularface_with_sampling_and_subcenters():
    """PartialFC sampling and sub-centres pass through: finite loss and gradients, t moved by the best sub-centre's
    cosine."""
    x, _, t = make_case(16, 50, 8)
    for kwargs in (dict(sample_rate=0.3), dict(subcenters=3)):
        loss = mk.CurricularFaceLoss(8, 50, **kwargs)
        value = loss(x, t)
        grads = torch.autograd.grad(value, (x, loss.weight))
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
        assert loss.t.item() != 0.0


# ------------------------------------------------------------------------------------------------------ MV-Softmax

def official_mv_softmax(x, weight, labels, is_am, margin=0.35, mv_weight=1.12, scale=32.0):
    """FaceX-Zoo's MV_Softmax head, its weight (D, C) as weightᵀ, in float64: the loss."""
    cos_theta = F.normalize(x) @ F.normalize(weight, dim=1).T
    gt = cos_theta[torch.arange(x.shape[0]), labels].view(-1, 1)
    if is_am:
        mask = cos_theta > gt - margin
        final_gt = torch.where(gt > margin, gt - margin, gt)
    else:
        cos_theta_m = gt * math.cos(margin) - torch.sqrt(1.0 - gt ** 2) * math.sin(margin)
        mask = cos_theta > cos_theta_m
        final_gt = torch.where(gt > 0.0, cos_theta_m, gt)
    cos_theta = torch.where(mask, mv_weight * cos_theta + mv_weight - 1.0, cos_theta)
    cos_theta = cos_theta.scatter(1, labels.view(-1, 1), final_gt)
    return F.cross_entropy(scale * cos_theta, labels)


@pytest.mark.parametrize("margin_type", ["cos", "arc"])
def test_mv_softmax_matches_the_official_head(margin_type):
    """Where every target cosine is above the margin (the official AM head's fallback does not act there)."""
    torch.manual_seed(1)
    loss = mk.MVSoftmaxLoss(12, 30, margin_type=margin_type, dtype=torch.float64)
    weight = loss.weight.detach().clone().requires_grad_()
    labels = torch.randint(0, 30, (24,))
    x = 3.0 * F.normalize(weight.detach()[labels], dim=1) + 0.8 * torch.randn(24, 12, dtype=torch.float64)
    x.requires_grad_()
    cos = F.normalize(x.detach()) @ F.normalize(weight.detach(), dim=1).T
    assert (cos.gather(1, labels[:, None]) > 0.35).all()
    got = loss(x, labels)
    got_grads = torch.autograd.grad(got, (x, loss.weight))
    x2 = x.detach().clone().requires_grad_()
    want = official_mv_softmax(x2, weight, labels, margin_type == "cos")
    want_grads = torch.autograd.grad(want, (x2, weight))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, want_grads):
        assert_close_rel(g, e, torch.float64)
    # and it is not the plain margin loss: some negatives were hard
    plain = mk.margin_cross_entropy(x, loss.weight, labels, scale=32.0, m2=loss.options["m2"], m3=loss.options["m3"])
    assert abs(plain.item() - got.item()) > 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_buffers_keep_their_values_under_module_casts(dtype):
    """.to(bf16) must not round MV-Softmax's 1.12 (1.1171875 in bf16) nor CurricularFace's t, nor AdaFace's
    statistics (Float32Buffers keeps the values they had before the cast)."""
    mv = mk.MVSoftmaxLoss(8, 10).to(dtype)
    assert mv.weight.dtype == dtype
    torch.testing.assert_close(mv.hard_negative_coefficients, torch.tensor([0.0, 1.12, 0.12]), rtol=0, atol=0)
    curricular = mk.CurricularFaceLoss(8, 10)
    curricular.t.fill_(0.123456)
    ada = mk.AdaFaceLoss(8, 10)
    ada.batch_mean.fill_(23.456)
    curricular, ada = curricular.to(dtype), ada.to(dtype)
    assert curricular.t.dtype == ada.batch_mean.dtype == torch.float32
    assert curricular.t.item() == torch.tensor(0.123456).item()
    assert ada.batch_mean.item() == torch.tensor(23.456).item()
    x = torch.randn(6, 8).to(dtype)
    assert torch.isfinite(mv(x, torch.arange(6))) and torch.isfinite(curricular(x, torch.arange(6)))


def test_module_arguments_are_checked():
    with pytest.raises(ValueError, match=r"momentum must lie in \[0.0, 1.0\]"):
        mk.CurricularFaceLoss(8, 10, momentum=1.5)
    with pytest.raises(TypeError, match="normalize cannot be set here"):
        mk.CurricularFaceLoss(8, 10, normalize=False)
    with pytest.raises(ValueError, match="margin_type must be 'cos'"):
        mk.MVSoftmaxLoss(8, 10, margin_type="am")
    with pytest.raises(ValueError, match="mv_weight must be a finite number"):
        mk.MVSoftmaxLoss(8, 10, mv_weight=math.inf)


def test_reference_matches_the_materialised_definition():
    """The oracle (reference.margin_cross_entropy, streamed over chunks of 7 classes) against the official-style
    formula: the two were written apart."""
    x, w, t = hard_negative_case(20, 31, 9, torch.float64)
    for coefficients, m2, m3 in (((1.0, 0.25, 0.0), 0.5, 0.0), ((0.0, 1.12, 0.12), 0.0, 0.35)):
        got = reference.margin_cross_entropy(x, w, t, scale=16.0, m2=m2, m3=m3, hard_negatives=coefficients,
                                             class_chunk=7)
        want = materialised_hard_negative_ce(x, w, t, coefficients, 16.0, m2, m3)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for g, e in zip(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_with_per_row_margins_that_need_a_gradient(backend):
    """Per-row margins (their own gradient) beside hard negatives: the loss and the gradients of x, w and m2 against
    the reference (a review found the margins' gradient slot cut off the coefficients' one: the backward raised)."""
    x, w, t = hard_negative_case(21, 17, 6, torch.float64)
    m2 = (0.2 + 0.5 * torch.rand(21, dtype=torch.float64)).requires_grad_()
    hard = torch.tensor([1.0, 0.3, 0.0], dtype=torch.float64)
    got = mk.margin_cross_entropy(x, w, t, scale=16.0, m2=m2, hard_negatives=hard)
    got_grads = torch.autograd.grad(got, (x, w, m2))
    want = reference.margin_cross_entropy(x, w, t, scale=16.0, m2=m2, hard_negatives=hard)
    want_grads = torch.autograd.grad(want, (x, w, m2))
    assert_close_rel(got, want, torch.float64, "loss")
    for name, g, e in zip(("x", "w", "m2"), got_grads, want_grads):
        assert_close_rel(g, e, torch.float64, f"grad {name}")


@pytest.mark.parametrize("cls", [mk.CurricularFaceLoss, mk.AdaFaceLoss], ids=lambda c: c.__name__)
@pytest.mark.parametrize("reentrant", [False, True])
def test_statistics_under_activation_checkpointing(cls, reentrant):
    """A checkpointed head's recompute (inside the backward pass) reuses its forward's coefficients or margins: the
    gradients equal the plain step's, and t (μ, σ) move once (a review saw dx 5% off and t moved twice)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    x, t = 4 * torch.randn(12, 8, dtype=torch.float64), torch.randint(0, 10, (12,))
    kwargs = dict(momentum=0.5) if cls is mk.CurricularFaceLoss else dict(t_alpha=0.5)
    plain, checkpointed = cls(8, 10, dtype=torch.float64, **kwargs), cls(8, 10, dtype=torch.float64, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    results = []
    for module, run in ((plain, lambda m, a: m(a, t)),
                        (checkpointed, lambda m, a: checkpoint(m, a, t, use_reentrant=reentrant))):
        for step in range(2):
            xs = (x * (1 + step)).requires_grad_()
            module.weight.grad = None
            loss = run(module, xs)
            loss.backward()  # (reentrant checkpointing refuses torch.autograd.grad)
            results.append((loss.detach(), xs.grad, module.weight.grad))
    for a, b in zip(results[:2], results[2:]):
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict(), rtol=0, atol=0)


def test_mv_coefficients_after_deferred_initialisation_and_casts():
    """The coefficients are rebuilt from mv_weight by every cast or move: after meta-device initialisation, to_empty
    and load_state_dict (a review saw uninitialised memory used as coefficients: loss 16.08 for 35.05), after .double()
    (exact 1.12, not fp32's), and when mv_weight is set."""
    real = mk.MVSoftmaxLoss(8, 10)
    loaded = mk.MVSoftmaxLoss(8, 10, device="meta").to_empty(device="cpu")
    loaded.load_state_dict(real.state_dict())
    x, t = torch.randn(6, 8), torch.arange(6)
    torch.testing.assert_close(loaded(x, t), real(x, t), rtol=0, atol=0)
    assert loaded.double().hard_negative_coefficients.tolist() == [0.0, 1.12, 1.12 - 1.0]
    real.mv_weight = 1.3
    torch.testing.assert_close(real.hard_negative_coefficients, torch.tensor([0.0, 1.3, 0.3]))
    with pytest.raises(ValueError, match="mv_weight must be a finite number"):
        real.mv_weight = math.nan


def test_a_tuple_of_tensors_is_refused_with_the_fix():
    x, w, t = make_case(4, 6, 3)
    with pytest.raises(TypeError, match=r"pass torch.stack of them"):
        mk.margin_cross_entropy(x, w, t, hard_negatives=(torch.tensor(1.0), 0.3, 0.0))


@pytest.mark.parametrize("cls", [mk.CurricularFaceLoss, mk.AdaFaceLoss], ids=lambda c: c.__name__)
def test_two_checkpointed_calls_in_one_loss(cls):
    """Two checkpointed calls of one head summed into one loss (two views, or micro-batches whose backward comes
    later): each recompute finds its own forward's options (a review saw dL/dx of the first call 7% off when the
    recompute took the most recent forward's); a recompute whose forward left the history raises."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    x1, x2 = 4 * torch.randn(12, 8, dtype=torch.float64), 6 * torch.randn(9, 8, dtype=torch.float64)
    t1, t2 = torch.randint(0, 10, (12,)), torch.randint(0, 10, (9,))
    kwargs = dict(momentum=0.5) if cls is mk.CurricularFaceLoss else dict(t_alpha=0.5)
    plain, checkpointed = cls(8, 10, dtype=torch.float64, **kwargs), cls(8, 10, dtype=torch.float64, **kwargs)
    checkpointed.load_state_dict(plain.state_dict())
    grads = []
    for module, run in ((plain, lambda m, a, t: m(a, t)),
                        (checkpointed, lambda m, a, t: checkpoint(m, a, t, use_reentrant=False))):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        (run(module, a, t1) + run(module, b, t2)).backward()
        grads.append((a.grad, b.grad, module.weight.grad))
    for u, v in zip(*grads):
        torch.testing.assert_close(v, u, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(checkpointed.state_dict(), plain.state_dict(), rtol=0, atol=0)
    checkpointed.REPLAY_HISTORY = 1
    checkpointed._replays = None
    a = x1.clone().requires_grad_()
    loss = checkpoint(checkpointed, a, t1, use_reentrant=False) + checkpoint(checkpointed, x2, t2, use_reentrant=False)
    with pytest.raises(RuntimeError, match="found no forward with its inputs among the last 1 training forwards"):
        loss.backward()


@pytest.mark.parametrize("backend_name", ["cpp", "reference"])
def test_nan_coefficients_give_nan_not_an_error(backend_name, monkeypatch):
    """NaN in the coefficients (CurricularFace's t after a NaN batch, in the official head) gives NaN losses on every
    backend, as a NaN embedding does (the C++ step raised instead); the module's t does not take the NaN."""
    from marginkern import cpp_tiles
    if backend_name == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend_name)
    x, w, t = make_case(5, 7, 4)
    assert torch.isnan(mk.margin_cross_entropy(x, w, t, hard_negatives=torch.tensor([1.0, math.nan, 0.0])))
    loss = mk.CurricularFaceLoss(4, 7, momentum=0.5)
    loss(x, t)
    before = loss.t.clone()
    bad = x.detach().clone()
    bad[1, 2] = math.nan
    assert torch.isnan(loss(bad, t))
    torch.testing.assert_close(loss.t, before, rtol=0, atol=0)
    assert torch.isfinite(loss(x, t))


def test_replay_takes_the_newest_forward_of_repeated_inputs():
    """The same batch every step (frozen features, an overfit-one-batch check): each checkpointed recompute takes its
    own, newest forward's t (a review saw the oldest matching one taken: dx 17.5% off by the eighth step)."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    feats, labels = torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 10, (64,))
    heads = [mk.CurricularFaceLoss(32, 10, scale=16.0, margin=0.3, momentum=0.1, dtype=torch.float64)
             for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    optimizers = [torch.optim.SGD(h.parameters(), lr=0.5) for h in heads]
    for step in range(6):
        grads = []
        for head, opt, run in zip(heads, optimizers, (lambda h, e: h(e, labels),
                                                      lambda h, e: checkpoint(h, e, labels, use_reentrant=False))):
            e = feats.clone().requires_grad_()
            run(head, e).backward()
            opt.step()
            opt.zero_grad()
            grads.append(e.grad)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-14, msg=f"step {step}")
    torch.testing.assert_close(heads[1].t, heads[0].t, rtol=0, atol=0)


def test_a_larger_replay_history_takes_effect_at_once():
    from torch.utils.checkpoint import checkpoint
    head = mk.CurricularFaceLoss(8, 10)
    head(torch.randn(4, 8), torch.arange(4))
    head.REPLAY_HISTORY = 20
    xs = [torch.randn(4, 8).requires_grad_() for _ in range(18)]
    sum(checkpoint(head, x, torch.arange(4), use_reentrant=False) for x in xs).backward()
    assert all(x.grad is not None for x in xs)


# ----------------------------------------------------------------------------------------- inter-class filtering

def insightface_filtered_logits(x, weight, labels, s, m2, m3, threshold):
    """arcface_torch's logits (PartialFC_V2: normalised embeddings and centres, clamped) through its
    CombinedMarginLoss with interclass_filtering_threshold, rewritten in float64: the non-target cosines above the
    threshold multiplied by 0 (the mask without gradient), then ArcFace's branch (m3 = 0) with the margin under
    no_grad (the head's in-place arccos/cos: a straight-through gradient, here a detached offset) or CosFace's."""
    logits = (F.normalize(x) @ F.normalize(weight).T).clamp(-1, 1)
    target = F.one_hot(labels, weight.shape[0]).bool()
    with torch.no_grad():
        keep = 1.0 - ((logits > threshold) & ~target).double()
    logits = keep * logits
    if m3 == 0:
        with torch.no_grad():
            moved = torch.where(target, torch.cos(torch.acos(logits) + m2), logits) - logits
        return s * (logits + moved)
    return s * torch.where(target, logits - m3, logits)


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_interclass_filtering_matches_insightface(backend, margin):
    """CombinedMarginLoss(interclass_filtering_threshold=0.2) against arcface_torch's head with the same option and
    class centres, in float64: loss and both gradients; the filter acts on the case (the unfiltered loss differs)."""
    torch.manual_seed(0)
    m2, m3 = (0.5, 0.0) if margin == "arcface" else (0.0, 0.4)
    loss = mk.CombinedMarginLoss(12, 30, 1.0, m2, m3, margin_grad="straight_through",
                                 interclass_filtering_threshold=0.2, dtype=torch.float64)
    labels = torch.randint(0, 30, (24,))
    near = (torch.arange(24) % 2 == 0)[:, None]
    x = (torch.randn(24, 12, dtype=torch.float64)
         + near * 3.0 * F.normalize(loss.weight.detach()[labels], dim=1)).requires_grad_()
    weight = loss.weight.detach().clone().requires_grad_()
    got = loss(x, labels)
    got_grads = torch.autograd.grad(got, (x, loss.weight))
    want = F.cross_entropy(insightface_filtered_logits(x, weight, labels, 64.0, m2, m3, 0.2), labels)
    want_grads = torch.autograd.grad(want, (x, weight))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, want_grads):
        assert_close_rel(g, e, torch.float64)
    unfiltered = mk.CombinedMarginLoss(12, 30, 1.0, m2, m3, margin_grad="straight_through", dtype=torch.float64)
    with torch.no_grad():
        unfiltered.weight.copy_(weight)
        assert (unfiltered(x, labels) - got).abs() > 0.1


def test_interclass_filtering_arguments_are_checked():
    for value in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"interclass_filtering_threshold must lie in \[0.0, 1.0\]"):
            mk.ArcFaceLoss(8, 10, interclass_filtering_threshold=value)
    with pytest.raises(ValueError, match="interclass_filtering_threshold needs normalize=True"):
        mk.LargeMarginSoftmaxLoss(8, 10, interclass_filtering_threshold=0.3)
    for cls in (mk.CurricularFaceLoss, mk.MVSoftmaxLoss):
        with pytest.raises(TypeError, match="interclass_filtering_threshold cannot be set here: .* re-weights its hard"):
            cls(8, 10, interclass_filtering_threshold=0.3)
        assert "hard_negative" not in repr(cls(8, 10, interclass_filtering_threshold=0.0))  # arcface_torch's "off"
    assert "hard_negative" not in repr(mk.ArcFaceLoss(8, 10, interclass_filtering_threshold=0.0))  # 0: off
    assert "hard_negative_threshold=0.3" in repr(mk.ArcFaceLoss(8, 10, interclass_filtering_threshold=0.3))


def test_float_coefficients_are_filled_on_the_device_not_copied():
    """Python-number coefficients become the ops' tensor by fills: a host-to-device copy (torch.tensor on a CUDA
    device) would synchronise with the GPU every step and fail inside a CUDA graph capture."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from marginkern.functional import hard_negative_coefficients

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))
    x = torch.zeros(2, 3)
    with Ops() as ops:
        got = hard_negative_coefficients(x, (1.0, 0.25, -0.5), True, 0.3)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.25, -0.5, 0.3]))
    assert not {"lift_fresh", "_to_copy", "copy_", "_local_scalar_dense"} & {n.split(".")[0] for n in ops.names}, \
        ops.names
