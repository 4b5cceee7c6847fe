"""Class-centre sampling, as insightface's PartialFC (sample_rate < 1).

Per training step the softmax runs over the classes of the batch's targets plus uniformly drawn other
classes, num_sample = int(sample_rate · C) in all (or every target class when they alone are more). It
cuts the work per step by about sample_rate at the price of an approximate softmax: the loss is the
margin CE over the sampled classes only (label smoothing spreads over them). Evaluation uses all classes.
"""
import torch


def num_sampled_classes(num_classes: int, sample_rate: float) -> int:
    """int(sample_rate · C) (PartialFC's rule), at least 1."""
    return max(1, int(sample_rate * num_classes))


IGNORED = -1  # the ignore_index of the sampled targets (a user's ignore_index may be a valid position)


def sample_classes(target, num_classes, num_sample, ignore_index=-100, generator=None):
    """(index, local_target): `index` (K,) the sorted class ids the step keeps (every class that is a target
    in the batch, then random others up to num_sample: K = max(min(num_sample, C), number of target
    classes)); `local_target` (int64) the position of each row's target in `index`, IGNORED (−1) for the
    rows with ignore_index: the caller computes the loss with ignore_index=IGNORED. `generator` must be on
    target's device.

    Syncs with the device once (torch.unique), as PartialFC does. Not traceable by torch.compile with
    fullgraph=True (K depends on the data).
    """
    target = target.long()  # a uint8 index would act as a mask
    valid = target != ignore_index
    positive = torch.unique(torch.where(valid, target, IGNORED))
    positive = positive[positive >= 0]
    num_sample = min(num_sample, num_classes)
    if positive.numel() >= num_sample:
        index = positive
    else:
        score = torch.rand(num_classes, device=target.device, generator=generator)
        score[positive] = 2.0  # the target classes always survive the top-k
        index = torch.topk(score, num_sample, sorted=False).indices.sort().values
    local = torch.searchsorted(index, torch.where(valid, target, 0))
    return index, torch.where(valid, local, IGNORED)


def sampled_class_rows(weight, index, rows_per_class=1):
    """The rows of `weight` (C·rows_per_class, D) that belong to the classes `index`, class by class (all K
    sub-centres of each sampled class)."""
    return weight.unflatten(0, (-1, rows_per_class))[index].flatten(0, 1)
