"""The public loss functions (DESIGN.md §3). They validate, call a torch.ops.marginkern op (ops.call: in plain
eager mode through its autograd.Function twin) and reduce."""
import torch

from .checks import (check_bias, check_binary_targets, check_bool, check_class_weight, check_classification_inputs,
                     check_circle_arguments, check_cosent_arguments, check_cost_embedding, check_direction,
                     check_embedding_pair, check_global_pointer_arguments,
                     check_extra_outputs, check_finite, check_float_tensor, check_ignore_index,
                     check_integer_dtype, check_jsd_beta, check_labels, check_linear_ce_options, check_logits_buffer,
                     check_margin_options, check_positive_indices, check_proxy_anchor_options, check_reduction,
                     check_shift, check_skip_ignored_rows, check_softcap, check_token_scaling,
                     check_subcenters, check_teacher,
                     check_temperature, check_tensor, check_token_ids, check_topk_arguments, check_topk_teacher,
                     resolve_grad_filter_eps)
from .emo import cost_in_dtype
from .engine import accumulation_dtype
from .linear_ce import LinearCEOptions, target_class_weights, token_scaling_weights
from .ops import call as call_op, eager_on_real_tensors
from .row_skipping import labelled_rows, put_rows, skip_share, take_rows
from .reference import reduce_rows


def margin_cross_entropy(input, weight, target, *, scale=64.0, m1=1.0, m2=0.5, m3=0.0, normalize=True,
                         margin_grad="exact", label_smoothing=0.0, ignore_index=-100, reduction="mean", subcenters=1,
                         lambda_=0.0, hard_negatives=None, hard_negative_threshold=None):
    """Margin-softmax cross-entropy over C classes without materialising the N × C logits.

    Target logit s·ψ(cos θ_y) with ψ the monotone combined margin (m1·θ + m2, then − m3; DESIGN.md §4),
    other logits s·cos θ_j. ArcFace is (m1, m2, m3) = (1, m, 0), CosFace (1, 0, m), SphereFace (m, 0, 0).
    normalize=False keeps the norms (L-Softmax): logits ‖x‖‖w_j‖·s·(same).
    margin_grad="exact" differentiates ψ (bounded near cos θ = ±1); "straight_through" uses dψ/dc = 1.
    subcenters K > 1 (sub-center ArcFace, Deng et al. 2020): weight holds K sub-centres per class, rows
    jK … jK+K−1 for class j, and cos θ_j is the largest cosine of class j's sub-centres (the gradient flows
    into that one); needs normalize=True.
    lambda_ λ ≥ 0 (SphereFace's A-Softmax and L-Softmax): the target logit's ψ becomes (λ·cos θ_y + ψ)/(1 + λ),
    easing the margin in; their modules can anneal it (CombinedMarginLoss's lambda_min).
    m2 and m3 may be (N,) float tensors: a margin per row (AdaFace, MagFace, ElasticFace; m2 of any sign), which
    receive their exact gradients when they require them (MagFace's margin is a function of ‖x‖).
    hard_negatives (a, b, d), three floats or a (3,) float tensor (needs normalize=True): every non-target class
    whose cosine c exceeds the row's target cosine with its margin, ψ(cos θ_y), gets the cosine a·c² + b·c + d
    instead, with that function's slope as its gradient (the mask itself has none): CurricularFace is (1, t, 0)
    with t its running mean target cosine, MV-Softmax (0, w, w − 1). A tensor (no gradient) is read on the device:
    a value that changes every step (CurricularFace's t) is then no constant of a torch.compile graph.
    hard_negative_threshold τ (a float; needs hard_negatives): the re-weighting acts on the non-target cosines above
    τ instead of above each row's ψ(cos θ_y). hard_negatives=(0, 0, 0) with τ is insightface's inter-class filtering
    (arcface_torch's interclass_filtering_threshold): a non-target cosine above τ, likely a mislabelled identity,
    counts as cosine 0, without gradient.

    input (N, D) and weight (C, D) ((K·C, D) with sub-centres) of one float dtype, target (N,) integer.
    Returns fp32 (fp64 for fp64 inputs). "mean" divides by the number of non-ignored rows, and is 0 when
    there are none.
    """
    check_classification_inputs(input, weight, target)
    row_margins, m2, m3 = row_margin_offsets(input, m2, m3)
    check_margin_options(scale, m1, m2, m3, margin_grad, label_smoothing)
    normalize, ignore_index = check_bool("normalize", normalize), check_ignore_index(ignore_index)
    subcenters = check_subcenters(subcenters, normalize, weight.shape[0])
    check_finite("lambda_", lambda_, 0.0)
    check_reduction(reduction)
    hard_negatives = hard_negative_coefficients(input, hard_negatives, normalize, hard_negative_threshold)
    target = target.long()  # uint8 indices would index as a mask
    optional = () if row_margins is None and hard_negatives is None else (row_margins,)
    optional += () if hard_negatives is None else (hard_negatives,)
    loss_rows = call_op("margin_cross_entropy", input, weight, target, float(scale), float(m1), float(m2),
                        float(m3), normalize, margin_grad == "exact", float(label_smoothing), ignore_index,
                        subcenters, float(lambda_), *optional)[0]
    return reduce_rows(loss_rows, target != ignore_index, reduction)


def hard_negative_coefficients(input, hard_negatives, normalize, threshold=None):
    """hard_negatives as the ops take them: a detached (3,) tensor (a, b, d) in the input's accumulation dtype on its
    device, (4,) (a, b, d, τ) with a fixed cosine threshold τ, or None. Python numbers are written on the device by
    fills: no host-to-device copy, which would sync with the GPU every step (and fail inside a CUDA graph capture)."""
    if hard_negatives is None:
        if threshold is not None:
            raise ValueError(f"hard_negative_threshold needs hard_negatives (the coefficients it selects for), got "
                             f"hard_negative_threshold={threshold!r} and hard_negatives=None")
        return None
    if not normalize:
        raise ValueError("hard_negatives needs normalize=True: it re-weights cosines")
    if threshold is not None:
        check_finite("hard_negative_threshold", threshold)
    acc = accumulation_dtype(input.dtype)
    if isinstance(hard_negatives, torch.Tensor):
        check_tensor("hard_negatives", hard_negatives)
        if tuple(hard_negatives.shape) != (3,) or not hard_negatives.dtype.is_floating_point:
            raise ValueError(f"hard_negatives must be three floats (a, b, d) or a float tensor of shape (3,), got a "
                             f"{hard_negatives.dtype} tensor of shape {tuple(hard_negatives.shape)}")
        if hard_negatives.device != input.device:
            raise ValueError(f"hard_negatives must be on input's device ({input.device}), got {hard_negatives.device}")
        coefficients = hard_negatives.detach().to(acc)
        if threshold is None:
            return coefficients
        return torch.cat([coefficients, torch.full((1,), float(threshold), dtype=acc, device=input.device)])
    if not (isinstance(hard_negatives, (tuple, list)) and len(hard_negatives) == 3):
        raise ValueError(f"hard_negatives must be three floats (a, b, d) or a float tensor of shape (3,), got "
                         f"{hard_negatives!r}")
    if any(isinstance(v, torch.Tensor) for v in hard_negatives):
        raise TypeError("hard_negatives must be three Python numbers or one (3,) tensor, got a tuple holding tensors: "
                        "pass torch.stack of them (read on the device: no host sync, and no recompile per value)")
    for name, value in zip(("a", "b", "d"), hard_negatives):
        check_finite(f"hard_negatives' {name}", value)
    values = [float(v) for v in hard_negatives] + ([] if threshold is None else [float(threshold)])
    coefficients = torch.empty(len(values), dtype=acc, device=input.device)
    for i, value in enumerate(values):
        coefficients[i].fill_(value)  # (`coefficients[i] = value` would copy a host scalar in)
    return coefficients


def row_margin_offsets(input, m2, m3):
    """(row_margins, m2, m3) as the ops take them: when either margin is an (N,) tensor, row_margins is (N, 2) in the
    input's accumulation dtype, differentiable, and the tensor's scalar becomes 0.0 (its rows are offsets of it; a
    float margin stays the scalar, its column 0); else (None, m2, m3)."""
    if not (isinstance(m2, torch.Tensor) or isinstance(m3, torch.Tensor)):
        return None, m2, m3
    n, acc = input.shape[0], accumulation_dtype(input.dtype)
    columns = []
    for name, m in (("m2", m2), ("m3", m3)):
        if not isinstance(m, torch.Tensor):
            columns.append(input.new_zeros((n,), dtype=acc))
            continue
        check_tensor(name, m)
        if m.dim() != 1 or m.shape[0] != n or not m.dtype.is_floating_point:
            raise ValueError(f"{name} must be a number or a float tensor of shape (N={n},) (a margin per row), "
                             f"got a {m.dtype} tensor of shape {tuple(m.shape)}")
        if m.device != input.device:
            raise ValueError(f"{name} must be on input's device ({input.device}), got {m.device}")
        columns.append(m.to(acc))
    return torch.stack(columns, 1), *(0.0 if isinstance(m, torch.Tensor) else m for m in (m2, m3))


def _flatten_tokens(input, target):
    """(B, ..., D) hidden states with (B, ...) targets, as LM heads see them → (N, D), (N,) and the shape a
    "none" reduction gives back (None for inputs that are already (N, D))."""
    if not (isinstance(input, torch.Tensor) and isinstance(target, torch.Tensor) and input.dim() > 2):
        return input, target, None
    if target.shape != input.shape[:-1]:
        raise ValueError(f"target must have shape {tuple(input.shape[:-1])} (the leading dimensions of input), "
                         f"got shape {tuple(target.shape)}")
    return input.reshape(-1, input.shape[-1]), target.reshape(-1), target.shape


def _shift_targets(target, shift, ignore_index):
    """Next-token targets without a copy of the hidden states (Cut Cross-Entropy's `shift`): position i of the
    target's last dimension (the sequence) gets target[..., i + shift], the last `shift` positions
    ignore_index. A 1-D target is one sequence."""
    shift = check_shift(shift)
    if shift == 0 or not isinstance(target, torch.Tensor):
        return target
    if target.dim() == 0:
        raise ValueError("shift needs a target with a sequence dimension, got a 0-dimensional target")
    check_integer_dtype(target)  # before .long(), which would truncate float targets silently
    target = target.long()  # ignore_index (e.g. −100) must fit
    length = target.shape[-1]
    tail = target.new_full(target.shape[:-1] + (min(shift, length),), ignore_index)
    return torch.cat([target[..., shift:], tail], dim=-1)


def _lm_rows(input, target, ignore_index, shift):
    """The LM losses' common preamble: ignore_index as an int, the targets shifted, (B, ..., D) inputs flattened;
    (input, target, the shape "none" gives back, ignore_index)."""
    ignore_index = check_ignore_index(ignore_index)
    input, target, token_shape = _flatten_tokens(input, _shift_targets(target, shift, ignore_index))
    return input, target, token_shape, ignore_index


def _may_skip_rows(input, target, skip_ignored_rows):
    """Whether this call may leave ignored rows out of the forward op: skip_ignored_rows is not False, and the call
    runs eagerly on real tensors (not under torch.compile, FakeTensor, functorch or a dispatch mode: a host sync and
    a data-dependent shape). A per-process answer: the vocab-parallel losses agree on it across ranks."""
    return skip_ignored_rows is not False and target.numel() > 0 and eager_on_real_tensors((input, target), True)


def _row_skipping(target, ignore_index, skip_ignored_rows, input, *differentiable):
    """(rows, share, in_forward) for a call whose targets are `target` (row_skipping.py): an eager call runs its op
    on the rows `rows` alone (labelled_rows; None: every row); inside torch.compile (or torch.export), where shapes
    cannot follow the data, the op gets `share` (its skip_ignored_share; None: it skips nothing), which its backward
    op uses, and its own forward pass too with `in_forward` (its skip_in_forward), when neither `input` nor a tensor
    of `differentiable` needs a gradient (under torch.no_grad, or frozen: there is no backward pass to skip in; dynamo
    guards on both), except in torch.export (its program has no such guard, and may be trained later).
    Results equal every row's up to the order of fp32 sums, for finite inputs: a NaN or inf in a skipped row's input
    no longer reaches dW (through every row, it did as 0·inf)."""
    if _may_skip_rows(input, target, skip_ignored_rows):
        return labelled_rows(target, ignore_index, skip_share(skip_ignored_rows)), None, False
    if not torch.compiler.is_compiling() or skip_ignored_rows is False:
        return None, None, False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, *differentiable))
    # not while exporting: an exported program keeps no guard on grad mode or requires_grad, and may be trained
    return None, skip_share(skip_ignored_rows), not needs_grad and not torch.compiler.is_exporting()


def _given_args(*pairs):
    """An op's optional trailing arguments, given as (value, default) pairs: the values up to the last one that is
    not its default (a plain call stays as it was)."""
    given = len(pairs)
    while given and pairs[given - 1][0] is pairs[given - 1][1]:
        given -= 1
    return tuple(value for value, _ in pairs[:given])


def _unflatten(loss, reduction, shape):
    return loss.reshape(shape) if reduction == "none" and shape is not None else loss


def linear_cross_entropy(input, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0,
                         softcap=None, focal_gamma=0.0, gamma_ce=0.0, reduction="mean", grad_filter_eps=None,
                         logits_buffer_mb=None, shift=0, class_weight=None, return_lse=False,
                         return_token_accuracy=False, token_scaling=False, skip_ignored_rows=None):
    """Cross-entropy of z = softcap(input·weightᵀ + bias) without materialising the N × C logits.

    label_smoothing as torch; z_loss adds z_loss·lse² (PaLM); softcap: z ← softcap·tanh(z/softcap)
    (Gemma 2); focal_gamma γ: −(1−p_t)^γ·log p_t; gamma_ce γ ∈ [0, 1): −log(γ + (1−γ)p_t)/(1−γ).
    Gradients for input, weight and bias. Returns fp32 (fp64 for fp64 inputs); "mean" divides by the
    number of non-ignored rows and is 0 when there are none. input may also be (B, T, D) with target
    (B, T) (any leading dimensions); "none" then returns the target's shape. shift=1: position i predicts
    target[..., i + 1] (causal LM labels as they come; the last position is ignored), without copying input.

    class_weight (C,) (torch's `weight` of cross_entropy and linear_cross_entropy; finite, ≥ 0, no gradient):
    each row's loss is scaled by its target's weight c_t, z-loss and focal/γ-CE terms included (α-balanced focal),
    except the label-smoothing term, which weights each class's −log p_j by c_j as torch does; "mean" divides by
    Σ c_t over non-ignored rows (0 when that is 0; as in torch, a row weighted 0 keeps its smoothing term). With
    label_smoothing > 0 it needs softcap=None.

    return_lse=True returns (loss, lse): each token's log-sum-exp of its logits (the target's shape, fp32, ignored
    tokens included), differentiable (its gradient joins the same backward pass: a custom z-loss), as CCE's
    return_lse; the z-loss that Liger's return_z_loss reports for logging is z_loss·mean(lse²) over the non-ignored
    tokens. Not with logits_buffer_mb.

    return_token_accuracy=True adds the token accuracy (Liger's return_token_accuracy, TRL's mean_token_accuracy):
    whether each non-ignored token's target logit is its largest (bit-identical ties count as correct; a row with a
    NaN logit is not correct), reduced as the loss ("none":
    1.0/0.0 per token, 0 on ignored ones; "mean": the fraction of non-ignored tokens, 0 when there are none; "sum":
    their count), unweighted by class_weight, without gradient, from the forward's own pass over the classes. Not
    with logits_buffer_mb. With both flags the result is (loss, lse, accuracy), the order numpy.unique uses.

    token_scaling=True is Dynamic Fine-Tuning (DFT, Wu et al. 2025; TRL's loss_type="dft", Liger-Kernel's
    use_token_scaling): each token's loss, every term above included, is multiplied by sg(p_t), its target's
    probability detached, so plain CE becomes −sg(p_t)·log p_t. The reductions are unchanged ("mean" divides by the
    number of non-ignored tokens, or Σ c_t, not by Σ p_t). p_t comes from the forward's lse and one gathered dot
    product per token (O(N·D)); the backward pass is the plain one with each row's gradient scaled. Not with
    logits_buffer_mb.

    skip_ignored_rows (None | bool): an eager call runs the op on the non-ignored rows alone (prompt and padding
    tokens cost no GEMM work), for one host sync and a copy of those rows of input (and of their gradient). None
    does so when at least row_skipping.SKIP_IGNORED_SHARE (1/8) of the rows are ignored, True whenever any is,
    False never. Inside torch.compile (or torch.export) the forward op runs every row and the backward op, 3 of the
    4 GEMM-equivalents, the labelled rows alone (its own host sync), and a compiled call that needs no gradient
    (under torch.no_grad, or with inputs that need none; not torch.export) skips in its forward op; while a CUDA graph
    is captured every row runs.
    Results are those of the full call up to the order of fp32 sums, for finite inputs (a NaN or inf in a skipped
    row's input no longer reaches dW or the other rows' gradients). Not with return_lse (which reports every row's
    lse).

    Exact by default. Two switches trade it, or memory, for speed (README "Speed and memory knobs"):
    grad_filter_eps (None | "auto" | float): the backward pass skips classes whose gradient is below eps
        (relative to the largest; for mean CE: p < eps in every row of a class chunk) in both GEMMs.
        "auto" is Cut Cross-Entropy's default, finfo(input.dtype).eps / 32 (2⁻¹² for bf16).
    logits_buffer_mb (None | float): None recomputes the logits in the backward pass (4 GEMMs, O(N) extra
        memory). A size in MB keeps row blocks of the full logits in a buffer of about that size and
        computes the gradients during the forward pass (3 GEMMs), plus one fp32 copy of dW while it runs
        (none for bf16 on CUDA: made in bf16, summed once per row block); needs reduction "mean" or "sum",
        and one backward pass per forward (the gradients are handed over, not copied).
    """
    input, target, token_shape, ignore_index = _lm_rows(input, target, ignore_index, shift)
    check_classification_inputs(input, weight, target)
    check_bias(bias, weight)
    check_linear_ce_options(label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    check_reduction(reduction)
    filter_eps = resolve_grad_filter_eps(grad_filter_eps, input.dtype)
    check_logits_buffer(logits_buffer_mb, reduction, filter_eps)
    check_class_weight(class_weight, weight, label_smoothing, softcap)
    return_lse, return_token_accuracy = check_extra_outputs(logits_buffer_mb, return_lse=return_lse,
                                                            return_token_accuracy=return_token_accuracy)
    token_scaling = check_token_scaling(token_scaling, logits_buffer_mb)
    skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows, return_lse)
    target = target.long()  # uint8 indices would index as a mask
    rows, share, in_forward = None, None, False  # return_lse: every row's lse is returned
    if not return_lse:
        rows, share, in_forward = _row_skipping(target, ignore_index, skip_ignored_rows, input, weight, bias)
    run_input, run_target = take_rows(rows, input, target)
    options = (ignore_index, float(label_smoothing), float(z_loss), None if softcap is None else float(softcap),
               float(focal_gamma), float(gamma_ce))
    if logits_buffer_mb is not None:
        grad_on = torch.is_grad_enabled()
        loss, _, _, _ = call_op("linear_cross_entropy_buffered", run_input, weight, run_target, bias, *options,
                                reduction, int(logits_buffer_mb * 2**20), grad_on and input.requires_grad,
                                grad_on and weight.requires_grad, grad_on and bias is not None and bias.requires_grad,
                                *_given_args((class_weight, None), (share, None)))
        return loss
    loss_rows, lse, correct = call_op("linear_cross_entropy", run_input, weight, run_target, bias, *options,
                                      filter_eps, *_given_args((class_weight, None), (return_lse, False),
                                                               (return_token_accuracy, False), (share, None),
                                                               (in_forward, False)))
    if token_scaling:
        loss_rows = loss_rows * token_scaling_weights(run_input, weight, run_target, bias, lse,
                                                      LinearCEOptions(*options))
    loss_rows, = put_rows(rows, target.shape[0], loss_rows)
    if return_token_accuracy:
        correct, = put_rows(rows, target.shape[0], correct)
    valid = target != ignore_index
    target_weight = None  # c_t, for the weighted mean's divisor Σ c_t
    if class_weight is not None and reduction == "mean":
        target_weight = target_class_weights(class_weight, torch.where(valid, target, -1), loss_rows.dtype)
    # a copy of lse: the op saved its own for the backward pass, where a caller's in-place edit must not reach
    return linear_ce_outputs(loss_rows, lse.clone() if return_lse else lse, correct, valid, reduction, token_shape,
                             target_weight, return_lse=return_lse, return_token_accuracy=return_token_accuracy)


def linear_ce_outputs(loss_rows, lse, correct, valid, reduction, token_shape, target_weight=None, *, return_lse,
                      return_token_accuracy):
    """The result of linear_cross_entropy (and its vocab-parallel form) from the op's per-row outputs: the reduced
    loss, then the per-token lse and the reduced accuracy where asked for (numpy.unique's order)."""
    loss = _unflatten(reduce_rows(loss_rows, valid, reduction, target_weight), reduction, token_shape)
    if not (return_lse or return_token_accuracy):
        return loss
    outputs = [loss]
    if return_lse:
        outputs.append(_unflatten(lse, "none", token_shape))
    if return_token_accuracy:
        accuracy = reduce_rows(correct.to(loss_rows.dtype), valid, reduction)
        outputs.append(_unflatten(accuracy, reduction, token_shape))
    return tuple(outputs)


EMO_RATIO_EPS = 1e-10  # as the reference code: sg(ce / (emo + 1e-10))


def _emo_rows(input, weight, target, cost_embedding, ignore_index, reduction, shift, skip_ignored_rows):
    """(per-row CE, per-row EMO, the flattened target, the shape "none" gives back, ignore_index as an int)."""
    input, target, token_shape, ignore_index = _lm_rows(input, target, ignore_index, shift)
    check_classification_inputs(input, weight, target)
    if cost_embedding is not None:
        check_cost_embedding(cost_embedding, weight)
    cost = cost_in_dtype(weight if cost_embedding is None else cost_embedding, input.dtype)
    check_reduction(reduction)
    skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)
    target = target.long()  # a uint8 target would compare unequal to ignore_index −100 (which wraps to 156)
    rows, share, in_forward = _row_skipping(target, ignore_index, skip_ignored_rows, input, weight)
    x, t = take_rows(rows, input, target)
    ce, emo, _ = call_op("emo_cross_entropy", x, weight, t, cost, ignore_index,
                         *_given_args((share, None), (in_forward, False)))
    return (*put_rows(rows, target.shape[0], ce, emo), target, token_shape, ignore_index)


def emo_loss(input, weight, target, *, cost_embedding=None, ignore_index=-100, reduction="mean", shift=0,
             skip_ignored_rows=None):
    """EMO: Σ_j p_j·(1 − ê_j·ê_t) with p = softmax(input·weightᵀ), never materialising the N × C logits.

    Ê is the row-normalised `cost_embedding` (C, E), default `weight` detached (E may differ from D); it
    never receives a gradient. Returns fp32; "mean" is over non-ignored rows (0 when there are none). (B, T, D)
    inputs, `shift` and `skip_ignored_rows` as in linear_cross_entropy.
    """
    ce, emo, target, token_shape, ignore_index = _emo_rows(input, weight, target, cost_embedding, ignore_index,
                                                           reduction, shift, skip_ignored_rows)
    if reduction == "none":  # the op saves emo for its backward: a caller's in-place edit (loss[pad] = 0) must
        emo = emo.clone()    # not reach it, as it cannot reach torch's own cross_entropy(reduction="none")
    return _unflatten(reduce_rows(emo, target != ignore_index, reduction), reduction, token_shape)


def emo_cross_entropy(input, weight, target, *, cost_embedding=None, ignore_index=-100, reduction="mean", shift=0,
                      skip_ignored_rows=None):
    """The MLE-anchored EMO recipe of the official code (emo1/`gpt2.py`), per token, in one fused pass:

        0.5 · (ce + sg(ce / (emo + 1e-10)) · emo)

    Its value equals the cross-entropy; its gradient is 0.5·(∇ce + (ce/emo)·∇emo). `emo` here is the
    true EMO value (the repository's `emo_patch.py` adds p_t to it through a detach trick, which changes
    the weight but not ∇emo). No clamp of the ratio (the PyPI package clamps it at 3). Arguments as emo_loss.
    """
    ce, emo, target, token_shape, ignore_index = _emo_rows(input, weight, target, cost_embedding, ignore_index,
                                                           reduction, shift, skip_ignored_rows)
    rows = 0.5 * (ce + (ce / (emo + EMO_RATIO_EPS)).detach() * emo)
    return _unflatten(reduce_rows(rows, target != ignore_index, reduction), reduction, token_shape)


def log_probs_and_entropy(input, weight, target, bias=None, *, temperature=1.0, softcap=None, ignore_index=-100,
                          shift=0, skip_ignored_rows=None, return_top1=False):
    """Per-token log p(target) and entropy of softmax(softcap(input·weightᵀ + bias) / temperature), both
    differentiable, in one pass over the classes without materialising the N × C logits (what an RL step computes
    for its policy ratio and entropy bonus; verl's and Transformer Engine's fused "linear cross-entropy with
    entropy").

    input (N, D) or (B, T, D), weight (C, D), target (N,) or (B, T) integer, bias (C,) or None; softcap (Gemma 2/3's
    final-logit soft-capping, softcap·tanh(z/softcap)) None or > 0: the model's logits, which the sampling
    temperature then divides. Returns (log_probs, entropy), fp32 (fp64 for fp64 inputs), shaped like target, both 0
    at ignored positions (target == ignore_index), whose gradients are 0; gradients for input, weight and bias.
    log_probs equals −F.cross_entropy(logits / temperature, target, reduction="none").
    shift as in linear_cross_entropy (the last `shift` positions then count as ignored); skip_ignored_rows too (the
    prompt of an RL rollout costs no GEMM work). return_top1=True adds a third result, bool, shaped like target:
    whether the target token is the most likely one (its logit the largest; ties count; False at ignored positions),
    from the same pass (TRL's is_top1 and mean token accuracy; TRL's argmax counts only the first of tied maxima).
    """
    input, target, token_shape, ignore_index = _lm_rows(input, target, ignore_index, shift)
    check_classification_inputs(input, weight, target)
    check_bias(bias, weight)
    check_temperature(temperature)
    softcap = check_softcap(softcap)
    skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)
    return_top1 = check_bool("return_top1", return_top1)
    target = target.long()
    rows, share, in_forward = _row_skipping(target, ignore_index, skip_ignored_rows, input, weight, bias)
    x, t = take_rows(rows, input, target)
    log_probs, entropy, _, top1 = call_op("log_probs_entropy", x, weight, t, float(temperature), ignore_index,
                                          *_given_args((share, None), (in_forward, False), (bias, None),
                                                       (softcap, None), (return_top1, False)))
    outputs = put_rows(rows, target.shape[0], log_probs, entropy, copy=True)  # the op saved both
    if return_top1:
        outputs += put_rows(rows, target.shape[0], top1)
    return tuple(o if token_shape is None else o.reshape(token_shape) for o in outputs)


def _teacher_rows(name, t, rows_shape, last="E"):
    """A teacher tensor of input's leading shape + (`last`,) flattened to rows, as the student's input is."""
    if isinstance(t, torch.Tensor) and t.dim() > 2:
        if t.shape[:-1] != rows_shape:
            raise ValueError(f"{name} must have shape {tuple(rows_shape)} + ({last},) (input's rows), got shape "
                             f"{tuple(t.shape)}")
        return t.reshape(-1, t.shape[-1])
    return t


def _distill_rows(input, weight, teachers, target, temperature, ignore_index, reduction, shift, skip_ignored_rows):
    """The distillation losses' preamble: _lm_rows with an optional target (None: every row counts), the teacher's
    per-row tensors (a dict name → (tensor, its last dimension's name)) flattened like the student's rows, and the
    common checks; (input, the teacher's tensors in order, target, token shape, ignore_index, the rows to run and the
    ops' skipping arguments: _row_skipping)."""
    ignore_index = check_ignore_index(ignore_index)
    check_tensor("input", input)
    skip_ignored_rows = check_skip_ignored_rows(skip_ignored_rows)
    if target is None and not shift:  # every row counts (no host sync to find that out)
        skip_ignored_rows = False
    if target is None:  # every row counts: any value but ignore_index
        target = torch.full(input.shape[:-1], int(ignore_index == 0), dtype=torch.int64, device=input.device)
    rows_shape = input.shape[:-1]
    input, target, token_shape, ignore_index = _lm_rows(input, target, ignore_index, shift)
    teacher_rows = [_teacher_rows(name, t, rows_shape, last) for name, (t, last) in teachers.items()]
    check_classification_inputs(input, weight, target)
    check_temperature(temperature)
    check_reduction(reduction)
    target = target.long()
    return (input, teacher_rows, target, token_shape, ignore_index,
            *_row_skipping(target, ignore_index, skip_ignored_rows, input, weight))


def linear_kl_divergence(input, weight, teacher_input, teacher_weight, target=None, *, temperature=1.0,
                         direction="forward", ignore_index=-100, reduction="mean", shift=0, skip_ignored_rows=None):
    """Knowledge distillation: the KL divergence between the teacher's softmax(teacher_input·teacher_weightᵀ / T)
    and the student's softmax(input·weightᵀ / T), per token, without materialising either N × C logits.

    direction="forward": KL(teacher‖student) (Hinton's distillation; torchtune's ForwardKLLoss returns its
    cross-entropy part −Σ q·log p, the same gradient without the teacher's entropy); "reverse": KL(student‖teacher)
    (MiniLLM). Gradients flow into input and weight only; the teacher's tensors
    are constants. input (N, D) or (B, T, D), weight (C, D); teacher_input (N, E) or (B, T, E) with the same
    rows, teacher_weight (C, E), both in input's dtype (E may differ from D). target (N,) or (B, T), optional,
    only masks: positions equal to ignore_index count for nothing ("mean" is over the others, 0 when there are
    none); `shift` and `skip_ignored_rows` as in linear_cross_entropy. Returns fp32 (fp64 for fp64 inputs); the KL at
    temperature T (multiply by T² for Hinton's scaling).
    """
    reverse = check_direction(direction)
    input, (teacher_input,), target, token_shape, ignore_index, rows, share, in_forward = _distill_rows(
        input, weight, {"teacher_input": (teacher_input, "E")}, target, temperature, ignore_index, reduction, shift,
        skip_ignored_rows)
    check_teacher(teacher_input, teacher_weight, input, weight)
    x, teacher_x, t = take_rows(rows, input, teacher_input.detach(), target)
    kl, _, _ = call_op("linear_kl_divergence", x, weight, teacher_x, teacher_weight.detach(), t, float(temperature),
                       ignore_index, reverse, *_given_args((share, None), (in_forward, False)))
    kl, = put_rows(rows, target.shape[0], kl, copy=reduction == "none")  # the op saved it
    return _unflatten(reduce_rows(kl, target != ignore_index, reduction), reduction, token_shape)


def linear_jsd(input, weight, teacher_input, teacher_weight, target=None, *, beta=0.5, temperature=1.0,
               ignore_index=-100, reduction="mean", shift=0, skip_ignored_rows=None):
    """Knowledge distillation by the generalized Jensen-Shannon divergence (GKD; TRL's generalized_jsd_loss, Liger's
    fused linear JSD): with the student's p = softmax(input·weightᵀ / T), the teacher's q = softmax(teacher_input ·
    teacher_weightᵀ / T) and their mixture m = (1−β)·p + β·q, per token

        β·KL(q‖m) + (1−β)·KL(p‖m)

    without materialising either N × C logits. beta = 0 is forward KL(q‖p), beta = 1 reverse KL(p‖q) (the
    endpoints TRL and Liger give; they run linear_kl_divergence). Arguments, shapes, masking, `shift` and the
    result's dtype as linear_kl_divergence; gradients flow into input and weight only. Two passes over the classes
    in the forward pass (the divergence needs both log-sum-exps first), one in the backward pass.
    """
    beta = check_jsd_beta(beta)
    if beta in (0.0, 1.0):
        return linear_kl_divergence(input, weight, teacher_input, teacher_weight, target, temperature=temperature,
                                    direction="forward" if beta == 0.0 else "reverse", ignore_index=ignore_index,
                                    reduction=reduction, shift=shift, skip_ignored_rows=skip_ignored_rows)
    input, (teacher_input,), target, token_shape, ignore_index, rows, share, in_forward = _distill_rows(
        input, weight, {"teacher_input": (teacher_input, "E")}, target, temperature, ignore_index, reduction, shift,
        skip_ignored_rows)
    check_teacher(teacher_input, teacher_weight, input, weight)
    x, teacher_x, t = take_rows(rows, input, teacher_input.detach(), target)
    jsd, _, _, _ = call_op("linear_jsd", x, weight, teacher_x, teacher_weight.detach(), t, beta, float(temperature),
                           ignore_index, *_given_args((share, None), (in_forward, False)))
    jsd, = put_rows(rows, target.shape[0], jsd)
    return _unflatten(reduce_rows(jsd, target != ignore_index, reduction), reduction, token_shape)


def linear_topk_kl_divergence(input, weight, teacher_token_ids, teacher_logits, target=None, *, temperature=1.0,
                              ignore_index=-100, reduction="mean", shift=0, skip_ignored_rows=None):
    """Distillation from a teacher stored as its top-k tokens per position (ids and logits, as distillation pipelines
    cache a large teacher's outputs): forward KL(q‖p) with q = softmax(teacher_logits / T) over those k tokens and
    p = softmax(input·weightᵀ / T) over the whole vocabulary, without materialising the N × C logits.

    input (N, D) or (B, T, D), weight (C, D); teacher_token_ids (N, k) or (B, T, k) integer in [0, C) and
    teacher_logits of the same shape (any float dtype; no gradient), one row per input row. target as in
    linear_kl_divergence (optional, only masks); `shift` shifts it alone (the teacher's rows are the student's
    positions; ids are checked on ignored rows too). A token listed twice in a row counts with its summed
    probability. Returns fp32 (fp64 for fp64 inputs); KL at temperature T (× T² for Hinton's scaling). One pass
    over the classes for the student's log-sum-exp, the k logits gathered; the backward writes g·(p − q) at the k
    tokens into the engine's dL/da (its target column and sparse cells: marginkern/distill.py).
    """
    input, (token_ids, logits), target, token_shape, ignore_index, rows, share, in_forward = _distill_rows(
        input, weight, {"teacher_token_ids": (teacher_token_ids, "k"), "teacher_logits": (teacher_logits, "k")},
        target, temperature, ignore_index, reduction, shift, skip_ignored_rows)
    check_topk_teacher(token_ids, logits, input)
    if rows is not None:  # the op checks the ids it gets; those of ignored rows are checked too (docstring)
        check_token_ids(token_ids, weight.shape[0])
    x, ids, teacher_z, t = take_rows(rows, input, token_ids, logits.detach(), target)
    kl, _ = call_op("linear_topk_kl_divergence", x, weight, ids, teacher_z, t, float(temperature), ignore_index,
                    *_given_args((share, None), (in_forward, False)))
    kl, = put_rows(rows, target.shape[0], kl)
    return _unflatten(reduce_rows(kl, target != ignore_index, reduction), reduction, token_shape)


def cosent_loss(scores, labels, *, scale=20.0):
    """CoSENT: log(1 + Σ_{labels_a < labels_b} exp(scale·(s_a − s_b))) over the pair scores `scores` (B,)
    (e.g. cosines), as sentence-transformers' CoSENTLoss: one scalar, not normalised by the pair count.
    O(B log B) time and O(B) memory (sorted prefix log-sum-exp); ties add nothing. A NaN label makes the
    loss and its gradient NaN (it has no place in the label order)."""
    check_cosent_arguments(scores, labels, scale)
    return call_op("cosent", scores, _sortable_labels(labels), float(scale))[0]


def cosent_embedding_loss(embeddings_a, embeddings_b, labels, *, scale=20.0):
    """CoSENT of the cosines of the pairs (embeddings_a[i], embeddings_b[i]); the cosine runs fused in one
    read of each batch (Triton on CUDA) and is differentiated without autograd's intermediates."""
    check_embedding_pair(embeddings_a, embeddings_b)
    check_labels(labels, embeddings_a.shape[0], embeddings_a.device)
    check_finite("scale", scale, 0.0, low_open=True)
    cos, _, _ = call_op("pairwise_cosine", embeddings_a, embeddings_b)
    return call_op("cosent", cos, _sortable_labels(labels), float(scale))[0]


def _sortable_labels(labels):
    """CoSENT sorts its labels: torch sorts no uint16/uint32/uint64 tensor, so those (exact in int64 up to 2⁶³) go
    as int64; a uint64 label beyond that would wrap, and is refused."""
    if labels.dtype not in (torch.uint16, torch.uint32, torch.uint64):
        return labels
    as_int64 = labels.long()
    if labels.dtype == torch.uint64 and not torch.compiler.is_compiling() and bool((as_int64 < 0).any()):
        raise ValueError("labels of dtype uint64 must be below 2**63 (they are compared as int64)")
    return as_int64


def _reduce_every_row(rows, reduction, shape):
    """Per-row losses with every row counted (the ZLPR losses'), reduced; "none" gives them in `shape`."""
    out = reduce_rows(rows, torch.ones_like(rows, dtype=torch.bool), reduction)
    return out.reshape(shape) if reduction == "none" else out


def multilabel_categorical_crossentropy(logits, targets, *, reduction="mean"):
    """ZLPR / GlobalPointer: log(1 + Σ_neg e^s) + log(1 + Σ_pos e^−s) over the last dimension, targets in
    {0, 1} of the same shape; −inf logits (masked spans) are left out. "none" keeps the leading shape. Memory beside
    the logits' gradient: a few 8 MB blocks of rows (pairwise.multilabel_ce_rows), not copies of the logits."""
    check_float_tensor("logits", logits)
    check_binary_targets(targets, logits)
    check_reduction(reduction)
    rows, _, _ = call_op("multilabel_ce", logits, targets)
    return _reduce_every_row(rows, reduction, logits.shape[:-1])


def sparse_multilabel_categorical_crossentropy(logits, positives, *, mask_zero=False, ignore_index=-100,
                                                reduction="mean"):
    """ZLPR with each row's positive classes given as indices (bert4keras's sparse form, GPLinker's loss): positives
    (..., P) integer, padded with ignore_index; with mask_zero=True index 0 is padding and class 0 is left out of
    the loss entirely (bert4keras's mask_zero). Equals multilabel_categorical_crossentropy with the dense 0/1
    targets that mark those classes (a class named twice is one positive), computed so, by blocks of rows: no (..., C)
    targets are made, and the negatives' sum is not Σ_all − Σ_pos (bert4keras's form, which cancels when the
    positives hold the mass; its 1e-7 clip is its error floor)."""
    check_float_tensor("logits", logits)
    ignore_index = check_ignore_index(ignore_index)
    mask_zero = check_bool("mask_zero", mask_zero)
    check_positive_indices(positives, logits, ignore_index, mask_zero)
    check_reduction(reduction)
    rows, _, _ = call_op("sparse_multilabel_ce", logits, positives, mask_zero, ignore_index)
    return _reduce_every_row(rows, reduction, logits.shape[:-1])


def global_pointer_loss(q, k, positives, *, mask=None, scale=None, tril=True, mask_zero=False, ignore_index=-100,
                        reduction="mean"):
    """GlobalPointer's span loss (Su; GPLinker's heads) with the span logits fused in: per (batch, head) the ZLPR
    over its L × L spans s_mn = scale·q_m·k_n (scale None: 1/√d), q and k (B, L, H, d) as GlobalPointer's heads
    give them (after RoPE), positives (B, H, P) the spans m·L + n, padded with ignore_index (0 with mask_zero, which
    also leaves span (0, 0) out). Spans with padding (mask (B, L) = 0) at either end, and with tril=True those ending
    before they start (n < m), are in neither sum, as GlobalPointer's −inf logits. "mean" over the B·H rows, "none"
    gives (B, H). Memory: blocks of the logits (8 MB, 64 MB on a GPU), never the (B, H, L, L) logits nor their
    gradient (marginkern/global_pointer.py)."""
    ignore_index = check_ignore_index(ignore_index)
    tril, mask_zero = check_bool("tril", tril), check_bool("mask_zero", mask_zero)
    scale = check_global_pointer_arguments(q, k, positives, mask, scale, ignore_index, mask_zero)
    check_reduction(reduction)
    rows, _, _ = call_op("global_pointer", q, k, positives, mask, scale, tril, mask_zero, ignore_index)
    return _reduce_every_row(rows, reduction, (q.shape[0], q.shape[2]))


def circle_loss(embeddings, labels, *, m=0.25, gamma=256.0, reduction="mean", anchor_block=None):
    """In-batch Circle loss (Sun et al. 2020; PML's weighting, α detached) on cosine similarities, per
    anchor softplus(LSE_n γα_n(s_n − m) + LSE_p −γα_p(s_p − 1 + m)); anchors without a positive or a
    negative contribute 0 and are left out of the mean. Memory: anchor_block × B similarities at a time (default:
    8 MB of them, 64 MB on a GPU; the backward pass recomputes each block)."""
    anchor_block = check_circle_arguments(embeddings, labels, m, gamma, anchor_block)
    check_reduction(reduction)
    loss_rows, valid = call_op("circle", embeddings, labels, float(m), float(gamma), anchor_block)
    return reduce_rows(loss_rows, valid, reduction)


def linear_topk(input, weight, k, bias=None, *, normalize=False, softcap=None, logit_scale=1.0, return_lse=False):
    """The k largest logits z = softcap(logit_scale·(input·weightᵀ + bias)) of each row and their classes, streamed
    over class chunks: the N × C logits never exist (marginkern.topk). No gradient. logit_scale (Cohere's logit_scale,
    Granite's 1/logits_scaling) is applied in fp32 after the GEMM.

    normalize=True ranks cosines x̂·ŵ_j instead (bias and softcap must then be None): the k nearest class centres of
    each embedding, face identification by a margin head's weight. A distillation pipeline caches its teacher's top-k
    with it (`linear_topk_kl_divergence` takes the ids and logits); return_lse=True adds each row's log-sum-exp over
    all C classes, so that values − lse are the top-k log-probabilities.

    input (N, D) or (B, ..., D), weight (C, D), bias (C,) of one float dtype on one device, 1 ≤ k ≤ C. Returns
    (values, indices[, lse]): values (..., k) fp32 (fp64 for fp64 inputs) in descending order, indices (..., k) int64,
    lse (...,) fp32; ties in any order; NaN logits rank first, as torch.topk ranks them.
    """
    k, normalize, softcap, logit_scale, return_lse = check_topk_arguments(input, weight, k, bias, normalize, softcap,
                                                                          logit_scale, return_lse)
    leading = input.shape[:-1]
    with torch.no_grad():
        values, indices, lse = call_op("linear_topk", input.reshape(-1, input.shape[-1]), weight, k, bias, normalize,
                                       softcap, return_lse, logit_scale)
    values, indices = values.reshape(*leading, k), indices.reshape(*leading, k)
    return (values, indices, lse.reshape(leading)) if return_lse else (values, indices)


def proxy_anchor_loss(input, proxies, target, *, margin=0.1, alpha=32.0, ignore_index=-100):
    """Proxy-Anchor loss (Kim et al., CVPR 2020; pytorch-metric-learning's ProxyAnchorLoss) over C proxies without the
    N × C cosines: with s_nj = cos(input_n, proxies_j) and P⁺ the proxies of the batch's (non-ignored) targets,

        1/|P⁺| Σ_{j∈P⁺} log(1 + Σ_{n: y_n=j} e^{−α(s_nj − margin)}) + 1/C Σ_j log(1 + Σ_{n: y_n≠j} e^{α(s_nj + margin)}).

    input (N, D), proxies (C, D) of one float dtype, target (N,) integer classes in [0, C) or ignore_index (such rows
    are neither a positive nor a negative of any proxy). Returns a scalar, fp32 (fp64 for fp64 inputs); 0 with zero
    gradients when every row is ignored. Streamed over chunks of proxies (marginkern.proxy_anchor): 4 GEMMs and O(N + C)
    saved state per step.
    """
    check_classification_inputs(input, proxies, target, weight_name="proxies")
    margin, alpha = check_proxy_anchor_options(margin, alpha)
    loss, _, _, _ = call_op("proxy_anchor", input, proxies, target, margin, alpha, check_ignore_index(ignore_index))
    return loss
