"""Per-token log-probabilities and entropy (log_probs_and_entropy): oracle, op, autograd, edge cases, errors."""
import pytest
import torch
import torch.nn.functional as F

import marginkern as mk
from marginkern import reference
from marginkern.dispatch import BackendUnavailable
from tests.helpers import assert_close_rel, check_special_rows_log_probs, make_case


def materialised(x, w, t, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """The definition on the full float64 logits: softcap(x·wᵀ + b), then the temperature."""
    z = x.double() @ w.double().t() + (0.0 if bias is None else bias.double())
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(z / temperature, dim=1)
    valid = t != ignore_index
    log_pt = log_p.gather(1, torch.where(valid, t, 0)[:, None])[:, 0]
    entropy = -(log_p.exp() * log_p).sum(1)
    return torch.where(valid, log_pt, 0.0), torch.where(valid, entropy, 0.0)


def outputs_and_grads(fn, x, w, t, upstream, bias=None, **kw):
    """(log p_t, H, dx, dw[, dbias]) of fn for the loss Σ upstream[0]·log p_t + upstream[1]·H (a None upstream
    leaves that output out of the loss: its gradient then never reaches the backward)."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    leaves = (x, w)
    if bias is not None:
        bias = bias.detach().requires_grad_()
        leaves, kw = leaves + (bias,), dict(kw, bias=bias)
    log_pt, entropy = fn(x, w, t, **kw)
    loss = sum((out.double() * g).sum() for out, g in zip((log_pt, entropy), upstream) if g is not None)
    return (log_pt.detach(), entropy.detach(), *torch.autograd.grad(loss, leaves))


# the LM heads the log-probabilities take: plain, biased (Phi-2), soft-capped (Gemma 2/3; a cap of 2 bites on these
# logits), both
HEADS = {"plain": (False, None), "bias": (True, None), "softcap": (False, 2.0), "bias+softcap": (True, 2.0)}


def check_log_probs_against_oracle(dtype, shape, temperature, device, upstream_kind="both", head="plain"):
    """The op (whatever backend serves `device`) against the float64 oracle on the same rounded inputs: both
    outputs and every gradient for random per-row upstream gradients, an ignored row included."""
    N, C, D = shape
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0,) if N > 2 else ())
    with_bias, softcap = HEADS[head]
    bias = torch.randn(C, dtype=torch.float64).to(dtype).to(device) if with_bias else None
    g_lp, g_h = torch.randn(N, dtype=torch.float64), torch.randn(N, dtype=torch.float64)
    upstream = {"both": (g_lp, g_h), "log_probs": (g_lp, None), "entropy": (None, g_h)}[upstream_kind]
    got = outputs_and_grads(mk.log_probs_and_entropy, x, w, t, [None if g is None else g.to(device) for g in upstream],
                            bias, temperature=temperature, softcap=softcap)
    want = outputs_and_grads(reference.log_probs_and_entropy, x.double().cpu(), w.double().cpu(), t.cpu(), upstream,
                             None if bias is None else bias.double().cpu(), temperature=temperature, softcap=softcap)
    for name, g, e in zip(("log_probs", "entropy", "grad input", "grad weight", "grad bias"), got, want):
        assert_close_rel(g, e, dtype, f"{name} {upstream_kind} {head}", floor=1.0)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("head", list(HEADS))
def test_oracle_matches_materialised_definition(temperature, head):
    """The streamed oracle (class chunks of 16) against the full float64 logits: outputs and gradients."""
    x, w, t = make_case(23, 70, 12, torch.float64, ignore=(4,))
    with_bias, softcap = HEADS[head]
    bias = torch.randn(70, dtype=torch.float64) if with_bias else None
    upstream = (torch.randn(23, dtype=torch.float64), torch.randn(23, dtype=torch.float64))
    got = outputs_and_grads(reference.log_probs_and_entropy, x, w, t, upstream, bias, temperature=temperature,
                            softcap=softcap, class_chunk=16)
    want = outputs_and_grads(materialised, x, w, t, upstream, bias, temperature=temperature, softcap=softcap)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-10)


def test_log_probs_equal_torch_cross_entropy():
    x, w, t = make_case(31, 90, 16, ignore=(2, 7))
    log_pt, _ = mk.log_probs_and_entropy(x, w, t, temperature=0.8)
    want = -F.cross_entropy((x @ w.t()).double() / 0.8, t, reduction="none")
    assert_close_rel(log_pt, want, torch.float32, floor=1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 1, 4), (19, 65, 16), (1, 2, 3)])
@pytest.mark.parametrize("upstream_kind", ["both", "log_probs", "entropy"])
def test_op_matches_oracle(dtype, shape, upstream_kind):
    check_log_probs_against_oracle(dtype, shape, 0.7, "cpu", upstream_kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(37, 301, 45), (3, 1, 4), (1, 2, 3)])
@pytest.mark.parametrize("upstream_kind", ["both", "log_probs", "entropy"])
@pytest.mark.parametrize("head", ["bias", "softcap", "bias+softcap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_biased_and_soft_capped_heads_match_oracle(dtype, shape, upstream_kind, head, temperature):
    """A head's bias (and its gradient) and Gemma's final-logit softcap, which the temperature divides after."""
    check_log_probs_against_oracle(dtype, shape, temperature, "cpu", upstream_kind, head)


def check_top1(device):
    """return_top1 against the argmax of the materialised float64 logits (bias and softcap included; random logits
    have no ties), ignored rows False, the other results unchanged; a tie of two maximal classes counts for both."""
    for head in HEADS:
        x, w, t = make_case(41, 300, 24, device=device, ignore=(0, 7))
        with_bias, softcap = HEADS[head]
        bias = torch.randn(300, device=device) if with_bias else None
        logits = x.double() @ w.double().t() + (0.0 if bias is None else bias.double())
        t[1:7] = logits[1:7].argmax(1)  # rows whose target is the most likely token (row 7 stays ignored)
        log_pt, entropy, top1 = mk.log_probs_and_entropy(x, w, t, bias, softcap=softcap, temperature=0.7,
                                                         return_top1=True)
        want = (logits.argmax(1) == t) & (t != -100)  # the softcap and the temperature keep the order
        assert top1.dtype == torch.bool and top1.shape == t.shape
        assert torch.equal(top1.cpu(), want.cpu()) and want[1:7].all(), head
        torch.testing.assert_close((log_pt, entropy), mk.log_probs_and_entropy(x, w, t, bias, softcap=softcap,
                                                                               temperature=0.7))
    x = torch.zeros(2, 4, device=device)
    x[:, 0] = 1.0
    w = torch.zeros(50, 4, device=device)
    w[10, 0] = w[20, 0] = 3.0
    _, _, top1 = mk.log_probs_and_entropy(x, w, torch.tensor([10, 20], device=device), return_top1=True)
    assert top1.tolist() == [True, True]


def test_return_top1():
    check_top1("cpu")


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_return_top1_on_both_cpu_backends(backend, monkeypatch):
    skip_without_cpp(backend)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_top1("cpu")


def test_soft_capped_log_probs_equal_torch_on_gemma_like_logits():
    """softcap = 30 (Gemma 2's) on logits up to ~±90: log p of the capped logits, as HF's Gemma computes them."""
    x, w, t = make_case(29, 150, 32, ignore=(5,))
    x = (x * 4.0).detach()
    bias = torch.randn(150)
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t, bias, softcap=30.0, temperature=0.9)
    z = 30.0 * torch.tanh((x.double() @ w.double().t() + bias.double()) / 30.0) / 0.9
    want = -F.cross_entropy(z, t, reduction="none")
    assert_close_rel(log_pt, want, torch.float32, floor=1.0)
    log_p = torch.log_softmax(z, 1)
    want_entropy = torch.where(t != -100, -(log_p.exp() * log_p).sum(1), 0.0)
    assert_close_rel(entropy, want_entropy, torch.float32, floor=1.0)


def test_token_shaped_inputs_and_ignored_positions():
    """(B, T, D) hidden states with (B, T) targets, as an RL step has them; padding positions give 0 and get
    no gradient."""
    x, w, t = make_case(12, 50, 8, ignore=(1, 5, 11))
    log_pt, entropy = mk.log_probs_and_entropy(x.view(3, 4, 8), w, t.view(3, 4))
    assert log_pt.shape == entropy.shape == (3, 4)
    want = materialised(x, w, t)
    assert_close_rel(log_pt.reshape(-1), want[0], torch.float32, floor=1.0)
    assert_close_rel(entropy.reshape(-1), want[1], torch.float32, floor=1.0)
    gx, = torch.autograd.grad((log_pt + 0.1 * entropy).sum(), x)
    assert (gx[[1, 5, 11]] == 0).all() and (gx.abs().sum(1)[[0, 2, 3]] > 0).all()


def test_empty_all_ignored_and_single_class():
    x, w, t = make_case(0, 10, 4)
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    assert log_pt.shape == entropy.shape == (0,)
    x, w, t = make_case(5, 10, 4, ignore=range(5))
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    gx, gw = torch.autograd.grad((log_pt + entropy).sum(), (x, w))
    assert (log_pt == 0).all() and (entropy == 0).all() and (gx == 0).all() and (gw == 0).all()
    x, w, t = make_case(4, 1, 4)  # one class: log p = 0, H = 0, no gradient
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    gx, = torch.autograd.grad((log_pt + entropy).sum(), x)
    assert log_pt.abs().max() < 1e-6 and entropy.abs().max() < 1e-6 and gx.abs().max() < 1e-5


def exact_entropy(x, w, temperature=1.0):
    """Per-row entropy in float64, rearranged so that nothing cancels: with M the row max and d_j = M − z_j,
    H = log1p(S′) + Σ_j e^{−d_j}·d_j / (1 + S′), S′ = Σ_{j ≠ argmax} e^{−d_j}. (−Σ p·log p over float64
    log_softmax loses the target's term −p_t·log p_t ≈ 1 − p_t once that is below 1e-16: 2% of H at H ≈ 1e-20.)"""
    z = (x.double() @ w.double().t()) / temperature
    top, where_top = z.max(1)
    d = top[:, None] - z
    e = torch.exp(-d)
    others = e.scatter(1, where_top[:, None], 0.0).sum(1)
    return torch.log1p(others) + (e * d).sum(1) / (1 + others)


def check_confident_and_flat_rows(device, dtype=torch.float32):
    """The entropy and log-probability of confident tokens (the common case in RL: most sampled tokens have
    p_t ≈ 1) are exact: H per row ≥ 0 (never −1e-7 from a cancelling lse − Σ p·z) and within 1e-3 of its own
    size of float64 down to H ≈ 1e-27, and log p_t within 1e-3 of its own size where it is below −1e-30 (z_t − lse
    in fp32 would round to a multiple of ulp(lse) ≈ 8e-6 here); a uniform row's entropy is log C."""
    torch.manual_seed(3)
    N, C, D = 40, 97, 16
    w = torch.randn(C, D, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x = torch.linspace(0.0, 6.0, N, dtype=torch.float64)[:, None] * w[t] + 0.1 * torch.randn(N, D, dtype=torch.float64)
    x[0] = 0.0  # every logit 0: uniform
    x, w = x.to(dtype), w.to(dtype)
    want = exact_entropy(x, w)
    log_pt, got = (v.double().cpu() for v in mk.log_probs_and_entropy(x.to(device), w.to(device), t.to(device)))
    assert (got >= 0).all(), f"negative entropy {got.min():.3e}"
    assert abs(got[0] - torch.log(torch.tensor(float(C), dtype=torch.float64))) < 1e-5
    err = ((got - want).abs() / want)[want > 1e-30]
    assert err.max() < 1e-3, f"entropy relative error {err.max():.3e} (entropy down to {want.min():.1e})"
    assert want.min() < 1e-20, "the case must reach confident rows"
    # where the target is the max, log p_t = −log1p(Σ_{j≠t} e^{z_j − z_t})
    z = x.double() @ w.double().t()
    on_top = z.argmax(1) == t
    assert on_top.sum() > N // 2
    want_log_pt = -torch.log1p(torch.exp(z - z.gather(1, t[:, None])).scatter(1, t[:, None], 0.0).sum(1))
    err = ((log_pt - want_log_pt).abs() / want_log_pt.abs())[on_top & (want_log_pt < -1e-30)]
    assert err.max() < 1e-3, f"log p_t relative error {err.max():.3e}"


def test_confident_and_flat_rows():
    check_confident_and_flat_rows("cpu")


def test_large_logits_in_fp16_stay_finite():
    """A low temperature on fp16 inputs: logits of ±500 (beyond nothing in fp32, but p·log p of the
    tail underflows): both outputs and gradients finite and at fp16's tolerance."""
    x, w, t = make_case(16, 300, 32, torch.float16)
    x = (x * 2).detach().requires_grad_()
    check = outputs_and_grads(mk.log_probs_and_entropy, x, w, t, (torch.ones(16), torch.ones(16)), temperature=0.05)
    assert all(torch.isfinite(v).all() for v in check)
    want = outputs_and_grads(reference.log_probs_and_entropy, x.double(), w.double(), t,
                             (torch.ones(16), torch.ones(16)), temperature=0.05)
    for g, e in zip(check, want):
        assert_close_rel(g, e, torch.float16, floor=1.0)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_nan_class_chunk_gives_nan(backend, monkeypatch):
    """A whole class chunk of NaN logits: the chunk merge must carry it (engine.merge_max_sums)."""
    from marginkern import cpp_tiles
    from marginkern.engine import TorchTiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    monkeypatch.setattr(TorchTiles, "class_chunks", lambda self, N, C, x, bytes_per_class=0:
                        [(c0, min(C, c0 + 32)) for c0 in range(0, C, 32)])
    x, w, _ = make_case(3, 300, 8)
    w = w.detach().clone()
    w[32:64] = float("nan")
    log_pt, entropy = mk.log_probs_and_entropy(x.detach(), w, torch.tensor([1, 5, 299]))
    assert torch.isnan(log_pt).all() and torch.isnan(entropy).all()


def test_special_rows_give_torchs_log_probs_and_entropy(cpu_backend):
    check_special_rows_log_probs("cpu")


def test_nan_input_gives_nan():
    x, w, t = make_case(6, 40, 8)
    x = x.detach().clone()
    x[2, 3] = float("nan")
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    assert torch.isnan(log_pt[2]) and torch.isnan(entropy[2])
    assert torch.isfinite(log_pt[[0, 1, 3]]).all() and torch.isfinite(entropy[[0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_minus_inf_logit_gives_torchs_gradient_and_entropy(backend, monkeypatch):
    """A −inf logit (p = 0): as the target, its entropy part p_t·(log p_t + H) is 0, not 0·(−inf) = NaN, and dL/dw
    equals F.cross_entropy's (found by a review); as another class, it adds 0·log 0 = 0 to the entropy (the PyTorch
    tiles' chunk sums weigh only p > 0: a mutation test's finding), on both CPU backends."""
    skip_without_cpp(backend)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x = torch.tensor([[1.0, 0.5], [1.0, 0.5]])
    w = torch.tensor([[0.0, 0.0], [-float("inf"), 0.0], [1.0, 0.0]], requires_grad=True)
    target = torch.tensor([1, 0])
    log_pt, entropy = mk.log_probs_and_entropy(x, w, target)
    grad, = torch.autograd.grad(log_pt.sum(), w)
    w_torch = w.detach().clone().requires_grad_()
    want, = torch.autograd.grad(-F.cross_entropy(x[:1] @ w_torch.t(), target[:1], reduction="sum"), w_torch)
    assert torch.equal(grad[1], want[1]) and torch.isfinite(grad).all()
    p = torch.softmax(x.double() @ w.detach().double().t(), 1)
    want_entropy = -torch.where(p > 0, p * p.log(), 0.0).sum(1)
    torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-6, atol=0)
    torch.testing.assert_close(log_pt[1].double(), p[1, 0].log(), rtol=1e-6, atol=0)


def skip_without_cpp(backend):
    from marginkern import cpp_tiles
    if backend == "cpp" and cpp_tiles.LOAD_ERROR is not None:
        pytest.skip(cpp_tiles.LOAD_ERROR)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_many_class_chunks_match_the_oracle(backend, monkeypatch):
    """N = 4096 rows make each CPU backend's budget a chunk of ≤ 1024 classes: C = 3000 runs 3 chunks whose
    log-sum-exp and entropy sums are merged (a wrong merge was 0.36 nats off in a mutation test that every single-chunk case
    passed); targets on the chunks' edges."""
    skip_without_cpp(backend)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    x, w, t = make_case(4096, 3000, 8, ignore=(7,))
    t[:6] = torch.tensor([0, 1023, 1024, 2047, 2048, 2999])
    upstream = (torch.randn(4096, dtype=torch.float64), torch.randn(4096, dtype=torch.float64))
    got = outputs_and_grads(mk.log_probs_and_entropy, x, w, t, upstream)
    want = outputs_and_grads(reference.log_probs_and_entropy, x.double(), w.double(), t, upstream)
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32, floor=1.0)


@pytest.mark.parametrize("temperature, match", [(1e-40, "temperature must be ≥"), (float("inf"), "finite"),
                                                (0.0, r"temperature must lie in \(0.0, inf\)")])
def test_temperatures_beyond_float32(temperature, match):
    x, w, t = make_case(3, 5, 4)
    with pytest.raises(ValueError, match=match):
        mk.log_probs_and_entropy(x, w, t, temperature=temperature)
    assert torch.isfinite(mk.log_probs_and_entropy(x, w, t, temperature=1e-30)[0]).all()


def test_in_place_edit_of_the_outputs_keeps_backward():
    x, w, t = make_case(6, 40, 8)
    log_pt, entropy = mk.log_probs_and_entropy(x, w, t)
    entropy[0] = 0.0  # masking in place, as RL code does
    log_pt[1] = 0.0
    torch.autograd.grad((log_pt + entropy).sum(), (x, w))


def test_gradcheck_float64():
    x, w, t = make_case(5, 11, 4, torch.float64, ignore=(1,))

    def fn(x, w):
        return mk.log_probs_and_entropy(x, w, t, temperature=0.9)

    assert torch.autograd.gradcheck(fn, (x, w))


def test_gradcheck_float64_with_bias_and_softcap():
    x, w, t = make_case(5, 11, 4, torch.float64, ignore=(1,))
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)

    def fn(x, w, bias):
        return mk.log_probs_and_entropy(x, w, t, bias, temperature=0.9, softcap=1.5)

    assert torch.autograd.gradcheck(fn, (x, w, bias))


def test_opcheck():
    x, w, t = make_case(7, 33, 8, ignore=(3,))
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy, (x, w, t, 0.7, -100))
    lse = torch.ops.marginkern.log_probs_entropy(x, w, t, 0.7, -100)[2]
    g = torch.randn(7)
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy_backward,
                          (g, g, x.detach(), w.detach(), t, lse, -lse.abs(), lse.abs(), 0.7, -100, True))


def test_opcheck_with_bias_and_softcap():
    x, w, t = make_case(7, 33, 8, ignore=(3,))
    bias = torch.randn(33, requires_grad=True)
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy, (x, w, t, 0.7, -100, None, False, bias, 2.5))
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy, (x, w, t, 0.7, -100, None, False, bias, 2.5, True))
    lse = torch.ops.marginkern.log_probs_entropy(x, w, t, 0.7, -100, None, False, bias, 2.5)[2]
    g = torch.randn(7)
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy_backward,
                          (g, g, x.detach(), w.detach(), t, lse, -lse.abs(), lse.abs(), 0.7, -100, True, None,
                           bias.detach(), 2.5, True))


@pytest.mark.parametrize("head", ["plain", "bias+softcap"])
def test_torch_compile_fullgraph(head):
    x, w, t = make_case(9, 40, 16, ignore=(2,))
    with_bias, softcap = HEADS[head]
    bias = torch.randn(40, requires_grad=True) if with_bias else None
    leaves = (x, w) if bias is None else (x, w, bias)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w, bias):
        log_pt, entropy = mk.log_probs_and_entropy(x, w, t, bias, temperature=0.5, softcap=softcap)
        return (log_pt - 0.01 * entropy).mean()

    got = torch.autograd.grad(step(x, w, bias), leaves)
    want_lp, want_h = reference.log_probs_and_entropy(x, w, t, bias, temperature=0.5, softcap=softcap)
    want = torch.autograd.grad(want_lp.mean() - 0.01 * want_h.mean(), leaves)
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32)


@pytest.mark.parametrize("grad", [True, False])
def test_return_top1_compiled(grad):
    """return_top1 inside torch.compile(fullgraph=True), with a gradient and under no_grad (where the forward op skips
    the ignored rows itself: its top1 output comes back in place too)."""
    x, w, t = make_case(12, 40, 16, ignore=(2, 3, 4, 5))
    t[0] = (x[0] @ w.t()).argmax()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w):
        return mk.log_probs_and_entropy(x, w, t, temperature=0.5, return_top1=True)

    with torch.set_grad_enabled(grad):
        log_pt, entropy, top1 = step(x, w)
    want = mk.log_probs_and_entropy(x.detach(), w.detach(), t, temperature=0.5, return_top1=True)
    torch.testing.assert_close((log_pt, entropy), want[:2])
    assert torch.equal(top1, want[2]) and top1[0] and not top1[2:6].any()
    if grad:
        torch.autograd.grad(log_pt.sum() + entropy.sum(), (x, w))


@pytest.mark.parametrize("temperature, exc, match", [
    (0.0, ValueError, "temperature must lie in"), (-1.0, ValueError, "temperature must lie in"),
    (1e-39, ValueError, "temperature must be ≥"),
    (float("nan"), ValueError, "temperature must be a finite"), (torch.tensor(1.0), TypeError, "temperature must be"),
])
def test_bad_temperature(temperature, exc, match):
    x, w, t = make_case(3, 5, 4)
    with pytest.raises(exc, match=match):
        mk.log_probs_and_entropy(x, w, t, temperature=temperature)
    if not isinstance(temperature, torch.Tensor):  # the op's schema itself turns a tensor into a float
        with pytest.raises(exc, match=match):
            torch.ops.marginkern.log_probs_entropy(x, w, t, temperature, -100)


@pytest.mark.parametrize("softcap, exc, match", [
    (0.0, ValueError, "softcap must lie in"), (-2.0, ValueError, "softcap must lie in"),
    (float("inf"), ValueError, "softcap must be a finite"), (torch.tensor(2.0), TypeError, "softcap must be"),
])
def test_bad_softcap(softcap, exc, match):
    x, w, t = make_case(3, 5, 4)
    with pytest.raises(exc, match=match):
        mk.log_probs_and_entropy(x, w, t, softcap=softcap)


def test_bad_bias():
    x, w, t = make_case(3, 5, 4)
    with pytest.raises(ValueError, match="bias"):
        mk.log_probs_and_entropy(x, w, t, torch.zeros(4))
    with pytest.raises(ValueError, match="bias"):
        torch.ops.marginkern.log_probs_entropy(x, w, t, 1.0, -100, None, False, torch.zeros(4))


def test_bad_targets_and_shapes():
    x, w, t = make_case(3, 5, 4)
    with pytest.raises(ValueError, match="target"):
        mk.log_probs_and_entropy(x, w, torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match="weight"):
        mk.log_probs_and_entropy(x, w[:, :3], t)
    with pytest.raises(ValueError, match="target must have shape"):
        mk.log_probs_and_entropy(x.view(1, 3, 4), w, t)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_both_cpu_backends_match_the_oracle(backend, monkeypatch):
    """The C++ kernels (csrc/cpu/log_probs_loss.cpp, the default on the CPU) and the PyTorch tiles."""
    if backend == "cpp":
        from marginkern import cpp_tiles
        if cpp_tiles.LOAD_ERROR is not None:
            pytest.skip(cpp_tiles.LOAD_ERROR)
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for head in HEADS:
            check_log_probs_against_oracle(dtype, (37, 301, 45), 0.7, "cpu", head=head)
    check_confident_and_flat_rows("cpu")


def test_forced_cuda_backend_refuses_with_a_reason(monkeypatch):
    monkeypatch.setenv("MARGINKERN_BACKEND", "cuda")
    x, w, t = make_case(4, 9, 4)
    with pytest.raises(BackendUnavailable, match="cuda"):
        mk.log_probs_and_entropy(x, w, t)
