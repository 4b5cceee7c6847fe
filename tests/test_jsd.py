"""Generalized Jensen-Shannon distillation (linear_jsd): against the materialised float64 definition (TRL's
generalized_jsd_loss) and the streamed oracle, the engine's tiles on the CPU, autograd, endpoints, edge cases,
opcheck, compile, errors. The Triton twin is tests/interpreter/test_triton_jsd.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from marginkern.dispatch import BackendUnavailable
from tests.helpers import assert_close_rel, make_case
from tests.test_distill import (check_divergence_against_oracle, check_empty_and_all_ignored,
                                 check_token_shapes_and_shift, check_torch_compile_fullgraph, kl_and_grads,
                                 teacher_case)


def materialised(x, w, x_t, w_t, t, beta=0.5, temperature=1.0, ignore_index=-100, reduction="none"):
    """Per-row JSD_β on the full float64 logits, as TRL's generalized_jsd_loss writes it (torch's kl_div over a
    log-sum-exp mixture)."""
    assert reduction == "none"
    log_p = torch.log_softmax((x.double() @ w.double().t()) / temperature, dim=1)
    log_q = torch.log_softmax((x_t.double() @ w_t.double().t()) / temperature, dim=1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log1p(-beta), log_q + math.log(beta)]), dim=0)
    jsd = (beta * F.kl_div(log_m, log_q, reduction="none", log_target=True)
           + (1 - beta) * F.kl_div(log_m, log_p, reduction="none", log_target=True)).sum(1)
    return torch.where(t != ignore_index, jsd, 0.0) if t is not None else jsd


jsd_and_grads = kl_and_grads  # any distillation loss, or a materialised definition


def check_jsd_against_oracle(dtype, shape, beta, device, temperature=0.8):
    check_divergence_against_oracle(mk.linear_jsd, reference.linear_jsd, dtype, shape, device, beta=beta,
                                    temperature=temperature)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_oracle_matches_materialised_definition(beta, temperature):
    x, w, t = make_case(23, 70, 12, torch.float64, ignore=(4,))
    x_t, w_t = teacher_case(23, 70, 9, torch.float64)
    upstream = torch.randn(23, dtype=torch.float64)
    got = jsd_and_grads(reference.linear_jsd, x, w, x_t, w_t, t, upstream, beta=beta, temperature=temperature,
                        class_chunk=16)
    want = jsd_and_grads(materialised, x, w, x_t, w_t, t, upstream, beta=beta, temperature=temperature)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(37, 301, 45, 20), (3, 1, 4, 5), (1, 2, 3, 2)])
def test_op_matches_oracle(cpu_backend, dtype, beta, shape):
    check_jsd_against_oracle(dtype, shape, beta, "cpu")


def test_small_class_chunks(monkeypatch):
    """Many class chunks on the PyTorch tiles: both passes and the backward add their chunks' sums (the C++ ones:
    csrc/tests/test_jsd_loss.cpp)."""
    from marginkern.engine import TorchTiles
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    monkeypatch.setattr(TorchTiles, "class_chunks", lambda self, N, C, x, bytes_per_class=0:
                        [(c0, min(C, c0 + 7)) for c0 in range(0, C, 7)])
    check_jsd_against_oracle(torch.float64, (9, 50, 6, 4), 0.3, "cpu")


def test_endpoints_are_forward_and_reverse_kl():
    """β = 0 and 1 are forward and reverse KL (TRL's and Liger's endpoints), and the divergence is continuous there:
    JSD_β / β → KL(q‖p) as β → 0, JSD_β / (1 − β) → KL(p‖q) as β → 1."""
    x, w, t = make_case(8, 40, 6, torch.float64)
    x_t, w_t = teacher_case(8, 40, 5, torch.float64)
    kl = dict((d, mk.linear_kl_divergence(x, w, x_t, w_t, t, direction=d, reduction="none"))
              for d in ("forward", "reverse"))
    torch.testing.assert_close(mk.linear_jsd(x, w, x_t, w_t, t, beta=0, reduction="none"), kl["forward"])
    torch.testing.assert_close(mk.linear_jsd(x, w, x_t, w_t, t, beta=1.0, reduction="none"), kl["reverse"])
    # JSD_β = β·KL(q‖m) + (1−β)·KL(p‖m) with m → p: the second term is O(β²·χ²(q‖p)), the first β·KL(q‖p) +
    # O(β²·χ²), and χ² (Σ (q−p)²/p) reaches ~1e3 here; the float64 sums keep their digits (log1p/expm1)
    eps = 1e-9
    torch.testing.assert_close(mk.linear_jsd(x, w, x_t, w_t, t, beta=eps, reduction="none") / eps, kl["forward"],
                               rtol=1e-5, atol=0)
    torch.testing.assert_close(mk.linear_jsd(x, w, x_t, w_t, t, beta=1 - eps, reduction="none") / (1 - (1 - eps)),
                               kl["reverse"], rtol=1e-5, atol=0)


def test_identical_teacher_gives_zero_and_no_gradient(cpu_backend):
    x, w, t = make_case(16, 300, 32)
    jsd, gx, gw = jsd_and_grads(mk.linear_jsd, x, w, x.detach(), w.detach(), t, torch.ones(16))
    assert (jsd >= 0).all() and jsd.max() < 1e-6
    assert gx.abs().max() < 1e-6 and gw.abs().max() < 1e-6


def trl_fp32(x, w, x_t, w_t, beta=0.5):
    """TRL's generalized_jsd_loss per row on fp32 logits (a log-sum-exp mixture, torch's kl_div)."""
    log_p, log_q = torch.log_softmax(x @ w.t(), dim=1), torch.log_softmax(x_t @ w_t.t(), dim=1)
    b = torch.tensor(beta)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-b), log_q + torch.log(b)]), dim=0)
    return (b * F.kl_div(log_m, log_q, reduction="none", log_target=True)
            + (1 - b) * F.kl_div(log_m, log_p, reduction="none", log_target=True)).sum(1)


def check_converged_student(device, max_rel_err=1e-2):
    """A student close to its teacher (both heads and hidden states 1e-3 apart: JSD ≈ 4e-6, a sum of terms ~1e-3·p
    that cancel), fp32. log(p/m) as −log1p(β·expm1(log q − log p)) keeps each term to the logits' own rounding, and
    the two sums' first-order log-sum-exp rounding cancels in their combination: ~1e-3 relative per row, where
    the log-sum-exp mixture (TRL's formulation, in fp32) is off by more than 100%."""
    torch.manual_seed(1)
    x, w, t = make_case(64, 2000, 64, requires_grad=False)
    x_t = (x.double() + 1e-3 * torch.randn(64, 64, dtype=torch.float64)).float()
    w_t = (w.double() + 1e-3 * torch.randn(2000, 64, dtype=torch.float64)).float()
    want = materialised(x, w, x_t, w_t, t)
    got = mk.linear_jsd(*(v.to(device) for v in (x, w, x_t, w_t, t)), reduction="none").double().cpu()
    assert want.median() < 1e-5
    assert ((got - want).abs() / want).max() < max_rel_err
    return ((trl_fp32(x, w, x_t, w_t).double() - want).abs() / want).max()


def test_converged_student_keeps_its_digits(cpu_backend):
    assert check_converged_student("cpu") > 1.0  # what the exact ratio buys over the mixture's log-sum-exp


def test_teacher_gets_no_gradient_and_mean_masks_ignored_rows():
    x, w, t = make_case(10, 50, 8, ignore=(1, 7))
    x_t, w_t = (v.requires_grad_() for v in teacher_case(10, 50, 6, torch.float32))
    jsd = mk.linear_jsd(x, w, x_t, w_t, t, beta=0.3)
    jsd.backward()
    assert x_t.grad is None and w_t.grad is None
    rows = materialised(x, w, x_t, w_t, t, beta=0.3)
    assert_close_rel(jsd, rows.sum() / 8, torch.float32)
    assert_close_rel(mk.linear_jsd(x, w, x_t, w_t, t, beta=0.3, reduction="sum"), rows.sum(), torch.float32)
    assert_close_rel(mk.linear_jsd(x, w, x_t, w_t, beta=0.3), materialised(x, w, x_t, w_t, None, beta=0.3).mean(),
                     torch.float32)


def test_token_shaped_inputs_and_shift():
    check_token_shapes_and_shift(mk.linear_jsd)


def test_empty_and_all_ignored():
    check_empty_and_all_ignored(mk.linear_jsd)


def check_confident_teacher(device):
    """A near one-hot teacher (logits up to ±300) against a flat student: q underflows to 0 for most classes;
    JSD and both gradients finite and at fp32's tolerance."""
    x, w, t = make_case(16, 200, 16, device=device)
    x_t, w_t = teacher_case(16, 200, 16, torch.float32, device, scale=20.0)
    got = jsd_and_grads(mk.linear_jsd, x, w, x_t, w_t, t, torch.ones(16, device=device), beta=0.5)
    assert all(torch.isfinite(v).all() for v in got)
    want = jsd_and_grads(reference.linear_jsd, *(v.double().cpu() for v in (x, w, x_t, w_t)), t.cpu(),
                         torch.ones(16, dtype=torch.float64), beta=0.5)
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32, floor=1.0)


def test_confident_teacher(cpu_backend):
    check_confident_teacher("cpu")


def check_minus_inf_logits(device):
    """−inf logits: the teacher's on a tail where the student's are finite (q = 0 there: m = (1−β)·p, finite), then
    both heads' on a common tail (both 0: nothing added); JSD and the gradient finite, as the float64 definition."""
    dtype = torch.float32
    torch.manual_seed(5)
    N, C = 6, 100
    x, x_t = torch.randn(N, 4, dtype=torch.float64), torch.randn(N, 3, dtype=torch.float64)
    x[:, 0], x_t[:, 0] = x[:, 0].abs() + 0.5, x_t[:, 0].abs() + 0.5
    w, w_t = torch.randn(C, 4, dtype=torch.float64), torch.randn(C, 3, dtype=torch.float64)
    w_t[40:, 0] = -float("inf")
    upstream = torch.randn(N, dtype=torch.float64)
    got = jsd_and_grads(mk.linear_jsd, *(v.to(dtype).to(device) for v in (x, w, x_t, w_t)), None,
                        upstream.to(device), beta=0.4)
    want = jsd_and_grads(masked_definition, x, w, x_t, w_t, None, upstream, beta=0.4)
    for name, g, e in zip(("jsd", "grad input", "grad weight"), got, want):
        assert_close_rel(g, e, dtype, name, floor=1.0)
    w[70:, 0], w_t[70:, 0] = -float("inf"), -float("inf")
    got = mk.linear_jsd(*(v.to(dtype).to(device) for v in (x, w, x_t, w_t)), beta=0.4, reduction="none")
    assert_close_rel(got, masked_definition(x, w, x_t, w_t, None, beta=0.4), dtype, "jsd", floor=1.0)


def masked_definition(x, w, x_t, w_t, t, beta=0.5, reduction="none"):
    """The float64 definition with 0·log 0 = 0, written so that autograd's unselected branches hold no inf."""
    log_p = torch.log_softmax(x @ w.t(), dim=1)
    log_q = torch.log_softmax(x_t @ w_t.t(), dim=1)
    p_in, q_in = log_p > -math.inf, log_q > -math.inf
    safe_p, safe_q = torch.where(p_in, log_p, 0.0), torch.where(q_in, log_q, 0.0)
    m = (1 - beta) * torch.where(p_in, safe_p.exp(), 0.0) + beta * torch.where(q_in, safe_q.exp(), 0.0)
    log_m = torch.where(p_in | q_in, torch.where(m > 0, m, 1.0).log(), 0.0)
    return (beta * torch.where(q_in, safe_q.exp() * (safe_q - log_m), 0.0)
            + (1 - beta) * torch.where(p_in, safe_p.exp() * (safe_p - log_m), 0.0)).sum(1)


def test_minus_inf_logits(cpu_backend):
    check_minus_inf_logits("cpu")


def test_nan_gives_nan(cpu_backend):
    x, w, t = make_case(4, 600, 8)
    x_t, w_t = teacher_case(4, 600, 6, torch.float32)
    x = x.detach().clone()
    x[1, 2] = float("nan")
    w_t = w_t.clone()
    w_t[590] = float("nan")  # a NaN teacher class: every row's JSD is NaN
    assert torch.isnan(mk.linear_jsd(x, w, x_t, w_t, t, reduction="none")).all()


def test_gradcheck_float64():
    x, w, t = make_case(5, 11, 4, torch.float64, ignore=(1,))
    x_t, w_t = teacher_case(5, 11, 3, torch.float64)
    for beta in (0.2, 0.7):
        assert torch.autograd.gradcheck(
            lambda x, w: mk.linear_jsd(x, w, x_t, w_t, t, beta=beta, temperature=0.9, reduction="none"), (x, w))


def test_opcheck():
    x, w, t = make_case(7, 33, 8, ignore=(3,))
    x_t, w_t = teacher_case(7, 33, 5, torch.float32)
    torch.library.opcheck(torch.ops.marginkern.linear_jsd, (x, w, x_t, w_t, t, 0.4, 0.7, -100))
    _, lse, lse_t, kl_pm = (v.detach() for v in torch.ops.marginkern.linear_jsd(x, w, x_t, w_t, t, 0.4, 0.7, -100))
    torch.library.opcheck(torch.ops.marginkern.linear_jsd_backward,
                          (torch.randn(7), x.detach(), w.detach(), x_t, w_t, t, lse, lse_t, kl_pm, 0.4, 0.7, -100,
                           True))


def test_torch_compile_fullgraph():
    check_torch_compile_fullgraph(lambda *a: mk.linear_jsd(*a, beta=0.25, temperature=2.0),
                                  lambda *a: reference.linear_jsd(*a, beta=0.25, temperature=2.0))


def test_bad_arguments():
    x, w, t = make_case(3, 5, 4)
    x_t, w_t = teacher_case(3, 5, 2, torch.float32)
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\]"):
        mk.linear_jsd(x, w, x_t, w_t, t, beta=1.5)
    with pytest.raises(TypeError, match="beta must be a real number"):
        mk.linear_jsd(x, w, x_t, w_t, t, beta=torch.tensor(0.5))
    with pytest.raises(ValueError, match=r"teacher_weight must have shape \(C=5, E=2\)"):
        mk.linear_jsd(x, w, x_t, w_t[:4], t)
    with pytest.raises(ValueError, match="temperature must lie in"):
        mk.linear_jsd(x, w, x_t, w_t, t, temperature=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        mk.linear_jsd(x, w, x_t, w_t, t, reduction="batchmean")
    with pytest.raises(ValueError, match=r"beta must lie strictly inside \(0, 1\) for the JSD ops"):
        torch.ops.marginkern.linear_jsd(x, w, x_t, w_t, t, 0.0, 1.0, -100)


def test_forced_cuda_backend_refuses_with_a_reason(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "cuda")
    x, w, t = make_case(3, 5, 4)
    x_t, w_t = teacher_case(3, 5, 2, torch.float32)
    with pytest.raises(BackendUnavailable, match="cuda"):
        mk.linear_jsd(x, w, x_t, w_t, t)


def test_cpp_ops_refuse_the_endpoints():
    """The raw C++ ops take β strictly inside (0, 1), as the Python ops do (the functions route 0 and 1 to KL)."""
    from marginkern import cpp_tiles
    if cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    x, w, t = make_case(3, 5, 4, requires_grad=False)
    x_t, w_t = teacher_case(3, 5, 2, torch.float32)
    with pytest.raises(RuntimeError, match=r"beta must lie in \(0, 1\)"):
        torch.ops.marginkern.jsd_rows(x, w, x_t, w_t, t, 1.0, 1.0, -100)


def check_beta_near_endpoints(device):
    """β within 1e-9 of 0 or 1 in fp32: 1 − β is rounded apart from β (1 + β·expm1(d) gave 1 − fp32(β): 0 at
    β = 1 − 1e-9, an infinite JSD, and 20% off per term at 1 − 1e-7; found by a review), also with a −inf teacher
    tail (e^d = 0 there). Against the float64 definition on the same rounded inputs, to fp32's tolerance."""
    torch.manual_seed(7)
    x, w, t = make_case(6, 30, 5, requires_grad=False)
    x_t, w_t = teacher_case(6, 30, 4, torch.float32)
    w_t[20:, 0] = -float("inf")
    x_t[:, 0] = x_t[:, 0].abs() + 0.5
    upstream = torch.randn(6, dtype=torch.float64)
    for beta in (1e-9, 1e-7, 1 - 1e-7, 1 - 1e-9):
        got = jsd_and_grads(mk.linear_jsd, *(v.to(device) for v in (x, w, x_t, w_t, t)), upstream.to(device),
                            beta=beta)
        want = jsd_and_grads(masked_definition, *(v.double() for v in (x, w, x_t, w_t)), t, upstream, beta=beta)
        for name, g, e in zip(("jsd", "grad input", "grad weight"), got, want):
            assert torch.isfinite(g).all(), (beta, name)
            err = ((g.double().cpu() - e).abs().max() / e.abs().max()).item()
            assert err < 1e-5, (beta, name, err)


def test_beta_near_endpoints(cpu_backend):
    check_beta_near_endpoints("cpu")


def check_small_temperature(device):
    """Logits ~1e4 (T = 1e-4): every backend computes log p from the logits rounded as its forward pass rounded them
    before their log-sum-exp (the C++ loops fused row_scale·dot − lse into one FMA: 2e-3 off, at T = 1e-8 a JSD of
    2e7 where it cannot exceed log 2; a review); KL's gradient too."""
    torch.manual_seed(8)
    x, w, t = make_case(6, 100, 8, requires_grad=False)
    x_t, w_t = teacher_case(6, 100, 8, torch.float32)
    upstream = torch.randn(6, dtype=torch.float64)
    for fn, oracle, kw in ((mk.linear_jsd, reference.linear_jsd, dict(beta=0.5)),
                           (mk.linear_kl_divergence, reference.linear_kl_divergence, dict(direction="forward"))):
        got = jsd_and_grads(fn, *(v.to(device) for v in (x, w, x_t, w_t, t)), upstream.to(device), temperature=1e-4,
                            **kw)
        # the oracle on the logits the kernels see: fp32 dot products times 1/T, rounded to fp32
        x64, x_t64 = x.double(), x_t.double()
        want = jsd_and_grads(oracle, x64, w.double(), x_t64, w_t.double(), t, upstream, temperature=1e-4, **kw)
        for name, g, e in zip(("divergence", "grad input", "grad weight"), got, want):
            err = ((g.double().cpu() - e).abs().max() / e.abs().max().clamp_min(1.0)).item()
            assert err < 1e-4, (fn.__name__, name, err)


def test_small_temperature(cpu_backend):
    check_small_temperature("cpu")


@pytest.mark.parametrize("divergence, fn, kw", [("forward_kl", mk.linear_kl_divergence, dict(direction="forward")),
                                                ("reverse_kl", mk.linear_kl_divergence, dict(direction="reverse")),
                                                ("jsd", mk.linear_jsd, dict(beta=0.25))])
def test_distillation_module_is_the_function(divergence, fn, kw):
    x, w, t = make_case(6, 40, 8, ignore=(2,))
    x_t, w_t = teacher_case(6, 40, 5, torch.float32)
    module = mk.LinearDistillationLoss(divergence, beta=0.25 if divergence == "jsd" else None, temperature=1.5,
                                       reduction="sum", shift=1)
    assert divergence in repr(module)
    got = module(x.view(2, 3, 8), w, x_t.view(2, 3, 5), w_t, t.view(2, 3))
    want = fn(x.view(2, 3, 8), w, x_t.view(2, 3, 5), w_t, t.view(2, 3), temperature=1.5, reduction="sum", shift=1, **kw)
    assert torch.equal(got, want)


def test_distillation_module_casts_an_fp32_head_under_autocast():
    """An fp32 head behind a bf16 autocast backbone: the module casts both heads to their hidden states' dtype (the
    cast's backward returns fp32 gradients); the function refuses the mix with the fix named."""
    x, w, t = make_case(6, 40, 8)
    x_t, w_t = teacher_case(6, 40, 5, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mk.LinearDistillationLoss("jsd")(x.bfloat16(), w, x_t.bfloat16(), w_t, t)
        with pytest.raises(TypeError):
            mk.linear_jsd(x.bfloat16(), w, x_t.bfloat16(), w_t, t)
    (gw,) = torch.autograd.grad(loss, (w,))
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


def test_distillation_module_bad_arguments():
    with pytest.raises(ValueError, match="divergence must be one of"):
        mk.LinearDistillationLoss("js")
    with pytest.raises(ValueError, match=r"beta must lie in \[0.0, 1.0\]"):
        mk.LinearDistillationLoss("jsd", beta=2.0)
    with pytest.raises(ValueError, match="temperature must lie in"):
        mk.LinearDistillationLoss(temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.LinearDistillationLoss(reduction="batchmean")
    with pytest.raises(ValueError, match="beta applies to divergence=\"jsd\" only"):  # ignored silently before
        mk.LinearDistillationLoss("forward_kl", beta=0.2)
