"""skip_ignored_rows: an eager call runs the op on the labelled rows alone (prompt and padding tokens cost no GEMM
work); the results equal those of every row, on the CPU paths (C++ and PyTorch tiles), with every option, both
linear-CE paths, shapes and shift, compile, and the refusals. Which rows the op saw is read from the op's own
arguments."""
import pytest
import torch

import marginkern as mk
from tests.helpers import assert_close_rel, make_case, record_op_rows


@pytest.fixture
def op_rows(monkeypatch):
    """The row count of every op call the public functions make (their input's first dimension)."""
    return record_op_rows(monkeypatch)


def prompt_masked(N, C, D, dtype, ignored, seed=0):
    """make_case with the first `ignored` rows ignored (a prompt) and logits of a few units."""
    torch.manual_seed(seed)
    x, w, t = make_case(N, C, D, dtype, ignore=range(ignored))
    return x, (w.detach() * 0.4).to(dtype).requires_grad_(), t


def loss_and_grads(fn, x, w, t, b, reduction, upstream, **opts):
    x, w, b = (v.detach().requires_grad_() for v in (x, w, b))
    out = fn(x, w, t, b, reduction=reduction, **opts)
    loss = out[0] if isinstance(out, tuple) else out
    total = (loss * (1.0 if upstream is None else upstream.to(loss.dtype))).sum()
    return (out if isinstance(out, tuple) else (out,)) + torch.autograd.grad(total, (x, w, b))


LCE_OPTIONS = [dict(), dict(label_smoothing=0.1, z_loss=1e-2, softcap=3.0), dict(focal_gamma=2.0),
               dict(class_weight=True, label_smoothing=0.1), dict(token_scaling=True, gamma_ce=0.3),
               dict(return_token_accuracy=True)]
LCE_IDS = ["plain", "smoothing+z+softcap", "focal", "class_weight", "token_scaling", "token_accuracy"]


def check_linear_ce_equals_every_row(device, dtype, opts, reduction, op_rows):
    """Outputs and gradients (input, weight, bias) with half the rows ignored: the op ran on the labelled rows, and
    all of it equals the call on every row; the ignored rows' input gradient is 0."""
    N, C = 40, 301
    x, w, t = (v.to(device) for v in prompt_masked(N, C, 24, dtype, ignored=15))
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = (0.5 * torch.randn(C)).to(dtype).to(device)
    opts = dict(opts)
    if opts.pop("class_weight", False):
        opts["class_weight"] = (torch.rand(C) + 0.5).to(w.dtype).to(device)
    upstream = torch.rand(N, dtype=torch.float64, device=device) if reduction == "none" else None
    got = loss_and_grads(mk.linear_cross_entropy, x, w, t, b, reduction, upstream, **opts)
    assert op_rows == [N - 15]
    want = loss_and_grads(mk.linear_cross_entropy, x, w, t, b, reduction, upstream, skip_ignored_rows=False, **opts)
    assert op_rows == [N - 15, N]
    assert len(got) == len(want)
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close_rel(g, e, dtype, f"output {i}", floor=1.0 if i == 0 else 1e-3)
    assert not got[-3][:15].any()  # the ignored rows' gradient


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", LCE_OPTIONS, ids=LCE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_equals_every_row(backend, dtype, opts, reduction, monkeypatch, op_rows):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_linear_ce_equals_every_row("cpu", dtype, opts, reduction, op_rows)


def test_when_rows_are_skipped(op_rows):
    x, w, t = prompt_masked(64, 50, 8, torch.float32, ignored=7)  # 7 < 64 / 8: every row runs
    mk.linear_cross_entropy(x, w, t)
    mk.linear_cross_entropy(x, w, t, skip_ignored_rows=True)
    t[7] = -100  # 8 = 64 / 8: skipped
    mk.linear_cross_entropy(x, w, t)
    mk.linear_cross_entropy(x, w, t, skip_ignored_rows=False)
    mk.linear_cross_entropy(x, w, t, return_lse=True)  # every row's lse is returned
    with torch.no_grad():  # forward only: skipped too
        mk.linear_cross_entropy(x, w, t)
    x, w, t = prompt_masked(64, 50, 8, torch.float32, ignored=0)
    mk.linear_cross_entropy(x, w, t, skip_ignored_rows=True)  # nothing to skip
    assert op_rows == [64, 57, 56, 64, 64, 56, 64]


def test_numpy_bools_and_modes(op_rows):
    """A NumPy False is False; under torch.set_default_device's function mode rows are skipped, under a dispatch mode
    (FlopCounterMode: it would count the skipped rows' FLOPs otherwise) every row runs."""
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode
    x, w, t = prompt_masked(16, 30, 8, torch.float32, ignored=8)
    mk.linear_cross_entropy(x, w, t, skip_ignored_rows=np.False_)
    mk.linear_cross_entropy(x, w, t, skip_ignored_rows=np.True_)
    mk.EMOLoss(skip_ignored_rows=np.False_)(x, w, t)
    with torch.device("cpu"):
        mk.linear_cross_entropy(x, w, t)
    with FlopCounterMode(display=False):
        mk.linear_cross_entropy(x, w, t)
    assert op_rows == [16, 8, 16, 8, 16]


def test_non_finite_values_of_skipped_rows_do_not_reach_the_gradients():
    """The one difference from every row (README): an inf in an ignored row's hidden state reaches dW through the
    dW GEMM (0·inf) when every row runs, and nothing when the row is skipped."""
    x, w, t = prompt_masked(16, 30, 8, torch.float32, ignored=8)
    x = x.detach().clone()
    x[0, 0] = float("inf")
    for skip, finite in ((None, True), (False, False)):
        xx, ww = x.clone().requires_grad_(), w.detach().clone().requires_grad_()
        loss = mk.linear_cross_entropy(xx, ww, t, skip_ignored_rows=skip)
        gx, gw = torch.autograd.grad(loss, (xx, ww))
        assert torch.isfinite(loss) and bool(torch.isfinite(gw).all()) == finite, skip


def test_all_rows_ignored_runs_no_row(op_rows):
    x, w, t = prompt_masked(10, 50, 8, torch.float32, ignored=10)
    loss = mk.linear_cross_entropy(x, w, t, z_loss=1e-3)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert op_rows == [0] and loss == 0 and not gx.any() and not gw.any()
    rows = mk.linear_cross_entropy(x, w, t, reduction="none", return_token_accuracy=True)
    assert not rows[0].any() and not rows[1].any() and rows[0].shape == (10,)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_3_gemm_path(reduction, op_rows):
    x, w, t = prompt_masked(40, 301, 24, torch.float64, ignored=20)
    b = torch.randn(301, dtype=torch.float64)
    got = loss_and_grads(mk.linear_cross_entropy, x, w, t, b, reduction, None, logits_buffer_mb=0.05, z_loss=1e-3)
    want = loss_and_grads(mk.linear_cross_entropy, x, w, t, b, reduction, None, logits_buffer_mb=0.05, z_loss=1e-3,
                          skip_ignored_rows=False)
    assert op_rows == [20, 40]
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14)


def test_sequences_with_prompts_and_shift(op_rows):
    """(B, T, D) hidden states, HF labels with masked prompts, shift=1: the result keeps the labels' shape."""
    x = torch.randn(3, 10, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 10))
    labels[0, :6] = labels[1, :3] = -100
    for reduction in ("none", "mean"):
        got = mk.linear_cross_entropy(x, w, labels, shift=1, reduction=reduction)
        want = mk.linear_cross_entropy(x, w, labels, shift=1, reduction=reduction, skip_ignored_rows=False)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        assert got.shape == want.shape
    assert op_rows == [20, 30, 20, 30]  # 30 positions less 10: 3 last ones, 5 + 2 masked labels shifted in


def test_compile_runs_every_row_and_agrees():
    x, w, t = prompt_masked(40, 60, 16, torch.float32, ignored=20)
    step = lambda a, ww, tt: mk.linear_cross_entropy(a, ww, tt, skip_ignored_rows=True)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got, want = compiled(x, w, t), step(x, w, t)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w)), torch.autograd.grad(want, (x, w)))


def test_module_and_refusals():
    x, w, t = prompt_masked(16, 30, 8, torch.float32, ignored=8)
    module = mk.LinearCrossEntropyLoss(skip_ignored_rows=False)
    assert "skip_ignored_rows=False" in repr(module)
    torch.testing.assert_close(module(x, w, t), mk.linear_cross_entropy(x, w, t))
    for make in (lambda **k: mk.linear_cross_entropy(x, w, t, **k), lambda **k: mk.LinearCrossEntropyLoss(**k)):
        with pytest.raises(TypeError, match="skip_ignored_rows must be None or a bool"):
            make(skip_ignored_rows="auto")
        with pytest.raises(ValueError, match="skip_ignored_rows=True cannot be combined with return_lse=True"):
            make(skip_ignored_rows=True, return_lse=True)


_TEACHER = {}


def _teacher(N, C, dtype):
    """A fixed teacher (hidden states (N, 12), head (C, 12)) and its top-8 cache, per shape and dtype."""
    key = (N, C, dtype)
    if key not in _TEACHER:
        g = torch.Generator().manual_seed(3)
        tx, tw = torch.randn(N, 12, generator=g).to(dtype), (0.4 * torch.randn(C, 12, generator=g)).to(dtype)
        z, ids = (tx.double() @ tw.double().t()).topk(8, dim=1)
        _TEACHER[key] = tx, tw, ids, z.to(dtype)
    return _TEACHER[key]


OTHER_LOSSES = {
    "emo_loss": lambda x, w, t, **k: mk.emo_loss(x, w, t, **k),
    "emo_cross_entropy": lambda x, w, t, **k: mk.emo_cross_entropy(x, w, t, **k),
    "log_probs_and_entropy": lambda x, w, t, reduction, **k: mk.log_probs_and_entropy(x, w, t, **k),
    "kl_forward": lambda x, w, t, **k: mk.linear_kl_divergence(x, w, *_teacher(*x.shape[:1], *w.shape[:1],
                                                                               x.dtype)[:2], t, **k),
    "kl_reverse": lambda x, w, t, **k: mk.linear_kl_divergence(x, w, *_teacher(x.shape[0], w.shape[0], x.dtype)[:2],
                                                               t, direction="reverse", **k),
    "jsd": lambda x, w, t, **k: mk.linear_jsd(x, w, *_teacher(x.shape[0], w.shape[0], x.dtype)[:2], t, beta=0.3,
                                              **k),
    "topk_kl": lambda x, w, t, **k: mk.linear_topk_kl_divergence(x, w, *_teacher(x.shape[0], w.shape[0],
                                                                                 x.dtype)[2:], t, **k),
}


def outputs_and_grads(fn, x, w, t, reduction, **opts):
    """The outputs (a tuple) and the gradients of Σ u·output over them (u fixed per output and row)."""
    x, w = (v.detach().requires_grad_() for v in (x, w))
    out = fn(x, w, t, reduction=reduction, **opts)
    out = out if isinstance(out, tuple) else (out,)
    g = torch.Generator().manual_seed(5)
    total = sum((o * torch.rand(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum() for o in out)
    return out + torch.autograd.grad(total, (x, w))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(OTHER_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_other_lm_losses_equal_every_row(backend, dtype, name, reduction, monkeypatch, op_rows):
    """EMO, the per-token log-probs and entropy, and the distillation losses skip ignored rows as linear CE does."""
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    if name == "log_probs_and_entropy" and reduction == "mean":
        pytest.skip("log_probs_and_entropy has no reduction")
    x, w, t = prompt_masked(40, 301, 24, dtype, ignored=15)
    fn = OTHER_LOSSES[name]
    got = outputs_and_grads(fn, x, w, t, reduction)
    want = outputs_and_grads(fn, x, w, t, reduction, skip_ignored_rows=False)
    assert op_rows == [25, 40]
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close_rel(g, e, dtype, f"{name} output {i}", floor=1.0 if i < len(got) - 2 else 1e-3)
    assert not got[-2][:15].any()


def test_distillation_without_a_target_runs_every_row_without_a_sync(op_rows):
    x, w, _ = prompt_masked(20, 50, 24, torch.float32, ignored=0)
    mk.linear_kl_divergence(x, w, *_teacher(20, 50, torch.float32)[:2])
    assert op_rows == [20]


def test_topk_teacher_ids_of_skipped_rows_are_still_checked():
    x, w, t = prompt_masked(20, 50, 24, torch.float32, ignored=10)
    ids, z = _teacher(20, 50, torch.float32)[2:]
    ids = ids.clone()
    ids[0, 0] = 50  # an ignored row
    with pytest.raises(ValueError, match="outside"):
        mk.linear_topk_kl_divergence(x, w, ids, z, t)


def test_modules_pass_it_on(op_rows):
    x, w, t = prompt_masked(16, 30, 12, torch.float32, ignored=8)
    emo = mk.EMOLoss(skip_ignored_rows=False)
    assert "skip_ignored_rows=False" in repr(emo)
    emo(x, w, t)
    distill = mk.LinearDistillationLoss("jsd", skip_ignored_rows=True)
    assert "skip_ignored_rows=True" in repr(distill)
    distill(x, w, *_teacher(16, 30, torch.float32)[:2], t)
    assert op_rows == [16, 8]
    for make in (lambda: mk.EMOLoss(skip_ignored_rows=1), lambda: mk.LinearDistillationLoss(skip_ignored_rows="no"),
                 lambda: mk.log_probs_and_entropy(x, w, t, skip_ignored_rows=0)):
        with pytest.raises(TypeError, match="skip_ignored_rows must be None or a bool"):
            make()
