"""margin_cross_entropy through torch.ops.marginkern on the CPU (engine + the C++ tiles when marginkern._C is built,
else plain-PyTorch tiles) against the float64 oracle; autograd, opcheck, torch.compile, modules, errors and
numerical edge cases."""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import cpp_tiles, reference
from marginkern.engine import TorchTiles, finish_grad_rows
from marginkern.margin_ce import MarginOptions, margin_ce_backward, margin_ce_forward
from tests.helpers import (assert_close_rel, check_loss_and_grads, check_margin_fp16_under_grad_scaler,
                           check_margin_per_row_upstream_gradient, loss_and_grads, make_case)

OPTIONS = [
    dict(),                                                        # ArcFace s=64 m=0.5
    dict(m2=0.0, m3=0.35),                                         # CosFace
    dict(m1=4.0, m2=0.0, scale=30.0),                              # SphereFace
    dict(m1=1.2, m2=0.3, m3=0.15, scale=32.0, label_smoothing=0.1),
    dict(margin_grad="straight_through"),
    dict(m1=3.0, m2=0.0, scale=1.0, normalize=False),              # L-Softmax
    dict(m1=1.5, m2=0.2, m3=0.1, scale=0.5, normalize=False, label_smoothing=0.2),
    dict(m1=2.0, scale=0.3, normalize=False, margin_grad="straight_through"),
    # A-Softmax's λ (scale 8: at 30, eased targets make the tiny shapes' rows confident, whose fp32 gradients
    # carry the lse rounding every fp32 cross-entropy has: bench/NOTES.md, "Precision of confident rows")
    dict(m1=4.0, m2=0.0, scale=8.0, lambda_=5.0),
    dict(m1=3.0, m2=0.0, scale=1.0, normalize=False, lambda_=2.0, margin_grad="straight_through"),
]
SHAPES = [(37, 301, 45), (3, 2, 2), (5, 7, 8), (64, 1029, 17)]


def check_against_oracle(x, w, t, dtype, reduction="mean", **opts):
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, reduction=reduction, **opts)
    ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t,
                                 reduction=reduction, **opts)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gx.dtype == dtype and gw.dtype == dtype
    assert_close_rel(loss, ref, dtype, "loss", floor=64.0)
    assert_close_rel(gx, rx, dtype, "grad input")
    assert_close_rel(gw, rw, dtype, "grad weight")


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_oracle_fp32(opts, shape):
    N, C, D = shape
    x, w, t = make_case(N, C, D, torch.float32, ignore=(0,) if N > 2 else ())
    check_against_oracle(x, w, t, torch.float32, **opts)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[5], OPTIONS[8]], ids=["arcface", "l-softmax", "lambda"])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_many_class_chunks_match_the_oracle(backend, opts, monkeypatch):
    """N = 4096 rows make each CPU backend's budget a chunk of ≤ 1024 classes: C = 3000 runs 3 chunks, targets on
    their edges, where each chunk's dW finalizer adds the target rows' terms (L-Softmax's radial term masked to the
    wrong chunk was 99% off in a mutation test that every single-chunk case passed)."""
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x, w, t = make_case(4096, 3000, 8, ignore=(7,))
    t[:6] = torch.tensor([0, 1023, 1024, 2047, 2048, 2999])
    check_against_oracle(x, w, t, torch.float32, **opts)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_target_angle_at_pi_keeps_the_bounded_slope(backend, normalize, monkeypatch):
    """Embeddings exactly opposite their class centre (cos θ_t = −1) and 1e-9 away: ArcFace's exact slope
    m1·sin(m1θ + m2)/sin θ is taken with θ clamped away from π (margin.py margin_slope), as in the oracle (the C++
    slope without that clamp was 35–100% off in a mutation test). The PyTorch tiles share margin_slope with the
    oracle: their case checks that the rest of their path agrees there and stays finite."""
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x, w, t = make_case(6, 40, 16, torch.float64)
    x = x.detach().clone()
    x[:4] = -2.0 * w.detach()[t[:4]]
    x[1] += 1e-9 * torch.randn(16, dtype=torch.float64)
    x[3] = -0.5 * w.detach()[t[3]]
    x.requires_grad_()
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, normalize=normalize,
                                  **({} if normalize else dict(scale=1.0)))
    ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x, w, t, normalize=normalize,
                                 **({} if normalize else dict(scale=1.0)))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(gx, rx, rtol=1e-7, atol=1e-9 * rx.abs().max().item())
    torch.testing.assert_close(gw, rw, rtol=1e-7, atol=1e-9 * rw.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("opts", OPTIONS[:2] + OPTIONS[5:6])
def test_matches_oracle_other_dtypes(dtype, opts):
    x, w, t = make_case(33, 211, 19, dtype, ignore=(3, 4))
    check_against_oracle(x, w, t, dtype, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_ignore_index(reduction):
    x, w, t = make_case(29, 53, 11, torch.float32, ignore=(1, 7, 8), ignore_index=7)
    check_against_oracle(x, w, t, torch.float32, reduction=reduction, ignore_index=7)
    rows = mk.margin_cross_entropy(x, w, t, reduction="none", ignore_index=7)
    assert rows.shape == (29,) and (rows[[1, 7, 8]] == 0).all()


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 8)])
def test_single_class_has_zero_loss_and_gradient(opts, shape):
    # one class: p = 1 and every term cancels, so only rounding noise of size eps·scale may remain
    x, w, t = make_case(*shape, torch.float32)
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, reduction="none", **opts)
    noise = 1e-5 * max(opts.get("scale", 64.0), 1.0)
    assert loss.abs().max() <= noise and gx.abs().max() <= noise and gw.abs().max() <= noise


def test_plain_cross_entropy_parity():
    # m1=1, m2=m3=0, normalize=False, scale=1: exactly F.cross_entropy on x·wᵀ
    x, w, t = make_case(41, 97, 13, torch.float32, ignore=(5,))
    for kw in (dict(), dict(label_smoothing=0.1), dict(reduction="sum"), dict(reduction="none")):
        got, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, scale=1.0, m2=0.0, normalize=False, **kw)
        want, ex, ew = loss_and_grads(lambda a, b, c, **k: F.cross_entropy(a @ b.t(), c, **k), x, w, t, **kw)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, ex, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw, ew, rtol=1e-5, atol=1e-6)


def test_empty_batch_and_all_ignored():
    x, w, t = make_case(0, 10, 4)
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t)
    assert float(loss) == 0.0 and gx.shape == (0, 4) and not gw.any()
    x, w, t = make_case(6, 10, 4, ignore=range(6))
    for reduction in ("mean", "sum"):
        loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, reduction=reduction)
        assert float(loss) == 0.0 and not gx.any() and not gw.any()


def test_streaming_chunk_size_does_not_change_the_result():
    x, w, t = make_case(17, 777, 9, torch.float64)
    opts = MarginOptions(64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100)
    one_chunk, _ = margin_ce_forward(x, w, t, opts, TorchTiles())
    many_chunks, _ = margin_ce_forward(x, w, t, opts, TorchTiles(buffer_bytes=17 * 8 * 300))
    assert len(TorchTiles(buffer_bytes=17 * 8 * 300).class_chunks(17, 777, x)) == 3
    torch.testing.assert_close(one_chunk, many_chunks, rtol=1e-13, atol=1e-13)


def test_backward_chunk_counts_its_weight_gradient_against_the_buffer():
    # A chunk's dW (chunk × D, accumulation dtype) lives beside its G (N × chunk): both share the budget.
    # On an H100, counting G alone gave 202 MB of extra memory for a 64 MB budget at (1024, 400k, 512) bf16.
    N, C, D = 8, 2000, 24
    x, w, t = make_case(N, C, D, torch.float64)
    budget = 8 * (N + D) * 300  # 300 classes per chunk with dW counted, 1200 with G alone
    seen = []

    class Spy(TorchTiles):
        def class_chunks(self, N, C, x, bytes_per_class=0):
            chunks = super().class_chunks(N, C, x, bytes_per_class)
            seen.append((bytes_per_class, chunks))
            return chunks

    opts = MarginOptions(64.0, 1.0, 0.5, 0.0, True, True, 0.0, -100)
    loss, lse = margin_ce_forward(x, w, t, opts, Spy(buffer_bytes=budget))
    margin_ce_backward(torch.ones_like(loss), x, w, t, lse, opts, Spy(buffer_bytes=budget))
    backward = [chunks for per_class, chunks in seen if per_class]
    assert backward and backward[0][0] == (0, 300)
    assert all((c1 - c0) * (N + D) * 8 <= budget for c0, c1 in backward[0])


def test_backward_frees_a_chunk_before_the_next_one():
    # The budget holds one G and one dW chunk: the previous chunk's must be gone when the next G is made
    # (the first H100 run held two of each, 3 × 64 MB where 64 MB was meant).
    import gc
    import weakref
    x, w, t = make_case(8, 2000, 24, torch.float64, requires_grad=False)  # as in the op: no autograd graph
    previous, alive = [], []

    class Spy(TorchTiles):
        def grad_logits(self, *args, **kwargs):
            gc.collect()  # only reference cycles would survive this; a plain local name is not one
            alive.append(any(ref() is not None for ref in previous))
            g = super().grad_logits(*args, **kwargs)
            previous.append(weakref.ref(g))
            return g

        def finish_grad_rows(self, grad, *args):
            previous.append(weakref.ref(grad))
            return finish_grad_rows(grad, *args)

    opts = MarginOptions(64.0, 1.0, 0.5, 0.0, True, True, 0.0, -100)
    tiles = Spy(buffer_bytes=8 * (8 + 24) * 300)
    loss, lse = margin_ce_forward(x, w, t, opts, tiles)
    margin_ce_backward(torch.ones_like(loss), x, w, t, lse, opts, tiles)
    assert len(alive) == 7 and not any(alive)


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3], OPTIONS[5]])
def test_gradcheck_float64(opts):
    x, w, t = make_case(6, 9, 5, torch.float64, ignore=(2,))
    kw = dict(opts, scale=min(opts.get("scale", 64.0), 4.0))
    assert torch.autograd.gradcheck(lambda a, b: mk.margin_cross_entropy(a, b, t, **kw), (x, w))


def test_opcheck():
    x, w, t = make_case(7, 13, 5, torch.float32, ignore=(1,))
    args = (x, w, t, 64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)
    loss, lse, row_state, col_norm = torch.ops.marginkern.margin_cross_entropy(*args)
    bwd_args = (torch.rand(7), x.detach(), w.detach(), t, lse.detach(), row_state, col_norm) + args[3:]
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy_backward.default, bwd_args)


def test_torch_compile_fullgraph():
    x, w, t = make_case(12, 40, 8, torch.float32, ignore=(3,))

    def step(a, b, c):
        return mk.margin_cross_entropy(a, b, c, m2=0.3, label_smoothing=0.1) * 2.0

    compiled = torch.compile(step, fullgraph=True)
    got, gx, gw = loss_and_grads(compiled, x, w, t)
    want, ex, ew = loss_and_grads(step, x, w, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw, ew)


# ---- numerical edge cases: finite loss and gradients for every valid input --------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("margin_grad", ["exact", "straight_through"])
def test_embedding_parallel_and_antiparallel_to_its_centre(dtype, margin_grad):
    x, w, t = make_case(8, 16, 32, dtype)
    x = x.detach().clone()
    x[:4] = w.detach()[t[:4]] * 3.0      # cos θ_y = 1: ArcFace's exact slope diverges here
    x[4:] = -w.detach()[t[4:]]           # θ_y = π
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, margin_grad=margin_grad)
    assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t, margin_grad=margin_grad)
    assert_close_rel(loss, ref, dtype, "loss", floor=64.0)
    # The exact slope at cos θ = 1 is ill-conditioned: the fp32 rounding of the cosine (6e-8) moves θ by
    # up to 3.5e-4 rad against the 1e-3 rad clamp, so fp32 gets a 16-bit-sized tolerance there.
    tol_dtype = torch.float16 if (dtype == torch.float32 and margin_grad == "exact") else dtype
    assert_close_rel(gw, rw, tol_dtype, "grad weight")


def test_scale_64_fp16_with_large_norms_stays_finite():
    x, w, t = make_case(16, 50, 64, torch.float16)
    x = (x.detach() * 40).requires_grad_()   # ‖x‖ ≈ 320, far outside unit scale
    for normalize in (True, False):
        loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, normalize=normalize,
                                      scale=64.0 if normalize else 1e-2)
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_exact_gradient_is_bounded_at_cos_one():
    # x = w_y exactly: the exact ArcFace slope is clamped at EXACT_SLOPE_MIN_ANGLE, so the gradient is finite
    w = torch.randn(5, 8, dtype=torch.float64)
    t = torch.arange(5)
    x = w.clone()
    _, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t)
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert gx.abs().max() < 64 * 1000 * 10


# ---- modules ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kw,expected", [
    (mk.ArcFaceLoss, dict(margin=0.4), dict(m1=1.0, m2=0.4, m3=0.0, scale=64.0)),
    (mk.CosFaceLoss, dict(), dict(m1=1.0, m2=0.0, m3=0.35, scale=64.0)),
    (mk.SphereFaceLoss, dict(margin=3), dict(m1=3.0, m2=0.0, m3=0.0, scale=30.0)),
    (mk.CombinedMarginLoss, dict(m1=1.1, m2=0.2, m3=0.1), dict(m1=1.1, m2=0.2, m3=0.1, scale=64.0)),
    (mk.LargeMarginSoftmaxLoss, dict(), dict(m1=4.0, m2=0.0, m3=0.0, scale=1.0, normalize=False)),
    (mk.NormalizedSoftmaxLoss, dict(temperature=0.1), dict(m1=1.0, m2=0.0, m3=0.0, scale=10.0)),
])
def test_modules(cls, kw, expected):
    module = cls(16, 100, **kw)
    assert module.weight.shape == (100, 16)
    assert 0.005 < float(module.weight.detach().std()) < 0.015  # insightface's N(0, 0.01)
    x = torch.randn(10, 16, requires_grad=True)
    t = torch.randint(0, 100, (10,))
    loss = module(x, t)
    loss.backward()
    assert module.weight.grad is not None and x.grad is not None
    want = mk.margin_cross_entropy(x.detach(), module.weight.detach(), t, **expected)
    torch.testing.assert_close(loss.detach(), want)


@pytest.mark.parametrize("cls,margin,bad,kw", [
    (mk.ArcFaceLoss, 0.3, 28.6, {}), (mk.SubCenterArcFaceLoss, 0.3, -0.1, {}), (mk.CosFaceLoss, 0.2, float("nan"), {}),
    (mk.SphereFaceLoss, 2.0, 0.5, {}), (mk.LargeMarginSoftmaxLoss, 2.0, 0.5, {}),
    (mk.ElasticArcFaceLoss, 0.3, 28.6, dict(std=0.0)), (mk.ElasticCosFaceLoss, 0.2, float("inf"), dict(std=0.0)),
    (mk.CurricularFaceLoss, 0.3, 28.6, {}), (mk.MVSoftmaxLoss, 0.2, -0.1, {}),
    (mk.MVSoftmaxLoss, 0.3, 28.6, dict(margin_type="arc")), (mk.AdaFaceLoss, 0.3, 4.0, {})],
    ids=lambda v: getattr(v, "__name__", None))
def test_scale_and_margin_are_live_attributes(cls, margin, bad, kw):
    """`loss.scale = ...` and `loss.margin = ...` (pytorch-metric-learning's heads have them; margin warm-ups assign
    them) act from the next call in both modes, as a module built with them, and are checked as the constructor checks
    them (a user audit: assigning ArcFace's .scale did nothing, and ElasticFace's .margin reached training only)."""
    loss = cls(8, 20, **kw)
    loss.scale, loss.margin = 16.0, margin
    fresh = cls(8, 20, scale=16.0, margin=margin, **kw)
    fresh.load_state_dict(loss.state_dict())
    x, t = torch.randn(12, 8), torch.randint(0, 20, (12,))
    for mode in (True, False):
        loss.train(mode), fresh.train(mode)
        torch.testing.assert_close(loss(x, t), fresh(x, t))
    assert repr(loss) == repr(fresh) and (loss.scale, loss.margin) == (16.0, margin)
    with pytest.raises(ValueError, match="margin"):
        loss.margin = bad
    with pytest.raises(ValueError, match="scale"):
        loss.scale = 0.0
    assert (loss.scale, loss.margin) == (16.0, margin)


def test_normalized_softmax_is_cross_entropy_of_cosines_over_temperature():
    """pytorch-metric-learning's NormalizedSoftmaxLoss: cross-entropy of cos(x, w_j)/T, in float64."""
    head = mk.NormalizedSoftmaxLoss(16, 40, temperature=0.05).double()
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 40, (12,))
    loss = head(x, t)
    cosines = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).t()
    want = torch.nn.functional.cross_entropy(cosines / 0.05, t)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(torch.autograd.grad(loss, (x, head.weight)), torch.autograd.grad(want, (x, head.weight))):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        mk.NormalizedSoftmaxLoss(16, 40, temperature=0.0)


def test_lambda_annealing_follows_the_sphereface_schedule():
    # A-Softmax's λ = max(λ_min, base·(1 + γ·t)^−power) at training step t (SphereFace's 1000, 0.12, 1, 5): t counts
    # the steps of an optimizer that holds the class centres
    head = mk.SphereFaceLoss(16, 50, lambda_min=5.0)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.0)
    x, t = torch.randn(10, 16), torch.randint(0, 50, (10,))
    steps = [0, 1, 2, 10000]
    for step in range(steps[-1] + 1):
        if step in steps:
            want_lambda = max(5.0, 1000.0 * (1 + 0.12 * step) ** -1.0)
            assert head.current_lambda() == pytest.approx(want_lambda)
            want = mk.margin_cross_entropy(x, head.weight.detach(), t, scale=30.0, m1=4.0, m2=0.0, m3=0.0,
                                           lambda_=want_lambda)
            loss = head(x, t)
            torch.testing.assert_close(loss.detach(), want)
            loss.backward()
            assert head.lambda_step == step  # forward and backward passes are not steps
            optimizer.step()
            assert head.lambda_step == step + 1
        else:
            head.lambda_step += 1
    assert head.current_lambda() == 5.0 and "lambda_step=10001" in repr(head)
    # the step travels with the state dict, only with a schedule: older checkpoints load strictly
    fresh = mk.SphereFaceLoss(16, 50, lambda_min=5.0)
    fresh.load_state_dict(head.state_dict())
    assert fresh.lambda_step == 10001
    plain = mk.SphereFaceLoss(16, 50)
    assert "lambda_step" not in plain.state_dict()
    fresh.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match="lambda_min must lie"):
        mk.SphereFaceLoss(16, 50, lambda_min=-1.0)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("schedule", ["one", "summed", "accumulated", "1F1B"])
def test_lambda_schedule_under_activation_checkpointing(use_reentrant, schedule):
    """checkpoint reruns forward passes inside the backward pass: the reruns must see their first runs' λ (a version
    that counted forward or backward passes gave some reruns another step's λ: 0.1–0.5 off). The head sits behind a
    backbone inside the checkpointed region (its embeddings are recomputed: new tensors), with micro-batches in one
    backward pass, in one backward pass each, and in a pipeline's 1F1B order; three optimizer steps of each, whose
    gradients equal those of the same steps without checkpointing."""
    from torch.utils.checkpoint import checkpoint
    kw = dict(lambda_min=0.0, lambda_base=10.0, lambda_gamma=1.0)  # λ_t = 10/(1 + t)

    def run(checkpointed):
        torch.manual_seed(0)
        backbone, head = torch.nn.Linear(5, 8), mk.SphereFaceLoss(8, 20, **kw)
        optimizer = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1)
        step = (lambda x, t: checkpoint(lambda a, b: head(backbone(a), b), x, t, use_reentrant=use_reentrant)) \
            if checkpointed else (lambda x, t: head(backbone(x), t))
        grads = []
        for _ in range(3):
            batches = [(torch.randn(6, 5, requires_grad=True), torch.randint(0, 20, (6,))) for _ in range(3)]
            if schedule == "one":
                step(*batches[0]).backward()
            elif schedule == "summed":
                sum(step(x, t) for x, t in batches).backward()
            elif schedule == "accumulated":
                for x, t in batches:
                    step(x, t).backward()
            else:  # forward 0, forward 1, backward 0, forward 2, backward 1, backward 2
                losses = [step(*batches[0]), step(*batches[1])]
                losses[0].backward()
                losses.append(step(*batches[2]))
                losses[1].backward()
                losses[2].backward()
            grads += [x.grad for x, _ in batches if x.grad is not None] + [backbone.weight.grad.clone()]
            optimizer.step()
            optimizer.zero_grad()
        return grads, head.lambda_step

    plain, steps = run(False)
    got, steps_again = run(True)
    assert steps == steps_again == 3
    # (the reentrant form accumulates each micro-batch's backbone gradient apart: another order of fp32 sums)
    tol = dict(rtol=1e-6, atol=1e-6) if use_reentrant else dict(rtol=0, atol=0)
    for g, e in zip(got, plain):
        torch.testing.assert_close(g, e, **tol)


def test_lambda_steps_are_the_steps_of_an_optimizer_holding_the_weight(recwarn):
    """Only an optimizer that holds the class centres counts (one per step, any param group); copies, pickles and
    modules pickled by older versions (their state held lambda_step) count too; 1000 training-mode forward passes
    without a counted step warn (weights flattened by FSDP1 or DeepSpeed are not seen)."""
    import copy
    import pickle
    import warnings
    head = mk.SphereFaceLoss(8, 20, lambda_min=5.0)
    other = torch.nn.Linear(3, 3)
    x, t = torch.randn(6, 8), torch.randint(0, 20, (6,))
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert head.lambda_step == 0
    both = torch.optim.Adam([{"params": other.parameters()}, {"params": [head.weight], "lr": 0.0}])
    head(x, t).backward()
    both.step()
    assert head.lambda_step == 1
    for twin in (copy.deepcopy(head), pickle.loads(pickle.dumps(head))):
        torch.optim.SGD(twin.parameters(), lr=0.0).step()
        assert twin.lambda_step == 2 and head.lambda_step == 1
    state = copy.deepcopy(head.__getstate__())  # (its own weight: head's would count for both)
    state.pop("_forwards_without_step", None)  # as an older marginkern pickled it
    old = mk.SphereFaceLoss.__new__(mk.SphereFaceLoss)
    old.__setstate__(state)
    torch.optim.SGD(old.parameters(), lr=0.0).step()
    assert old.lambda_step == 2
    state = copy.deepcopy(head.__getstate__())
    state["_lambda_steps"], state["_lambda_pending"] = state.pop("lambda_step"), True  # a development version's
    dev = mk.SphereFaceLoss.__new__(mk.SphereFaceLoss)
    dev.__setstate__(state)
    assert dev.lambda_step == 2

    # a step inside another optimizer's step (a subclass's super().step(), ZeroRedundancyOptimizer's local step) is
    # part of it: one count
    class Wrapped(torch.optim.SGD):
        def step(self, closure=None):
            return super().step(closure)
    torch.optim.SGD(other.parameters(), lr=0.1)  # (torch wraps each class's step at its first instance)
    Wrapped(head.parameters(), lr=0.0).step()
    assert head.lambda_step == 2

    def forwards(module, n):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                module(x, t)
                yield
        messages = [w for w in caught if "has not moved in 1000 training-mode forward passes" in str(w.message)]
        assert len(messages) <= 1 and all(w.filename == __file__ for w in messages)  # the caller's line
        forwards.warned = bool(messages)

    for _ in forwards(head, 1000):
        pass
    assert forwards.warned
    fresh = mk.SphereFaceLoss(8, 20, lambda_min=5.0)
    for _ in forwards(fresh, 1500):  # advanced by hand, as the warning says: no warning
        fresh.lambda_step += 1
    assert not forwards.warned
    # a constructor that raises leaves nothing that other optimizers' steps would look at
    with pytest.raises(ValueError) as raised:
        mk.SphereFaceLoss(8, 20, lambda_min=5.0, sample_rate=2.0)
    torch.optim.SGD(other.parameters(), lr=0.1).step()
    assert raised.value is not None


def test_a_rejected_call_counts_no_lambda_step():
    head = mk.SphereFaceLoss(8, 20, lambda_min=5.0)
    with pytest.raises(ValueError, match="target holds class 20"):
        head(torch.randn(3, 8), torch.tensor([0, 20, 1]))
    assert head.lambda_step == 0


def test_lambda_is_checked_and_passes_opcheck():
    x, w, t = make_case(7, 40, 5, torch.float32, ignore=(1,))
    with pytest.raises(ValueError, match="lambda_ must lie"):
        mk.margin_cross_entropy(x, w, t, lambda_=-0.5)
    args = (x.detach(), w.detach(), t, 30.0, 4.0, 0.0, 0.0, True, True, 0.1, -100, 1, 5.0)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy.default, args)
    _, lse, row_state, col_norm = torch.ops.marginkern.margin_cross_entropy(*args)
    torch.library.opcheck(torch.ops.marginkern.margin_cross_entropy_backward.default,
                          (torch.rand(7), *args[:3], lse, row_state, col_norm, *args[3:11], True, 1, 5.0))


def test_a_margin_schedule_takes_effect_per_step():
    # SphereFace's substitute for A-Softmax's λ annealing (the module docstring): raise m1 from 1 step by step
    head = mk.SphereFaceLoss(16, 50, margin=4)
    x, t = torch.randn(10, 16), torch.randint(0, 50, (10,))
    for m1 in (1.0, 2.5, 4.0):
        head.options["m1"] = m1
        want = mk.margin_cross_entropy(x, head.weight.detach(), t, scale=30.0, m1=m1, m2=0.0, m3=0.0)
        torch.testing.assert_close(head(x, t).detach(), want)
    head.options["m1"] = 0.5
    with pytest.raises(ValueError, match="m1 must lie"):
        head(x, t)


# ---- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate,exc,match", [
    (lambda x, w, t: (x, w, t + 1000), ValueError, "target"),
    (lambda x, w, t: (x, w, t - 1000), ValueError, "target"),
    (lambda x, w, t: (x, w, t.float()), TypeError, "target"),
    (lambda x, w, t: (x, w, t.bool()), TypeError, "target"),
    (lambda x, w, t: (x, w, t[:-1]), ValueError, "target"),
    (lambda x, w, t: (x, w[:, :-1], t), ValueError, "weight"),
    (lambda x, w, t: (x[0], w, t), ValueError, "input"),
    (lambda x, w, t: (x, w.double(), t), TypeError, "weight"),
    (lambda x, w, t: (x.int(), w.int(), t), TypeError, "input"),
    (lambda x, w, t: (x, w.to("meta"), t), ValueError, "device"),
    (lambda x, w, t: (x, w[:0], t[:0] * 0), ValueError, "weight"),
    # FSDP1's flat 1-D parameter shard (Liger #332): refused, not read as a (C, D) matrix
    (lambda x, w, t: (x, w.reshape(-1), t), ValueError, r"weight must have shape \(C, D\)"),
])
def test_bad_tensors_raise_naming_the_argument(mutate, exc, match):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    x, w, t = mutate(x, w, t)
    with pytest.raises(exc, match=match):
        mk.margin_cross_entropy(x, w, t)


@pytest.mark.parametrize("kw,match", [
    (dict(m1=0.5), "m1"), (dict(m2=-0.1), "m2"), (dict(m2=28.6), "m2 is an angle in radians"), (dict(scale=0.0), "scale"),
    (dict(scale=math.inf), "scale"),
    (dict(m3=math.nan), "m3"), (dict(label_smoothing=1.5), "label_smoothing"),
    (dict(margin_grad="approx"), "margin_grad"), (dict(reduction="avg"), "reduction"),
])
def test_bad_options_raise_naming_the_argument(kw, match):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(ValueError, match=match):
        mk.margin_cross_entropy(x, w, t, **kw)
    with pytest.raises(ValueError, match=match):
        mk.CombinedMarginLoss(3, 6, **{("m1" if k == "m1" else k): v for k, v in kw.items()})


@pytest.mark.parametrize("backend,match", [
    ("cuda", "cuda"),
    pytest.param("cpp", "marginkern._C", marks=pytest.mark.skipif(
        cpp_tiles.LOAD_ERROR is None, reason="the C++ extension is built, so cpp serves CPU tensors (test_cpp.py)")),
    ("tpu", "not a backend"), ("triton", "TRITON_INTERPRET")])
def test_forced_backend_that_cannot_serve_says_why(monkeypatch, backend, match):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(mk.BackendUnavailable, match=match):
        mk.margin_cross_entropy(x, w, t)


def test_a_triton_older_than_tested_is_refused_with_the_reason(monkeypatch):
    """A Triton older than the kernels are checked with (bench/NOTES.md, twenty-sixth session): the backend says so
    instead of failing inside a launch; a forced one raises with that reason. The interpreter has its own floor."""
    from marginkern import dispatch
    assert dispatch.triton_version_reason("3.2.0").startswith("triton 3.2.0 is older than 3.3")
    assert dispatch.interpreter_version_reason("3.6.0").startswith("triton 3.6.0 is older than 3.7")
    assert all(dispatch.triton_version_reason(v) is None for v in ("3.3.0", "3.9.0", "3.10.0+gitabc", "4.0"))
    assert all(dispatch.interpreter_version_reason(v) is None for v in ("3.7.1", "3.9.0", "3.10.0+gitabc", "4.0"))
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.2.0")
    monkeypatch.setenv("MARGINKERN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    dispatch._triton_version_reasons.cache_clear()
    try:
        assert "older than 3.3" in dispatch.explain("cuda").splitlines()[0]
        x, w, t = make_case(4, 6, 3, requires_grad=False)
        with pytest.raises(mk.BackendUnavailable, match="triton 3.2.0 is older than 3.7"):
            mk.margin_cross_entropy(x, w, t)  # CPU tensors: the interpreter's floor
    finally:
        monkeypatch.undo()
        dispatch._triton_version_reasons.cache_clear()


def test_forced_reference_backend_runs(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    x, w, t = make_case(4, 6, 3)
    check_against_oracle(x, w, t, torch.float32)


# ---- regressions from the first code review -------------------------------------------------------------

def test_straight_through_unnormalized_follows_dpsi_dc_one():
    # DESIGN.md §4: straight-through means dψ/dc := 1, so T = s‖x‖‖w_y‖·(c + sg(ψ(c) − c)) keeps the norms'
    # gradient (written out here independently of marginkern.reference)
    from marginkern.margin import margin_psi
    x, w, t = make_case(9, 13, 6, torch.float64)
    kw = dict(m1=2.0, m2=0.1, m3=0.05, scale=0.7, normalize=False)
    got, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, margin_grad="straight_through", **kw)

    def literal(a, b, tt, **_):
        logits = 0.7 * (a @ b.t())
        r, q = a.norm(dim=1), b[tt].norm(dim=1)
        c = (a * b[tt]).sum(1) / (r * q)
        target = 0.7 * r * q * (c + (margin_psi(c.detach(), 2.0, 0.1, 0.05) - c).detach())
        logits = torch.where(F.one_hot(tt, 13).bool(), target[:, None], logits)
        return F.cross_entropy(logits, tt)

    want, ex, ew = loss_and_grads(literal, x, w, t)
    for a, b in ((got, want), (gx, ex), (gw, ew)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64])
def test_small_integer_target_dtypes(dtype):
    # a uint8 index tensor indexes as a boolean mask unless converted (review finding); uint16/32/64 targets failed in
    # the value check (aminmax has no CPU kernel for them) until it read targets as int64 (2026-12-07)
    x, w, t = make_case(6, 100, 5)
    t[2] = 7
    want = mk.margin_cross_entropy(x, w, t, ignore_index=7)
    torch.testing.assert_close(mk.margin_cross_entropy(x, w, t.to(dtype), ignore_index=7), want)
    torch.testing.assert_close(mk.linear_cross_entropy(x, w, t.to(dtype), ignore_index=7),
                               mk.linear_cross_entropy(x, w, t, ignore_index=7))


def test_compile_with_non_contiguous_inputs():
    # the fake kernels must promise the real kernels' (contiguous) gradient strides (review finding)
    x, w, t = make_case(8, 20, 6)
    xt = x.detach().t().contiguous().t().requires_grad_()
    wt = w.detach().t().contiguous().t().requires_grad_()
    for fn in (mk.margin_cross_entropy, mk.linear_cross_entropy, mk.emo_cross_entropy):
        step = torch.compile(lambda a, b, c: fn(a, b, c), fullgraph=True)
        got = loss_and_grads(step, xt, wt, t)
        want = loss_and_grads(fn, x, w, t)
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)


def test_log_sum_exp_output_is_not_differentiable():
    x, w, t = make_case(5, 9, 4)
    _, lse, row_state, col_norm = torch.ops.marginkern.margin_cross_entropy(x, w, t, 64.0, 1.0, 0.5, 0.0, True,
                                                                             True, 0.0, -100)
    _, lse_linear, _ = torch.ops.marginkern.linear_cross_entropy(x, w, t, None, -100, 0.0, 0.0, None, 0.0, 0.0)
    assert not any(o.requires_grad for o in (lse, row_state, col_norm, lse_linear))


@pytest.mark.parametrize("loss", ["margin", "linear", "emo"])
def test_frozen_weight_skips_its_gradient(loss):
    # a frozen head (LoRA, linear probing) must not pay for dW; x's gradient is unchanged
    fn = {"margin": mk.margin_cross_entropy, "linear": mk.linear_cross_entropy, "emo": mk.emo_cross_entropy}[loss]
    x, w, t = make_case(10, 40, 6)
    _, want_x, _ = loss_and_grads(fn, x, w, t)
    xf = x.detach().requires_grad_()
    fn(xf, w.detach(), t).backward()
    torch.testing.assert_close(xf.grad, want_x)
    op = {"margin": "margin_cross_entropy_backward", "linear": "linear_cross_entropy_backward",
          "emo": "emo_cross_entropy_backward"}[loss]
    geometry = torch.ops.marginkern.margin_cross_entropy(x.detach(), w.detach(), t, 64.0, 1.0, 0.5, 0.0, True, True,
                                                         0.0, -100)[2:]
    args = {"margin": (torch.rand(10), x.detach(), w.detach(), t, torch.rand(10), *geometry, 64.0, 1.0, 0.5, 0.0,
                       True, True, 0.0, -100, False),
            "linear": (torch.rand(10), x.detach(), w.detach(), t, None, torch.rand(10), -100, 0.0, 0.0, None, 0.0,
                       0.0, False, False),
            "emo": (torch.rand(10), torch.rand(10), x.detach(), w.detach(), t, w.detach(), torch.rand(10),
                    torch.rand(10), -100, False)}[loss]
    grads = getattr(torch.ops.marginkern, op)(*args)
    assert grads[1].numel() == 0
    torch.library.opcheck(getattr(torch.ops.marginkern, op).default, args)


def test_frozen_bias_and_weight_of_linear_ce():
    x, w, t = make_case(10, 40, 6)
    b = torch.randn(40, requires_grad=True)
    loss = mk.linear_cross_entropy(x, w.detach(), t, b)
    gx, gb = torch.autograd.grad(loss, (x, b))
    want = torch.autograd.grad(mk.linear_cross_entropy(x, w, t, b), (x, b))
    torch.testing.assert_close(gx, want[0])
    torch.testing.assert_close(gb, want[1])


@pytest.mark.parametrize("normalize", [True, False])
def test_backward_from_the_forwards_geometry_equals_recomputing_it(normalize):
    # the op hands the forward's target geometry and class norms to the backward instead of recomputing them
    from marginkern.margin_ce import margin_ce_backward
    x, w, t = make_case(11, 37, 6, torch.float64, ignore=(2,))
    opts = MarginOptions(8.0 if normalize else 1.0, 1.0, 0.3, 0.1, normalize, True, 0.1, -100)
    loss, lse, row_state, col_norm = margin_ce_forward(x, w, t, opts, TorchTiles(), keep_geometry=True)
    assert row_state.shape == (11, 4) and col_norm.shape == ((37,) if normalize else (0,))
    g = torch.rand(11, dtype=torch.float64)
    saved = margin_ce_backward(g, x, w, t, lse, opts, TorchTiles(), saved=(row_state, col_norm))
    recomputed = margin_ce_backward(g, x, w, t, lse, opts, TorchTiles())
    for a, b in zip(saved, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embedding_gives_a_non_finite_row_and_gradients(bad):
    # face_margin_anchors.md: a NaN/inf embedding must surface (GradScaler skips the step) instead of being
    # clamped into a finite loss; the other rows stay finite
    x, w, t = make_case(6, 40, 8)
    x = x.detach().clone()
    x[2, 3] = bad
    x.requires_grad_()
    loss = mk.margin_cross_entropy(x, w, t, reduction="none")
    assert not torch.isfinite(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all()
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    assert not torch.isfinite(gx[2]).all() and not torch.isfinite(gw).all()


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_fp16_under_a_grad_scaler_scale(backend, monkeypatch):
    if backend != "default":
        monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_margin_fp16_under_grad_scaler("cpu")


@pytest.mark.parametrize("backend", ["default", "reference"])
def test_per_row_upstream_gradient(backend, monkeypatch):
    if backend != "default":
        monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_margin_per_row_upstream_gradient("cpu")


def test_fp32_head_behind_autocast_is_refused_with_the_fix():
    # face_margin_anchors.md / llm_ce_anchors.md (Liger #305): a bf16 embedding from an autocast backbone
    # and an fp32 head; the functional ops do not cast silently, the error says what to do
    x, w, t = make_case(6, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = torch.nn.functional.linear(x, torch.eye(8))
        assert emb.dtype == torch.bfloat16
        for fn in (mk.margin_cross_entropy, mk.linear_cross_entropy, mk.emo_cross_entropy):
            with pytest.raises(TypeError, match=r"weight must have the dtype of input .*under autocast"):
                fn(emb, w, t)
        loss = mk.margin_cross_entropy(emb, w.to(emb.dtype), t)  # the fix the message names
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    head = mk.ArcFaceLoss(8, 40)  # the module casts its fp32 weight itself
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(head(torch.nn.functional.linear(x, torch.eye(8)), t))


@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("loss", ["margin", "linear"])
def test_fp16_beyond_65504_classes_on_the_cpu(monkeypatch, loss, backend):
    # the CPU tier of test_gpu.py's case: class ids above fp16's 65504 (insightface's labels overflowed where
    # they went through fp16) never do here, and label smoothing's Σ_j z_j over 70k classes stays fp32
    if backend:
        monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    fn = {"margin": mk.margin_cross_entropy, "linear": mk.linear_cross_entropy}[loss]
    oracle = {"margin": reference.margin_cross_entropy, "linear": reference.linear_cross_entropy}[loss]
    x, w, t = make_case(16, 70_003, 16, torch.float16, ignore=(3,))
    w = (w.detach().float() * 0.2).half()
    t[:8] = torch.arange(70_003 - 8, 70_003)
    check_loss_and_grads(fn, oracle, x, w, t, torch.float16, 1.0, oracle_dtype=torch.float64, label_smoothing=0.1)
