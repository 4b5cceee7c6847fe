"""open_clip's ClipLoss and SigLipLoss as drop-ins: the same constructor arguments and forward(image_features,
text_features, logit_scale, logit_bias=None, output_dict=False), the same loss and gradients, never the B × B logits
(marginkern.info_nce_loss and siglip_loss underneath).

    from marginkern.open_clip import ClipLoss, SigLipLoss
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    loss = loss_fn(image_features, text_features, model.logit_scale.exp())

The features are taken as given: open_clip's models normalise them (normalize=False underneath). logit_scale and
SigLIP's logit_bias are numbers or 0-dim tensors, which get their gradients (ClipLoss takes a logit_bias as open_clip
does and it changes nothing: a softmax does not see a constant shift; a tensor one gets its zero gradient).
cache_labels is accepted and does nothing (no label tensor is made).

With world_size > 1 the features of every rank are gathered over torch.distributed's default process group, which
must have world_size ranks with this process at `rank` (one batch size on every rank). marginkern scores each rank's
images against every rank's texts and its texts against every rank's images, the gathered features' gradients summed
back to their ranks (O(B_local · B) memory), and gives what open_clip's flags give:
- local_loss=True, gather_with_grad=True (open_clip's setting for large batches): that, the rank's own loss;
- local_loss=False, gather_with_grad=True: the same gradients of the features; the value is the global batch's loss
  (all-reduced: one more collective), as open_clip computes it on every rank;
- local_loss=False, gather_with_grad=False (open_clip's default): the global loss's value, and the features' gradients
  1/world_size of the above (open_clip's gradient then flows only through each rank's own copy of the global loss);
- local_loss=True, gather_with_grad=False is refused: open_clip's gradient there leaves out every share that flows
  through a gathered feature, this rank's own keys' included, which no streaming of the global loss reproduces.
With local_loss=False the learned logit_scale's gradient is this rank's share, not the global loss's: equal after
DDP averages the ranks' gradients, as it does for a parameter.
SigLipLoss: each rank's images against every rank's texts (the others' all negatives), their gradients summed back:
the pairs and gradients of open_clip's neighbour exchange, whichever dist_impl and bidir, with every rank's texts in
memory at once. Horovod (use_horovod=True) is not supported.
"""
import torch
import torch.distributed as dist
from torch import nn

from .checks import check_bool, check_int
from .contrastive import _in_wider_dtype, info_nce_loss, siglip_loss
from .process_groups import SharesProcessGroup


def _default_group(rank, world_size, what):
    """(torch.distributed's default group when world_size > 1, checked against rank and world_size, else None; rank;
    world_size)."""
    rank, world_size = check_int("rank", rank), check_int("world_size", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{what} needs world_size ≥ 1 and 0 ≤ rank < world_size, got rank={rank}, "
                         f"world_size={world_size}")
    if world_size == 1:
        return None, rank, world_size
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{what}(world_size={world_size}) gathers features over torch.distributed's default "
                           "process group, which is not initialised (torch.distributed.init_process_group)")
    if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
        raise ValueError(f"{what}(rank={rank}, world_size={world_size}) does not match torch.distributed's default "
                         f"group (rank {dist.get_rank()} of {dist.get_world_size()})")
    return dist.group.WORLD, rank, world_size


def _refuse_horovod(use_horovod, what):
    if check_bool("use_horovod", use_horovod):
        raise NotImplementedError(f"{what}(use_horovod=True): Horovod is not supported; run under torch.distributed")


def _checked_features(image_features, text_features):
    if (isinstance(image_features, torch.Tensor) and isinstance(text_features, torch.Tensor)
            and image_features.shape != text_features.shape):
        raise ValueError(f"image_features and text_features must have one shape (B, D) (pair i: image i, text i), got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    return _in_wider_dtype(image_features, text_features)


class _ScaledGradient(torch.autograd.Function):
    """Identity forward; the gradient times `factor` in the backward."""

    @staticmethod
    def forward(ctx, t, factor):
        ctx.factor = factor
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _global_value(loss, group):
    """loss with the mean of every rank's loss as its value (its gradient unchanged)."""
    total = loss.detach().clone()
    dist.all_reduce(total, group=group)
    return loss + (total / dist.get_world_size(group) - loss.detach())


def _output(loss, output_dict):
    return {"contrastive_loss": loss} if check_bool("output_dict", output_dict) else loss


class ClipLoss(SharesProcessGroup, nn.Module):
    """open_clip.loss.ClipLoss: (CE(logit_scale·I·Tᵀ, i) + CE(logit_scale·T·Iᵀ, i)) / 2 over the batch's pairs."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__()
        _refuse_horovod(use_horovod, "ClipLoss")
        self.local_loss, self.gather_with_grad = check_bool("local_loss", local_loss), check_bool(
            "gather_with_grad", gather_with_grad)
        self.cache_labels = check_bool("cache_labels", cache_labels)
        self.group, self.rank, self.world_size = _default_group(rank, world_size, "ClipLoss")
        if self.group is not None and self.local_loss and not self.gather_with_grad:
            raise NotImplementedError(
                f"ClipLoss(world_size={world_size}, local_loss=True, gather_with_grad=False): open_clip's gradient "
                "there flows only through this rank's own features where they are used directly, which the "
                "streamed loss does not reproduce; gather_with_grad=True gives the full gradient of the same loss "
                "(see marginkern.open_clip's docstring)")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        image_features, text_features = _checked_features(image_features, text_features)
        if self.group is not None and not self.gather_with_grad:  # (local_loss=False) open_clip's 1/W gradient
            factor = 1.0 / self.world_size
            image_features = _ScaledGradient.apply(image_features, factor)
            text_features = _ScaledGradient.apply(text_features, factor)
        loss = info_nce_loss(image_features, text_features, scale=logit_scale, symmetric=True, normalize=False,
                             group=self.group)
        if self.group is not None and not self.local_loss:
            loss = _global_value(loss, self.group)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # its gradient 0, as open_clip's: DDP expects one for a parameter
        return _output(loss, output_dict)

    def extra_repr(self):
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}")


class SigLipLoss(SharesProcessGroup, nn.Module):
    """open_clip.loss.SigLipLoss: −Σ_ij log σ(y_ij·(logit_scale·I_i·T_j + logit_bias)) / B, y_ii = 1, else −1."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None, bidir=True, use_horovod=False):
        super().__init__()
        _refuse_horovod(use_horovod, "SigLipLoss")
        self.cache_labels, self.bidir = check_bool("cache_labels", cache_labels), check_bool("bidir", bidir)
        if dist_impl not in (None, "bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be None, 'bidir', 'shift', 'reduce' or 'gather' (open_clip's; all give "
                             f"the same loss here), got {dist_impl!r}")
        self.dist_impl = dist_impl
        self.group, self.rank, self.world_size = _default_group(rank, world_size, "SigLipLoss")

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        image_features, text_features = _checked_features(image_features, text_features)
        loss = siglip_loss(image_features, text_features, scale=logit_scale,
                           bias=0.0 if logit_bias is None else logit_bias, normalize=False, group=self.group)
        return _output(loss, output_dict)

    def extra_repr(self):
        return f"rank={self.rank}, world_size={self.world_size}"
