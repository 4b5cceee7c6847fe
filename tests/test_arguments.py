"""Argument handling shared by every loss: the raw torch.ops.marginkern.* ops check what the public functions
check, hyperparameters take any real number but not a tensor or a bool, ignore_index must be an int (a float
was truncated for the op but compared as a float for the mean), and modules name their own arguments."""
import numpy as np
import pytest
import torch

import marginkern as mk
from tests.helpers import make_case

LOSSES = {
    "margin": lambda x, w, t, **kw: mk.margin_cross_entropy(x, w, t, **kw),
    "linear": lambda x, w, t, **kw: mk.linear_cross_entropy(x, w, t, **kw),
    "emo": lambda x, w, t, **kw: mk.emo_loss(x, w, t, **kw),
    "emo_ce": lambda x, w, t, **kw: mk.emo_cross_entropy(x, w, t, **kw),
}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("ignore_index", [1.5, 1.0, None, "1"])
def test_ignore_index_must_be_an_int(loss, ignore_index):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        LOSSES[loss](x, w, t, ignore_index=ignore_index)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("ignore_index", [2**63, -2**63 - 1])
def test_ignore_index_beyond_int64_is_named(loss, ignore_index):
    """(it overflowed inside a cast, or in the op's schema on the C++ path, without the argument's name)"""
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(ValueError, match="ignore_index must fit in int64"):
        LOSSES[loss](x, w, t, ignore_index=ignore_index)


def test_an_int_beyond_the_float_range_is_not_finite():
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        mk.log_probs_and_entropy(x, w, t, temperature=10**400)  # (it overflowed at float())
    with pytest.raises(ValueError, match="scale must be a finite number"):
        mk.margin_cross_entropy(x, w, t, scale=-10**400)


@pytest.mark.parametrize("loss", LOSSES)
def test_integer_like_ignore_index_is_the_int(loss):
    x, w, t = make_case(6, 6, 3, requires_grad=False)
    t[:2] = 1
    want = LOSSES[loss](x, w, t, ignore_index=1)
    torch.testing.assert_close(LOSSES[loss](x, w, t, ignore_index=np.int64(1)), want)
    torch.testing.assert_close(LOSSES[loss](x, w, t, ignore_index=torch.tensor(1)), want)


def test_numpy_hyperparameters_are_numbers():
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    want = mk.margin_cross_entropy(x, w, t, scale=32.0, m2=0.25)
    torch.testing.assert_close(mk.margin_cross_entropy(x, w, t, scale=np.float32(32), m2=np.float64(0.25)), want)
    torch.testing.assert_close(mk.linear_cross_entropy(x, w, t, z_loss=np.float32(1e-3)),
                               mk.linear_cross_entropy(x, w, t, z_loss=1e-3))
    torch.testing.assert_close(mk.cosent_loss(x[:, 0], t, scale=np.int64(20)), mk.cosent_loss(x[:, 0], t))


@pytest.mark.parametrize("value", [torch.tensor(64.0), True, "64", None])
def test_hyperparameter_of_another_type_is_a_type_error(value):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(TypeError, match="scale must be a real number"):
        mk.margin_cross_entropy(x, w, t, scale=value)


@pytest.mark.parametrize("normalize", [None, "no", 1])
def test_normalize_must_be_a_bool(normalize):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(TypeError, match="normalize must be a bool"):
        mk.margin_cross_entropy(x, w, t, normalize=normalize)


# ---- the raw ops ------------------------------------------------------------------------------------------

def _margin_op(x, w, t, m1=1.0, label_smoothing=0.0):
    return torch.ops.marginkern.margin_cross_entropy(x, w, t, 64.0, m1, 0.5, 0.0, True, True, label_smoothing, -100)


def _linear_op(x, w, t, bias=None, label_smoothing=0.0, focal_gamma=0.0, gamma_ce=0.0):
    return torch.ops.marginkern.linear_cross_entropy(x, w, t, bias, -100, label_smoothing, 0.0, None, focal_gamma,
                                                     gamma_ce)


def _buffered_op(x, w, t, reduction="mean"):
    return torch.ops.marginkern.linear_cross_entropy_buffered(x, w, t, None, -100, 0.0, 0.0, None, 0.0, 0.0,
                                                              reduction, 1 << 20, False, False, False)


def _emo_op(x, w, t, cost=None):
    return torch.ops.marginkern.emo_cross_entropy(x, w, t, w if cost is None else cost, -100)


@pytest.mark.parametrize("call,exc,match", [
    (lambda x, w, t: _margin_op(x, w, t.float()), TypeError, "target must hold integer"),
    (lambda x, w, t: _margin_op(x, w, t[:, None]), ValueError, "target must have shape"),
    (lambda x, w, t: _margin_op(x, w[:, :-1], t), ValueError, "weight must have shape"),
    (lambda x, w, t: _margin_op(x, w, t, m1=0.5), ValueError, "m1"),
    (lambda x, w, t: _margin_op(x, w, t, label_smoothing=2.0), ValueError, "label_smoothing"),
    (lambda x, w, t: _linear_op(x, w[:, :-1], t), ValueError, "weight must have shape"),
    (lambda x, w, t: _linear_op(x, w, t.float()), TypeError, "target"),
    (lambda x, w, t: _linear_op(x, w, t, bias=torch.zeros(2)), ValueError, "bias"),
    (lambda x, w, t: _linear_op(x, w, t, label_smoothing=-1.0), ValueError, "label_smoothing"),
    (lambda x, w, t: _linear_op(x, w, t, focal_gamma=1.0, gamma_ce=0.5), ValueError, "cannot be combined"),
    (lambda x, w, t: _buffered_op(x, w, t, reduction="none"), ValueError, "reduction"),
    (lambda x, w, t: _buffered_op(x.double(), w, t), TypeError, "weight must have the dtype"),
    (lambda x, w, t: _emo_op(x, w, t, cost=w[:-1]), ValueError, "cost_embedding"),
    (lambda x, w, t: _emo_op(x[0], w, t), ValueError, "input must have shape"),
    (lambda x, w, t: torch.ops.marginkern.cosent(x[:, 0], t[:-1], 20.0), ValueError, "labels"),
    (lambda x, w, t: torch.ops.marginkern.cosent(x[:, 0], t, -1.0), ValueError, "scale"),
    (lambda x, w, t: torch.ops.marginkern.pairwise_cosine(x, x[:, :-1]), ValueError, "embeddings_b"),
])
def test_raw_ops_name_the_bad_argument(call, exc, match):
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with pytest.raises(exc, match=match):
        call(x, w, t)


@pytest.mark.parametrize("call,match", [
    (lambda x, w, t: _margin_op(x, w, t, m1=0.5), "m1"),
    (lambda x, w, t: _margin_op(x, w, t.float()), "target must hold integer"),
    (lambda x, w, t: _linear_op(x, w[:, :-1], t), "weight must have shape"),
    (lambda x, w, t: _buffered_op(x, w, t, reduction="none"), "reduction"),
    (lambda x, w, t: _emo_op(x, w, t, cost=w[:-1]), "cost_embedding"),
    (lambda x, w, t: torch.ops.marginkern.cosent(x[:, 0], t, -1.0), "scale"),
])
def test_fake_kernels_check_too(call, match):
    # under FakeTensorMode only the fake kernels run (what torch.compile traces): they must name the bad
    # argument themselves, at trace time, not leave it to the real kernel at run time
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w, t = make_case(4, 6, 3, requires_grad=False)
    with FakeTensorMode() as mode:
        fx, fw, ft = mode.from_tensor(x), mode.from_tensor(w), mode.from_tensor(t)
        with pytest.raises((TypeError, ValueError), match=match):
            call(fx, fw, ft)


# ---- modules --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: mk.ArcFaceLoss(8, 5, margin=-0.1), ValueError, "margin must lie"),
    # pytorch-metric-learning's ArcFaceLoss takes its margin in degrees (28.6): here it would train with 28.6 radians
    (lambda: mk.ArcFaceLoss(8, 5, margin=28.6), ValueError, r"radians.*math.radians\(28.6\) = 0.4992"),
    (lambda: mk.CurricularFaceLoss(8, 5, margin=28.6), ValueError, "margin is an angle in radians"),
    (lambda: mk.AdaFaceLoss(8, 5, margin=22.9), ValueError, "margin is an angle in radians"),
    (lambda: mk.MagFaceLoss(8, 5, lower_margin=25.8, upper_margin=45.8), ValueError, "lower_margin is an angle"),
    (lambda: mk.ElasticArcFaceLoss(8, 5, margin=28.6), ValueError, "margin is an angle in radians"),
    (lambda: mk.MVSoftmaxLoss(8, 5, margin=28.6, margin_type="arc"), ValueError, "margin is an angle in radians"),
    (lambda: mk.CosFaceLoss(8, 5, margin=float("nan")), ValueError, "margin must be a finite"),
    (lambda: mk.SphereFaceLoss(8, 5, margin=0.5), ValueError, "margin must lie"),
    (lambda: mk.LargeMarginSoftmaxLoss(8, 5, margin=0), ValueError, "margin must lie"),
    (lambda: mk.ArcFaceLoss(8.7, 5), TypeError, "embedding_dim must be an int"),
    (lambda: mk.ArcFaceLoss(8, "5"), TypeError, "num_classes must be an int"),
    (lambda: mk.ArcFaceLoss(0, 5), ValueError, "embedding_dim must be ≥ 1"),
    (lambda: mk.EMOLoss(cost_embedding=[[1.0]]), TypeError, "cost_embedding must be a torch.Tensor"),
    # at construction, not at the first forward (a user audit)
    (lambda: mk.EMOLoss(cost_embedding=torch.ones(5)), ValueError, r"cost_embedding must have shape \(C, E\)"),
    (lambda: mk.EMOLoss(cost_embedding=torch.ones(5, 3, dtype=torch.long)), TypeError, "must be a float tensor"),
    (lambda: mk.EMOLoss(cost_embedding=torch.ones(5, 3).to(torch.float8_e4m3fn)), TypeError, "must be a float tensor"),
    (lambda: mk.LinearCrossEntropyLoss(class_weight=[1.0, 2.0]), TypeError, "class_weight must be a torch.Tensor"),
])
def test_module_errors_use_the_modules_own_argument_names(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_module_input_of_the_wrong_width_names_embedding_dim():
    with pytest.raises(ValueError, match=r"embeddings must have shape \(N, embedding_dim=8\)"):
        mk.ArcFaceLoss(8, 5)(torch.randn(4, 9), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("make", [
    lambda: mk.ArcFaceLoss(16, 10, sample_rate=0.5, ignore_index=-100.0),
    lambda: mk.LinearCrossEntropyLoss(ignore_index=1.5),
    lambda: mk.EMOLoss(ignore_index=None),
])
def test_modules_check_ignore_index_when_built(make):
    # the sampled training path used ignore_index before any loss function checked it
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        make()


def test_margin_module_checks_normalize_when_built():
    with pytest.raises(TypeError, match="normalize must be a bool"):
        mk.CombinedMarginLoss(8, 5, normalize="yes")


def test_margin_module_repr_lists_every_option():
    text = repr(mk.CombinedMarginLoss(8, 5, 1.0, 0.3, 0.2, label_smoothing=0.1, ignore_index=3, reduction="sum"))
    for part in ("embedding_dim=8", "num_classes=5", "scale=64.0", "m1=1.0", "m2=0.3", "m3=0.2", "normalize=True",
                 "margin_grad='exact'", "label_smoothing=0.1", "ignore_index=3", "reduction='sum'"):
        assert part in text, (part, text)


@pytest.mark.parametrize("module", ["linear", "emo"])
def test_llm_modules_take_an_fp32_head_under_autocast(module):
    # an fp32 lm_head behind a bf16 autocast backbone (Liger-Kernel #305): the module casts the head as F.linear
    # would there, and the fp32 parameter gets an fp32 gradient
    x, w, t = make_case(6, 10, 8)
    head = torch.nn.Parameter(w.detach().clone())
    loss_fn = mk.LinearCrossEntropyLoss() if module == "linear" else mk.EMOLoss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = x.detach().bfloat16().requires_grad_()
        loss = loss_fn(hidden, head, t)
    loss.backward()
    assert head.grad is not None and head.grad.dtype == torch.float32 and torch.isfinite(head.grad).all()
    want = loss_fn(hidden.detach(), head.detach().bfloat16(), t)
    torch.testing.assert_close(loss.detach(), want)
    with pytest.raises(TypeError, match="modules do this for you"), torch.autocast("cpu", dtype=torch.bfloat16):
        (mk.linear_cross_entropy if module == "linear" else mk.emo_loss)(hidden, head, t)


@pytest.mark.parametrize("call", [
    lambda x, w, t: mk.linear_cross_entropy(x.to_sparse(), w, t),
    lambda x, w, t: mk.linear_cross_entropy(x, w.to_sparse_csr(), t),
    lambda x, w, t: mk.margin_cross_entropy(x.to_sparse(), w, t),
    lambda x, w, t: mk.emo_cross_entropy(x, w, t, cost_embedding=w.to_sparse()),
    lambda x, w, t: mk.proxy_anchor_loss(x, w.to_sparse(), t),
    lambda x, w, t: mk.info_nce_loss(x.to_sparse(), w[:6]),
    lambda x, w, t: mk.cosent_loss(x[:, 0].to_sparse(), t.float()),
])
def test_sparse_tensors_are_refused_by_name(call):
    """A sparse argument is refused like a wrong dtype (a layout fuzzer found internal errors: "unsupported memory
    format option", NotImplementedError on SparseCPU)."""
    x, w, t = torch.randn(6, 8), torch.randn(13, 8), torch.randint(0, 13, (6,))
    with pytest.raises(TypeError, match=r"must be a dense tensor, got layout torch.sparse_(coo|csr) \(call .to_dense"):
        call(x, w, t)
