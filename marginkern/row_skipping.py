"""Running an LM loss on the rows whose target is not ignore_index (prompt and padding tokens cost no GEMM work).

Two places do it, both with these helpers: an eager call of a public function runs the forward op on those rows
alone (functional.py; the vocab-parallel losses in distributed.py, once every rank agrees), and inside a compiled
graph, where shapes cannot follow the data, the backward op does (ops.py: its `skip_ignored_share` argument). A
skipped row contributes nothing either way: its loss and gradient are 0 by definition.
"""
import torch

# Rows are skipped by default when at least this share of them is ignored: every GEMM shrinks with them, for one
# host sync and an (n, D) copy of those rows and of their gradient
SKIP_IGNORED_SHARE = 1 / 8


def skip_share(skip_ignored_rows):
    """The ops' `skip_ignored_share` for a public skip_ignored_rows (checks.check_skip_ignored_rows): the least
    share of ignored rows that makes a call skip them (None: the automatic SKIP_IGNORED_SHARE; True: 0.0, any
    ignored row; False: None, never)."""
    if skip_ignored_rows is False:
        return None
    return 0.0 if skip_ignored_rows else SKIP_IGNORED_SHARE


def labelled_rows(target, ignore_index, share):
    """The indices of the rows whose target is not ignore_index, when at least `share` (skip_share) of the rows and
    at least one are ignored; None to run every row (also while a CUDA graph is captured: this syncs the host)."""
    if share is None or target.numel() == 0 or (target.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    rows = (target != ignore_index).nonzero().squeeze(1)
    ignored = target.numel() - rows.numel()
    if ignored == 0 or ignored < share * target.numel():
        return None
    return rows


def take_rows(rows, *tensors):
    """The rows `rows` (labelled_rows) of each per-row tensor (None: the tensors as they are); differentiable."""
    return tensors if rows is None else tuple(t.index_select(0, rows) for t in tensors)


def put_rows(rows, n, *values, copy=False):
    """Per-row values of the rows `rows` (labelled_rows) in their places of new (n, ...) tensors, 0 (False)
    elsewhere; rows None: the values as they are, or copies with `copy` (outputs an op saved for its backward pass,
    which a caller's in-place edit, as masking padding, must not reach). Differentiable."""
    if rows is None:
        return tuple(v.clone() for v in values) if copy else values
    # in place into the zeros: index_copy would make a second (n, ...) tensor
    return tuple(v.new_zeros((n,) + v.shape[1:]).index_copy_(0, rows, v) for v in values)
