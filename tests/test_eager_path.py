"""ops.call: in plain eager mode the public functions run each op's implementation through a
torch.autograd.Function twin (no torch.library dispatch: ~80 µs less host time per step), everywhere else
through the op. Both paths must give bit-identical losses and gradients, and the op path must still be
taken where its registrations matter (fake tensors, dispatch modes, torch.compile, functorch, double
backward)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import marginkern as mk
from marginkern import ops

OP_NAMES = ("margin_cross_entropy", "margin_cross_entropy_backward", "linear_cross_entropy",
            "linear_cross_entropy_backward", "linear_cross_entropy_buffered", "emo_cross_entropy",
            "emo_cross_entropy_backward", "pairwise_cosine", "pairwise_cosine_backward", "cosent", "cosent_backward",
            "proxy_anchor", "proxy_anchor_backward")


@pytest.fixture(autouse=True)
def twins_enabled(monkeypatch):
    """These tests are about the default: a MARGINKERN_EAGER_TWINS=0 in the environment must not change it."""
    monkeypatch.delenv("MARGINKERN_EAGER_TWINS", raising=False)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that went through the torch.library ops (not the eager twins)."""
    counts = dict.fromkeys(OP_NAMES, 0)
    for name in OP_NAMES:
        op = ops._OPS[name]

        def counted(*args, _op=op, _name=name):
            counts[_name] += 1
            return _op(*args)
        monkeypatch.setitem(ops._OPS, name, counted)
    return counts


def _case(dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(10, 12, dtype=dtype, requires_grad=True)
    w = torch.randn(30, 12, dtype=dtype, requires_grad=True)
    b = torch.randn(30, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 30, (10,))
    t[3] = -100
    return x, w, b, t


LOSSES = {
    "margin": lambda x, w, b, t: mk.margin_cross_entropy(x, w, t, label_smoothing=0.1),
    "linear": lambda x, w, b, t: mk.linear_cross_entropy(x, w, t, bias=b, z_loss=1e-3, softcap=20.0),
    "linear 3-GEMM": lambda x, w, b, t: mk.linear_cross_entropy(x, w, t, bias=b, logits_buffer_mb=0.001),
    "emo": lambda x, w, b, t: mk.emo_cross_entropy(x, w, t),
    "cosent": lambda x, w, b, t: mk.cosent_embedding_loss(x, w[:10], t.float()),
    "proxy anchor": lambda x, w, b, t: mk.proxy_anchor_loss(x, w, t),
}


def _loss_and_grads(name, dtype):
    x, w, b, t = _case(dtype)
    loss = LOSSES[name](x, w, b, t)
    inputs = [v for v in (x, w, b) if v.requires_grad]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(LOSSES))
def test_twin_and_op_paths_agree_bit_for_bit(name, dtype, op_calls, monkeypatch):
    loss, grads = _loss_and_grads(name, dtype)
    assert not any(op_calls.values()), f"plain eager went through the ops: {op_calls}"
    monkeypatch.setattr(ops, "_plain_eager", lambda args: False)
    want_loss, want_grads = _loss_and_grads(name, dtype)
    assert any(op_calls.values())
    assert torch.equal(loss, want_loss)
    for got, want in zip(grads, want_grads):
        assert (got is None and want is None) or torch.equal(got, want)


def test_modules_parameters_take_the_twin(op_calls):
    head = mk.ArcFaceLoss(12, 30)
    x, _, _, t = _case()
    head(x, t).backward()
    assert not any(op_calls.values()) and head.weight.grad is not None


def test_dispatch_modes_and_fake_tensors_take_the_op(op_calls):
    x, w, b, t = _case()
    with FlopCounterMode(display=False):
        mk.linear_cross_entropy(x, w, t).backward()
    assert op_calls["linear_cross_entropy"] == 1 and op_calls["linear_cross_entropy_backward"] == 1
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fx, fw, ft = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(t)
        assert mk.margin_cross_entropy(fx, fw, ft).shape == ()
    assert op_calls["margin_cross_entropy"] == 1


def test_compile_and_functorch_take_the_op(op_calls):
    x, w, b, t = _case()
    torch.vmap(lambda a: mk.margin_cross_entropy(a, w.detach(), t))(x.detach()[None].expand(2, -1, -1))
    assert op_calls["margin_cross_entropy"] == 1  # the op, whose vmap fallback loops over the batch
    compiled = torch.compile(lambda a, ww: mk.linear_cross_entropy(a, ww, t), fullgraph=True, backend="eager")
    compiled(x, w).backward()
    assert op_calls["linear_cross_entropy"] >= 1


@pytest.mark.parametrize("name", ["margin", "linear", "emo", "proxy anchor"])
def test_a_double_backward_still_goes_through_the_backward_op(name, op_calls):
    # with create_graph=True the backward ops run as ops, whose autograd refuses a second derivative, naming the
    # loss (it was torch.library's "no autograd formula was registered. Please use register_autograd", which reads
    # as an instruction to the user): it cannot be silently taken as zero through the direct implementation
    x, w, b, t = _case(torch.float64)
    loss = LOSSES[name](x, w, b, t)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    backward_op = {"margin": "margin_cross_entropy", "linear": "linear_cross_entropy", "emo": "emo_cross_entropy",
                   "proxy anchor": "proxy_anchor"}[name]
    with pytest.raises(RuntimeError, match=f"marginkern's {backward_op} cannot be differentiated twice"):
        torch.autograd.grad(g.sum(), x)
    assert op_calls[backward_op + "_backward"] == 1


def test_a_fresh_process_does_not_import_dynamo_for_an_eager_step():
    # the op path imports torch._dynamo (and sympy) at its first call, ≈ 155 MB of modules (README, "Measured
    # so far (CPU only)"); the eager twins do not, so a plain training step never pays that
    import subprocess
    import sys
    code = ("import sys, torch, marginkern as mk\n"
            "x, w = torch.randn(4, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)\n"
            "t = torch.randint(0, 30, (4,))\n"
            "for f in (mk.margin_cross_entropy, mk.linear_cross_entropy, mk.emo_cross_entropy):\n"
            "    f(x, w, t).backward()\n"
            "mk.cosent_embedding_loss(x, w[:4], t.float()).backward()\n"
            "print('torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_the_environment_switch_sends_every_call_through_the_ops(op_calls, monkeypatch):
    monkeypatch.setenv("MARGINKERN_EAGER_TWINS", "0")
    x, w, b, t = _case()
    mk.margin_cross_entropy(x, w, t).backward()
    assert op_calls["margin_cross_entropy"] == 1 and op_calls["margin_cross_entropy_backward"] == 1


@pytest.mark.parametrize("twins", ["1", "0"])
def test_inference_mode_even_with_grad_enabled(twins, monkeypatch):
    # the op skips autograd under inference mode; a Function would try to save inference tensors
    monkeypatch.setenv("MARGINKERN_EAGER_TWINS", twins)
    x, w, b, t = _case()
    for name, loss in LOSSES.items():
        with torch.inference_mode(), torch.enable_grad():
            value = loss(x, w, b, t)
        assert value.grad_fn is None and torch.isfinite(value), name


@pytest.mark.parametrize("twins", ["1", "0"])
def test_forward_mode_ad_raises_instead_of_a_zero_tangent(twins, monkeypatch):
    monkeypatch.setenv("MARGINKERN_EAGER_TWINS", twins)
    x, w, b, t = _case()
    x, w = x.detach(), w.detach()
    with pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        torch.func.jvp(lambda a: mk.margin_cross_entropy(a, w, t), (x,), (torch.ones_like(x),))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode derivative"):
        mk.linear_cross_entropy(fwAD.make_dual(x, torch.ones_like(x)), w, t)


def test_an_undefined_incoming_gradient_leaves_grads_none_as_native_ops_do():
    # a node after the loss that returns None for it: native PyTorch ops (F.cross_entropy) then leave their
    # inputs' .grad None, and so do the twins (torch.library's op path materialises zeros instead)
    class DropGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    x, w, b, t = _case()
    other = torch.ones(2, requires_grad=True)
    (DropGrad.apply(mk.margin_cross_entropy(x, w, t)) + other.sum()).backward()
    assert x.grad is None and w.grad is None and other.grad is not None


@pytest.mark.parametrize("twins", ["1", "0"])
def test_none_reduction_losses_can_be_edited_in_place(twins, monkeypatch):
    """loss = f(..., reduction="none"); loss[pad] = 0; loss.sum().backward(), as with torch's cross_entropy:
    emo_loss returned the tensor its op saves for the backward pass, which then raised (a review finding)."""
    monkeypatch.setenv("MARGINKERN_EAGER_TWINS", twins)
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    t = torch.randint(0, 20, (6,))
    losses = [lambda: mk.margin_cross_entropy(x, w, t, reduction="none"),
              lambda: mk.margin_cross_entropy(x, w, t % 10, reduction="none", subcenters=2),
              lambda: mk.linear_cross_entropy(x, w, t, reduction="none"),
              lambda: mk.emo_loss(x, w, t, reduction="none"),
              lambda: mk.emo_cross_entropy(x, w, t, reduction="none")]
    for loss in losses:
        rows = loss()
        want = torch.autograd.grad(rows[1:].sum(), (x, w))
        rows = loss()
        rows[0] = 0.0
        got = torch.autograd.grad(rows.sum(), (x, w))
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e)
