"""Shared test helpers: random cases, gradients, dtype-justified tolerances, memory probes in a fresh process."""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The host C++ compiler and what torch >= 2.14's headers say when compiled as C++17 (tests/test_cpp_standard.py,
# tests/test_cuda_sources.py)
CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
TORCH_REFUSES_CPP17 = "C++20 or later compatible compiler is required"


def _triton_unsupported(interpreter):
    """Why the Triton kernels cannot be tested here (not installed, or older than dispatch.MIN_TRITON for the compiler,
    MIN_TRITON_INTERPRETER for its interpreter), or None; read from the package's metadata, without importing triton
    (the interpreter's switch is read at its import)."""
    from importlib.metadata import PackageNotFoundError, version
    from marginkern.dispatch import interpreter_version_reason, triton_version_reason
    for distribution in ("triton", "pytorch-triton"):  # (the latter: torch nightlies' build of Triton)
        try:
            return (interpreter_version_reason if interpreter else triton_version_reason)(version(distribution))
        except PackageNotFoundError:
            pass
    return "triton is not installed"


TRITON_COMPILER_UNSUPPORTED = _triton_unsupported(interpreter=False)
TRITON_INTERPRETER_UNSUPPORTED = _triton_unsupported(interpreter=True)
needs_triton_interpreter = pytest.mark.skipif(TRITON_INTERPRETER_UNSUPPORTED is not None,
                                              reason=str(TRITON_INTERPRETER_UNSUPPORTED))

# A memory probe's measuring functions (prepended to its code by run_python(..., peak_memory=True)): resident memory
# now, the high-water mark and its reset (/proc/self/clear_refs), or ru_maxrss where those are missing (an
# overestimate: the process's whole-life peak).
PEAK_MEMORY = """
import resource

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False

def peak():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""


def run_python(code, timeout=600, peak_memory=False):
    """Runs `code` (after PEAK_MEMORY's functions with peak_memory=True) in a fresh interpreter at the repository root,
    without MARGINKERN_BACKEND and TRITON_INTERPRET; returns its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k not in ("MARGINKERN_BACKEND", "TRITON_INTERPRET")}
    code = (PEAK_MEMORY if peak_memory else "") + textwrap.dedent(code)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def make_case(N, C, D, dtype=torch.float32, device="cpu", ignore=(), ignore_index=-100, requires_grad=True):
    """Random embeddings, class centres and targets (rows listed in `ignore` get ignore_index)."""
    x = torch.randn(N, D, dtype=torch.float64).to(dtype).to(device)
    w = torch.randn(C, D, dtype=torch.float64).to(dtype).to(device)
    t = torch.randint(0, C, (N,), device=device)
    for i in ignore:
        t[i] = ignore_index
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), t


def record_op_rows(monkeypatch):
    """A list that receives the row count (first dimension of the first argument) of every op call the public
    functions make from here on: what skip_ignored_rows left the op."""
    import marginkern.functional as functional
    seen, call = [], functional.call_op

    def spy(name, *args):
        seen.append(args[0].shape[0])
        return call(name, *args)
    monkeypatch.setattr(functional, "call_op", spy)
    return seen


def record_selected_rows(monkeypatch):
    """A list that receives, for every op that got a skip_ignored_share (the compiled path), the number of rows it
    ran on after ops.labelled_rows chose them (every row where it chose none)."""
    import marginkern.ops as ops
    seen, select = [], ops.labelled_rows

    def spy(target, ignore_index, share):
        rows = select(target, ignore_index, share)
        seen.append(target.shape[0] if rows is None else rows.shape[0])
        return rows
    monkeypatch.setattr(ops, "labelled_rows", spy)
    return seen


def loss_and_grads(fn, x, w, t, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = fn(x, w, t, **kw)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w), allow_unused=True)
    return loss.detach(), gx, gw


# Tolerances of a kernel against the float64 oracle evaluated on the same (rounded) inputs, relative to
# the largest magnitude of the compared tensor. fp32: accumulation-order error only. fp16/bf16: the
# N × chunk gradient buffer is stored in the input dtype (2^-11 resp. 2^-8 relative), and the outputs
# are rounded to it too.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual, expected, dtype, what="", floor=1e-3, factor=1.0):
    """|actual − expected| ≤ factor · tol(dtype) · max(max |expected|, floor); the floor covers exact zeros
    (a loss over one class is 0 up to rounding of terms of size ~scale); `factor` for a quantity whose own
    math cancels (its caller says why)."""
    assert actual is not None and expected is not None, what
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(floor)
    err = (actual - expected).abs().max() / scale
    tol = factor * REL_TOL[dtype]
    assert err <= tol, f"{what}: max error {err:.3e} relative to max |expected|, tolerance {tol:.0e}"


SPECIAL_ROWS = {  # logits of one row each (C = 9), as torch.logsumexp must see them
    "normal": [0.5, -1.0, 3.0, 2.0, -4.0, 0.0, 1.0, 7.0, -2.0],
    "all -inf": [-math.inf] * 9,
    "-inf tail": [1.0, 2.0, 0.5, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf],
    "one +inf": [1.0, 2.0, 0.5, 3.0, math.inf, 0.0, 1.0, 2.0, 3.0],
    "+inf and -inf": [-math.inf, 2.0, math.inf, 3.0, -math.inf, 0.0, 1.0, math.inf, 3.0],
    "NaN": [1.0, 2.0, 0.5, 3.0, math.nan, 0.0, 1.0, 2.0, 3.0],
    "NaN and +inf": [1.0, math.inf, math.nan, 2.0, 0.0, 1.0, -1.0, 2.0, 3.0],
    "NaN, then +inf": [math.nan, 1.0, 2.0, 0.5, 0.0, 1.0, -1.0, 2.0, math.inf],
    "NaN among -inf": [-math.inf, -math.inf, -math.inf, -math.inf, -math.inf, math.nan, -math.inf, -math.inf,
                       -math.inf],
}


def check_special_rows_log_probs(device):
    """log_probs_and_entropy of SPECIAL_ROWS (target class 1, finite in all but the all −inf row) against float64
    softmax arithmetic: −inf logits are p = 0 (they add nothing to H); a +inf or NaN logit, or no finite one, gives
    NaN for both, as torch's log_softmax (the entropy's sums gave −inf for a +inf row once its shift was 0)."""
    import marginkern as mk
    for name, logits in SPECIAL_ROWS.items():
        z = torch.tensor(logits, dtype=torch.float64)
        log_p = torch.log_softmax(z, 0)
        want_lp = log_p[1]
        want_h = -torch.where(log_p > -math.inf, log_p.exp() * log_p, 0.0).sum()
        if torch.isnan(want_lp):
            want_h = want_lp
        w = torch.tensor(logits, device=device)[:, None]  # logits x·w_j with x = 1 (one row: inf·0 would be NaN)
        got_lp, got_h = mk.log_probs_and_entropy(torch.ones(1, 1, device=device), w, torch.tensor([1], device=device))
        for got, want, what in ((got_lp, want_lp, "log p_t"), (got_h, want_h, "entropy")):
            torch.testing.assert_close(got.cpu().double(), want.reshape(1), equal_nan=True, rtol=1e-6, atol=1e-6,
                                       msg=f"{what} of the {name} row")


def check_fp16_grad_saturates_and_keeps_nan(tiles, device):
    """A tile backend's float16 dL/da: entries beyond fp16's range saturate at ±65504 instead of becoming
    inf (the engine's scale keeps regular entries far below), and a NaN row stays NaN (GradScaler must see
    it: clamping NaN to a number would hide a broken step)."""
    from marginkern.engine import LogitSpec
    N, C, D = 4, 300, 8
    x, w = torch.randn(N, D, device=device).half(), torch.randn(C, D, device=device).half()
    ones, zeros = torch.ones(N, device=device), torch.zeros(N, device=device)
    spec = LogitSpec(ones, None, None, None, torch.full((N,), -1, device=device), zeros)
    lse = torch.full((N,), -30.0, device=device)  # p = exp(z + 30): far beyond 65504
    lse[1] = float("nan")
    g = tiles.grad_logits(x, w, spec, lse, ones, zeros, zeros, 0, C)
    assert g.dtype == torch.float16
    others = g[[0, 2, 3]].float()
    assert torch.isfinite(others).all() and others.abs().max() == 65504.0
    assert torch.isnan(g[1]).all(), "a NaN row of dL/da was clamped to numbers"


def check_margin_fp16_under_grad_scaler(device):
    """ArcFace (s = 64) in fp16 with GradScaler's 65536 on the loss (face_margin_anchors.md: "Fp16 Grad
    Scale: 0" reports): the gradients stay finite and match the float64 oracle at fp16's tolerance."""
    import marginkern as mk
    from marginkern import reference
    x, w, t = make_case(256, 700, 32, torch.float16, device=device, ignore=(5,))
    a = [v.detach().clone().requires_grad_() for v in (x, w)]
    got = torch.autograd.grad(mk.margin_cross_entropy(*a, t) * 65536.0, a)
    ref = [v.detach().double().requires_grad_() for v in (x, w)]
    want = torch.autograd.grad(reference.margin_cross_entropy(*ref, t) * 65536.0, ref)
    for name, g, e in zip(("grad input", "grad weight"), got, want):
        assert g.dtype == torch.float16
        assert_close_rel(g, e, torch.float16, name)


def check_margin_per_row_upstream_gradient(device, dtype=torch.float32):
    """reduction="none" with a non-uniform, strided upstream gradient (a weighted sum over rows, zero on
    some rows; llm_ce_anchors.md: reduction='none' gave wrong gradients in a peer): both gradients match
    the float64 oracle's, for the margin family's two geometries."""
    import marginkern as mk
    from marginkern import reference
    x, w, t = make_case(37, 301, 45, dtype, device=device, ignore=(0,))
    upstream = torch.randn(2 * 37, device=device)[::2]
    upstream[3] = 0.0
    for opts in (dict(), dict(m1=1.5, m2=0.2, m3=0.1, scale=0.5, normalize=False, label_smoothing=0.2)):
        a = [v.detach().clone().requires_grad_() for v in (x, w)]
        got = torch.autograd.grad(mk.margin_cross_entropy(*a, t, reduction="none", **opts), a, upstream)
        ref = [v.detach().double().requires_grad_() for v in (x, w)]
        want = torch.autograd.grad(reference.margin_cross_entropy(*ref, t, reduction="none", **opts), ref,
                                   upstream.double())
        for name, g, e in zip(("grad input", "grad weight"), got, want):
            assert_close_rel(g, e, dtype, f"{name} {opts}")


def check_emo_confident_rows(device, dtype=torch.float32):
    """EMO of confident tokens (seed_losses.md: "if emo ≈ 0 … the weight explodes"): 1 − Σ_j p_j·ê_j·ê_t
    cancels as p_t → 1 (fp32 gave −5e-7 for an EMO that is ≥ 0), which flips or blows up the MLE-anchored
    ratio ce/emo. Per row: EMO ≥ 0 and within 1e-3 of its own size of a direct float64 computation, from
    barely to very confident rows (1 − p_t from ~0.5 down to ~1e-12)."""
    import marginkern as mk
    torch.manual_seed(11)
    N, C, D = 40, 97, 16
    w = torch.randn(C, D, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    confidence = torch.linspace(0.0, 2.5, N, dtype=torch.float64)[:, None]
    x = confidence * w[t] + 0.3 * torch.randn(N, D, dtype=torch.float64)
    x, w = x.to(dtype), w.to(dtype)
    # the oracle on the rounded inputs, materialised in float64, the target's own cost exactly 0
    xd, wd = x.double(), w.double()
    p = torch.softmax(xd @ wd.t(), dim=1)
    unit = torch.nn.functional.normalize(wd, dim=1)
    cost = 1.0 - unit @ unit[t].t()             # (C, N): 1 − ê_j·ê_t
    cost = cost.t().scatter(1, t[:, None], 0.0)
    want = (p * cost).sum(1)
    got = mk.emo_loss(x.to(device), w.to(device), t.to(device), reduction="none").double().cpu()
    assert (got >= 0).all(), f"negative EMO {got.min():.3e}"
    err = ((got - want).abs() / want.clamp_min(1e-30))[want > 1e-25]
    assert err.max() < 1e-3, f"EMO relative error {err.max():.3e} (EMO down to {want.min():.1e})"
    assert want.min() < 1e-9, "the case must reach confident rows"
    # EMO's gradient per row against float64 autograd of the same definition: the target column's −p_t·EMO term was
    # lost where 1 − EMO rounds to 1 (EMO < 6e-8 in fp32; a review found the confident rows' dx 3% off)
    xr, wr = x.to(device).requires_grad_(), w.to(device).requires_grad_()
    gx, gw = torch.autograd.grad(mk.emo_loss(xr, wr, t.to(device), reduction="sum"), (xr, wr))
    xd, wd = xd.clone().requires_grad_(), wd.clone().requires_grad_()
    p = torch.softmax(xd @ wd.t(), dim=1)
    want_gx, want_gw = torch.autograd.grad((p * cost).sum(), (xd, wd))
    row_err = (gx.double().cpu() - want_gx).norm(dim=1) / want_gx.norm(dim=1).clamp_min(1e-30)
    assert row_err.max() < 1e-3, f"EMO dx per row: relative error {row_err.max():.3e}"
    assert_close_rel(gw, want_gw, torch.float32, "EMO grad weight")
    # the MLE-anchored loss's gradient stays finite
    gx, gw = torch.autograd.grad(mk.emo_cross_entropy(xr, wr, t.to(device)), (xr, wr))
    assert torch.isfinite(gx).all() and torch.isfinite(gw).all()


def check_confident_rows_per_row_gradient(device, dtype, opts=None):
    """Linear CE where rows' targets are nearly certain (1 − p_t from 0.99 down to ~3e-5), summed: each row's
    dX against the float64 oracle relative to ITS OWN size (llm_ce_anchors.md: Liger #1329, up to 100%
    relative error at p = 0.999 when the target's gradient p_t − 1 was formed in 16 bits; a tolerance
    relative to the largest row would hide that). The bound is the dtype's tolerance plus what fp32 itself
    allows: p_t − 1 is formed from T − lse, whose rounding (≈ ulp(lse)) is a relative error of about
    ulp(lse)/(1 − p_t) in that row (as in torch's own fp32 cross-entropy)."""
    import marginkern as mk
    from marginkern import reference
    opts = opts or {}
    torch.manual_seed(13)
    N, C, D = 48, 257, 32
    w = torch.randn(C, D, dtype=torch.float64)
    t = torch.randint(0, C, (N,))
    x = torch.linspace(0.05, 0.45, N, dtype=torch.float64)[:, None] * w[t] + 0.05 * torch.randn(N, D, dtype=torch.float64)
    x, w = x.to(dtype), w.to(dtype)
    xd = x.double().requires_grad_()
    want = torch.autograd.grad(reference.linear_cross_entropy(xd, w.double(), t, reduction="sum", **opts), xd)[0]
    logits = x.double() @ w.double().t()
    one_minus_p = 1 - torch.softmax(logits, 1).gather(1, t[:, None]).squeeze(1)
    assert one_minus_p.max() > 0.5 and one_minus_p.min() < 1e-4, "the case must span confident rows"
    xg = x.to(device).requires_grad_()
    got = torch.autograd.grad(mk.linear_cross_entropy(xg, w.to(device), t.to(device), reduction="sum", **opts), xg)[0]
    err = (got.double().cpu() - want).norm(dim=1) / want.norm(dim=1)
    fp32_limit = 8 * torch.finfo(torch.float32).eps * torch.logsumexp(logits, 1).abs().clamp_min(1) / one_minus_p
    bound = 4 * REL_TOL[dtype] + fp32_limit
    if dtype == torch.float16:
        # fp16 G is scaled so that its largest entry is ~1: a row whose gradient is below fp16's subnormals
        # of that (focal loss on confident rows: (1 − p_t)^γ ≈ 1e-7 of the hardest row's) may vanish
        row_norms = want.norm(dim=1)
        bound = torch.maximum(bound, 1e-6 * row_norms.max() / row_norms)
    worst = int((err / bound).argmax())
    assert (err <= bound).all(), (f"row {worst}: dX error {err[worst]:.2e} relative to its own norm, bound "
                                  f"{bound[worst]:.2e} (1 − p_t = {one_minus_p[worst]:.1e})")


def check_loss_and_grads(fn, oracle, x, w, t, dtype, loss_floor, oracle_dtype=torch.float32, **kw):
    """fn's loss and both gradients against the oracle's on upcast inputs, at dtype's tolerance."""
    loss, gx, gw = loss_and_grads(fn, x, w, t, **kw)
    ref, rx, rw = loss_and_grads(oracle, x.to(oracle_dtype), w.to(oracle_dtype), t, **kw)
    assert_close_rel(loss, ref, dtype, "loss", floor=loss_floor)
    assert_close_rel(gx, rx, dtype, "grad input")
    assert_close_rel(gw, rw, dtype, "grad weight")


def subcenter_case(N, C, K, D, dtype=torch.float32, device="cpu", ignore=()):
    """make_case with K sub-centres per class: weight (C·K, D), targets in [0, C)."""
    x, w, t = make_case(N, C * K, D, dtype, device=device, ignore=ignore)
    return x, w, torch.where(t == -100, t, t % C)


def check_subcenters_match_oracle(device, dtype, shape, opts, oracle_dtype=torch.float64):
    """margin_cross_entropy with sub-centres (whatever backend serves `device`) against the float64 oracle:
    loss and both gradients, with an ignored row and targets over every class."""
    import marginkern as mk
    from marginkern import reference
    N, C, K, D = shape
    x, w, t = subcenter_case(N, C, K, D, dtype, device, ignore=(0,) if N > 2 else ())
    check_loss_and_grads(mk.margin_cross_entropy, reference.margin_cross_entropy, x, w, t, dtype, 64.0,
                         oracle_dtype=oracle_dtype, subcenters=K, **opts)


def check_duplicate_subcenters_are_plain_margin_ce(device, dtype=torch.float32, K=3):
    """Every class's K sub-centres equal (exact ties): the loss is the plain margin CE's over one copy, and
    the whole gradient of each class goes to its FIRST sub-centre (the tie-break every backend shares:
    a near-tie broken differently in the forward and backward passes would split a class's gradient)."""
    import marginkern as mk
    x, w1, t = make_case(29, 41, 24, dtype, device=device, ignore=(2,))
    w = w1.detach().repeat_interleave(K, dim=0)
    plain, px, pw = loss_and_grads(mk.margin_cross_entropy, x, w1, t, label_smoothing=0.1)
    loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, label_smoothing=0.1, subcenters=K)
    assert_close_rel(loss, plain, dtype, "loss", floor=64.0)
    assert_close_rel(gx, px, dtype, "grad input")
    gw = gw.unflatten(0, (-1, K))
    assert_close_rel(gw[:, 0], pw, dtype, "grad of the first sub-centres")
    assert (gw[:, 1:] == 0).all(), "a tied sub-centre other than the first got a gradient"


def check_subcenter_edge_cases(device, K=2):
    """No rows, one class (loss 0: its gradients are rounding of terms of size ~scale, hence the floors),
    every row ignored: finite, and the oracle's values, for every reduction."""
    import marginkern as mk
    from marginkern import reference
    for reduction in ("mean", "sum", "none"):
        for (N, C, D), ignore in [((0, 5, 3), ()), ((4, 1, 5), ()), ((6, 40, 7), range(6))]:
            x, w, t = subcenter_case(N, C, K, D, device=device, ignore=ignore)
            loss, gx, gw = loss_and_grads(mk.margin_cross_entropy, x, w, t, subcenters=K, reduction=reduction)
            ref, rx, rw = loss_and_grads(reference.margin_cross_entropy, x.double(), w.double(), t, subcenters=K,
                                         reduction=reduction)
            assert torch.isfinite(loss).all() and torch.isfinite(gx).all() and torch.isfinite(gw).all()
            assert_close_rel(loss, ref, torch.float32, "loss", floor=64.0)
            assert_close_rel(gx, rx, torch.float32, "grad input", floor=1.0)
            assert_close_rel(gw, rw, torch.float32, "grad weight", floor=1.0)


def check_chunked_margin_matches_one_chunk(small_tiles, N, C, K, D, device="cpu"):
    """The margin loss's forward and backward on `small_tiles` (a buffer of a few classes per chunk) against the
    PyTorch tiles in one chunk: the engine's chunk loop over classes of K rows of w each."""
    from marginkern.engine import TorchTiles
    from marginkern.margin_ce import MarginOptions, margin_ce_backward, margin_ce_forward
    x, w, t = subcenter_case(N, C, K, D, device=device, ignore=(1,))
    x, w = x.detach(), w.detach()
    opts = MarginOptions.of(64.0, 1.0, 0.5, 0.0, True, True, 0.1, -100, K)
    assert len(small_tiles.class_chunks(N * K, C, x)) > 3
    outputs = []
    for tiles in (small_tiles, TorchTiles()):
        loss, lse = margin_ce_forward(x, w, t, opts, tiles)
        outputs.append((loss,) + margin_ce_backward(torch.ones_like(loss), x, w, t, lse, opts, tiles))
    for got, want in zip(*outputs):
        assert_close_rel(got, want, torch.float32, floor=1.0)


def check_subcenter_nan_stays_nan(device):
    """A NaN embedding gives a NaN loss row (the others stay finite); a NaN in one sub-centre (not the first)
    of a class makes every row NaN (every row's softmax sees that class): the max over sub-centres keeps NaN."""
    import marginkern as mk
    x, w, t = subcenter_case(4, 6, 3, 5, device=device)
    x, w = x.detach().clone(), w.detach().clone()
    x[2, 1] = float("nan")
    loss = mk.margin_cross_entropy(x, w, t, subcenters=3, reduction="none")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    x[2, 1] = 0.5
    w[3 * 3 + 1, 0] = float("nan")
    assert torch.isnan(mk.margin_cross_entropy(x, w, t, subcenters=3, reduction="none")).all()


class InProcessShards:
    """W vocab shards of one head in one process, standing in for marginkern.distributed's ProcessGroupShard
    where no process group exists (the interpreter tier, one GPU): the engine's sharded linear CE runs once per
    shard to record each shard's row statistics, then again with the others' statistics merged in rank order,
    as the collectives would; dL/dx is left per shard (the caller sums it). Tests the tile backends' handling of
    rows whose target another shard holds (no target column, target logit 0) and of a bias slice."""

    class Shard:
        def __init__(self, owner, rank, start):
            self.owner, self.rank, self.start, self.num_classes = owner, rank, start, owner.num_classes

        def merge_row_stats(self, lse, sum_logits, target_logit):
            self.owner.recorded[self.rank] = (lse, sum_logits, target_logit)
            parts = self.owner.recorded if all(r is not None for r in self.owner.recorded) else [
                (lse, sum_logits, target_logit)]
            lses = torch.stack([p[0] for p in parts])
            merged_sum = None if sum_logits is None else sum(p[1] for p in parts)
            return torch.logsumexp(lses, 0), merged_sum, sum(p[2] for p in parts)

        def sum_rows(self, values):
            others = [p[2] for r, p in enumerate(self.owner.recorded) if r != self.rank]
            return values + sum(others)

        def sum_input_grad(self, grad_x):
            return grad_x

    def __init__(self, num_classes, world_size):
        from marginkern.distributed import shard_range
        self.num_classes = num_classes
        self.ranges = [shard_range(num_classes, r, world_size) for r in range(world_size)]
        self.recorded = [None] * world_size

    def linear_ce(self, x, w, t, bias, opts, tiles, grad_loss):
        """(per-row loss, dL/dx summed over shards, dL/dw, dL/dbias or None) of the sharded engine path."""
        from marginkern.linear_ce import linear_ce_backward, linear_ce_forward
        shards = [self.Shard(self, r, start) for r, (start, _) in enumerate(self.ranges)]
        cut = [(slice(a, b), None if bias is None else bias[a:b]) for a, b in self.ranges]
        for s, (rows, b) in zip(shards, cut):  # records every shard's statistics
            linear_ce_forward(x, w[rows], t, b, opts, tiles, s)
        outs = [linear_ce_forward(x, w[rows], t, b, opts, tiles, s) for s, (rows, b) in zip(shards, cut)]
        loss, lse = outs[0]
        assert all(torch.equal(o[0], loss) for o in outs), "the shards' losses differ"
        grads = [linear_ce_backward(grad_loss, x, w[rows], t, b, lse, opts, tiles, shard=s)
                 for s, (rows, b) in zip(shards, cut)]
        grad_b = None if bias is None else torch.cat([g[2] for g in grads])
        return loss, sum(g[0].double() for g in grads), torch.cat([g[1] for g in grads]), grad_b


def check_sharded_linear_ce_tiles(tiles, device, dtype, opts, world_size=3, with_bias=True):
    """The engine's vocab-parallel linear CE on `tiles` (InProcessShards) against the float64 oracle with the
    whole head: per-row loss, dL/dx summed over shards, the shards' dL/dw and dL/dbias concatenated."""
    from marginkern import reference
    from marginkern.linear_ce import LinearCEOptions
    N, C, D = 23, 61, 12
    x, w, t = make_case(N, C, D, dtype, device=device, ignore=(0, 7), requires_grad=False)
    w = (w.float() * 0.3).to(dtype)
    t[3] = 0  # a target on the first shard, one on the last
    t[4] = C - 1
    b = torch.randn(C, device=device).to(dtype) if with_bias else None
    upstream = torch.randn(N, device=device)
    o = LinearCEOptions(-100, opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0), opts.get("softcap"),
                        opts.get("focal_gamma", 0.0), opts.get("gamma_ce", 0.0))
    loss, gx, gw, gb = InProcessShards(C, world_size).linear_ce(x, w, t, b, o, tiles, upstream)
    leaves = [v.double().requires_grad_() for v in (x, w) + (() if b is None else (b,))]
    want = reference.linear_cross_entropy(leaves[0], leaves[1], t, *leaves[2:], reduction="none", **opts)
    want_grads = torch.autograd.grad((want * upstream.double()).sum(), leaves)
    assert_close_rel(loss, want, dtype, "loss", floor=1.0)
    for name, g, e in zip(("grad input", "grad weight", "grad bias"), (gx, gw, gb), want_grads):
        assert_close_rel(g, e, dtype, name)


def materialised_row_margin_ce(x, w, t, m2, m3, scale, m1=1.0, normalize=True, label_smoothing=0.0, lambda_=0.0,
                               ignore_index=-100):
    """Per-row margin CE written out on the full N × C float64 logits (DESIGN.md §4's ψ with row n's m2_n, m3_n),
    differentiable by plain autograd (through acos: keep cos θ_y away from ±1): the oracle the row margins of
    every backend are held to, independent of margin.py."""
    x, w, m2, m3 = (v.double() for v in (x, w, m2, m3))
    valid = t != ignore_index
    y = torch.where(valid, t, 0)
    xn, wn = x.norm(dim=1, keepdim=True), w.norm(dim=1, keepdim=True)
    cos = (x / xn) @ (w / wn).T
    c = cos.gather(1, y[:, None])[:, 0]
    phi = m1 * torch.acos(c) + m2
    k = torch.floor(phi / math.pi).detach()
    psi = (-1.0) ** k * torch.cos(phi) - 2 * k - m3
    psi = (lambda_ * c + psi) / (1 + lambda_)
    radius = 1.0 if normalize else (xn * wn.T).gather(1, y[:, None])[:, 0]
    logits = scale * (cos if normalize else cos * xn * wn.T)
    logits = logits.scatter(1, y[:, None], (scale * radius * psi)[:, None])
    rows = torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    return torch.where(valid, rows, 0.0).sum() / valid.sum().clamp_min(1)


def check_row_margins_match_oracle(device, dtype, N=37, C=53, D=24, subcenters=1, **options):
    """mk.margin_cross_entropy with (N,) tensor margins m2 (of both signs) and m3 on `device` in `dtype`: loss and
    the gradients of x, w, m2 and m3 against the materialised float64 definition, or the reference where that has
    no form (sub-centres, the straight-through dψ/dc), at dtype's tolerance."""
    import marginkern as mk
    from marginkern import reference
    normalize = options.get("normalize", True)
    x, w, t = make_case(N, C * subcenters, D, dtype, device=device, ignore=(3,))
    t = t % C
    t[3] = -100
    m2 = (torch.rand(N, dtype=torch.float64) - 0.5).to(device)
    m3 = (0.3 * torch.rand(N, dtype=torch.float64)).to(device)
    kw = dict(scale=8.0 if normalize else 1.0, m1=1.0 if normalize else 2.0, subcenters=subcenters, **options)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    inputs = [v.detach().requires_grad_() for v in (x, w, m2.to(acc), m3.to(acc))]
    got = mk.margin_cross_entropy(inputs[0], inputs[1], t, m2=inputs[2], m3=inputs[3], **kw)
    got_grads = torch.autograd.grad(got, inputs)
    exact = [v.detach().double().requires_grad_() for v in inputs]
    if subcenters == 1 and options.get("margin_grad", "exact") == "exact":
        kw.pop("subcenters")
        want = materialised_row_margin_ce(exact[0], exact[1], t, exact[2], exact[3], **kw)
    else:
        want = reference.margin_cross_entropy(exact[0], exact[1], t, m2=exact[2], m3=exact[3], **kw)
    want_grads = torch.autograd.grad(want, exact)
    assert_close_rel(got, want, dtype, "loss")
    for name, g, e in zip(("grad input", "grad weight", "grad m2", "grad m3"), got_grads, want_grads):
        assert_close_rel(g, e, dtype, name)


def check_nan_margin_on_an_ignored_row(device, dtype, normalize):
    """An ignored row's margin is never used: NaN there (0·NaN in the unnormalised radial term and in the margins'
    gradient, a reviewer's case) must not reach the loss or any gradient."""
    import marginkern as mk
    x, w, t = make_case(6, 9, 5, dtype, device=device, ignore=(2,))
    m2 = torch.rand(6, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device)
    m2[2] = float("nan")
    m2.requires_grad_()
    loss = mk.margin_cross_entropy(x, w, t, scale=4.0 if normalize else 1.0, m1=1.0 if normalize else 2.0, m2=m2,
                                   m3=0.1, normalize=normalize)
    grads = torch.autograd.grad(loss, (x, w, m2))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    assert grads[2][2] == 0.0


def materialised_hard_negative_ce(x, w, t, coefficients, scale, m2=0.5, m3=0.0, label_smoothing=0.0,
                                  ignore_index=-100, reduction="mean", threshold=None):
    """Margin CE with the hard negatives re-weighted, written out on the full N × C float64 cosines as the official
    CurricularFace / MV-Softmax heads do it (a boolean mask of c_j > the target's margin cosine, or > `threshold`
    when given, as insightface's inter-class filtering, then a, b, d on the masked cells, then the target column),
    independent of the library: the oracle of `hard_negatives`."""
    x, w = x.double(), w.double()
    a, b, d = (float(v) for v in coefficients)
    valid = t != ignore_index
    y = torch.where(valid, t, 0)
    cos = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(w, dim=1).T
    c = cos.gather(1, y[:, None])[:, 0]
    psi = torch.cos(torch.acos(c) + m2) - m3  # keep θ_y + m2 < π: no branch of ψ needed
    mask = cos > (psi.detach()[:, None] if threshold is None else threshold)
    cos = torch.where(mask, a * cos * cos + b * cos + d, cos)
    logits = scale * cos.scatter(1, y[:, None], psi[:, None])
    rows = torch.nn.functional.cross_entropy(logits, y, reduction="none", label_smoothing=label_smoothing)
    rows = torch.where(valid, rows, 0.0)
    return rows if reduction == "none" else rows.sum() / valid.sum().clamp_min(1)


def hard_negative_case(N, C, D, dtype, device="cpu", subcenters=1, ignore=(3,)):
    """(x, w, t) where about half the rows sit near their class centre (few hard negatives) and half are random
    (many): both branches of the re-weighting occur; targets in [0, C), w with `subcenters` rows per class."""
    x, w, t = make_case(N, C * subcenters, D, torch.float64, ignore=ignore, requires_grad=False)
    t = t % C
    for i in ignore:
        t[i] = -100
    near = torch.arange(N) % 2 == 0
    centre = w[t.clamp_min(0) * subcenters]
    x = torch.where(near[:, None], centre * 3.0 + x, x)
    return (x.to(dtype).to(device).requires_grad_(), w.to(dtype).to(device).requires_grad_(), t.to(device))


def check_hard_negatives_match_oracle(device, dtype, N=37, C=53, D=24, subcenters=1, coefficients=(1.0, 0.2, 0.0),
                                      as_tensor=True, threshold=None, **options):
    """mk.margin_cross_entropy(hard_negatives=..., hard_negative_threshold=threshold) on `device` in `dtype`: loss and
    the gradients of x and w against the materialised float64 definition (the reference where that has no form:
    sub-centres), at dtype's tolerance; the case must have hard and plain negatives both."""
    import marginkern as mk
    from marginkern import reference
    x, w, t = hard_negative_case(N, C, D, dtype, device, subcenters)
    kw = dict(scale=16.0, m2=options.pop("m2", 0.5), m3=options.pop("m3", 0.0), **options)
    # A cosine within rounding of its row's threshold may fall on either side of the mask in dtype's arithmetic (a
    # jump of s·(h(c) − c) in that logit): such rows are ignored, so that the comparison is of the function, not of
    # where rounding put a step.
    cos = torch.nn.functional.normalize(x.detach().double(), dim=1) @ torch.nn.functional.normalize(
        w.detach().double(), dim=1).T
    cos = cos.unflatten(1, (-1, subcenters)).amax(2)
    column = t.clamp_min(0)[:, None]
    psi = torch.cos(torch.acos(cos.gather(1, column).clamp(-1, 1)) + kw["m2"]) - kw["m3"]
    if threshold is not None:
        psi = torch.full_like(psi, threshold)
    ambiguous = ((cos - psi).abs() < 1e-4).scatter(1, column, False).any(1)
    t = torch.where(ambiguous, -100, t)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    hard = torch.tensor(coefficients, dtype=acc, device=device) if as_tensor else coefficients
    got = mk.margin_cross_entropy(x, w, t, hard_negatives=hard, hard_negative_threshold=threshold,
                                  subcenters=subcenters, **kw)
    got_grads = torch.autograd.grad(got, (x, w))
    exact = [v.detach().double().cpu().requires_grad_() for v in (x, w)]
    valid = (t != -100)[:, None]
    hard_fraction = ((cos > psi) & valid).double().sum().item() / max(1, valid.sum().item() * cos.shape[1])
    assert 0.05 < hard_fraction < 0.95, hard_fraction  # both sides of the mask occur
    if subcenters == 1:
        want = materialised_hard_negative_ce(exact[0], exact[1], t.cpu(), coefficients, threshold=threshold, **kw)
    else:
        want = reference.margin_cross_entropy(exact[0], exact[1], t.cpu(), hard_negatives=coefficients,
                                              hard_negative_threshold=threshold, subcenters=subcenters, **kw)
    want_grads = torch.autograd.grad(want, exact)
    assert_close_rel(got.cpu(), want, dtype, "loss")
    for name, g, e in zip(("grad input", "grad weight"), got_grads, want_grads):
        assert_close_rel(g.cpu(), e, dtype, name)


def counted_launchers(monkeypatch, kernels, names):
    """{name: 0, ...} counting the calls of each launcher `name` of the module `kernels` (replaced by monkeypatch), so
    that a test fails when a path silently falls back from its Triton kernels."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        launcher = getattr(kernels, name)

        def counted(*args, _launcher=launcher, _name=name):
            counts[_name] += 1
            return _launcher(*args)
        monkeypatch.setattr(kernels, name, counted)
    return counts


def check_offset_targets_and_shift(device, fn, dtype):
    """fn(hidden, w, labels, reduction="none", shift=1) with labels a view one int64 into its allocation (8-byte, not
    16-byte aligned: flash-attn's bedf8774, a vectorised load of a misaligned int64 pointer) equals the call on an
    aligned copy, loss and gradient. Only a GPU can show that bug (the interpreter never vectorises); in the
    interpreter tier the case makes the recorded sm_90 compile cover the unaligned pointer's specialisation."""
    B, T, D, C = 3, 11, 32, 301
    torch.manual_seed(5)
    hidden = torch.randn(B, T, D, device=device).to(dtype).requires_grad_()
    w = (torch.randn(C, D, device=device) * 0.3).to(dtype)
    big = torch.randint(0, C, (B * T + 1,), device=device)
    labels = big[1:].view(B, T)
    assert labels.data_ptr() % 16 == 8 and labels.clone().data_ptr() % 16 == 0
    got = fn(hidden, w, labels, reduction="none", shift=1)
    want = fn(hidden, w, labels.clone(), reduction="none", shift=1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    g, = torch.autograd.grad(got.sum(), hidden)
    e, = torch.autograd.grad(want.sum(), hidden)
    torch.testing.assert_close(g, e, rtol=0, atol=0)
    assert (got[:, -1] == 0).all() and torch.isfinite(got).all()
