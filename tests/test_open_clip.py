"""marginkern.open_clip's drop-ins against open_clip's ClipLoss and SigLipLoss arithmetic (one process; the gathered
form in test_distributed.py)."""
import pytest
import torch
import torch.nn.functional as F

from marginkern.open_clip import ClipLoss, SigLipLoss
from tests.test_contrastive import clip_oracle, siglip_oracle


def open_clip_loss(image_features, text_features, logit_scale):
    """open_clip.loss.ClipLoss.forward with world_size = 1 (test_contrastive's oracle on the features as given)."""
    return clip_oracle(image_features, text_features, logit_scale, normalize=False)


def open_siglip_loss(image_features, text_features, logit_scale, logit_bias=None):
    """open_clip.loss.SigLipLoss with world_size = 1 (test_contrastive's oracle; no bias: 0)."""
    bias = 0.0 if logit_bias is None else logit_bias
    return siglip_oracle(image_features, text_features, logit_scale, bias, normalize=False).mean()


def unit_features(B=12, D=16, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    image, text = F.normalize(torch.randn(B, D, dtype=torch.float64), dim=1), F.normalize(
        torch.randn(B, D, dtype=torch.float64), dim=1)
    return image.to(dtype), text.to(dtype)


def loss_and_grads(fn, image, text, *scalars, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, *scalars)]
    loss = fn(*leaves, **kw)
    loss = loss["contrastive_loss"] if isinstance(loss, dict) else loss
    return (loss, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("output_dict", [False, True])
def test_clip_loss_is_open_clips(output_dict):
    image, text = unit_features()
    scale = torch.tensor(14.3, dtype=torch.float64)  # what model.logit_scale.exp() hands over
    got = loss_and_grads(ClipLoss(cache_labels=True), image, text, scale, output_dict=output_dict)
    want = loss_and_grads(open_clip_loss, image, text, scale)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    out = ClipLoss()(image, text, 14.3, output_dict=output_dict)  # a number works too
    assert set(out) == {"contrastive_loss"} if output_dict else out.dim() == 0


def test_clip_loss_takes_open_clips_logit_bias():
    """open_clip's train loop calls loss(**model_out, output_dict=True), logit_bias included when the model has one: the
    value does not change (a constant shift of every logit), the bias gets a zero gradient, as from open_clip."""
    image, text = unit_features()
    scale, bias = torch.tensor(14.3, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    model_out = dict(image_features=image, text_features=text, logit_scale=scale, logit_bias=bias)
    out = ClipLoss()(**model_out, output_dict=True)
    torch.testing.assert_close(out["contrastive_loss"], open_clip_loss(image, text, scale), rtol=1e-12, atol=0)
    (grad,) = torch.autograd.grad(out["contrastive_loss"], bias)
    assert grad == 0
    torch.testing.assert_close(ClipLoss()(image, text, scale, None), ClipLoss()(image, text, scale))


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("output_dict", [False, True])
def test_siglip_loss_is_open_clips(with_bias, output_dict):
    image, text = unit_features(seed=1)
    scalars = (torch.tensor(10.0, dtype=torch.float64),) + ((torch.tensor(-10.0, dtype=torch.float64),) if with_bias
                                                             else ())
    got = loss_and_grads(SigLipLoss(dist_impl="bidir"), image, text, *scalars, output_dict=output_dict)
    want = loss_and_grads(open_siglip_loss, image, text, *scalars)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_features_against_float64(dtype):
    """bf16 features as open_clip's autocast gives them: the loss of those rounded features to fp32 accuracy."""
    image, text = unit_features(B=64, D=32, dtype=dtype, seed=2)
    scale = torch.tensor(100.0)
    for module, oracle in ((ClipLoss(), open_clip_loss), (SigLipLoss(), open_siglip_loss)):
        got = module(image, text, scale)
        want = oracle(image.double(), text.double(), scale.double())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("make,exc,match", [
    (lambda: ClipLoss(use_horovod=True), NotImplementedError, "Horovod"),
    (lambda: SigLipLoss(use_horovod=True), NotImplementedError, "Horovod"),
    (lambda: ClipLoss(world_size=2, rank=0), RuntimeError, "not initialised"),
    (lambda: SigLipLoss(world_size=2, rank=1), RuntimeError, "not initialised"),
    (lambda: ClipLoss(rank=1), ValueError, "0 ≤ rank < world_size"),
    (lambda: ClipLoss(world_size=0), ValueError, "world_size ≥ 1"),
    (lambda: ClipLoss(world_size=2.0), TypeError, "world_size must be an int"),
    (lambda: SigLipLoss(dist_impl="ring"), ValueError, "dist_impl"),
])
def test_bad_arguments_name_them(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_features_of_two_shapes_are_refused():
    image, text = unit_features()
    with pytest.raises(ValueError, match="one shape"):
        ClipLoss()(image, text[:-1], 10.0)
    with pytest.raises(ValueError, match="one shape"):
        SigLipLoss()(image[:, :-1], text, 10.0, -10.0)
