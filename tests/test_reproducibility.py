"""Every loss gives bit-identical values and gradients when called again on the same inputs, and the same bits under
torch.use_deterministic_algorithms(True): that mode makes torch.empty (in Python and in C++) fill new tensors with
NaN, so a kernel that reads memory it never wrote, or adds a 0·garbage term, shows as a difference here (and an op
that has no deterministic implementation raises). Duplicate targets in every batch: atomics or index_add_ over the
same class would be where run-to-run differences come from on a GPU (tests/test_gpu.py runs these steps there)."""
import pytest
import torch

import marginkern as mk
from marginkern.dispatch import _why_not


def _case(device, dtype, N=23, C=157, D=24, duplicates=True):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype).to(device)
    w = torch.randn(C, D, generator=g, dtype=torch.float64).mul(0.5).to(dtype).to(device)
    t = torch.randint(0, C, (N,), generator=g)
    if duplicates:
        t[1::3] = t[0]  # one class is the target of a third of the rows
    t[2] = -100
    return x, w, t.to(device)


def _margin(device, dtype, **opts):
    x, w, t = _case(device, dtype)
    return (x, w), lambda x, w: mk.margin_cross_entropy(x, w, t, **opts)


def _subcenters(device, dtype, K=3):
    x, w, t = _case(device, dtype, C=53 * K)
    return (x, w), lambda x, w: mk.margin_cross_entropy(x, w, torch.where(t >= 0, t % 53, t), subcenters=K)


def _linear(device, dtype, **opts):
    x, w, t = _case(device, dtype)
    b = torch.linspace(-1, 1, w.shape[0], dtype=torch.float64).to(dtype).to(device)
    if opts.pop("class_weight", False):
        opts["class_weight"] = torch.linspace(0.5, 2.0, w.shape[0], device=device)
    return (x, w, b), lambda x, w, b: mk.linear_cross_entropy(x, w, t, b, **opts)


def _emo(device, dtype, fn):
    x, w, t = _case(device, dtype)
    return (x, w), lambda x, w: fn(x, w, t)


def _log_probs(device, dtype):
    x, w, t = _case(device, dtype)
    return (x, w), lambda x, w: sum(o.pow(2).sum() for o in mk.log_probs_and_entropy(x, w, t, temperature=0.7))


def _distill(device, dtype, fn, **opts):
    x, w, t = _case(device, dtype)
    xt, wt, _ = _case(device, dtype, D=17)
    return (x, w), lambda x, w: fn(x, w, xt, wt.flip(0), t, **opts)


def _contrastive(device, dtype, fn, **opts):
    """Queries against more keys (hard negatives), a learned scale."""
    x, w, _ = _case(device, dtype)
    scale = torch.tensor(7.0, device=device)
    if "margin" in opts:
        return (x, w), lambda x, w: fn(x, w, scale=7.0, **opts)
    return (x, w, scale), lambda x, w, s: fn(x, w, scale=s, **opts)


def _supcon(device, dtype):
    x, _, _ = _case(device, dtype)
    labels = torch.arange(x.shape[0], device=device) % 5  # repeated labels: index_add_ over the same class
    return (x,), lambda x: mk.supcon_loss(x, labels, temperature=0.2)


def _topk(device, dtype):
    x, w, t = _case(device, dtype)
    a = t.clamp_min(0)  # listed three times in each row, and the rows share classes (duplicate targets)
    ids = torch.stack([a, (a + 7) % w.shape[0], a, a], 1)
    logits = torch.linspace(-2, 3, ids.numel(), dtype=torch.float64).reshape(ids.shape).to(dtype).to(device)
    return (x, w), lambda x, w: mk.linear_topk_kl_divergence(x, w, ids, logits, t)


def _pairwise(device, dtype, which):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 16, generator=g, dtype=torch.float64).to(dtype).to(device)
    b = torch.randn(40, 16, generator=g, dtype=torch.float64).to(dtype).to(device)
    labels = torch.randint(0, 4, (40,), generator=g).to(device)
    if which == "cosent":
        return (a, b), lambda a, b: mk.cosent_embedding_loss(a, b, labels.to(a.dtype))
    if which == "zlpr":
        targets = (torch.rand(40, 16, generator=g) < 0.2).to(device)
        return (a,), lambda a: mk.multilabel_categorical_crossentropy(a, targets)
    if which == "sparse zlpr":
        positives = torch.randint(0, 16, (40, 3), generator=g).to(device)
        return (a,), lambda a: mk.sparse_multilabel_categorical_crossentropy(a, positives)
    return (a,), lambda a: mk.circle_loss(a, labels, anchor_block=16)


def _global_pointer(device, dtype):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 20, 4, 8, generator=g, dtype=torch.float64).to(dtype).to(device)
    k = torch.randn(3, 20, 4, 8, generator=g, dtype=torch.float64).to(dtype).to(device)
    mask = (torch.arange(20) < torch.tensor([[20], [13], [7]])).to(device)
    positives = torch.randint(0, 400, (3, 4, 5), generator=g).to(device)
    return (q, k), lambda q, k: mk.global_pointer_loss(q, k, positives, mask=mask)


STEPS = {
    "arcface": lambda d, t: _margin(d, t),
    "cosface+smoothing": lambda d, t: _margin(d, t, m2=0.0, m3=0.35, label_smoothing=0.1),
    "lsoftmax": lambda d, t: _margin(d, t, m1=2.0, m2=0.0, scale=1.0, normalize=False),
    "subcenters": lambda d, t: _subcenters(d, t),
    "linear ce": lambda d, t: _linear(d, t),
    "linear ce, every term": lambda d, t: _linear(d, t, label_smoothing=0.1, z_loss=1e-3, softcap=20.0,
                                                  focal_gamma=1.5),
    "linear ce, class weights": lambda d, t: _linear(d, t, label_smoothing=0.1, class_weight=True),
    "linear ce, 3-GEMM": lambda d, t: _linear(d, t, logits_buffer_mb=0.01),
    "linear ce, filtered": lambda d, t: _linear(d, t, grad_filter_eps=1e-3),
    "emo": lambda d, t: _emo(d, t, mk.emo_loss),
    "emo + ce": lambda d, t: _emo(d, t, mk.emo_cross_entropy),
    "log-probs and entropy": _log_probs,
    "kl": lambda d, t: _distill(d, t, mk.linear_kl_divergence, direction="reverse", temperature=2.0),
    "jsd": lambda d, t: _distill(d, t, mk.linear_jsd, beta=0.3),
    "top-k kl": _topk,
    "cosent": lambda d, t: _pairwise(d, t, "cosent"),
    "zlpr": lambda d, t: _pairwise(d, t, "zlpr"),
    "sparse zlpr": lambda d, t: _pairwise(d, t, "sparse zlpr"),
    "global pointer": lambda d, t: _global_pointer(d, t),
    "circle": lambda d, t: _pairwise(d, t, "circle"),
    "proxy anchor": lambda d, t: _emo(d, t, mk.proxy_anchor_loss),
    "siglip": lambda d, t: _contrastive(d, t, mk.siglip_loss, bias=-3.0),
    "clip": lambda d, t: _contrastive(d, t, mk.info_nce_loss, symmetric=True, label_smoothing=0.1),
    "mnrl": lambda d, t: _contrastive(d, t, mk.info_nce_loss, margin=0.2),
    "supcon": lambda d, t: _supcon(d, t),
}


def step_outputs(name, device, dtype):
    """(loss, gradient of each input) of one call of the step."""
    inputs, fn = STEPS[name](device, dtype)
    inputs = [i.detach().requires_grad_() for i in inputs]
    loss = fn(*inputs)
    return (loss.detach(),) + torch.autograd.grad(loss, inputs)


# Steps that add into the same rows of a tensor with torch's index_add_/scatter_add_ (L-Softmax's radial dW term; a
# top-k teacher's repeated tokens and classes; Proxy-Anchor's per-class sums of its rows' positive terms; SupCon's
# per-class sums of its unit rows): on CUDA those
# use atomics unless deterministic mode is on.
USES_TORCH_ATOMICS = {"lsoftmax", "top-k kl", "proxy anchor", "supcon"}


def check_reproducible(name, device, dtype):
    """Two calls give the same bits, and the same as a call in deterministic mode; on CUDA, the steps of
    USES_TORCH_ATOMICS only in deterministic mode (two calls there)."""
    def deterministic_call():
        try:
            torch.use_deterministic_algorithms(True)  # and torch.empty fills NaN (fill_uninitialized_memory)
            return step_outputs(name, device, dtype)
        finally:
            torch.use_deterministic_algorithms(False)

    atomics = torch.device(device).type == "cuda" and name in USES_TORCH_ATOMICS
    first = deterministic_call() if atomics else step_outputs(name, device, dtype)
    again = deterministic_call() if atomics else step_outputs(name, device, dtype)
    deterministic = deterministic_call()
    for what, a, b, c in zip(("loss",) + tuple(f"grad {i}" for i in range(len(first) - 1)), first, again,
                             deterministic):
        assert torch.isfinite(a).all(), (name, what)
        assert torch.equal(a, b), f"{name}: {what} differs between two calls"
        assert torch.equal(a, c), f"{name}: {what} differs under torch.use_deterministic_algorithms(True)"


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", sorted(STEPS))
def test_bit_identical_again_and_in_deterministic_mode(name, dtype, backend, monkeypatch):
    if backend == "cpp" and _why_not("cpp", torch.device("cpu"), dtype):
        pytest.skip(_why_not("cpp", torch.device("cpu"), dtype))
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_reproducible(name, "cpu", dtype)


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", sorted(STEPS))
def test_activation_checkpointing_gives_the_same_bits(name, use_reentrant, monkeypatch):
    """torch.utils.checkpoint drops what the loss saved and reruns its forward pass in the backward (whole training
    steps are often checkpointed with the head inside): loss and gradients equal the plain call's, bit for bit."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.setenv("MARGINKERN_BACKEND", "cpp" if not _why_not("cpp", torch.device("cpu"), torch.float32)
                       else "reference")
    plain = step_outputs(name, "cpu", torch.float32)
    inputs, fn = STEPS[name]("cpu", torch.float32)
    inputs = [i.detach().requires_grad_() for i in inputs]
    loss = checkpoint(fn, *inputs, use_reentrant=use_reentrant)
    loss.backward()  # the reentrant form takes no autograd.grad
    assert torch.equal(loss.detach(), plain[0]), name
    for i, (want, got) in enumerate(zip(plain[1:], inputs)):
        assert torch.equal(got.grad, want), f"{name}: grad {i}"
