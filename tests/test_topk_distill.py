"""Top-k distillation (linear_topk_kl_divergence): the teacher as its top-k token ids and logits per position,
against the materialised float64 definition and the streamed oracle on every CPU backend, the identity with plain
cross-entropy at k = 1, autograd, edge cases, opcheck, compile, errors. The Triton twin is
tests/interpreter/test_triton_topk_distill.py."""
import pytest
import torch

import marginkern as mk
from marginkern import reference
from tests.helpers import assert_close_rel, make_case


def topk_case(N, C, D, k, dtype=torch.float32, device="cpu", scale=2.0, seed=0):
    """Student rows and head, and a teacher's top-k: distinct token ids per row and their logits."""
    torch.manual_seed(seed)
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(1,) if N > 2 else ())
    ids = torch.stack([torch.randperm(C)[:k] for _ in range(N)]) if N else torch.zeros(0, k, dtype=torch.int64)
    logits = (torch.randn(N, k, dtype=torch.float64) * scale).to(dtype)
    return x, w, t, ids.to(device), logits.to(device)


def materialised(x, w, ids, logits, t, temperature=1.0, ignore_index=-100):
    log_p = torch.log_softmax((x.double() @ w.double().t()) / temperature, dim=1)
    log_q = torch.log_softmax(logits.double() / temperature, dim=1)
    kl = (log_q.exp() * (log_q - log_p.gather(1, ids))).sum(1)
    return torch.where(t != ignore_index, kl, 0.0)


def kl_and_grads(fn, x, w, ids, logits, t, upstream, **kw):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    kl = fn(x, w, ids, logits, t, **kw) if fn is materialised else fn(x, w, ids, logits, t, reduction="none", **kw)
    gx, gw = torch.autograd.grad((kl.double() * upstream).sum(), (x, w))
    return kl.detach(), gx, gw


def check_against_oracle(dtype, shape, device, temperature=0.8):
    N, C, D, k = shape
    x, w, t, ids, logits = topk_case(N, C, D, k, dtype, device)
    upstream = torch.randn(N, dtype=torch.float64)
    got = kl_and_grads(mk.linear_topk_kl_divergence, x, w, ids, logits, t, upstream.to(device),
                       temperature=temperature)
    want = kl_and_grads(reference.linear_topk_kl_divergence, *(v.double().cpu() for v in (x, w)), ids.cpu(),
                        logits.double().cpu(), t.cpu(), upstream, temperature=temperature)
    for name, g, e in zip(("kl", "grad input", "grad weight"), got, want):
        assert_close_rel(g, e, dtype, name, floor=1.0)


def test_oracle_matches_materialised_definition():
    x, w, t, ids, logits = topk_case(13, 50, 7, 6, torch.float64)
    upstream = torch.randn(13, dtype=torch.float64)
    got = kl_and_grads(lambda *a, **k: reference.linear_topk_kl_divergence(*a, class_chunk=9, **k), x, w, ids, logits,
                       t, upstream, temperature=1.7)
    want = kl_and_grads(materialised, x, w, ids, logits, t, upstream, temperature=1.7)
    for g, e in zip(got, want):
        assert torch.allclose(g, e, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 301, 45, 8), (3, 2, 4, 2), (1, 5, 3, 1), (19, 65, 16, 65)])
def test_op_matches_oracle(cpu_backend, dtype, shape):
    check_against_oracle(dtype, shape, "cpu")


def test_small_class_chunks(monkeypatch):
    """Many class chunks on the PyTorch tiles: each chunk's G takes only the cells whose token lies in it."""
    from marginkern.engine import TorchTiles
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    monkeypatch.setattr(TorchTiles, "class_chunks", lambda self, N, C, x, bytes_per_class=0:
                        [(c0, min(C, c0 + 7)) for c0 in range(0, C, 7)])
    check_against_oracle(torch.float64, (9, 50, 6, 5), "cpu")


def test_one_token_is_cross_entropy(cpu_backend):
    """k = 1: q is one-hot on the teacher's token, KL(q‖p) = −log p_token: linear_cross_entropy with that target."""
    x, w, t, ids, logits = topk_case(11, 40, 8, 1)
    got = kl_and_grads(mk.linear_topk_kl_divergence, x, w, ids, logits, t, torch.ones(11))
    ce_target = torch.where(t == -100, -100, ids[:, 0])
    want = kl_and_grads(lambda x, w, *_, **kw: mk.linear_cross_entropy(x, w, ce_target, **kw), x, w, ids, logits, t,
                        torch.ones(11))
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32, floor=1.0)


def test_teacher_gets_no_gradient_token_shapes_shift_and_mean():
    x, w, t, ids, logits = topk_case(12, 40, 8, 4)
    logits.requires_grad_()
    t_all = torch.zeros_like(t)  # every row counts (with shift, row i takes row i + 1's mask)
    got = mk.linear_topk_kl_divergence(x.view(3, 4, 8), w, ids.view(3, 4, 4), logits.view(3, 4, 4),
                                       t_all.view(3, 4), reduction="none", shift=1)
    want = mk.linear_topk_kl_divergence(x, w, ids, logits, t_all, reduction="none").view(3, 4)
    assert got.shape == (3, 4) and (got[:, -1] == 0).all()
    torch.testing.assert_close(got[:, :-1], want[:, :-1])
    loss = mk.linear_topk_kl_divergence(x, w, ids, logits, t)
    loss.backward()
    assert logits.grad is None
    rows = materialised(x, w, ids, logits.detach(), t)
    assert_close_rel(loss, rows.sum() / 11, torch.float32)  # row 1 is ignored


def test_empty_and_all_ignored():
    x, w, t, ids, logits = topk_case(0, 10, 4, 3)
    assert mk.linear_topk_kl_divergence(x, w, ids, logits, t).item() == 0.0
    x, w, t, ids, logits = topk_case(5, 10, 4, 3)
    t[:] = -100
    kl = mk.linear_topk_kl_divergence(x, w, ids, logits, t)
    gx, gw = torch.autograd.grad(kl, (x, w))
    assert kl.item() == 0.0 and (gx == 0).all() and (gw == 0).all()


def test_teacher_equal_to_student_on_its_support_is_zero_only_if_the_mass_is_all_there():
    """KL(q‖p) is 0 exactly when p puts all its mass on the k tokens as q does: a student whose other logits are
    −inf-like (far below) gives ≈ 0 and no gradient."""
    x, w, t, ids, _ = topk_case(6, 30, 5, 4)
    x = x.detach().double()
    w = w.detach().double()
    z = x @ w.t()
    student = torch.full_like(z, -1e4).scatter(1, ids, z.gather(1, ids))  # the student's logits: only the k tokens
    eye = torch.eye(30, dtype=torch.float64)
    kl = mk.linear_topk_kl_divergence(student, eye, ids, z.gather(1, ids), t, reduction="none")
    assert kl.abs().max() < 1e-10


def test_gradcheck_float64():
    x, w, t, ids, logits = topk_case(5, 11, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w: mk.linear_topk_kl_divergence(x, w, ids, logits, t, temperature=0.9, reduction="none"), (x, w))


def test_opcheck():
    x, w, t, ids, logits = topk_case(7, 33, 8, 5)
    torch.library.opcheck(torch.ops.marginkern.linear_topk_kl_divergence, (x, w, ids, logits, t, 0.7, -100))
    _, lse = torch.ops.marginkern.linear_topk_kl_divergence(x, w, ids, logits, t, 0.7, -100)
    torch.library.opcheck(torch.ops.marginkern.linear_topk_kl_divergence_backward,
                          (torch.randn(7), x.detach(), w.detach(), ids, logits, t, lse.detach(), 0.7, -100, True))


def test_torch_compile_fullgraph():
    x, w, t, ids, logits = topk_case(9, 40, 16, 5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, w):
        return mk.linear_topk_kl_divergence(x, w, ids, logits, t, temperature=2.0) * 4.0

    got = torch.autograd.grad(step(x, w), (x, w))
    want = torch.autograd.grad(reference.linear_topk_kl_divergence(x, w, ids, logits, t, temperature=2.0) * 4.0,
                               (x, w))
    for g, e in zip(got, want):
        assert_close_rel(g, e, torch.float32)


def test_bad_arguments():
    x, w, t, ids, logits = topk_case(3, 5, 4, 2)
    with pytest.raises(ValueError, match=r"teacher_token_ids holds token 5, outside \[0, 5\)"):
        mk.linear_topk_kl_divergence(x, w, torch.full_like(ids, 5), logits, t)
    with pytest.raises(ValueError, match=r"teacher_token_ids holds token -1"):
        mk.linear_topk_kl_divergence(x, w, torch.full_like(ids, -1), logits, t)
    with pytest.raises(ValueError, match=r"teacher_token_ids must have shape \(N=3, k\)"):
        mk.linear_topk_kl_divergence(x, w, ids[:2], logits[:2], t)
    with pytest.raises(ValueError, match=r"teacher_logits must have teacher_token_ids' shape"):
        mk.linear_topk_kl_divergence(x, w, ids, logits[:, :1], t)
    with pytest.raises(TypeError, match="teacher_token_ids must be an integer tensor"):
        mk.linear_topk_kl_divergence(x, w, ids.float(), logits, t)
    with pytest.raises(TypeError, match="teacher_logits must be a floating-point tensor"):
        mk.linear_topk_kl_divergence(x, w, ids, ids, t)
    with pytest.raises(ValueError, match="temperature must lie in"):
        mk.linear_topk_kl_divergence(x, w, ids, logits, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"teacher_token_ids must have shape \(1, 3\) \+ \(k,\)"):
        mk.linear_topk_kl_divergence(x.view(1, 3, 4), w, ids.view(3, 1, 2), logits.view(3, 1, 2), t.view(1, 3))


def merged_definition(x, w, ids, logits, t, temperature=1.0):
    """The float64 definition with q as a distribution over tokens: a token listed twice counts with its summed
    probability (a dense (N, C) Q by scatter_add), 0·log 0 = 0."""
    log_p = torch.log_softmax((x.double() @ w.double().t()) / temperature, dim=1)
    q = torch.softmax(logits.double() / temperature, dim=1)
    big_q = torch.zeros_like(log_p).scatter_add(1, ids, q)
    safe = torch.where(big_q > 0, big_q, 1.0)
    kl = torch.where(big_q > 0, big_q * (torch.log(safe) - log_p), 0.0).sum(1)
    return torch.where(t != -100, kl, 0.0)


def test_repeated_tokens_count_with_their_summed_probability(cpu_backend):
    """A token listed twice in a row (a padded cache, or a bad one): the loss is the KL of the merged distribution
    (≥ 0; the per-entry sum was clamped to 0 while its gradient was not, found by a review), and so are both
    gradients, on every backend."""
    x, w, t, ids, logits = topk_case(8, 20, 6, 5, torch.float64)
    ids[0] = torch.tensor([3, 3, 7, 3, 9])
    ids[2] = torch.tensor([0, 19, 0, 19, 5])
    logits[2, 2] = -float("inf")  # a padded entry: q = 0 on a repeated token
    upstream = torch.randn(8, dtype=torch.float64)
    got = kl_and_grads(mk.linear_topk_kl_divergence, x, w, ids, logits, t, upstream)
    want = kl_and_grads(lambda x, w, ids, logits, t, reduction: merged_definition(x, w, ids, logits, t), x, w, ids,
                        logits, t, upstream)
    for name, g, e in zip(("kl", "grad input", "grad weight"), got, want):
        assert torch.allclose(g, e, atol=1e-10), name
    assert (got[0] >= 0).all()
    oracle = reference.linear_topk_kl_divergence(x.double(), w.double(), ids, logits, t, reduction="none")
    assert torch.allclose(oracle, want[0], atol=1e-12)


def test_ignored_row_with_a_fully_masked_teacher_adds_nothing(cpu_backend):
    """An ignored (padding) row whose cached teacher logits are all −inf (a NaN softmax): no NaN in the loss or either
    gradient (under GradScaler it would skip every step; found by a review)."""
    x, w, t, ids, logits = topk_case(6, 20, 5, 4)
    t[3] = -100
    logits[3] = -float("inf")
    kl, gx, gw = kl_and_grads(mk.linear_topk_kl_divergence, x, w, ids, logits, t, torch.ones(6))
    assert torch.isfinite(kl).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert (gx[3] == 0).all()


def test_unsigned_token_ids():
    x, w, t, ids, logits = topk_case(5, 20, 4, 3)
    want = mk.linear_topk_kl_divergence(x, w, ids, logits, t)
    for dtype in (torch.uint8, torch.int32, torch.uint32):
        assert torch.equal(mk.linear_topk_kl_divergence(x, w, ids.to(dtype), logits, t), want)


def check_converged_student_at_one_token(device, dtype):
    """k = 1 with p_token → 1 (a converged student) in 16-bit: the cell's total g·(p − 1) is written whole into G,
    not −q added onto an already rounded p (1 − p cancelled: 50% off in fp16, found by a review); as good as
    linear_cross_entropy's own target column."""
    torch.manual_seed(4)
    N, C, D = 16, 300, 32
    w = torch.randn(C, D)
    tokens = torch.randint(0, C, (N,))
    x = 0.6 * w[tokens] * torch.linspace(1.5, 2.5, N)[:, None] + 0.05 * torch.randn(N, D)
    x, w = x.to(dtype).to(device), (w * 0.6).to(dtype).to(device)
    ids, logits, t = tokens[:, None].to(device), torch.zeros(N, 1, device=device), torch.zeros(N, dtype=torch.int64)
    upstream = torch.ones(N, dtype=torch.float64)
    got = kl_and_grads(mk.linear_topk_kl_divergence, x, w, ids, logits, t.to(device), upstream.to(device))
    ce = kl_and_grads(lambda x, w, *_, **kw: mk.linear_cross_entropy(x, w, tokens.to(device), **kw), x, w, ids, logits,
                      t, upstream.to(device))
    want = kl_and_grads(materialised, x.double().cpu(), w.double().cpu(), ids.cpu(), logits.double().cpu(), t, upstream)
    p_token = torch.exp(-want[0])
    assert p_token.min() > 0.99 and p_token.median() > 0.999, p_token  # the rows this is about
    for name, g, c, e in zip(("grad input", "grad weight"), got[1:], ce[1:], want[1:]):
        err = ((g.double().cpu() - e).abs().max() / e.abs().max()).item()
        ce_err = ((c.double().cpu() - e).abs().max() / e.abs().max()).item()
        assert err < 2 * ce_err + 1e-6, (name, err, ce_err)


def test_converged_student_at_one_token(cpu_backend):
    check_converged_student_at_one_token("cpu", torch.float32)
