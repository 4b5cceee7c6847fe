"""skip_ignored_rows inside torch.compile: the forward op runs every row (no data-dependent shapes in a graph) and
the backward op runs on the labelled rows alone (its skip_ignored_share argument; the 3-GEMM path, whose forward is
the whole step, skips there); a call that needs no gradient skips in its forward op (skip_in_forward). Results equal
those of every row; which rows each pass saw is read from the rows the ops selected (ops.labelled_rows,
tests/helpers.record_selected_rows)."""
import pytest
import torch

import marginkern as mk
from tests.helpers import assert_close_rel, record_selected_rows
from tests.test_skip_ignored_rows import OTHER_LOSSES, _teacher, outputs_and_grads, prompt_masked


@pytest.fixture
def selected_rows(monkeypatch):
    return record_selected_rows(monkeypatch)


LOSSES = dict(OTHER_LOSSES,
              linear_ce=lambda x, w, t, **k: mk.linear_cross_entropy(x, w, t, **k),
              linear_ce_options=lambda x, w, t, **k: mk.linear_cross_entropy(
                  x, w, t, label_smoothing=0.1, z_loss=1e-2, softcap=3.0, focal_gamma=1.5, grad_filter_eps=1e-30,
                  return_token_accuracy=True, token_scaling=True, **k),
              linear_ce_class_weight=lambda x, w, t, **k: mk.linear_cross_entropy(
                  x, w, t, label_smoothing=0.1, gamma_ce=0.3,
                  class_weight=torch.linspace(0.5, 1.5, w.shape[0], dtype=w.dtype), **k),
              linear_ce_3_gemm=lambda x, w, t, reduction, **k: mk.linear_cross_entropy(
                  x, w, t, logits_buffer_mb=0.02, reduction="sum" if reduction == "none" else reduction, **k))


def compiled(fn, **opts):
    return torch.compile(lambda x, w, t, reduction: fn(x, w, t, reduction=reduction, **opts), fullgraph=True,
                         backend="aot_eager")


def check_compiled_backward_runs_the_labelled_rows(name, reduction, selected_rows, device="cpu"):
    torch._dynamo.reset()
    x, w, t = (v.to(device) for v in prompt_masked(40, 301, 24, torch.float32, ignored=15))
    _teacher(40, 301, torch.float32)  # made outside the compiled function (a generator cannot be traced)
    got = outputs_and_grads(compiled(LOSSES[name]), x, w, t, reduction)
    # the forward ops ran every row (they select none), the backward op (the 3-GEMM forward) the 25 labelled ones
    assert selected_rows == [25]
    want = outputs_and_grads(compiled(LOSSES[name], skip_ignored_rows=False), x, w, t, reduction)
    assert selected_rows == [25]  # no share: nothing selected
    assert len(got) == len(want)
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert_close_rel(g, e, torch.float32, f"{name} output {i}", floor=1.0 if i < len(got) - 2 else 1e-3)
    assert not got[-2][:15].any()  # the ignored rows' input gradient


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compiled_backward_runs_the_labelled_rows(backend, name, reduction, monkeypatch, selected_rows):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    if name == "log_probs_and_entropy" and reduction == "mean":
        pytest.skip("log_probs_and_entropy has no reduction")
    check_compiled_backward_runs_the_labelled_rows(name, reduction, selected_rows)


def test_compiled_share_follows_the_option(selected_rows):
    """None skips from 1/8 of the rows ignored, True from one, False never; eager calls skip in the forward op."""
    x, w, t = prompt_masked(64, 50, 8, torch.float32, ignored=7)  # 7 < 64 / 8
    for skip in (None, True, False):
        torch._dynamo.reset()
        outputs_and_grads(compiled(mk.linear_cross_entropy, skip_ignored_rows=skip), x, w, t, "mean")
    assert selected_rows == [64, 57]  # False: no share, no selection
    outputs_and_grads(mk.linear_cross_entropy, x, w, t, "mean", skip_ignored_rows=True)
    assert selected_rows == [64, 57]  # eager: the function selected the rows, its backward op got no share


def test_compiled_step_returns_the_lse_of_every_row(selected_rows):
    """return_lse reports every row's lse (and gives it a gradient): nothing is skipped."""
    x, w, t = prompt_masked(40, 60, 16, torch.float32, ignored=20)
    loss, lse = compiled(mk.linear_cross_entropy, return_lse=True)(x, w, t, "none")
    torch.autograd.grad((loss.sum() + lse.sum()), (x, w))
    assert selected_rows == []


def _backward_args(N=12, C=40, D=8, ignored=5):
    x, w, t = prompt_masked(N, C, D, torch.float64, ignored=ignored)
    loss, lse, _ = torch.ops.marginkern.linear_cross_entropy(x, w, t, None, -100, 0.0, 1e-3, None, 0.0, 0.0)
    return (torch.rand(N, dtype=torch.float64), x.detach(), w.detach(), t, None, lse, -100, 0.0, 1e-3, None, 0.0, 0.0,
            None, True, False, None, None)


def test_backward_op_argument(monkeypatch):
    """The backward op's implementation runs on the labelled rows (7 of 12) and its dX comes back in place."""
    import marginkern.ops as ops
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    rows_run, backward = [], ops.linear_ce_backward
    monkeypatch.setattr(ops, "linear_ce_backward", lambda g, x, *a, **k: rows_run.append(x.shape[0]) or
                        backward(g, x, *a, **k))
    args = _backward_args()
    full = torch.ops.marginkern.linear_cross_entropy_backward(*args)
    skipped = torch.ops.marginkern.linear_cross_entropy_backward(*args, 0.0)
    assert rows_run == [12, 7]
    torch.testing.assert_close(skipped, full, rtol=1e-12, atol=1e-15)
    assert not skipped[0][:5].any()
    torch.library.opcheck(torch.ops.marginkern.linear_cross_entropy_backward.default, args + (0.0,))
    x, w, t = args[1:4]
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy.default,
                          (x.clone().requires_grad_(), w.clone().requires_grad_(), t, 1.0, -100, 0.0))


def test_backward_op_argument_errors():
    args = _backward_args()
    for share in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="skip_ignored_share"):
            torch.ops.marginkern.linear_cross_entropy_backward(*args, share)
    with pytest.raises(ValueError, match="skip_ignored_share cannot be combined with a differentiable lse"):
        torch.ops.marginkern.linear_cross_entropy_backward(*args[:-1], torch.ones(12, dtype=torch.float64), 0.5)
    x, w, t = args[1:4]
    with pytest.raises(ValueError, match="skip_ignored_share cannot be combined with a differentiable lse"):
        torch.ops.marginkern.linear_cross_entropy(x, w, t, None, -100, 0.0, 0.0, None, 0.0, 0.0, None, None, True,
                                                  False, 0.125)


def _outputs(fn, x, w, t, reduction, **opts):
    out = fn(x, w, t, reduction=reduction, **opts)
    return out if isinstance(out, tuple) else (out,)


def check_compiled_call_without_gradient_skips_in_its_forward(name, frozen, selected_rows, device="cpu"):
    """A compiled call that needs no gradient (under no_grad, or `frozen`: inputs that need none; evaluation, a
    reference model's log-probs) has no backward pass to skip in: its forward op skips (skip_in_forward), with
    results equal to every row's."""
    torch._dynamo.reset()
    reduction = "sum" if name == "linear_ce_3_gemm" else "none"
    x, w, t = (v.detach().to(device) for v in prompt_masked(40, 301, 24, torch.float32, ignored=15))
    _teacher(40, 301, torch.float32)
    with torch.set_grad_enabled(frozen):
        got = _outputs(compiled(LOSSES[name]), x, w, t, reduction)
        assert selected_rows == [25]
        want = _outputs(compiled(LOSSES[name], skip_ignored_rows=False), x, w, t, reduction)
    assert selected_rows == [25]
    for i, (g, e) in enumerate(zip(got, want)):
        assert g.shape == e.shape and g.dtype == e.dtype and not g.requires_grad
        assert_close_rel(g, e, torch.float32, f"{name} output {i}", floor=1.0)
    if reduction == "none":
        assert not got[0][:15].any()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("frozen", [False, True], ids=["no_grad", "frozen"])
def test_compiled_call_without_gradient_skips_in_its_forward(backend, name, frozen, monkeypatch, selected_rows):
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    check_compiled_call_without_gradient_skips_in_its_forward(name, frozen, selected_rows)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_compiled_call_with_every_row_ignored(backend, name, monkeypatch, selected_rows):
    """Every row ignored: the ops run on no row at all, and their per-row outputs and dX still have every row
    (zeros), under compile with and without gradients (a 0-row dX once came back as the input's gradient)."""
    monkeypatch.setenv("MARGINKERN_BACKEND", backend)
    torch._dynamo.reset()
    reduction = "sum" if name == "linear_ce_3_gemm" else "none"
    x, w, t = prompt_masked(12, 40, 8, torch.float32, ignored=12)
    _teacher(12, 40, torch.float32)
    got = outputs_and_grads(compiled(LOSSES[name], skip_ignored_rows=True), x, w, t, reduction)
    want = outputs_and_grads(compiled(LOSSES[name], skip_ignored_rows=False), x, w, t, reduction)
    with torch.no_grad():
        got_no_grad = _outputs(compiled(LOSSES[name], skip_ignored_rows=True), x, w, t, reduction)
    assert selected_rows == [0, 0]
    for i, (g, e) in enumerate(zip(got + got_no_grad, want + want[:len(got_no_grad)])):
        assert g.shape == e.shape and g.dtype == e.dtype
        assert not g.any(), f"{name} output {i}"
        assert not e.any(), f"{name} output {i}"


def _forward_args(N=12, C=40, D=8, ignored=5):
    x, w, t = prompt_masked(N, C, D, torch.float64, ignored=ignored)
    return x.detach(), w.detach(), t


def test_forward_op_argument(monkeypatch):
    """skip_in_forward: the forward op runs on the labelled rows (7 of 12) and puts zeros in the others' outputs; a
    backward pass through it raises; without a share it does nothing."""
    import marginkern.ops as ops
    monkeypatch.setenv("MARGINKERN_BACKEND", "reference")
    rows_run, forward = [], ops.linear_ce_forward
    monkeypatch.setattr(ops, "linear_ce_forward", lambda x, *a, **k: rows_run.append(x.shape[0]) or
                        forward(x, *a, **k))
    x, w, t = _forward_args()
    op = torch.ops.marginkern.linear_cross_entropy
    args = (x, w, t, None, -100, 0.0, 1e-3, None, 0.0, 0.0, None, None, False, True)
    full = op(*args)
    skipped = op(*args, 0.0, True)
    not_skipped = op(*args, None, True)  # no share: every row (and a backward pass, below)
    assert rows_run == [12, 7, 12]
    for got, want in zip(skipped, full):
        torch.testing.assert_close(got[5:], want[5:], rtol=1e-12, atol=1e-15)
        assert not got[:5].any()
    for got, want in zip(not_skipped, full):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.library.opcheck(op.default, args + (0.0, True))
    loss, _, _ = op(x.clone().requires_grad_(), w, t, *args[3:], 0.0, True)
    with pytest.raises(RuntimeError, match="skip_in_forward=True"):
        loss.sum().backward()
    log_probs = torch.ops.marginkern.log_probs_entropy(x.clone().requires_grad_(), w, t, 1.0, -100, 0.0, True)[0]
    with pytest.raises(RuntimeError, match="skip_in_forward=True"):
        log_probs.sum().backward()
    x_grad = x.clone().requires_grad_()
    torch.ops.marginkern.log_probs_entropy(x_grad, w, t, 1.0, -100, None, True)[0].sum().backward()
    assert x_grad.grad[5:].any()
    torch.library.opcheck(torch.ops.marginkern.log_probs_entropy.default, (x, w, t, 1.0, -100, 0.0, True))


def test_compiled_call_without_gradient_checks_the_ignored_rows_teacher_ids():
    """linear_topk_kl_divergence checks the ids of ignored rows too (its docstring): also when its forward op skips
    them (the op checks every row before it leaves rows out)."""
    x, w, t = prompt_masked(16, 50, 8, torch.float32, ignored=6)
    ids, logits = torch.randint(0, 50, (16, 4)), torch.randn(16, 4)
    ids[0, 0] = 55  # row 0 is ignored
    step = torch.compile(lambda *a: mk.linear_topk_kl_divergence(*a), fullgraph=True, backend="aot_eager")
    for grad in (False, True):
        with torch.set_grad_enabled(grad), pytest.raises(Exception, match=r"holds token 55, outside \[0, 50\)"):
            step(x.detach().requires_grad_(grad), w.detach(), ids, logits, t)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("frozen", [False, True], ids=["no_grad", "frozen"])
def test_program_exported_without_gradients_can_be_trained(strict, frozen, selected_rows):
    """torch.export has no guard on grad mode or requires_grad: a program exported under no_grad (or from a frozen
    model) keeps its forward op running every row, so that training it later works."""
    x, w, t = prompt_masked(16, 50, 8, torch.float32, ignored=6)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(w.detach().clone(), requires_grad=not frozen)

        def forward(self, x, t):
            return mk.linear_cross_entropy(x, self.weight, t)

    with torch.set_grad_enabled(frozen):
        program = torch.export.export(Head(), (x.detach(), t), strict=strict)
    module = program.module().requires_grad_()  # unfrozen, to be trained
    loss = module(x.detach(), t)
    loss.backward()
    weight = w.detach().requires_grad_()
    want = mk.linear_cross_entropy(x.detach(), weight, t)
    torch.testing.assert_close(loss, want)
    (exported_weight,) = module.parameters()
    torch.testing.assert_close(exported_weight.grad, torch.autograd.grad(want, weight)[0])
