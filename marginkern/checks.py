"""Argument validation. Every error names the argument and what was expected (DESIGN.md §6)."""
import math
import numbers
import operator
import sys

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_tensor(name, t, expected="a torch.Tensor"):
    """t is a plain tensor: a torch.Tensor, and not a DTensor.

    A DTensor (FSDP2's sharded parameter, a tensor-parallel shard) would reach the ops as its global shape
    while the kernels see only the local shard; torch's own message ("got mixed torch.Tensor and DTensor")
    points the wrong way, and peers crashed on it (Cut Cross-Entropy #31: an illegal memory access)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be {expected}, got {type(t).__name__}")
    if t.layout != torch.strided:  # sparse COO/CSR: the kernels read dense rows
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout} (call .to_dense())")
    dtensor_module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    if dtensor_module is not None and isinstance(t, dtensor_module.DTensor):
        raise TypeError(
            f"{name} is a DTensor (placements {tuple(t.placements)}); marginkern's losses take plain tensors. "
            f"With FSDP2, call the loss inside the forward of the module that owns {name} (FSDP has gathered it "
            f"there; torch.distributed.fsdp.register_fsdp_forward_method for another method) or pass "
            f"{name}.full_tensor(); for a head sharded over classes (Shard(0)), marginkern.distributed's "
            f"sharded losses take {name}.to_local()")


def check_classification_inputs(input, weight, target, weight_name="weight"):
    """Shapes, dtypes and devices of (input (N, D), weight (C, D), target (N,)); works on fake tensors.
    `weight_name` is what errors call the weight (a class-sharded loss takes "weight_shard")."""
    for name, t in (("input", input), (weight_name, weight), ("target", target)):
        check_tensor(name, t)
    if input.dim() != 2:
        raise ValueError(f"input must have shape (N, D), got shape {tuple(input.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"{weight_name} must have shape (C, D), got shape {tuple(weight.shape)}")
    if weight.shape[1] != input.shape[1]:
        raise ValueError(f"{weight_name} must have shape (C, D={input.shape[1]}) to match input, "
                         f"got shape {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have at least one class (C ≥ 1), got C = 0")
    check_target_tensor(target, input.shape[0])
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if weight.dtype != input.dtype:
        hint = ""
        if torch.is_autocast_enabled(input.device.type):
            # an fp32 head behind an autocast backbone (insightface's setup): the ops do not cast for the caller
            hint = (f"; under autocast, pass {weight_name}.to(input.dtype) (marginkern's modules do this for you) or "
                    "run the loss on float32 input")
        raise TypeError(f"{weight_name} must have the dtype of input ({input.dtype}), got {weight.dtype}{hint}")
    if not (input.device == weight.device == target.device):
        raise ValueError(f"input, {weight_name} and target must be on one device, got {input.device}, "
                         f"{weight.device} and {target.device}")


def check_target_tensor(target, n, name="target"):
    """target is an (n,) tensor of integer class indices."""
    check_tensor(name, target)
    if target.dim() != 1 or target.shape[0] != n:
        raise ValueError(f"{name} must have shape (N={n},), got shape {tuple(target.shape)}")
    check_integer_dtype(target, name)


def check_integer_dtype(target, name="target"):
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class indices, got dtype {target.dtype}")


def check_target_values(target, num_classes, ignore_index, name="target"):
    """Targets in [0, C) or == ignore_index (None: nothing is ignored). Data-dependent (one host sync), so real
    tensors only, and skipped while a CUDA graph is being captured (a sync would break the capture)."""
    if (target.is_cuda and torch.cuda.is_current_stream_capturing()) or target.numel() == 0:
        return
    if target.dtype != torch.int64:
        # as the ops index: int64 (aminmax has no uint16/32/64 kernel, and in a narrow dtype ignore_index would wrap)
        target = target.long()
    ignored = "" if ignore_index is None else f" and not ignore_index={ignore_index}"
    if num_classes == 0:  # (no class to stand in for the ignored entries below)
        named = target if ignore_index is None else target[target != ignore_index]
        if named.numel():
            raise ValueError(f"{name} holds class {named.reshape(-1)[0].item()}, outside [0, 0){ignored}")
        return
    # the smallest and largest class with ignored rows as class 0: four small ops and one sync (seven
    # before; a small GPU step is host-bound)
    kept = target if ignore_index is None else torch.where(target == ignore_index, 0, target)
    low, high = torch.stack(torch.aminmax(kept)).tolist()
    if low < 0 or high >= num_classes:
        raise ValueError(f"{name} holds class {low if low < 0 else high}, outside [0, {num_classes}){ignored}")


def checked_class_targets(target, n, num_classes, ignore_index, name="target"):
    """target as int64 after check_target_tensor and check_target_values: for code that indexes with the
    targets before an op checks them (class sampling)."""
    check_target_tensor(target, n, name)
    target = target.long()  # a uint8 index would act as a mask
    check_target_values(target, num_classes, ignore_index, name)
    return target


def _is_bool(value):
    """A bool or a NumPy bool."""
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


def check_bool(name, value):
    """value as a Python bool (a bool or a NumPy bool); anything else (None, a string, an int) is a TypeError
    rather than a truthiness guess."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_ignore_index(ignore_index):
    """ignore_index as a Python int: a float would be truncated for the op but compared as a float for the
    mean's denominator (torch's cross_entropy raises TypeError too)."""
    return check_int("ignore_index", ignore_index)


def check_head_size(embedding_dim, num_classes):
    """A module's (embedding_dim, num_classes) as ints ≥ 1."""
    sizes = check_int("embedding_dim", embedding_dim), check_int("num_classes", num_classes)
    for name, size in zip(("embedding_dim", "num_classes"), sizes):
        if size < 1:
            raise ValueError(f"{name} must be ≥ 1, got {size}")
    return sizes


def check_module_embeddings(embeddings, embedding_dim):
    """The input of a module that owns (C, embedding_dim) class centres: errors in the module's terms."""
    if isinstance(embeddings, torch.Tensor) and (embeddings.dim() != 2 or embeddings.shape[1] != embedding_dim):
        raise ValueError(f"embeddings must have shape (N, embedding_dim={embedding_dim}), got shape "
                         f"{tuple(embeddings.shape)}")


def interclass_filtering_options(threshold, normalize):
    """margin_cross_entropy's options for insightface's inter-class filtering at cosine `threshold` (the margin modules'
    interclass_filtering_threshold; 0: off, as arcface_torch's): every non-target cosine above it counts as 0, without
    gradient (hard negatives (0, 0, 0) above a fixed threshold)."""
    check_finite("interclass_filtering_threshold", threshold, 0.0, 1.0)
    if threshold == 0:
        return {}
    if not normalize:
        raise ValueError("interclass_filtering_threshold needs normalize=True: it filters cosines")
    return dict(hard_negatives=(0.0, 0.0, 0.0), hard_negative_threshold=float(threshold))


def margin_module_repr(embedding_dim, num_classes, options, extra=""):
    """extra_repr of the margin modules (plain and sharded): every option, so a printed model says how
    its loss was configured."""
    return f"embedding_dim={embedding_dim}, num_classes={num_classes}{extra}, " + ", ".join(
        f"{k}={v!r}" for k, v in options.items())


def check_int(name, value):
    """value as a Python int (from an int, a NumPy integer or a one-element integer tensor) within int64 (the ops'
    schemas), else a TypeError or ValueError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def check_shift(shift):
    """The next-token shift of the LM losses as an int ≥ 0."""
    shift = check_int("shift", shift)
    if shift < 0:
        raise ValueError(f"shift must be ≥ 0, got {shift}")
    return shift


def check_classes_per_rank(num_classes, world_size):
    if num_classes < world_size:
        raise ValueError(f"num_classes must be ≥ the process group's size ({world_size}) so that every rank holds "
                         f"at least one class, got {num_classes}")


def check_class_shard(weight_shard, class_start, num_classes, rank, world_size, expected_range, subcenters=1):
    """weight_shard holds the classes `expected_range` = [start, stop) that the sharding rule gives `rank` of
    `world_size` processes (`subcenters` rows each), and class_start says so too (a wrong slice would be a
    silent wrong answer)."""
    check_classes_per_rank(num_classes, world_size)
    start, stop = expected_range
    if class_start != start:
        raise ValueError(f"class_start must be {start} on rank {rank} of {world_size} for num_classes={num_classes} "
                         f"(marginkern.distributed.shard_range), got {class_start}")
    rows = (stop - start) * subcenters
    if weight_shard.shape[0] != rows:
        per_class = "" if subcenters == 1 else f", {subcenters} sub-centres per class"
        raise ValueError(f"weight_shard must hold classes [{start}, {stop}) on rank {rank} of {world_size}"
                         f"{per_class}, i.e. have shape ({rows}, D), got shape {tuple(weight_shard.shape)}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_finite(name, value, low=-math.inf, high=math.inf, low_open=False, high_open=False):
    """value is a real number (int, float, a NumPy scalar; not a bool or a tensor) in the given bounds."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, torch.SymInt, torch.SymFloat)):
        hint = " (pass a Python number: value.item())" if isinstance(value, torch.Tensor) else ""
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}{hint}")
    # comparisons, not math.isfinite: torch.compile(dynamic=True) traces floats as symbols, which
    # math.isfinite cannot take (and NaN fails both comparisons)
    if not (-math.inf < value < math.inf) or (isinstance(value, int) and abs(value) > sys.float_info.max):
        # (a Python int compares exactly with inf, so 10**400 passed and overflowed at float())
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        bound = ("(" if low_open else "[") + f"{low}, {high}" + (")" if high == math.inf or high_open else "]")
        raise ValueError(f"{name} must lie in {bound}, got {value!r}")


# The smallest temperature whose inverse, the logits' row scale, is a finite float32.
MIN_TEMPERATURE = 1.0 / torch.finfo(torch.float32).max


def check_proxy_anchor_options(margin, alpha):
    """Proxy-Anchor's margin δ (finite, any sign) and α (finite, > 0) as floats."""
    check_finite("margin", margin)
    check_finite("alpha", alpha, 0.0, low_open=True)
    return float(margin), float(alpha)


def check_temperature(temperature):
    """A softmax temperature as a float: finite, > 0, and with a finite float32 inverse."""
    check_finite("temperature", temperature, 0.0, low_open=True)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(f"temperature must be ≥ {MIN_TEMPERATURE:.3e} (its inverse scales the logits in float32), "
                         f"got {temperature!r}")
    return float(temperature)


def check_angular_margin(name, value):
    """An additive angular margin (ArcFace's m2) in radians, in [0, π]: pytorch-metric-learning's ArcFaceLoss takes
    degrees (28.6), which would silently train with a margin of 28.6 radians."""
    check_finite(name, value, 0.0)  # the monotone extension ψ of DESIGN.md §4 needs m2 ≥ 0
    if value > math.pi:
        raise ValueError(f"{name} is an angle in radians (ArcFace's 0.5) and must lie in [0, π], got {value!r}; "
                         f"in degrees (pytorch-metric-learning's ArcFaceLoss), pass math.radians({value!r}) = "
                         f"{math.radians(value):.4g}")


def check_margin_scalars(scale, m1, m2, m3, label_smoothing):
    check_finite("scale", scale, 0.0, low_open=True)
    check_finite("m1", m1, 1.0)  # the monotone extension ψ of DESIGN.md §4 needs m1 ≥ 1, m2 ≥ 0
    check_angular_margin("m2", m2)
    check_finite("m3", m3)
    check_finite("label_smoothing", label_smoothing, 0.0, 1.0)


def check_margin_options(scale, m1, m2, m3, margin_grad, label_smoothing):
    check_margin_scalars(scale, m1, m2, m3, label_smoothing)
    if margin_grad not in ("exact", "straight_through"):
        raise ValueError(f"margin_grad must be 'exact' or 'straight_through', got {margin_grad!r}")


def check_subcenters(subcenters, normalize, num_weight_rows=None, weight_name="weight"):
    """subcenters K as an int ≥ 1; with K > 1 the logits must be cosines (normalize=True: the largest of a
    class's K raw dot products would favour long sub-centres) and the weight's rows a multiple of K
    (class j's sub-centres are rows jK … jK+K−1). Returns K."""
    subcenters = check_int("subcenters", subcenters)
    if subcenters < 1:
        raise ValueError(f"subcenters must be ≥ 1, got {subcenters}")
    if subcenters > 1 and not normalize:
        raise ValueError(f"subcenters={subcenters} needs normalize=True (sub-centres compete by cosine)")
    if num_weight_rows is not None and num_weight_rows % subcenters != 0:
        raise ValueError(f"{weight_name} must have C·subcenters rows (class j's sub-centres are rows "
                         f"j·{subcenters} … j·{subcenters}+{subcenters - 1}), got {num_weight_rows} rows, not a "
                         f"multiple of subcenters={subcenters}")
    return subcenters


def check_bias(bias, weight, name="bias"):
    if bias is None:
        return
    check_tensor(name, bias, "a torch.Tensor or None")
    if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"{name} must have shape (C={weight.shape[0]},), got shape {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"{name} must have the dtype of weight ({weight.dtype}), got {bias.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{name} must be on the device of weight ({weight.device}), got {bias.device}")


def check_class_weight(class_weight, weight, label_smoothing, softcap):
    """torch's per-class `weight` of cross_entropy, as linear_cross_entropy's class_weight: (C,), floating, on the
    head's device, no gradient (none is computed, as torch computes none). Metadata only (the fake kernels run
    it); check_class_weight_values looks at the values."""
    if class_weight is None:
        return
    check_tensor("class_weight", class_weight, "a torch.Tensor or None")
    if class_weight.dim() != 1 or class_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"class_weight must have shape (C={weight.shape[0]},), got shape "
                         f"{tuple(class_weight.shape)}")
    if not class_weight.is_floating_point():
        raise TypeError(f"class_weight must be a floating-point tensor, got {class_weight.dtype}")
    if class_weight.device != weight.device:
        raise ValueError(f"class_weight must be on the device of weight ({weight.device}), got {class_weight.device}")
    if class_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("class_weight receives no gradient (as torch's cross_entropy weight): pass a tensor that "
                         "does not require one (class_weight.detach())")
    if label_smoothing > 0 and softcap is not None:
        raise ValueError("class_weight with label_smoothing > 0 needs softcap=None (the class-weighted smoothing "
                         "term Σ_j c_j·z_j is computed as one product with the head, which a softcap would not be)")


def check_class_weight_values(class_weight, dtype=None):
    """Finite and non-negative (a negative weight would make the loss unbounded below), also once cast to `dtype`,
    the dtype the loss computes in (an fp64 1e39 is inf in fp32). One host sync, so real tensors only, skipped while
    a CUDA graph is being captured."""
    if class_weight is None or (class_weight.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    values = class_weight.detach() if dtype is None else class_weight.detach().to(dtype)
    low, high = torch.stack(torch.aminmax(values)).tolist() if class_weight.numel() else (0.0, 0.0)
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
        bad = low if (low < 0 or not math.isfinite(low)) else high
        raise ValueError(f"class_weight must hold finite, non-negative values, got {bad}")


def check_extra_outputs(logits_buffer_mb, **flags):
    """linear_cross_entropy's return_* flags as bools (in the order given); the 3-GEMM path (logits_buffer_mb)
    returns the reduced loss only."""
    for name, value in flags.items():
        if check_bool(name, value) and logits_buffer_mb is not None:
            raise ValueError(f"{name}=True needs logits_buffer_mb=None (the 3-GEMM path returns the reduced loss only)")
    return tuple(bool(v) for v in flags.values())


def check_token_scaling(token_scaling, logits_buffer_mb):
    """linear_cross_entropy's token_scaling (DFT) as a bool; the 3-GEMM path computes its gradients in the forward
    pass, before any per-token weight could scale them."""
    if check_bool("token_scaling", token_scaling) and logits_buffer_mb is not None:
        raise ValueError("token_scaling=True needs logits_buffer_mb=None (the 3-GEMM path computes the gradients "
                         "in the forward pass, unscaled)")
    return bool(token_scaling)


def check_skip_ignored_rows(skip_ignored_rows, return_lse=False):
    """skip_ignored_rows as None (automatic), True or False (a NumPy bool read as a bool); True cannot leave out
    rows whose lse return_lse reports."""
    if skip_ignored_rows is None:
        return None
    if not _is_bool(skip_ignored_rows):
        raise TypeError(f"skip_ignored_rows must be None or a bool, got {type(skip_ignored_rows).__name__}")
    if skip_ignored_rows and return_lse:
        raise ValueError("skip_ignored_rows=True cannot be combined with return_lse=True (the lse of every row, "
                         "ignored ones included, is returned)")
    return bool(skip_ignored_rows)


def check_skip_ignored_share(share, differentiable_lse=False):
    """An op's skip_ignored_share (row_skipping.skip_share): None, or a share in [0, 1]; not with a differentiable
    lse (the forward op's differentiable_lse, the backward op's grad_lse: an ignored row's lse takes a gradient, so
    that row cannot be left out)."""
    if share is None:
        return None
    check_finite("skip_ignored_share", share, 0.0, 1.0)
    if differentiable_lse:
        raise ValueError("skip_ignored_share cannot be combined with a differentiable lse (differentiable_lse=True, "
                         "or a grad_lse): the lse of every row, ignored ones included, takes a gradient")
    return float(share)


def check_softcap(softcap):
    """A logit softcap cap·tanh(z/cap): None, or a finite number > 0, as a float."""
    if softcap is None:
        return None
    check_finite("softcap", softcap, 0.0, low_open=True)
    return float(softcap)


def check_linear_ce_options(label_smoothing, z_loss, softcap, focal_gamma, gamma_ce):
    check_finite("label_smoothing", label_smoothing, 0.0, 1.0)
    check_finite("z_loss", z_loss, 0.0)
    check_softcap(softcap)
    check_finite("focal_gamma", focal_gamma, 0.0)
    check_finite("gamma_ce", gamma_ce, 0.0)
    if gamma_ce >= 1.0:
        raise ValueError(f"gamma_ce must lie in [0, 1), got {gamma_ce!r}")
    if focal_gamma > 0 and gamma_ce > 0:
        raise ValueError(f"focal_gamma={focal_gamma} and gamma_ce={gamma_ce} cannot be combined: both reweight "
                         "the target term; set one of them to 0")


def check_cost_embedding(cost_embedding, weight=None):
    """EMO's cost embedding (C, E), float; with the head's weight also its C and device (without: EMOLoss's buffer,
    checked when built, before any weight is seen)."""
    check_tensor("cost_embedding", cost_embedding, "a torch.Tensor or None")
    if cost_embedding.dim() != 2 or (weight is not None and cost_embedding.shape[0] != weight.shape[0]):
        classes = "C" if weight is None else f"C={weight.shape[0]}"
        raise ValueError(f"cost_embedding must have shape ({classes}, E) (one row per class; E may "
                         f"differ from the hidden size), got shape {tuple(cost_embedding.shape)}")
    if cost_embedding.dtype not in FLOAT_DTYPES:
        raise TypeError(f"cost_embedding must be a float tensor, got {cost_embedding.dtype}")
    if weight is not None and cost_embedding.device != weight.device:
        raise ValueError(f"cost_embedding must be on the device of weight ({weight.device}), "
                         f"got {cost_embedding.device}")


def check_teacher(teacher_input, teacher_weight, input, weight):
    """The teacher's hidden states (N, E) and head (C, E) of the distillation losses: the student's rows,
    classes, dtype (the two GEMMs run in one kernel) and device; E may differ from the student's D."""
    check_tensor("teacher_input", teacher_input)
    check_tensor("teacher_weight", teacher_weight)
    if teacher_input.dim() != 2 or teacher_input.shape[0] != input.shape[0]:
        raise ValueError(f"teacher_input must have shape (N={input.shape[0]}, E) (the student's rows; E may differ "
                         f"from D), got shape {tuple(teacher_input.shape)}")
    if (teacher_weight.dim() != 2 or teacher_weight.shape[0] != weight.shape[0]
            or teacher_weight.shape[1] != teacher_input.shape[1]):
        raise ValueError(f"teacher_weight must have shape (C={weight.shape[0]}, E={teacher_input.shape[1]}) (the "
                         f"student's classes, teacher_input's width), got shape {tuple(teacher_weight.shape)}")
    for name, t in (("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        if t.dtype != input.dtype:
            raise TypeError(f"{name} must have the dtype of input ({input.dtype}), got {t.dtype}; pass "
                            f"{name}.to(input.dtype)")
        if t.device != input.device:
            raise ValueError(f"{name} must be on the device of input ({input.device}), got {t.device}")


def check_topk_teacher(token_ids, teacher_logits, input):
    """A top-k teacher: token ids (N, k) integer and logits (N, k) floating point, k ≥ 1, on input's device (the
    values are checked apart: check_token_ids)."""
    check_tensor("teacher_token_ids", token_ids)
    check_tensor("teacher_logits", teacher_logits)
    n = input.shape[0]
    if token_ids.dim() != 2 or token_ids.shape[0] != n or token_ids.shape[1] < 1:
        raise ValueError(f"teacher_token_ids must have shape (N={n}, k) with k ≥ 1, got shape {tuple(token_ids.shape)}")
    if teacher_logits.shape != token_ids.shape:
        raise ValueError(f"teacher_logits must have teacher_token_ids' shape {tuple(token_ids.shape)}, got shape "
                         f"{tuple(teacher_logits.shape)}")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise TypeError(f"teacher_token_ids must be an integer tensor, got {token_ids.dtype}")
    if not teacher_logits.is_floating_point():
        raise TypeError(f"teacher_logits must be a floating-point tensor, got {teacher_logits.dtype}")
    for name, t in (("teacher_token_ids", token_ids), ("teacher_logits", teacher_logits)):
        if t.device != input.device:
            raise ValueError(f"{name} must be on the device of input ({input.device}), got {t.device}")


def check_token_ids(token_ids, num_classes):
    """Token ids in [0, C): one host sync, skipped while a CUDA graph is captured (as check_target_values)."""
    if (token_ids.is_cuda and torch.cuda.is_current_stream_capturing()) or token_ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(token_ids.long())).tolist()  # unsigned ids too (no aminmax for uint32)
    if low < 0 or high >= num_classes:
        raise ValueError(f"teacher_token_ids holds token {low if low < 0 else high}, outside [0, {num_classes})")


def check_jsd_beta(beta):
    """β of the generalized JSD as a float in [0, 1] (0 and 1: forward and reverse KL)."""
    check_finite("beta", beta, 0.0, 1.0)
    return float(beta)


def check_direction(direction):
    if direction not in ("forward", "reverse"):
        raise ValueError(f"direction must be \"forward\" (KL(teacher‖student)) or \"reverse\" "
                         f"(KL(student‖teacher)), got {direction!r}")
    return direction == "reverse"


def check_float_tensor(name, t, dim=None):
    check_tensor(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_labels(labels, n, device):
    check_tensor("labels", labels)
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must be integer or float, got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")


def check_cosent_arguments(scores, labels, scale):
    """CoSENT's pair scores (B,), labels (B,) and scale: the function's and the op's one check."""
    check_float_tensor("scores", scores, dim=1)
    check_labels(labels, scores.shape[0], scores.device)
    check_finite("scale", scale, 0.0, low_open=True)


def check_circle_arguments(embeddings, labels, m, gamma, anchor_block):
    """Circle loss's embeddings (B, D), labels (B,), m, gamma and anchor_block (None: the default): the function's
    and the op's one check; returns anchor_block as the op takes it, a Python int, 0 for the default."""
    check_float_tensor("embeddings", embeddings, dim=2)
    check_labels(labels, embeddings.shape[0], embeddings.device)
    check_finite("m", m, 0.0, 1.0)
    check_finite("gamma", gamma, 0.0, low_open=True)
    if anchor_block is None:
        return 0
    anchor_block = check_int("anchor_block", anchor_block)
    if anchor_block < 1:
        raise ValueError(f"anchor_block must be ≥ 1 (or None for the default), got {anchor_block}")
    return anchor_block


def check_embedding_pair(a, b):
    check_float_tensor("embeddings_a", a, dim=2)
    check_float_tensor("embeddings_b", b, dim=2)
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"embeddings_b must match embeddings_a in shape, dtype and device: got "
                         f"{tuple(b.shape)} {b.dtype} {b.device} vs {tuple(a.shape)} {a.dtype} {a.device}")


def check_binary_targets(targets, logits):
    check_tensor("targets", targets)
    if targets.shape != logits.shape:
        raise ValueError(f"targets must have the shape of logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
    if targets.device != logits.device:
        raise ValueError(f"targets must be on {logits.device}, got {targets.device}")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the labels)")
    if not torch.compiler.is_compiling():
        # by slices of 2²⁴ labels (two bool temporaries of the whole targets were 2 × N·C bytes), one host sync
        flat = targets.reshape(-1)
        non_binary = [((part != 0) & (part != 1)).any() for part in flat.split(1 << 24)]
        if non_binary and bool(torch.stack(non_binary).any()):
            raise ValueError("targets must hold 0/1 labels (soft labels are not supported)")


def _check_positive_values(positives, num_classes, ignore_index, mask_zero, name):
    """Each positive index in [0, num_classes) or padding (ignore_index; 0 too with mask_zero), in eager calls only
    (a compiled call cannot look at the values: the ops make such a row NaN)."""
    if torch.compiler.is_compiling():
        return
    positives = positives.long()
    if mask_zero:
        positives = positives.masked_fill(positives == 0, ignore_index)
    check_target_values(positives, num_classes, ignore_index, name)


def check_positive_indices(positives, logits, ignore_index, mask_zero=False):
    """The sparse multilabel CE's positives: integer class indices (..., P) beside logits (..., C), each in [0, C) or
    padding (ignore_index; 0 too with mask_zero). The values are checked in eager calls only (a compiled call makes
    such a row NaN)."""
    check_tensor("positives", positives)
    check_integer_dtype(positives, "positives")
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension (the labels)")
    if positives.dim() != logits.dim() or positives.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"positives must have shape (*{tuple(logits.shape[:-1])}, P): the logits' leading "
                         f"dimensions and P class indices per row, got {tuple(positives.shape)}")
    if positives.device != logits.device:
        raise ValueError(f"positives must be on {logits.device}, got {positives.device}")
    _check_positive_values(positives, logits.shape[-1], ignore_index, mask_zero, "positives")


def check_global_pointer_arguments(q, k, positives, mask, scale, ignore_index, mask_zero):
    """GlobalPointer's q, k (B, L, H, d), positives (B, H, P) of flattened spans m·L + n, mask (B, L) or None and
    scale (None: 1/√d): the function's one check; returns scale as a float. Positive values are checked in eager
    calls only (a compiled call makes such a row NaN)."""
    check_float_tensor("q", q, dim=4)
    check_float_tensor("k", k, dim=4)
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} (B, L, H, d), got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        raise TypeError(f"k must have q's dtype {q.dtype}, got {k.dtype}")
    if k.device != q.device:
        raise ValueError(f"k must be on {q.device} (q's device), got {k.device}")
    B, L, H, d = q.shape
    check_tensor("positives", positives)
    check_integer_dtype(positives, "positives")
    if positives.dim() != 3 or positives.shape[:2] != (B, H):
        raise ValueError(f"positives must have shape (B={B}, H={H}, P): each (batch, head)'s spans m·L + n, got "
                         f"{tuple(positives.shape)}")
    if positives.device != q.device:
        raise ValueError(f"positives must be on {q.device}, got {positives.device}")
    if mask is not None:
        check_tensor("mask", mask)
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"mask must be a bool or integer tensor (1: a token, 0: padding), got {mask.dtype}")
        if mask.shape != (B, L):
            raise ValueError(f"mask must have shape (B={B}, L={L}), got {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ValueError(f"mask must be on {q.device}, got {mask.device}")
    if scale is None:
        scale = 1.0 / math.sqrt(d) if d else 1.0  # GlobalPointer's q·k/√d
    check_finite("scale", scale, 0.0, low_open=True)
    _check_positive_values(positives, L * L, ignore_index, mask_zero, "positives (spans m·L + n)")
    return float(scale)


def resolve_grad_filter_eps(grad_filter_eps, dtype):
    """None (exact), "auto" (Cut Cross-Entropy's default: the dtype's machine epsilon / 32) or a float in
    (0, 1) → None or float."""
    if grad_filter_eps is None:
        return None
    if isinstance(grad_filter_eps, str):
        if grad_filter_eps != "auto":
            raise ValueError(f"grad_filter_eps must be None, 'auto' or a float in (0, 1), got {grad_filter_eps!r}")
        return torch.finfo(dtype).eps / 32
    # (1 would drop nearly every class's gradient: dX 93% off in a review's case)
    check_finite("grad_filter_eps", grad_filter_eps, 0.0, 1.0, low_open=True, high_open=True)
    return float(grad_filter_eps)


def check_logits_buffer(logits_buffer_mb, reduction, grad_filter_eps):
    if logits_buffer_mb is None:
        return
    check_finite("logits_buffer_mb", logits_buffer_mb, 0.0, low_open=True)
    if reduction == "none":
        raise ValueError("logits_buffer_mb needs reduction 'mean' or 'sum': the buffered path computes the "
                         "gradients of the reduced loss in the forward pass; use logits_buffer_mb=None with 'none'")
    if grad_filter_eps is not None:
        raise ValueError("grad_filter_eps filters the recomputing backward pass (logits_buffer_mb=None); it "
                         f"cannot be combined with logits_buffer_mb={logits_buffer_mb}")


def check_topk_arguments(input, weight, k, bias, normalize, softcap, logit_scale, return_lse, weight_name="weight",
                         max_k=None):
    """linear_topk's arguments checked: input (N, D) or (B, ..., D), weight (C, D), bias (C,) of one float dtype on one
    device, 1 ≤ k ≤ C, or ≤ max_k, the smallest shard's classes; (k, normalize, softcap as a float or None,
    logit_scale as a float, return_lse)."""
    check_tensor("input", input)
    check_tensor(weight_name, weight)
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, D) or (B, ..., D), got shape {tuple(input.shape)}")
    if weight.dim() != 2 or weight.shape[1] != input.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"{weight_name} must have shape (C ≥ 1, D={input.shape[-1]}), got shape {tuple(weight.shape)}")
    check_float_tensor("input", input)
    if weight.dtype != input.dtype or weight.device != input.device:
        raise TypeError(f"{weight_name} must have the dtype and device of input ({input.dtype} on {input.device}), "
                        f"got {weight.dtype} on {weight.device}")
    check_bias(bias, weight)
    k = check_int("k", k)
    if max_k is None and not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k must lie in [1, C={weight.shape[0]}], got {k}")
    if max_k is not None and not 1 <= k <= max_k:
        raise ValueError(f"k must lie in [1, {max_k}] (the smallest shard's classes), got {k}")
    normalize = check_bool("normalize", normalize)
    softcap = check_softcap(softcap)
    if normalize and (bias is not None or softcap is not None):
        raise ValueError("normalize=True ranks cosines: bias and softcap must be None")
    check_finite("logit_scale", logit_scale, 0.0, low_open=True)
    if normalize and logit_scale != 1.0:
        raise ValueError("normalize=True ranks cosines: logit_scale must be 1")
    return (k, normalize, softcap, float(logit_scale),
            check_bool("return_lse", return_lse))
