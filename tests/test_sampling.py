"""Class-centre sampling (PartialFC's sample_rate) of the margin modules."""
import pytest
import torch

import marginkern as mk
from marginkern.sampling import num_sampled_classes, sample_classes


def test_sample_keeps_every_target_class_and_remaps_targets():
    gen = torch.Generator().manual_seed(1)
    target = torch.tensor([5, 99, 5, -100, 42, 7])
    index, local = sample_classes(target, 100, 10, generator=gen)
    assert index.numel() == 10 and torch.equal(index, index.sort().values) and index.unique().numel() == 10
    valid = target != -100
    assert torch.equal(index[local[valid]], target[valid])
    assert local[3] == -1  # sampling.IGNORED, whatever the caller's ignore_index


def test_more_target_classes_than_num_sample_keeps_exactly_the_targets():
    target = torch.arange(20).flip(0)
    index, local = sample_classes(target, 50, 5)
    assert torch.equal(index, torch.arange(20))
    assert torch.equal(index[local], target)


def test_all_rows_ignored_samples_random_classes():
    index, local = sample_classes(torch.full((4,), -1), 30, 6, ignore_index=-1)
    assert index.numel() == 6 and (local == -1).all()


def test_module_loss_and_gradients_are_those_of_the_sampled_classes():
    torch.manual_seed(0)
    head = mk.ArcFaceLoss(16, 500, sample_rate=0.1)
    x = torch.randn(24, 16, requires_grad=True)
    t = torch.randint(0, 500, (24,))
    t[3] = -100
    state = torch.get_rng_state()
    loss = head(x, t)
    gx, gw = torch.autograd.grad(loss, (x, head.weight))

    torch.set_rng_state(state)  # the same draw
    index, local = sample_classes(t, 500, num_sampled_classes(500, 0.1))
    w = head.weight.detach()[index].requires_grad_()
    want = mk.margin_cross_entropy(x, w, local, scale=64.0, m2=0.5, ignore_index=-1)
    ex, ew = torch.autograd.grad(want, (x, w))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gx, ex)
    torch.testing.assert_close(gw[index], ew)
    unsampled = torch.ones(500, dtype=torch.bool)
    unsampled[index] = False
    assert index.numel() == 50 and not gw[unsampled].any()


def test_eval_mode_and_rate_one_use_every_class():
    torch.manual_seed(0)
    head = mk.CosFaceLoss(8, 64, sample_rate=0.25)
    full = mk.CosFaceLoss(8, 64)
    rate_one = mk.CosFaceLoss(8, 64, sample_rate=1.0)
    full.weight.data.copy_(head.weight.data)
    rate_one.weight.data.copy_(head.weight.data)
    x, t = torch.randn(10, 8), torch.randint(0, 64, (10,))
    torch.testing.assert_close(rate_one(x, t), full(x, t))
    head.eval()
    torch.testing.assert_close(head(x, t), full(x, t))
    head.train()
    assert not torch.allclose(head(x, t), full(x, t))


@pytest.mark.parametrize("ignore_index", [1, 0, -100])
def test_a_non_negative_ignore_index_is_not_confused_with_a_sampled_position(ignore_index):
    # review finding: with ignore_index=1, the row whose class landed at position 1 of the sample was ignored
    torch.manual_seed(0)
    head = mk.ArcFaceLoss(8, 50, sample_rate=0.1, ignore_index=ignore_index, reduction="none")
    t = torch.tensor([ignore_index if ignore_index >= 0 else -100, 3, 7, 11, 20, 45])
    x = torch.randn(6, 8)
    loss = head(x, t)
    assert loss[0] == 0 and (loss[1:] > 0).all()
    head.eval()
    assert head(x, t)[0] == 0


@pytest.mark.parametrize("target,exc,match", [
    (torch.tensor([1, -5, 2]), ValueError, "target"), (torch.tensor([1, 50, 2]), ValueError, "target"),
    (torch.tensor([1.0, 2.0, 3.0]), TypeError, "integer"), (torch.tensor([[1, 2, 3]]), ValueError, "shape"),
])
def test_sampling_checks_the_targets_first(target, exc, match):
    head = mk.ArcFaceLoss(8, 50, sample_rate=0.2)
    with pytest.raises(exc, match=match):
        head(torch.randn(3, 8), target)


def test_uint8_targets_and_more_samples_than_classes():
    index, local = sample_classes(torch.tensor([3, 1], dtype=torch.uint8), 5, 99)
    assert torch.equal(index, torch.arange(5)) and torch.equal(local, torch.tensor([3, 1]))


def test_rate_zero_keeps_only_the_target_classes():
    # insightface's configs use sample_rate=0 for "the batch's classes only" (e.g. wf42m_pfc0008)
    head = mk.ArcFaceLoss(8, 50, sample_rate=0.0)
    x, t = torch.randn(6, 8), torch.tensor([7, 3, 7, 41, 3, 0])
    classes = torch.unique(t)
    want = mk.margin_cross_entropy(x, head.weight.detach()[classes], torch.searchsorted(classes, t))
    torch.testing.assert_close(head(x, t).detach(), want)


@pytest.mark.parametrize("rate", [1.5, -0.1, float("nan")])
def test_bad_sample_rate_raises(rate):
    with pytest.raises(ValueError, match="sample_rate"):
        mk.ArcFaceLoss(8, 10, sample_rate=rate)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_sample(use_reentrant):
    """torch.utils.checkpoint reruns the forward pass in the backward; the rerun must draw the classes the
    first run drew (the sampler takes its seed from the global generator, which checkpoint restores), else
    the loss and its gradients would belong to two different samples."""
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    head = mk.ArcFaceLoss(16, 400, sample_rate=0.2)
    x, t = torch.randn(12, 16, requires_grad=True), torch.randint(0, 400, (12,))
    torch.manual_seed(7)
    plain = head(x, t)
    want = torch.autograd.grad(plain, (x, head.weight))
    torch.manual_seed(7)
    checkpointed = checkpoint(lambda a: head(a, t), x, use_reentrant=use_reentrant)
    checkpointed.backward()
    assert torch.equal(checkpointed.detach(), plain.detach())
    assert torch.equal(x.grad, want[0]) and torch.equal(head.weight.grad, want[1])
