"""Proxy-Anchor over many proxies, streamed over chunks of them (marginkern/proxy_anchor.py), against the official
code's formula (Proxy-Anchor-CVPR2020's losses.py, written out here in float64) and marginkern.reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import marginkern as mk
from marginkern import proxy_anchor, reference


def official_proxy_anchor(x, proxies, labels, margin=0.1, alpha=32.0):
    """The official implementation's arithmetic (tjddus9597/Proxy-Anchor-CVPR2020, code/losses.py): materialised
    cosines, masked sums of exponentials, log(1 + sum)."""
    cos = F.linear(F.normalize(x, dim=1), F.normalize(proxies, dim=1))
    positive = F.one_hot(labels, proxies.shape[0]).to(cos.dtype)
    pos_exp = torch.exp(-alpha * (cos - margin))
    neg_exp = torch.exp(alpha * (cos + margin))
    with_pos_proxies = torch.nonzero(positive.sum(dim=0) != 0).squeeze(dim=1)
    p_sim_sum = torch.where(positive == 1, pos_exp, torch.zeros_like(pos_exp)).sum(dim=0)
    n_sim_sum = torch.where(positive == 0, neg_exp, torch.zeros_like(neg_exp)).sum(dim=0)
    pos_term = torch.log(1 + p_sim_sum).sum() / len(with_pos_proxies)
    neg_term = torch.log(1 + n_sim_sum).sum() / proxies.shape[0]
    return pos_term + neg_term


@pytest.fixture(params=[None, 1], ids=["one-chunk", "many-chunks"])
def chunk_bytes(request, monkeypatch):
    """One chunk, or chunks of 4 proxies (the budget at its floor)."""
    if request.param is not None:
        monkeypatch.setattr(proxy_anchor, "CHUNK_BYTES", request.param)
        monkeypatch.setattr(proxy_anchor, "MIN_CHUNK_CLASSES", 4)


def case(N=37, C=53, D=24, dtype=torch.float64, seed=0, classes=None):
    """Embeddings, proxies and labels drawn from `classes` (default: a third of C, so that proxies have several
    positives, and most none), with one row whose label repeats another's."""
    torch.manual_seed(seed)
    x = torch.randn(N, D, dtype=torch.float64).to(dtype).requires_grad_()
    w = torch.randn(C, D, dtype=torch.float64).to(dtype).requires_grad_()
    t = torch.randint(0, classes or max(1, C // 3), (N,))
    return x, w, t


def grads(loss, x, w):
    return torch.autograd.grad(loss, (x, w))


@pytest.mark.parametrize("margin,alpha", [(0.1, 32.0), (0.0, 1.0), (-0.2, 64.0)], ids=["default", "plain", "wide"])
def test_matches_the_official_code(chunk_bytes, margin, alpha):
    x, w, t = case()
    loss = mk.proxy_anchor_loss(x, w, t, margin=margin, alpha=alpha)
    want = official_proxy_anchor(x, w, t, margin, alpha)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for got, expected in zip(grads(loss, x, w), grads(want, x, w)):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_reference_matches_the_official_code():
    x, w, t = case(seed=1)
    torch.testing.assert_close(reference.proxy_anchor_loss(x, w, t, class_chunk=7), official_proxy_anchor(x, w, t),
                               rtol=1e-12, atol=1e-12)


def grad_tolerance(device, dtype):
    """Of the gradients, relative to their largest entry: fp32 arithmetic (a relative 1e-7 of a cosine is 3e-6 of an
    α = 32 exponent), then stored in the inputs' dtype (one rounding: the dtype's eps covers it twice over); on a GPU
    bf16 inputs' dL/d(x·w) also goes into the backward GEMMs in bf16 (every term rounded)."""
    if dtype == torch.float32:
        return 2e-5
    return 2e-2 if torch.device(device).type == "cuda" and dtype == torch.bfloat16 else torch.finfo(dtype).eps


def check_proxy_anchor_matches_float64(device, dtype, N=70, C=300, D=40, seed=2):
    """Loss and gradients of low-precision inputs against the float64 definition of the same (rounded) inputs, with
    an ignored row, a third of the proxies with positives."""
    x, w, t = case(N=N, C=C, D=D, dtype=dtype, seed=seed)
    x, w, t = x.detach().to(device).requires_grad_(), w.detach().to(device).requires_grad_(), t.to(device)
    t[5] = -100
    loss = mk.proxy_anchor_loss(x, w, t)
    assert loss.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = reference.proxy_anchor_loss(x64, w64, t)
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=2e-5)
    for got, expected in zip(grads(loss, x, w), grads(want, x64, w64)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), expected, rtol=0,
                                   atol=grad_tolerance(device, dtype) * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_match_float64_of_the_same_inputs(chunk_bytes, dtype):
    check_proxy_anchor_matches_float64("cpu", dtype)


def test_ignored_rows_are_neither_positive_nor_negative(chunk_bytes):
    x, w, t = case(seed=3)
    t[[0, 4, 9]] = -1
    loss = mk.proxy_anchor_loss(x, w, t, ignore_index=-1)
    keep = t != -1
    x_kept = x.detach()[keep].clone().requires_grad_()
    want = official_proxy_anchor(x_kept, w, t[keep])
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    gx, gw = grads(loss, x, w)
    gx_want, gw_want = grads(want, x_kept, w)
    assert torch.all(gx[~keep] == 0)
    torch.testing.assert_close(gx[keep], gx_want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, gw_want, rtol=1e-10, atol=1e-12)


def test_edge_cases(chunk_bytes):
    # every row ignored, and no rows: 0 with zero gradients, still part of the graph
    for N in (5, 0):
        x, w, t = case(N=N)
        loss = mk.proxy_anchor_loss(x, w, torch.full((N,), -100))
        assert loss.item() == 0.0
        gx, gw = grads(loss, x, w)
        assert torch.all(gx == 0) and torch.all(gw == 0)
    # one proxy: every row is its positive, nothing is a negative; one label for the whole batch; every proxy with a
    # positive (37 rows, 37 proxies)
    for C, labels in ((1, torch.zeros(37, dtype=torch.long)), (53, torch.full((37,), 7)), (37, torch.arange(37))):
        x, w, _ = case(C=C)
        loss = mk.proxy_anchor_loss(x, w, labels)
        want = official_proxy_anchor(x, w, labels)
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
        for got, expected in zip(grads(loss, x, w), grads(want, x, w)):
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_narrow_integer_targets(dtype):
    x, w, t = case(C=20, seed=11)
    t = t % 20
    loss = mk.proxy_anchor_loss(x, w, t.to(dtype), ignore_index=255 if dtype == torch.uint8 else -100)
    want = mk.proxy_anchor_loss(x, w, t)
    assert torch.equal(loss, want)
    for got, expected in zip(grads(loss, x, w), grads(want, x, w)):
        assert torch.equal(got, expected)


def test_nan_in_an_ignored_row_stays_out_of_the_loss():
    """An ignored row is no negative: a NaN there (a padded sample) leaves the loss finite, as the Triton epilogue does
    and margin_cross_entropy; the other rows' gradients stay finite (the row's own is NaN·0 through its normalisation,
    and dW's GEMM multiplies its zero dL/ds by NaN, as everywhere in the library)."""
    x, w, t = case(seed=12)
    t[3] = -100
    with torch.no_grad():
        x[3] = float("nan")
    loss = mk.proxy_anchor_loss(x, w, t)
    keep = t != -100
    torch.testing.assert_close(loss, official_proxy_anchor(x.detach()[keep], w.detach(), t[keep]), rtol=1e-12,
                               atol=1e-12)
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gx[keep]).all()


def test_embedding_on_its_proxy_and_extreme_alpha():
    """Finite where the official code overflows: e^{α(s + δ)} at α = 1000 is inf in float64 (log-sum-exps here)."""
    x, w, t = case(seed=4)
    with torch.no_grad():
        x[0] = w[t[0]] * 3.0  # cos = 1 with its own proxy (up to rounding)
        x[1] = w[(t[1] + 1) % w.shape[0]]  # and with another one: e^{1000·1.1} overflows
    loss = mk.proxy_anchor_loss(x, w, t, alpha=1000.0)
    assert torch.isfinite(loss)
    assert not torch.isfinite(official_proxy_anchor(x, w, t, alpha=1000.0))
    assert all(torch.isfinite(g).all() for g in grads(loss, x, w))
    torch.testing.assert_close(loss, reference.proxy_anchor_loss(x, w, t, alpha=1000.0), rtol=1e-12, atol=1e-9)


def test_nan_embedding_stays_nan():
    x, w, t = case(seed=5)
    with torch.no_grad():
        x[2, 0] = float("nan")
    assert torch.isnan(mk.proxy_anchor_loss(x, w, t))


def test_gradcheck():
    x, w, t = case(N=9, C=13, D=5, seed=6)
    t[1] = -100
    assert torch.autograd.gradcheck(lambda a, b: mk.proxy_anchor_loss(a, b, t), (x, w))


def test_frozen_proxies_or_embeddings():
    x, w, t = case(seed=7)
    loss = mk.proxy_anchor_loss(x.detach(), w, t)
    (gw,) = torch.autograd.grad(loss, w)
    torch.testing.assert_close(gw, grads(mk.proxy_anchor_loss(x, w, t), x, w)[1])
    loss = mk.proxy_anchor_loss(x, w.detach(), t)
    (gx,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(gx, grads(mk.proxy_anchor_loss(x, w, t), x, w)[0])


def test_upstream_gradient_scales():
    x, w, t = case(seed=8)
    loss = mk.proxy_anchor_loss(x, w, t)
    gx, gw = torch.autograd.grad(loss * 0.37, (x, w))
    gx1, gw1 = grads(mk.proxy_anchor_loss(x, w, t), x, w)
    torch.testing.assert_close(gx, 0.37 * gx1)
    torch.testing.assert_close(gw, 0.37 * gw1)


def test_module_trains_and_matches_the_function():
    torch.manual_seed(9)
    head = mk.ProxyAnchorLoss(16, 40)
    # the official initialisation: kaiming_normal_(mode="fan_out") of a (C, D) tensor has std sqrt(2 / C)
    assert abs(head.proxies.std().item() - math.sqrt(2 / 40)) < 0.03
    x = torch.randn(32, 16, requires_grad=True)
    labels = torch.randint(0, 40, (32,))
    loss = head(x, labels)
    torch.testing.assert_close(loss, mk.proxy_anchor_loss(x, head.proxies, labels))
    loss.backward()
    assert head.proxies.grad is not None and x.grad is not None
    assert "margin=0.1, alpha=32.0" in repr(head)
    # a few steps separate the classes: the loss falls
    embeddings = torch.nn.Parameter(torch.randn(32, 16))
    optimizer = torch.optim.SGD([embeddings, head.proxies], lr=0.5)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        step_loss = head(embeddings, labels)
        first = step_loss.item() if first is None else first
        step_loss.backward()
        optimizer.step()
    assert step_loss.item() < 0.5 * first


def test_module_casts_its_proxies_to_the_embeddings_dtype():
    head = mk.ProxyAnchorLoss(8, 12)
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    loss = head(x, torch.randint(0, 12, (6,)))
    assert loss.dtype == torch.float64
    loss.backward()
    assert head.proxies.grad.dtype == torch.float32


def test_opcheck_and_compile():
    x, w, t = case(N=11, C=17, D=6, dtype=torch.float32, seed=10)
    t[2] = -100
    torch.library.opcheck(torch.ops.marginkern.proxy_anchor, (x, w, t, 0.1, 32.0, -100))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b, c: mk.proxy_anchor_loss(a, b, c), fullgraph=True, backend="aot_eager")
    loss = compiled(x, w, t)
    torch.testing.assert_close(loss, mk.proxy_anchor_loss(x, w, t))
    for got, want in zip(grads(loss, x, w), grads(mk.proxy_anchor_loss(x, w, t), x, w)):
        torch.testing.assert_close(got, want)


def test_bad_arguments_are_named():
    x, w, t = case(N=4, C=5, D=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="target holds class 5"):
        mk.proxy_anchor_loss(x, w, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="proxies must have shape"):
        mk.proxy_anchor_loss(x, w[:, :2], t)
    with pytest.raises(TypeError, match="proxies must have the dtype"):
        mk.proxy_anchor_loss(x, w.double(), t)
    with pytest.raises(ValueError, match="alpha"):
        mk.proxy_anchor_loss(x, w, t, alpha=0.0)
    with pytest.raises(ValueError, match="margin"):
        mk.proxy_anchor_loss(x, w, t, margin=float("nan"))
    with pytest.raises(TypeError, match="target"):
        mk.proxy_anchor_loss(x, w, t.float())
    with pytest.raises(ValueError, match="embedding"):
        mk.ProxyAnchorLoss(3, 5)(torch.randn(4, 2), t)


def test_chunks_tile_the_proxies():
    chunks = proxy_anchor.proxy_chunks(1024, 1_000_000, 512, 4)
    assert chunks[0][0] == 0 and chunks[-1][1] == 1_000_000 and all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) > 1


def _malloc_live_bytes():
    """Bytes glibc's malloc holds for the process now (PyTorch's CPU allocator frees to malloc): mallinfo2; None
    without it."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                         "fsmblks", "uordblks", "fordblks", "keepcost")]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        return None
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


class _PeakMalloc(TorchDispatchMode):
    """Malloc's live bytes after every ATen op (not inside one: an op's own temporaries are not seen), the peak
    relative to entering the mode."""

    def __enter__(self):
        self.base, self.peak = _malloc_live_bytes(), 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _malloc_live_bytes() - self.base)
        return out


FREED_CASE = dict(N=2048, D=64, C=20_000)  # N ≫ D: a second N × chunk tensor stands out above the chunk × D ones


def measure_chunk_peaks(dtype_name):
    """(forward peak, backward peak beyond its outputs) in bytes of FREED_CASE in `dtype_name`, after a warm-up (a
    dispatch mode's first use and BLAS's buffers allocate once); None when malloc's counters do not see PyTorch's
    allocations. Run in a fresh process (test_cpu_chunks_are_freed_before_the_next): in one that ran many tests the
    probe below was seen to fail."""
    if _malloc_live_bytes() is None:
        return None
    dtype = getattr(torch, dtype_name)
    N, D, C = FREED_CASE["N"], FREED_CASE["D"], FREED_CASE["C"]
    torch.manual_seed(0)
    x, w, t = torch.randn(N, D).to(dtype), torch.randn(C, D).to(dtype), torch.randint(0, C, (N,))
    with _PeakMalloc() as probe:
        torch.empty(4 << 20, dtype=torch.uint8).fill_(1)
    if probe.peak < 4 << 20:
        return None
    with _PeakMalloc():  # warm-up
        outputs = proxy_anchor.proxy_anchor_forward(x, w, t, 0.1, 32.0, -100)
        proxy_anchor.proxy_anchor_backward(torch.ones(()), x, w, t, *outputs[1:], 0.1, 32.0, -100)
    with _PeakMalloc() as forward:
        proxy_anchor.proxy_anchor_forward(x, w, t, 0.1, 32.0, -100)
    with _PeakMalloc() as backward:
        gx, gw = proxy_anchor.proxy_anchor_backward(torch.ones(()), x, w, t, *outputs[1:], 0.1, 32.0, -100)
    outputs_bytes = gx.numel() * gx.element_size() + gw.numel() * gw.element_size() + 4 * N * D  # and dX's fp32 sum
    return forward.peak, backward.peak - outputs_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_chunks_are_freed_before_the_next(dtype):
    """Between ATen ops at most one chunk's N × chunk tensor is alive (the previous chunk's freed before the next GEMM),
    plus bf16 proxies' fp32 copy for the GEMM, and in the backward pass the chunk's dW rows and their finishing (2
    chunk × D tensors in fp32; 4 with bf16 weights), beside O(N + C) vectors and the outputs. Measured in a fresh
    process (measure_chunk_peaks)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = str(Path(__file__).resolve().parents[1])
    script = (f"import json, sys; sys.path.insert(0, {root!r}); from tests.test_proxy_anchor import measure_chunk_peaks; "
              f"print(json.dumps(measure_chunk_peaks({str(dtype).split('.')[-1]!r})))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    if peaks is None:
        pytest.skip("malloc's counters do not see PyTorch's allocations here (no glibc mallinfo2, or another allocator)")
    forward_peak, backward_peak = peaks
    N, D, C = FREED_CASE["N"], FREED_CASE["D"], FREED_CASE["C"]
    upcast = int(dtype != torch.float32)  # the GEMMs' fp32 copy of a chunk of bf16 proxies
    forward_chunk = proxy_anchor.proxy_chunks(N, C, D, 4, weight_rows=upcast)[0][1]
    backward_chunk = proxy_anchor.proxy_chunks(N, C, D, 4, weight_rows=4)[0][1]
    assert C // backward_chunk > 3
    # (N,) and (C,) vectors, x's fp32 copy, and 2 MB for malloc's bookkeeping and small tensors (a chunk kept alive too
    # long is 8 MB here)
    vectors = 8 * 4 * (N + C) + (4 * N * D if upcast else 0) + (2 << 20)
    assert forward_peak <= 4 * N * forward_chunk + upcast * 4 * forward_chunk * D + vectors, forward_peak / 2**20
    weight_rows = (2 if dtype == torch.float32 else 4) * 4 * backward_chunk * D
    assert backward_peak <= 4 * N * backward_chunk + weight_rows + vectors, backward_peak / 2**20
