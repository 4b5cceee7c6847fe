"""Every torch.library op of marginkern: schema, fake kernel and autograd, in one place.

The ops return per-row losses; the public functions in functional.py apply the reduction with plain
torch ops, so one backward op serves "mean", "sum" and "none". Each op picks its backend at run time
(dispatch.select_tiles), which is why the real kernels are registered for every device.

The LM losses' backward ops take `skip_ignored_share` (None: off): when at least that share of the rows, and at
least one, have target == ignore_index (row_skipping.labelled_rows: one host sync, none while a CUDA graph is
captured), they run on the other rows alone, whose gradients are all there is (an ignored row's is 0;
_on_labelled_rows). It is how a compiled graph skips prompt and padding tokens, whose shapes cannot follow the data
(eager calls skip them in the forward pass already, functional.py). The forward ops take it only to hand it to their
backward op and run every row themselves: a forward that left rows out would give the backward placeholders for
their statistics, and a backward captured in a CUDA graph (which cannot sync to leave them out in turn) would compute
with them. The 3-GEMM op (linear_cross_entropy_buffered) skips in its forward pass, which is its whole step. A
compiled call that needs no gradient (evaluation, a reference model's log-probs under torch.no_grad) has no backward
pass to skip in: the forward ops' `skip_in_forward=True` makes them skip in theirs, with zeros in the ignored rows'
outputs (the public functions pass it only where no input needs a gradient; a backward pass through it raises).
"""
import functools
import inspect
import os
from typing import Optional

import torch
from torch import Tensor

from .checks import (check_bias, check_bool, check_circle_arguments, check_class_weight, check_class_weight_values,
                     check_classification_inputs, check_cosent_arguments, check_cost_embedding,
                     check_embedding_pair, check_finite, check_ignore_index, check_linear_ce_options,
                     check_jsd_beta, check_proxy_anchor_options, check_subcenters, check_target_values, check_teacher,
                     check_int, check_skip_ignored_share, check_softcap, check_temperature, check_tensor,
                     check_token_ids, check_topk_teacher)
from .dispatch import select_tiles, select_tiles_except
from . import global_pointer, pairwise
from .engine import NORM_EPS, accumulation_dtype, buffered_grads_in_input_dtype
from .distill import jsd_backward, jsd_forward, kl_backward, kl_forward, topk_kl_backward, topk_kl_forward
from .emo import emo_backward, emo_forward
from .log_probs import log_probs_backward, log_probs_forward
from .linear_ce import LinearCEOptions, linear_ce_backward, linear_ce_buffered, linear_ce_forward
from .margin_ce import MarginOptions, margin_ce_backward, margin_ce_forward, row_margin_grads
from .row_skipping import labelled_rows, put_rows, take_rows
from .proxy_anchor import proxy_anchor_backward as proxy_anchor_backward_pass, proxy_anchor_forward
from .siglip import siglip_backward as siglip_backward_pass, siglip_forward
from .supcon import supcon_backward as supcon_backward_pass, supcon_forward
from .info_nce import info_nce_backward as info_nce_backward_pass, info_nce_forward
from .topk import streaming_topk


def _without_autocast(kernel):
    """The kernels pick their own precision (16-bit operands, fp32 accumulation): a caller's autocast
    region must not turn the GEMMs inside an op into 16-bit ones (or break their in-place writes)."""
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
            return kernel(*args, **kwargs)  # the common case, without two context managers per call
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return kernel(*args, **kwargs)
    return run


_OPS = {}              # name → the torch.library op (torch.ops.marginkern.<name>)
_IMPLEMENTATIONS = {}  # name → the Python function the op runs
_EAGER_TWINS = {}      # name → a torch.autograd.Function with the op's implementation, setup_context and backward


def _op(name, without_autocast=True):
    """@torch.library.custom_op("marginkern::<name>"), running the function without autocast; the function is
    kept for call()."""
    def register(kernel):
        implementation = _without_autocast(kernel) if without_autocast else kernel
        _IMPLEMENTATIONS[name] = implementation
        _OPS[name] = torch.library.custom_op(f"marginkern::{name}", implementation, mutates_args=())
        if name.endswith("_backward"):
            _OPS[name].register_autograd(_no_second_derivative(name[:-len("_backward")]))
        return _OPS[name]
    return register


def _optional_arg(values, index):
    """values[index], an op's optional trailing argument, or None where the call left it out (the eager twin gets the
    arguments as given, the op's own autograd the defaults too)."""
    return values[index] if len(values) > index else None


def _on_labelled_rows(*per_row, row_outputs=((0, None),), only_with=None):
    """Decorates an op implementation that takes skip_ignored_share (module docstring): where
    row_skipping.labelled_rows selects rows, the implementation runs on those rows of its (N, ...) arguments named
    `per_row` (target and input among them), and each of its per-row outputs comes back as an (N, ...) tensor with
    zeros (False) in the other rows. `row_outputs`: (index of the output, the bool argument that asks for it or None
    where it is always made): an output not asked for stays the empty tensor it is. `only_with`: the bool argument
    without which the implementation runs every row (the forward ops' skip_in_forward). Arguments of the wrong length
    go through as they are, for the implementation's own error."""
    def decorate(implementation):
        signature = inspect.signature(implementation)
        names = list(signature.parameters)
        defaults = [p.default for p in signature.parameters.values()]
        required = sum(d is inspect.Parameter.empty for d in defaults)
        share_at, only_at = names.index("skip_ignored_share"), None if only_with is None else names.index(only_with)
        per_row_at = [names.index(name) for name in per_row]

        def given(args, kwargs, name, at):
            return kwargs.get(name, args[at] if len(args) > at else None)

        def in_order(args, kwargs):
            """Every argument, in order, defaults filled in: positional calls (the dispatcher's and call()'s) without
            Signature.bind (~30 µs of host time a call)."""
            if kwargs or len(args) < required:
                bound = signature.bind(*args, **kwargs)  # (and its TypeError for a bad call)
                bound.apply_defaults()
                return list(bound.arguments.values())
            return list(args) + defaults[len(args):]

        @functools.wraps(implementation)
        def run(*args, **kwargs):
            if (given(args, kwargs, "skip_ignored_share", share_at) is None
                    or (only_with is not None and not given(args, kwargs, only_with, only_at))):
                return implementation(*args, **kwargs)
            values = in_order(args, kwargs)
            arguments = dict(zip(names, values))
            share = check_skip_ignored_share(arguments["skip_ignored_share"],
                                             arguments.get("grad_lse") is not None
                                             or bool(arguments.get("differentiable_lse")))
            n = arguments["input"].shape[0]
            if any(arguments[name].shape[:1] != (n,) for name in per_row):
                return implementation(*values)
            rows = labelled_rows(arguments["target"], arguments["ignore_index"], share)
            if rows is None:
                return implementation(*values)
            asked = [i for i, asked_by in row_outputs if asked_by is None or arguments[asked_by]]
            for at, taken in zip(per_row_at, take_rows(rows, *(values[at] for at in per_row_at))):
                values[at] = taken
            del arguments
            outputs = list(implementation(*values))
            del values  # the rows' copies, before the (N, ...) outputs are made
            for i in asked:
                outputs[i], = put_rows(rows, n, outputs[i])
            return tuple(outputs)
        return run
    return decorate


def _no_second_derivative(loss):
    """A backward op's autograd: differentiating it (a second derivative, after create_graph=True) raises, naming
    the loss, instead of torch.library's advice to register a formula."""
    def backward(ctx, *grads):
        raise RuntimeError(f"marginkern's {loss} cannot be differentiated twice: its backward pass has no derivative "
                           f"of its own (a create_graph=True gradient can be used, not differentiated again)")
    return backward


def _with_row_skipping(op, backward, setup_context, share_at):
    """An LM forward op's backward and setup_context, with its skipping arguments handled in one place: its
    skip_ignored_share (inputs[share_at]) kept as ctx.skip_ignored_share for its backward op, and a backward pass
    refused after a forward that left the ignored rows out (skip_in_forward, inputs[share_at + 1], with a share): that
    forward put placeholders (0) in their statistics, for calls that need no gradient (the public functions pass it
    only then)."""
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.skip_ignored_share = _optional_arg(inputs, share_at)
        ctx.skipped_in_forward = ctx.skip_ignored_share is not None and bool(_optional_arg(inputs, share_at + 1))

    def checked_backward(ctx, *grads):
        if ctx.skipped_in_forward:
            raise RuntimeError(f"marginkern::{op} ran with skip_in_forward=True, which leaves the ignored rows out of "
                               f"the forward pass and has no backward pass: call it with skip_in_forward=False where "
                               f"a gradient is needed")
        return backward(ctx, *grads)
    return checked_backward, setup


def _register_autograd(name, backward, setup_context, skip_share_at=None):
    """The op's autograd, and its eager twin for call(): a torch.autograd.Function with the same forward,
    setup_context and backward. (A ctx-style one: a setup_context-style Function, tried first, saved nothing
    over the op's own dispatch.) skip_share_at: where an LM forward op's skip_ignored_share sits among its inputs
    (_with_row_skipping)."""
    if skip_share_at is not None:
        backward, setup_context = _with_row_skipping(name, backward, setup_context, skip_share_at)
    _OPS[name].register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *args):
        # the by-product outputs (lse, norms, ...) get no gradient: no zero tensors are made for them (the
        # backward functions take None for those)
        ctx.set_materialize_grads(False)
        ctx.num_args = len(args)
        output = _run_implementation(name, args)
        setup_context(ctx, args, output)
        return output

    def twin_backward(ctx, *grads):
        if all(g is None for g in grads):  # nothing flows back (gradcheck's undefined-gradient check)
            return (None,) * ctx.num_args
        return backward(ctx, *grads)

    _EAGER_TWINS[name] = type(f"{name}_eager", (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(twin_backward)})


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager_on_real_tensors(args, function_modes_allowed=False) -> bool:
    """Whether this call runs eagerly on plain CPU/CUDA tensors: not traced or compiled, no dispatch mode
    (FakeTensorMode, FlopCounterMode, make_fx's), no functorch transform, no tensor subclass (fake, functional or
    distributed tensors), and no torch function mode unless `function_modes_allowed` (torch.set_default_device's
    is one: data-dependent steps work under it, but a call that skips the op's dispatch would hide the op from a
    user's mode). Data-dependent steps (a host sync, a shape read from values) may run then, unless a CUDA graph is
    being captured (the caller's check)."""
    try:
        if (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or (not function_modes_allowed and torch._C._len_torch_function_stack())
                or torch._C._len_torch_dispatch_stack() or torch._C._functorch.peek_interpreter_stack() is not None):
            return False
    except AttributeError:  # a torch without these internals: always the op
        return False
    return all(type(a) in _PLAIN_TENSOR_TYPES and a.device.type in ("cpu", "cuda")
               for a in args if isinstance(a, torch.Tensor))


def _plain_eager(args) -> bool:
    """Whether a call can skip torch.library's dispatch: eager_on_real_tensors, outside inference mode (there the
    op skips autograd, where a Function would try to save inference tensors, which raises under enable_grad).
    MARGINKERN_EAGER_TWINS=0 sends every call through the ops (to compare, or to rule the twins out)."""
    if os.environ.get("MARGINKERN_EAGER_TWINS") == "0":
        return False
    return eager_on_real_tensors(args) and not torch.is_inference_mode_enabled()  # (dynamo refuses the latter)


def _run_implementation(name, args):
    """The op's Python implementation, in a profiler range named as the op's own (only while a profiler
    runs: a range costs a dispatcher call), so that profiles read the same on both paths."""
    if getattr(torch.autograd.profiler, "_is_profiler_enabled", True):
        with torch.profiler.record_function(f"marginkern::{name}"):
            return _IMPLEMENTATIONS[name](*args)
    return _IMPLEMENTATIONS[name](*args)


def call(name, *args):
    """torch.ops.marginkern.<name>(*args) as the public functions and the backward passes run it. In plain
    eager mode the op's Python implementation runs without torch.library's per-call dispatch (about 75 µs of
    host time less per margin fwd+bwd on a CPU, bench/results/cpu-amd-epyc/2026-12-05-host-time-breakdown.txt;
    small steps on a GPU are host-bound): a
    differentiable op through its eager twin, a backward op directly when no graph is being recorded (with
    create_graph=True it goes through the op, whose autograd raises: a double backward is refused, not zero).
    Everywhere else (torch.compile, FakeTensor, functorch, dispatch modes) through the op."""
    _refuse_forward_mode(args)
    if _plain_eager(args):
        twin = _EAGER_TWINS.get(name)
        if twin is not None:
            return twin.apply(*args)
        if not torch.is_grad_enabled():
            return _run_implementation(name, args)
    return _OPS[name](*args)


# torch.compile reads functorch's interpreter stack in traced code from torch 2.7 on (dynamo's trace_rules list it as
# an in-graph function); torch 2.6's dynamo cannot (an unsupported builtin: every loss failed under fullgraph=True).
_COMPILE_READS_FUNCTORCH_STACK = torch.__version__ >= "2.7"


def _refuse_forward_mode(args):
    """The losses have no forward-mode derivative: through the op, torch.func.jvp would get a zero tangent
    and forward_ad's dual tensors none, silently. (Inside a compiled function on torch 2.6 the jvp check is
    skipped: see _COMPILE_READS_FUNCTORCH_STACK.)"""
    in_jvp = False
    if _COMPILE_READS_FUNCTORCH_STACK or not torch.compiler.is_compiling():
        try:
            interpreter = torch._C._functorch.peek_interpreter_stack()
            in_jvp = interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Jvp
        except AttributeError:  # a torch without these internals
            pass
    if not in_jvp and getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:
        in_jvp = any(isinstance(a, torch.Tensor) and torch.autograd.forward_ad.unpack_dual(a).tangent is not None
                     for a in args)
    if in_jvp:
        raise NotImplementedError("marginkern's losses have no forward-mode derivative: torch.func.jvp, jacfwd and "
                                  "torch.autograd.forward_ad are not supported; use reverse mode (backward(), "
                                  "torch.autograd.grad)")


def _contiguous_like(t):
    # The real kernels return contiguous gradients whatever the inputs' strides: the fakes must say so.
    return t.new_empty(t.shape)


def _or_empty(grad, like):
    # custom ops return tensors: a gradient that was not computed is an empty (0,) tensor
    return grad if grad is not None else like.new_empty((0,))


def _check_forward_inputs(input, weight, target, bias=None, cost_embedding=None):
    """The forward ops are public too (torch.ops.marginkern.*): they name a bad argument as the functions do.
    Metadata only, so the fake kernels run it as well (a traced call fails at trace time)."""
    check_classification_inputs(input, weight, target)
    check_bias(bias, weight)
    if cost_embedding is not None:
        check_cost_embedding(cost_embedding, weight)


def _margin_scalars(opts: MarginOptions):
    """MarginOptions as the scalar arguments of the C++ ops (csrc/cpu/loss_ops.cpp), in schema order."""
    return (opts.scale, opts.m1, opts.m2, opts.m3, opts.normalize, opts.exact_margin_grad, opts.label_smoothing,
            opts.ignore_index)


def _margin_options(weight, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
                    subcenters, lambda_):
    """The op's checked MarginOptions, the weight's rows a multiple of subcenters."""
    opts = MarginOptions.of(scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
                            subcenters, lambda_)
    check_subcenters(opts.subcenters, opts.normalize, weight.shape[0])
    return opts


def _tiles_except_cuda(input, what):
    """select_tiles, except the CUDA tiles, which lack `what` (an epilogue of the engine; on CUDA Triton serves it)."""
    return select_tiles_except(("cuda",), what, input.device, input.dtype)


def _margin_tiles(input, opts: MarginOptions, hard_negatives=None):
    """select_tiles, except that the CUDA extension has no sub-centres nor hard negatives (the C++ margin step has
    both)."""
    if opts.subcenters == 1 and hard_negatives is None:
        return select_tiles(input.device, input.dtype)
    return _tiles_except_cuda(input, "sub-centres" if hard_negatives is None else "hard-negative re-weighting")


def _check_row_margins(row_margins, input):
    """Per-row margin offsets (Δm2, Δm3), as the ops take them: (N, 2) in input's accumulation dtype, on its device.
    Their values are not checked (that would sync with the GPU every step): a NaN margin gives a NaN loss row."""
    if row_margins is None:
        return
    shape, dtype = (input.shape[0], 2), accumulation_dtype(input.dtype)
    if tuple(row_margins.shape) != shape or row_margins.dtype != dtype or row_margins.device != input.device:
        raise ValueError(f"row_margins must be a {shape} {dtype} tensor on {input.device} (per-row offsets of m2 and "
                         f"m3), got a {tuple(row_margins.shape)} {row_margins.dtype} tensor on {row_margins.device}")


def _check_hard_negatives(hard_negatives, input, opts: MarginOptions):
    """The hard-negative coefficients, as the ops take them: (3,) (a, b, d) above each row's ψ, or (4,) (a, b, d, τ)
    above the fixed cosine τ, in input's accumulation dtype, on its device, with normalize (they re-weight cosines)."""
    if hard_negatives is None:
        return
    dtype = accumulation_dtype(input.dtype)
    if (hard_negatives.dim() != 1 or hard_negatives.shape[0] not in (3, 4) or hard_negatives.dtype != dtype
            or hard_negatives.device != input.device):
        raise ValueError(f"hard_negatives must be a (3,) (a, b, d) or (4,) (a, b, d, threshold) {dtype} tensor on "
                         f"{input.device}, got a {tuple(hard_negatives.shape)} {hard_negatives.dtype} tensor on "
                         f"{hard_negatives.device}")
    if not opts.normalize:
        raise ValueError("hard_negatives needs normalize=True: it re-weights cosines")


@_op("margin_cross_entropy")
def margin_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, scale: float, m1: float, m2: float,
                         m3: float, normalize: bool, exact_margin_grad: bool, label_smoothing: float,
                         ignore_index: int, subcenters: int = 1, lambda_: float = 0.0,
                         row_margins: Optional[Tensor] = None,
                         hard_negatives: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row loss, per-row log-sum-exp, (N, 4) target geometry ((N, 5) with sub-centres), (K·C,) class-centre
    norms or (0,) without normalize); ignored rows have loss 0. The last three are by-products the backward
    op takes. weight is (K·C, D) for K = subcenters sub-centres per class; lambda_: A-Softmax's λ; row_margins
    (N, 2): per-row offsets (Δm2, Δm3) added to m2 and m3 (AdaFace, MagFace), differentiable; hard_negatives (3,):
    (a, b, d) of the hard-negative re-weighting (CurricularFace, MV-Softmax; functional.margin_cross_entropy) above
    each row's ψ, or (4,): (a, b, d, τ) above the fixed cosine τ (insightface's inter-class filtering), no gradient.
    Their values are not checked here (a device sync): a NaN coefficient gives NaN losses, and a NaN τ makes nothing
    hard except on the C++ step, which reads τ on the host and raises (the public functions refuse a non-finite τ)."""
    _check_forward_inputs(input, weight, target)
    opts = _margin_options(weight, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
                           subcenters, lambda_)
    _check_row_margins(row_margins, input)
    _check_hard_negatives(hard_negatives, input, opts)
    check_target_values(target, weight.shape[0] // opts.subcenters, opts.ignore_index)
    input, weight = input.contiguous(), weight.contiguous()
    tiles = _margin_tiles(input, opts, hard_negatives)
    if tiles.name == "cpp":  # the whole step in C++ (csrc/cpu/margin_loss.cpp), the same math
        return torch.ops.marginkern.margin_ce_rows(input, weight, target, *_margin_scalars(opts), opts.subcenters,
                                                   opts.lambda_, row_margins, hard_negatives)
    return margin_ce_forward(input, weight, target, opts, tiles, keep_geometry=True, row_margins=row_margins,
                             hard_negatives=hard_negatives)


@margin_cross_entropy.register_fake
def _(input, weight, target, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
      subcenters=1, lambda_=0.0, row_margins=None, hard_negatives=None):
    # The fake kernel lets torch.compile trace through the op without running it.
    _check_forward_inputs(input, weight, target)
    opts = _margin_options(weight, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
                           subcenters, lambda_)
    _check_row_margins(row_margins, input)
    _check_hard_negatives(hard_negatives, input, opts)
    acc = accumulation_dtype(input.dtype)
    n = input.shape[0]
    return (input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc),
            input.new_empty((n, 4 if opts.subcenters == 1 else 5), dtype=acc),
            input.new_empty((weight.shape[0] if normalize else 0,), dtype=acc))


def _check_margin_by_products(input, weight, row_state, col_norm, opts: MarginOptions):
    """The forward op's row state and class norms, as the backward op reads them (the raw ops are public)."""
    state = (input.shape[0], 4 if opts.subcenters == 1 else 5)
    if tuple(row_state.shape) != state:
        raise ValueError(f"row_state must have shape {state} (the forward op's, for subcenters={opts.subcenters}), "
                         f"got shape {tuple(row_state.shape)}")
    norms = (weight.shape[0] if opts.normalize else 0,)
    if tuple(col_norm.shape) != norms:
        raise ValueError(f"col_norm must have shape {norms} (the forward op's), got shape {tuple(col_norm.shape)}")


@_op("margin_cross_entropy_backward")
def margin_cross_entropy_backward(grad_loss: Tensor, input: Tensor, weight: Tensor, target: Tensor, lse: Tensor,
                                  row_state: Tensor, col_norm: Tensor, scale: float, m1: float, m2: float,
                                  m3: float, normalize: bool, exact_margin_grad: bool, label_smoothing: float,
                                  ignore_index: int, need_weight_grad: bool = True, subcenters: int = 1,
                                  lambda_: float = 0.0, row_margins: Optional[Tensor] = None,
                                  hard_negatives: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(dL/dinput, dL/dweight) for the per-row loss gradient `grad_loss`; dL/dweight is empty (0,) when
    not `need_weight_grad` (a frozen head skips the dW GEMM). row_state and col_norm are the forward op's;
    row_margins and hard_negatives the forward's (the margins' own gradient is row_margin_grads', in the autograd
    formula)."""
    opts = _margin_options(weight, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
                           subcenters, lambda_)
    _check_margin_by_products(input, weight, row_state, col_norm, opts)
    _check_row_margins(row_margins, input)
    _check_hard_negatives(hard_negatives, input, opts)
    input, weight = input.contiguous(), weight.contiguous()
    tiles = _margin_tiles(input, opts, hard_negatives)
    if tiles.name == "cpp":
        return torch.ops.marginkern.margin_ce_rows_backward(grad_loss, input, weight, target, lse, row_state, col_norm,
                                                            *_margin_scalars(opts), need_weight_grad, opts.subcenters,
                                                            opts.lambda_, row_margins, hard_negatives)
    grad_x, grad_w = margin_ce_backward(grad_loss, input, weight, target, lse, opts, tiles, need_weight_grad,
                                        saved=(row_state, col_norm), row_margins=row_margins,
                                        hard_negatives=hard_negatives)
    return grad_x, _or_empty(grad_w, weight)


@margin_cross_entropy_backward.register_fake
def _(grad_loss, input, weight, target, lse, row_state, col_norm, scale, m1, m2, m3, normalize, exact_margin_grad,
      label_smoothing, ignore_index, need_weight_grad=True, subcenters=1, lambda_=0.0, row_margins=None,
      hard_negatives=None):
    return _contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,)))


_MARGIN_SCALAR_DEFAULTS = (1, 0.0)  # the forward op's subcenters and lambda_, after its eight required scalars
_ROW_MARGINS_INPUT = 13             # row_margins' position among the forward op's inputs


def _margin_setup_context(ctx, inputs, output):
    input, weight, target, *options = inputs
    # the scalars with the defaults a caller of the raw op left out, and the per-row margins apart (a tensor)
    options += _MARGIN_SCALAR_DEFAULTS[len(options) - 8:]
    row_margins, hard_negatives = _optional_arg(options, 10), _optional_arg(options, 11)
    _, lse, row_state, col_norm = output
    ctx.save_for_backward(input, weight, target, lse, row_state, col_norm, row_margins, hard_negatives)
    ctx.mark_non_differentiable(lse, row_state, col_norm)  # by-products for the backward pass
    ctx.options, ctx.num_inputs = options[:10], len(inputs)


def _margin_backward(ctx, grad_loss, *grad_by_products):
    # lse and the geometry are by-products for the backward pass, not differentiable outputs.
    input, weight, target, lse, row_state, col_norm, row_margins, hard_negatives = ctx.saved_tensors
    need_weight_grad = ctx.needs_input_grad[1]
    # the forward's scalar options: the eight the backward op takes first, then subcenters and lambda_ after
    # need_weight_grad
    options, grad_loss = ctx.options, grad_loss.contiguous()
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0] or need_weight_grad:  # (only the margins': O(N), no pass over the classes)
        grad_input, grad_weight = call("margin_cross_entropy_backward", grad_loss, input, weight, target, lse,
                                       row_state, col_norm, *options[:8], need_weight_grad, *options[8:],
                                       row_margins, hard_negatives)
    grads = (grad_input, grad_weight if need_weight_grad else None) + (None,) * (ctx.num_inputs - 2)
    if row_margins is not None and ctx.needs_input_grad[_ROW_MARGINS_INPUT]:
        opts = _margin_options(weight, *options)
        # not differentiable again, as the rest of this backward: with create_graph=True a second derivative
        # must fail loudly, not follow the sin φ term alone (the paths through lse and the geometry are not here)
        with torch.no_grad():
            grad_margins = row_margin_grads(row_state, lse, grad_loss, target, opts,
                                            weight.shape[0] // opts.subcenters, row_margins)
        grads = grads[:_ROW_MARGINS_INPUT] + (grad_margins.to(row_margins.dtype),) + grads[_ROW_MARGINS_INPUT + 1:]
    return grads


_register_autograd("margin_cross_entropy", _margin_backward, _margin_setup_context)


def _linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce):
    check_linear_ce_options(label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    return LinearCEOptions(check_ignore_index(ignore_index), float(label_smoothing), float(z_loss),
                           None if softcap is None else float(softcap), float(focal_gamma), float(gamma_ce))


def _linear_scalars(opts: LinearCEOptions):
    """LinearCEOptions as the scalar arguments of the C++ ops (csrc/cpu/loss_ops.cpp), in schema order."""
    return (opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap, opts.focal_gamma, opts.gamma_ce)


@_op("linear_cross_entropy")
@_on_labelled_rows("input", "target", row_outputs=((0, None), (1, None), (2, "token_accuracy")),
                   only_with="skip_in_forward")
def linear_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], ignore_index: int,
                         label_smoothing: float, z_loss: float, softcap: Optional[float], focal_gamma: float,
                         gamma_ce: float, grad_filter_eps: Optional[float] = None,
                         class_weight: Optional[Tensor] = None, differentiable_lse: bool = False,
                         token_accuracy: bool = False, skip_ignored_share: Optional[float] = None,
                         skip_in_forward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row loss, per-row log-sum-exp, per-row correct) of softcap(x·wᵀ + b); ignored rows have loss 0.
    grad_filter_eps is the backward pass's (engine.streaming_grads). class_weight (C,): torch's per-class weight
    (linear_ce.py). differentiable_lse: the log-sum-exp output takes a gradient too (d lse/dz = p, in the same
    backward pass); otherwise it is a by-product without one. token_accuracy: `correct` (N,) bool says whether each
    row's target logit is its largest (ties count, ignored rows False), from the forward's own pass; else empty.
    skip_ignored_share: the backward op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target, bias)
    opts = _linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    check_class_weight(class_weight, weight, opts.label_smoothing, opts.softcap)
    check_skip_ignored_share(skip_ignored_share, differentiable_lse)
    check_target_values(target, weight.shape[0], opts.ignore_index)
    check_class_weight_values(class_weight, accumulation_dtype(weight.dtype))
    input, weight = input.contiguous(), weight.contiguous()
    if token_accuracy:  # the row max comes from the tiles' row_stats_with_max, which the CUDA tiles lack
        tiles = select_tiles_except(("cuda",), "token accuracy (row maxima)", input.device, input.dtype)
        return linear_ce_forward(input, weight, target, bias, opts, tiles, class_weight=class_weight,
                                 token_accuracy=True)
    tiles = select_tiles(input.device, input.dtype)
    if tiles.name == "cpp" and class_weight is None:  # the whole step in C++ (csrc/cpu/linear_ce_loss.cpp)
        rows = torch.ops.marginkern.linear_ce_rows(input, weight, target, bias, *_linear_scalars(opts))
    else:
        rows = linear_ce_forward(input, weight, target, bias, opts, tiles, class_weight=class_weight)
    return (*rows, _no_token_accuracy(input))


def _no_token_accuracy(input):
    return torch.empty((0,), dtype=torch.bool, device=input.device)


@linear_cross_entropy.register_fake
def _(input, weight, target, bias, *options):
    _check_forward_inputs(input, weight, target, bias)
    opts = _linear_options(*options[:6])
    if len(options) > 7:
        check_class_weight(options[7], weight, opts.label_smoothing, opts.softcap)
    check_skip_ignored_share(_optional_arg(options, 10), _optional_arg(options, 8))
    acc = accumulation_dtype(input.dtype)
    n = input.shape[0]
    token_accuracy = _optional_arg(options, 9)
    correct = input.new_empty((n,), dtype=torch.bool) if token_accuracy else _no_token_accuracy(input)
    return input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc), correct


@_op("linear_cross_entropy_backward")
@_on_labelled_rows("grad_loss", "input", "target", "lse")
def linear_cross_entropy_backward(grad_loss: Tensor, input: Tensor, weight: Tensor, target: Tensor,
                                  bias: Optional[Tensor], lse: Tensor, ignore_index: int, label_smoothing: float,
                                  z_loss: float, softcap: Optional[float], focal_gamma: float,
                                  gamma_ce: float, grad_filter_eps: Optional[float] = None,
                                  need_weight_grad: bool = True, need_bias_grad: bool = True,
                                  class_weight: Optional[Tensor] = None,
                                  grad_lse: Optional[Tensor] = None,
                                  skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dinput, dL/dweight, dL/dbias); a gradient not needed (or of an absent bias) is empty (0,). grad_lse:
    the gradient of the log-sum-exp output, when it has one. skip_ignored_share: see the module docstring."""
    opts = _linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    input, weight = input.contiguous(), weight.contiguous()
    tiles = select_tiles(input.device, input.dtype)
    if tiles.name == "cpp" and grad_filter_eps is None and class_weight is None and grad_lse is None:
        # the whole step in C++; the other cases run the engine's Python loop (on the C++ tiles)
        return torch.ops.marginkern.linear_ce_rows_backward(grad_loss, input, weight, target, bias, lse,
                                                            *_linear_scalars(opts), need_weight_grad,
                                                            need_bias_grad)
    grad_x, grad_w, grad_b = linear_ce_backward(grad_loss, input, weight, target, bias, lse, opts, tiles,
                                                need_weight_grad, need_bias_grad, grad_filter_eps,
                                                class_weight=class_weight, grad_lse=grad_lse)
    return grad_x, _or_empty(grad_w, weight), _or_empty(grad_b, weight)


@linear_cross_entropy_backward.register_fake
def _(grad_loss, input, weight, target, bias, lse, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
      gamma_ce, grad_filter_eps=None, need_weight_grad=True, need_bias_grad=True, class_weight=None, grad_lse=None,
      skip_ignored_share=None):
    check_skip_ignored_share(skip_ignored_share, grad_lse is not None)
    grad_b = _contiguous_like(bias) if bias is not None and need_bias_grad else weight.new_empty((0,))
    grad_w = _contiguous_like(weight) if need_weight_grad else weight.new_empty((0,))
    return _contiguous_like(input), grad_w, grad_b


def _linear_setup_context(ctx, inputs, output):
    input, weight, target, bias, *options = inputs
    class_weight = _optional_arg(options, 7)
    ctx.save_for_backward(input, weight, target, bias, output[1], class_weight)
    ctx.differentiable_lse = bool(_optional_arg(options, 8))
    # one call: a second mark_non_differentiable replaces the first one's outputs
    ctx.mark_non_differentiable(*((output[2],) if ctx.differentiable_lse else (output[1], output[2])))
    ctx.options = options[:7]  # the scalars, grad_filter_eps last


def _linear_backward(ctx, grad_loss, grad_lse, grad_correct=None):
    input, weight, target, bias, lse, class_weight = ctx.saved_tensors
    need_weight_grad, need_bias_grad = ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3]
    if grad_loss is None:  # only the log-sum-exp is used (the eager twin does not make zeros)
        grad_loss = torch.zeros_like(lse)
    grad_lse = grad_lse.contiguous() if ctx.differentiable_lse and grad_lse is not None else None
    grad_input, grad_weight, grad_bias = call("linear_cross_entropy_backward", grad_loss.contiguous(), input, weight,
                                              target, bias, lse, *ctx.options, need_weight_grad, need_bias_grad,
                                              class_weight, grad_lse, ctx.skip_ignored_share)
    return ((grad_input, grad_weight if need_weight_grad else None, None, grad_bias if need_bias_grad else None)
            + (None,) * 12)


_register_autograd("linear_cross_entropy", _linear_backward, _linear_setup_context, skip_share_at=14)


@_op("linear_cross_entropy_buffered")
@_on_labelled_rows("input", "target", row_outputs=((1, "need_input_grad"),))
def linear_cross_entropy_buffered(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                                  ignore_index: int, label_smoothing: float, z_loss: float, softcap: Optional[float],
                                  focal_gamma: float, gamma_ce: float, reduction: str, buffer_bytes: int,
                                  need_input_grad: bool, need_weight_grad: bool, need_bias_grad: bool,
                                  class_weight: Optional[Tensor] = None,
                                  skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(reduced loss, dL/dinput, dL/dweight, dL/dbias) with 3 GEMMs: the gradients (for a loss gradient
    of 1) come out of the forward pass; the autograd backward only scales them. They stay in the
    accumulation dtype until then (a GradScaler scale of 65536 is inf in fp16, and unit-scale fp16
    gradients would underflow), except dL/dinput and dL/dweight of bf16 inputs on CUDA, which are made in
    bf16 (engine.buffered_grads_in_input_dtype: no (C, D) fp32 accumulator). A gradient not asked for (or
    of an absent bias) is empty (0,). Through autograd, the backward pass scales the gradient outputs in
    place and hands them over as the inputs' .grad (no copy): a caller of this op who keeps them sees that.
    skip_ignored_share: as the backward ops', here in the forward pass, which is the whole step."""
    _check_buffered_call(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                         gamma_ce, reduction, buffer_bytes, class_weight, skip_ignored_share)
    check_target_values(target, weight.shape[0], ignore_index)
    check_class_weight_values(class_weight, accumulation_dtype(weight.dtype))
    # The 3-GEMM path runs ATen GEMMs on every backend, and the backend's fused block epilogue where it has
    # one (C++), else PyTorch's; select_tiles also enforces MARGINKERN_BACKEND (a forced backend that cannot
    # serve the call raises).
    tiles = select_tiles(input.device, input.dtype)
    opts = _linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    input, weight = input.contiguous(), weight.contiguous()
    loss, grad_x, grad_w, grad_b = linear_ce_buffered(input, weight, target, bias, opts, reduction,
                                                      int(buffer_bytes), need_input_grad, need_weight_grad,
                                                      need_bias_grad, tiles, class_weight)
    return loss, _or_empty(grad_x, loss), _or_empty(grad_w, loss), _or_empty(grad_b, loss)


def _check_buffered_call(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                         gamma_ce, reduction, buffer_bytes, class_weight=None, skip_ignored_share=None):
    _check_forward_inputs(input, weight, target, bias)
    opts = _linear_options(ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce)
    check_class_weight(class_weight, weight, opts.label_smoothing, opts.softcap)
    check_skip_ignored_share(skip_ignored_share)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum' on the buffered path, got {reduction!r}")
    check_finite("buffer_bytes", buffer_bytes, 0, low_open=True)


@linear_cross_entropy_buffered.register_fake
def _(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, focal_gamma, gamma_ce, reduction,
      buffer_bytes, need_input_grad, need_weight_grad, need_bias_grad, class_weight=None, skip_ignored_share=None):
    _check_buffered_call(input, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
                         gamma_ce, reduction, buffer_bytes, class_weight, skip_ignored_share)
    acc = accumulation_dtype(input.dtype)
    in_dtype = buffered_grads_in_input_dtype(input, weight)

    def grad_like(t, needed, own_dtype=False):
        return t.new_empty(t.shape, dtype=t.dtype if own_dtype else acc) if needed else t.new_empty((0,), dtype=acc)

    return (input.new_empty((), dtype=acc), grad_like(input, need_input_grad, in_dtype),
            grad_like(weight, need_weight_grad, in_dtype),
            grad_like(bias if bias is not None else weight, bias is not None and need_bias_grad))


def _buffered_setup_context(ctx, inputs, output):
    # The gradients are held as a plain attribute, not saved tensors: the backward pass scales them in place
    # and hands them over, and AccumulateGrad adopts a gradient only when nothing else references it (a saved
    # tensor would make it copy: a second (C, D) dW at the peak, 1 GB at Llama-3-8B shapes).
    ctx.grads = list(output[1:])
    ctx.mark_non_differentiable(*output[1:])
    input, weight, _, bias = inputs[:4]
    ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)


def _buffered_backward(ctx, grad_loss, *unused):
    # The op computed the gradients for a loss gradient of 1; an input that needs a gradient here had
    # need_*_grad set by the caller (functional.linear_cross_entropy), so its saved gradient is not empty.
    if torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy(logits_buffer_mb=...) computes its gradients in the forward "
                           "pass and cannot be differentiated twice (create_graph=True); use logits_buffer_mb=None")
    if ctx.grads is None:
        raise RuntimeError("linear_cross_entropy(logits_buffer_mb=...) hands its gradients over in the first "
                           "backward pass: a second one through the same graph (retain_graph=True) is not "
                           "supported; use logits_buffer_mb=None")
    grads, ctx.grads = ctx.grads, None
    needed = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.dtypes[2] is not None and ctx.needs_input_grad[3])
    # in place where the dtype already is the parameter's (bf16 on CUDA, fp32 on the CPU), else multiplied in
    # fp32 and rounded once when stored: never a second copy of a (C, D) gradient beside the first
    # (real tensors only: a traced backward, whose tensors are fake or functional subclasses, must not mutate
    # a forward output; the compiler plans that memory itself)
    in_place = not torch.compiler.is_compiling() and all(type(g) is torch.Tensor for g in grads)
    scaled = [(g.mul_(grad_loss) if g.dtype == dtype and in_place else
               torch.mul(g, grad_loss, out=torch.empty(g.shape, dtype=dtype, device=g.device))) if need else None
              for g, need, dtype in zip(grads, needed, ctx.dtypes)]
    del grads
    return (scaled[0], scaled[1], None, scaled[2]) + (None,) * 13


_register_autograd("linear_cross_entropy_buffered", _buffered_backward, _buffered_setup_context)


@_op("emo_cross_entropy")
@_on_labelled_rows("input", "target", row_outputs=((0, None), (1, None), (2, None)), only_with="skip_in_forward")
def emo_cross_entropy(input: Tensor, weight: Tensor, target: Tensor, cost_embedding: Tensor, ignore_index: int,
                      skip_ignored_share: Optional[float] = None,
                      skip_in_forward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row CE, per-row EMO, per-row log-sum-exp) of z = x·wᵀ; cost_embedding gets no gradient.
    skip_ignored_share: the backward op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target, cost_embedding=cost_embedding)
    ignore_index = check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    check_target_values(target, weight.shape[0], ignore_index)
    input, weight, cost_embedding = input.contiguous(), weight.contiguous(), cost_embedding.contiguous()
    tiles = select_tiles(input.device, input.dtype)
    if tiles.name == "cpp":  # the whole step in C++ (csrc/cpu/emo_loss.cpp), the same math
        return torch.ops.marginkern.emo_rows(input, weight, target, cost_embedding, int(ignore_index))
    return emo_forward(input, weight, target, cost_embedding, int(ignore_index), tiles)


@emo_cross_entropy.register_fake
def _(input, weight, target, cost_embedding, ignore_index, skip_ignored_share=None, skip_in_forward=False):
    _check_forward_inputs(input, weight, target, cost_embedding=cost_embedding)
    check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    acc = accumulation_dtype(input.dtype)
    n = input.shape[0]
    return tuple(input.new_empty((n,), dtype=acc) for _ in range(3))


@_op("emo_cross_entropy_backward")
@_on_labelled_rows("grad_ce", "grad_emo", "input", "target", "lse", "emo")
def emo_cross_entropy_backward(grad_ce: Tensor, grad_emo: Tensor, input: Tensor, weight: Tensor, target: Tensor,
                               cost_embedding: Tensor, lse: Tensor, emo: Tensor, ignore_index: int,
                               need_weight_grad: bool = True,
                               skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """dL/dinput and dL/dweight (empty unless need_weight_grad). skip_ignored_share: see the module docstring."""
    input, weight, cost_embedding = input.contiguous(), weight.contiguous(), cost_embedding.contiguous()
    tiles = select_tiles(input.device, input.dtype)
    if tiles.name == "cpp":
        return torch.ops.marginkern.emo_rows_backward(grad_ce, grad_emo, input, weight, target, cost_embedding, lse,
                                                      emo, int(ignore_index), need_weight_grad)
    grad_x, grad_w = emo_backward(grad_ce, grad_emo, input, weight, target, cost_embedding, lse, emo,
                                  int(ignore_index), tiles, need_weight_grad)
    return grad_x, _or_empty(grad_w, weight)


@emo_cross_entropy_backward.register_fake
def _(grad_ce, grad_emo, input, weight, target, cost_embedding, lse, emo, ignore_index, need_weight_grad=True,
      skip_ignored_share=None):
    check_skip_ignored_share(skip_ignored_share)
    return _contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,)))


def _emo_setup_context(ctx, inputs, output):
    input, weight, target, cost_embedding, ignore_index = inputs[:5]
    ctx.save_for_backward(input, weight, target, cost_embedding, output[2], output[1])
    ctx.mark_non_differentiable(output[2])
    ctx.ignore_index = ignore_index


def _emo_backward(ctx, grad_ce, grad_emo, grad_lse):
    input, weight, target, cost_embedding, lse, emo = ctx.saved_tensors
    grad_ce = torch.zeros_like(lse) if grad_ce is None else grad_ce.contiguous()
    grad_emo = torch.zeros_like(lse) if grad_emo is None else grad_emo.contiguous()
    need_weight_grad = ctx.needs_input_grad[1]
    grad_input, grad_weight = call("emo_cross_entropy_backward", grad_ce, grad_emo, input, weight, target,
                                   cost_embedding, lse, emo, ctx.ignore_index, need_weight_grad,
                                   ctx.skip_ignored_share)
    return grad_input, (grad_weight if need_weight_grad else None), None, None, None, None, None


_register_autograd("emo_cross_entropy", _emo_backward, _emo_setup_context, skip_share_at=5)


def _check_row_vectors(input, **vectors):
    """A backward op's per-row arguments (N,): a wrong one would be read out of bounds by the kernels."""
    n = input.shape[0]
    for name, t in vectors.items():
        if t.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) (one value per row of input), got {tuple(t.shape)}")


@_op("linear_kl_divergence")
@_on_labelled_rows("input", "teacher_input", "target", row_outputs=((0, None), (1, None), (2, None)),
                   only_with="skip_in_forward")
def linear_kl_divergence(input: Tensor, weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor, target: Tensor,
                         temperature: float, ignore_index: int, reverse: bool,
                         skip_ignored_share: Optional[float] = None,
                         skip_in_forward: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(per-row KL, student lse, teacher lse) at `temperature`; the teacher gets no gradient.
    skip_ignored_share: the backward op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target)
    check_teacher(teacher_input, teacher_weight, input, weight)
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    input, weight = input.contiguous(), weight.contiguous()
    teacher_input, teacher_weight = teacher_input.contiguous(), teacher_weight.contiguous()
    tiles = _tiles_except_cuda(input, "teacher logit plane (distillation)")
    if tiles.name == "cpp":  # the whole step in C++ (csrc/cpu/distill_loss.cpp), the same math
        return torch.ops.marginkern.kl_divergence_rows(input, weight, teacher_input, teacher_weight, target,
                                                       temperature, ignore_index, bool(reverse))
    return kl_forward(input, weight, teacher_input, teacher_weight, target, temperature, ignore_index, bool(reverse),
                      tiles)


@linear_kl_divergence.register_fake
def _(input, weight, teacher_input, teacher_weight, target, temperature, ignore_index, reverse,
      skip_ignored_share=None, skip_in_forward=False):
    _check_forward_inputs(input, weight, target)
    check_teacher(teacher_input, teacher_weight, input, weight)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((input.shape[0],), dtype=acc) for _ in range(3))


@_op("linear_kl_divergence_backward")
@_on_labelled_rows("grad_kl", "input", "teacher_input", "target", "lse", "teacher_lse", "kl")
def linear_kl_divergence_backward(grad_kl: Tensor, input: Tensor, weight: Tensor, teacher_input: Tensor,
                                  teacher_weight: Tensor, target: Tensor, lse: Tensor, teacher_lse: Tensor, kl: Tensor,
                                  temperature: float, ignore_index: int, reverse: bool,
                                  need_weight_grad: bool = True,
                                  skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """dL/dinput and dL/dweight (empty unless need_weight_grad) from the forward op's lse, teacher lse and KL.
    skip_ignored_share: see the module docstring."""
    _check_row_vectors(input, grad_kl=grad_kl, lse=lse, teacher_lse=teacher_lse, kl=kl)
    input, weight = input.contiguous(), weight.contiguous()
    teacher_input, teacher_weight = teacher_input.contiguous(), teacher_weight.contiguous()
    tiles = _tiles_except_cuda(input, "teacher logit plane (distillation)")
    if tiles.name == "cpp":
        return torch.ops.marginkern.kl_divergence_rows_backward(
            grad_kl, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse, kl, float(temperature),
            int(ignore_index), bool(reverse), need_weight_grad)
    grad_x, grad_w = kl_backward(grad_kl, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse, kl,
                                 float(temperature), int(ignore_index), bool(reverse), tiles, need_weight_grad)
    return grad_x, _or_empty(grad_w, weight)


@linear_kl_divergence_backward.register_fake
def _(grad_kl, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse, kl, temperature, ignore_index,
      reverse, need_weight_grad=True, skip_ignored_share=None):
    check_skip_ignored_share(skip_ignored_share)
    return _contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,)))


def _register_distillation_autograd(name, statistic):
    """The autograd of the distillation ops `name` (KL, JSD): outputs (loss, lse, teacher lse[, ...]), the loss the
    only differentiable one; the backward op `<name>_backward` takes the saved (…, lse, teacher lse,
    output[statistic]), the forward's three scalar arguments in their order, need_weight_grad and the forward's
    skip_ignored_share, and gives the student's gradients."""
    def setup_context(ctx, inputs, output):
        input, weight, teacher_input, teacher_weight, target = inputs[:5]
        # the teacher's tensors are saved detached: no gradient flows into them (their views of a graph stay out)
        ctx.save_for_backward(input, weight, teacher_input.detach(), teacher_weight.detach(), target, output[1],
                              output[2], output[statistic])
        ctx.mark_non_differentiable(*output[1:])
        ctx.scalars = inputs[5:8]
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_loss, *unused):
        need_weight_grad = ctx.needs_input_grad[1]
        grad_input, grad_weight = call(f"{name}_backward", grad_loss.contiguous(), *ctx.saved_tensors, *ctx.scalars,
                                       need_weight_grad, ctx.skip_ignored_share)
        return (grad_input, (grad_weight if need_weight_grad else None)) + (None,) * (ctx.num_inputs - 2)

    _register_autograd(name, backward, setup_context, skip_share_at=8)


_register_distillation_autograd("linear_kl_divergence", statistic=0)  # its backward takes the KL itself


def _jsd_beta_inside(beta):
    """β of the JSD ops, strictly inside (0, 1): the functions route the endpoints to the KL ops."""
    beta = check_jsd_beta(beta)
    if beta in (0.0, 1.0):
        raise ValueError(f"beta must lie strictly inside (0, 1) for the JSD ops (0 and 1 are linear_kl_divergence's "
                         f"forward and reverse KL), got {beta}")
    return beta


@_op("linear_jsd")
@_on_labelled_rows("input", "teacher_input", "target", row_outputs=((0, None), (1, None), (2, None), (3, None)),
                   only_with="skip_in_forward")
def linear_jsd(input: Tensor, weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor, target: Tensor,
               beta: float, temperature: float, ignore_index: int, skip_ignored_share: Optional[float] = None,
               skip_in_forward: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row JSD_β, student lse, teacher lse, KL(p‖m)) at `temperature`; the teacher gets no gradient.
    skip_ignored_share: the backward op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target)
    check_teacher(teacher_input, teacher_weight, input, weight)
    beta = _jsd_beta_inside(beta)
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    input, weight = input.contiguous(), weight.contiguous()
    teacher_input, teacher_weight = teacher_input.contiguous(), teacher_weight.contiguous()
    tiles = _tiles_except_cuda(input, "teacher logit plane (distillation)")
    if tiles.name == "cpp":  # the whole step in C++ (csrc/cpu/distill_loss.cpp), the same math
        return torch.ops.marginkern.jsd_rows(input, weight, teacher_input, teacher_weight, target, beta, temperature,
                                             ignore_index)
    return jsd_forward(input, weight, teacher_input, teacher_weight, target, temperature, ignore_index, beta, tiles)


@linear_jsd.register_fake
def _(input, weight, teacher_input, teacher_weight, target, beta, temperature, ignore_index, skip_ignored_share=None,
      skip_in_forward=False):
    _check_forward_inputs(input, weight, target)
    check_teacher(teacher_input, teacher_weight, input, weight)
    _jsd_beta_inside(beta)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((input.shape[0],), dtype=acc) for _ in range(4))


@_op("linear_jsd_backward")
@_on_labelled_rows("grad_jsd", "input", "teacher_input", "target", "lse", "teacher_lse", "kl_student_mixture")
def linear_jsd_backward(grad_jsd: Tensor, input: Tensor, weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                        target: Tensor, lse: Tensor, teacher_lse: Tensor, kl_student_mixture: Tensor, beta: float,
                        temperature: float, ignore_index: int, need_weight_grad: bool = True,
                        skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """dL/dinput and dL/dweight (empty unless need_weight_grad) from the forward op's lse, teacher lse and KL(p‖m).
    skip_ignored_share: see the module docstring."""
    _check_row_vectors(input, grad_jsd=grad_jsd, lse=lse, teacher_lse=teacher_lse,
                       kl_student_mixture=kl_student_mixture)
    beta = _jsd_beta_inside(beta)
    input, weight = input.contiguous(), weight.contiguous()
    teacher_input, teacher_weight = teacher_input.contiguous(), teacher_weight.contiguous()
    tiles = _tiles_except_cuda(input, "teacher logit plane (distillation)")
    if tiles.name == "cpp":
        return torch.ops.marginkern.jsd_rows_backward(grad_jsd, input, weight, teacher_input, teacher_weight, target,
                                                      lse, teacher_lse, kl_student_mixture, beta, float(temperature),
                                                      int(ignore_index), need_weight_grad)
    grad_x, grad_w = jsd_backward(grad_jsd, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse,
                                  kl_student_mixture, float(temperature), int(ignore_index), beta, tiles,
                                  need_weight_grad)
    return grad_x, _or_empty(grad_w, weight)


@linear_jsd_backward.register_fake
def _(grad_jsd, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse, kl_student_mixture, beta,
      temperature, ignore_index, need_weight_grad=True, skip_ignored_share=None):
    check_skip_ignored_share(skip_ignored_share)
    return _contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,)))


_register_distillation_autograd("linear_jsd", statistic=3)  # its backward takes KL(p‖m)


@_op("linear_topk_kl_divergence")
def linear_topk_kl_divergence(input: Tensor, weight: Tensor, teacher_token_ids: Tensor, teacher_logits: Tensor,
                              target: Tensor, temperature: float, ignore_index: int,
                              skip_ignored_share: Optional[float] = None,
                              skip_in_forward: bool = False) -> tuple[Tensor, Tensor]:
    """(per-row KL(q‖p) with q the teacher's softmax over its top-k tokens, student lse) at `temperature`.
    skip_ignored_share: the backward op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target)
    check_topk_teacher(teacher_token_ids, teacher_logits, input)
    check_token_ids(teacher_token_ids, weight.shape[0])  # every row's, ignored ones too: before rows are left out
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    return _topk_kl_forward_rows(input, weight, teacher_token_ids.long(), teacher_logits, target, temperature,
                                 ignore_index, skip_ignored_share, skip_in_forward)


@_on_labelled_rows("input", "teacher_token_ids", "teacher_logits", "target", row_outputs=((0, None), (1, None)),
                   only_with="skip_in_forward")
def _topk_kl_forward_rows(input, weight, teacher_token_ids, teacher_logits, target, temperature, ignore_index,
                          skip_ignored_share, skip_in_forward):
    input, weight = input.contiguous(), weight.contiguous()
    return topk_kl_forward(input, weight, teacher_token_ids, teacher_logits, target, temperature, ignore_index,
                           select_tiles(input.device, input.dtype))


@linear_topk_kl_divergence.register_fake
def _(input, weight, teacher_token_ids, teacher_logits, target, temperature, ignore_index, skip_ignored_share=None,
      skip_in_forward=False):
    _check_forward_inputs(input, weight, target)
    check_topk_teacher(teacher_token_ids, teacher_logits, input)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_skip_ignored_share(skip_ignored_share)
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((input.shape[0],), dtype=acc) for _ in range(2))


@_op("linear_topk_kl_divergence_backward")
@_on_labelled_rows("grad_kl", "input", "teacher_token_ids", "teacher_logits", "target", "lse")
def linear_topk_kl_divergence_backward(grad_kl: Tensor, input: Tensor, weight: Tensor, teacher_token_ids: Tensor,
                                       teacher_logits: Tensor, target: Tensor, lse: Tensor, temperature: float,
                                       ignore_index: int, need_weight_grad: bool = True,
                                       skip_ignored_share: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """dL/dinput and dL/dweight (empty unless need_weight_grad) from the forward op's lse.
    skip_ignored_share: see the module docstring."""
    _check_row_vectors(input, grad_kl=grad_kl, lse=lse)
    input, weight = input.contiguous(), weight.contiguous()
    grad_x, grad_w = topk_kl_backward(grad_kl, input, weight, teacher_token_ids.long(), teacher_logits, target, lse,
                                      float(temperature), int(ignore_index), select_tiles(input.device, input.dtype),
                                      need_weight_grad)
    return grad_x, _or_empty(grad_w, weight)


@linear_topk_kl_divergence_backward.register_fake
def _(grad_kl, input, weight, teacher_token_ids, teacher_logits, target, lse, temperature, ignore_index,
      need_weight_grad=True, skip_ignored_share=None):
    check_skip_ignored_share(skip_ignored_share)
    return _contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,)))


def _topk_kl_setup_context(ctx, inputs, output):
    input, weight, teacher_token_ids, teacher_logits, target, temperature, ignore_index = inputs[:7]
    ctx.save_for_backward(input, weight, teacher_token_ids, teacher_logits.detach(), target, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.temperature, ctx.ignore_index = temperature, ignore_index


def _topk_kl_backward(ctx, grad_kl, grad_lse):
    input, weight, teacher_token_ids, teacher_logits, target, lse = ctx.saved_tensors
    need_weight_grad = ctx.needs_input_grad[1]
    grad_input, grad_weight = call("linear_topk_kl_divergence_backward", grad_kl.contiguous(), input, weight,
                                   teacher_token_ids, teacher_logits, target, lse, ctx.temperature, ctx.ignore_index,
                                   need_weight_grad, ctx.skip_ignored_share)
    return (grad_input, (grad_weight if need_weight_grad else None)) + (None,) * 7


_register_autograd("linear_topk_kl_divergence", _topk_kl_backward, _topk_kl_setup_context, skip_share_at=7)


@_op("log_probs_entropy")
@_on_labelled_rows("input", "target", row_outputs=((0, None), (1, None), (2, None), (3, "top1")),
                   only_with="skip_in_forward")
def log_probs_entropy(input: Tensor, weight: Tensor, target: Tensor, temperature: float, ignore_index: int,
                      skip_ignored_share: Optional[float] = None, skip_in_forward: bool = False,
                      bias: Optional[Tensor] = None, softcap: Optional[float] = None,
                      top1: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(per-row log p_t, per-row entropy, per-row log-sum-exp, per-row top1) of z = softcap(x·wᵀ + b)/temperature;
    log p_t and the entropy are 0 on ignored rows. top1: `top1` (N,) bool says whether each row's target logit is its
    largest (ties count, ignored rows False), from the forward's own pass; else empty. skip_ignored_share: the backward
    op's; with skip_in_forward, this op's too (module docstring)."""
    _check_forward_inputs(input, weight, target, bias)
    temperature, ignore_index = check_temperature(temperature), check_ignore_index(ignore_index)
    softcap = check_softcap(softcap)
    check_skip_ignored_share(skip_ignored_share)
    check_target_values(target, weight.shape[0], ignore_index)
    input, weight = input.contiguous(), weight.contiguous()
    tiles = _tiles_except_cuda(input, "token-entropy epilogue")
    if tiles.name == "cpp":  # the whole step in C++ (csrc/cpu/log_probs_loss.cpp), the same math
        return torch.ops.marginkern.log_probs_entropy_rows(input, weight, target, temperature, ignore_index, bias,
                                                           softcap, bool(top1))
    rows = log_probs_forward(input, weight, target, temperature, ignore_index, tiles, bias=bias, softcap=softcap,
                             top1=top1)
    return rows if top1 else (*rows, _no_token_accuracy(input))


@log_probs_entropy.register_fake
def _(input, weight, target, temperature, ignore_index, skip_ignored_share=None, skip_in_forward=False, bias=None,
      softcap=None, top1=False):
    _check_forward_inputs(input, weight, target, bias)
    check_temperature(temperature)
    check_ignore_index(ignore_index)
    check_softcap(softcap)
    check_skip_ignored_share(skip_ignored_share)
    acc, n = accumulation_dtype(input.dtype), input.shape[0]
    top1 = input.new_empty((n,), dtype=torch.bool) if top1 else _no_token_accuracy(input)
    return (*(input.new_empty((n,), dtype=acc) for _ in range(3)), top1)


@_op("log_probs_entropy_backward")
@_on_labelled_rows("grad_log_probs", "grad_entropy", "input", "target", "lse", "log_probs", "entropy")
def log_probs_entropy_backward(grad_log_probs: Tensor, grad_entropy: Tensor, input: Tensor, weight: Tensor,
                               target: Tensor, lse: Tensor, log_probs: Tensor, entropy: Tensor, temperature: float,
                               ignore_index: int, need_weight_grad: bool = True,
                               skip_ignored_share: Optional[float] = None, bias: Optional[Tensor] = None,
                               softcap: Optional[float] = None,
                               need_bias_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dinput, dL/dweight, dL/dbias) from the forward op's lse, log_probs, entropy; a gradient not needed (or of an
    absent bias) is empty (0,). skip_ignored_share: see the module docstring."""
    _check_row_vectors(input, grad_log_probs=grad_log_probs, grad_entropy=grad_entropy, lse=lse, log_probs=log_probs,
                       entropy=entropy)
    input, weight = input.contiguous(), weight.contiguous()
    need_bias_grad = bias is not None and need_bias_grad
    tiles = _tiles_except_cuda(input, "token-entropy epilogue")
    if tiles.name == "cpp":
        return torch.ops.marginkern.log_probs_entropy_rows_backward(
            grad_log_probs, grad_entropy, input, weight, target, lse, log_probs, entropy, float(temperature),
            int(ignore_index), need_weight_grad, bias, softcap, need_bias_grad)
    grad_x, grad_w, grad_b = log_probs_backward(grad_log_probs, grad_entropy, input, weight, target, lse, log_probs,
                                                entropy, float(temperature), int(ignore_index), tiles,
                                                need_weight_grad, bias=bias, softcap=softcap,
                                                need_bias_grad=need_bias_grad)
    return grad_x, _or_empty(grad_w, weight), _or_empty(grad_b, weight)


@log_probs_entropy_backward.register_fake
def _(grad_log_probs, grad_entropy, input, weight, target, lse, log_probs, entropy, temperature, ignore_index,
      need_weight_grad=True, skip_ignored_share=None, bias=None, softcap=None, need_bias_grad=False):
    check_skip_ignored_share(skip_ignored_share)
    grad_b = _contiguous_like(bias) if bias is not None and need_bias_grad else weight.new_empty((0,))
    return (_contiguous_like(input), (_contiguous_like(weight) if need_weight_grad else weight.new_empty((0,))),
            grad_b)


def _log_probs_setup_context(ctx, inputs, output):
    input, weight, target, temperature, ignore_index = inputs[:5]
    bias, ctx.softcap = _optional_arg(inputs, 7), _optional_arg(inputs, 8)
    ctx.save_for_backward(input, weight, target, output[2], output[0], output[1], bias)
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.temperature, ctx.ignore_index = temperature, ignore_index


def _log_probs_backward(ctx, grad_log_probs, grad_entropy, grad_lse, grad_top1=None):
    input, weight, target, lse, log_probs, entropy, bias = ctx.saved_tensors
    grad_log_probs = torch.zeros_like(lse) if grad_log_probs is None else grad_log_probs.contiguous()
    grad_entropy = torch.zeros_like(lse) if grad_entropy is None else grad_entropy.contiguous()
    need_weight_grad = ctx.needs_input_grad[1]
    need_bias_grad = bias is not None and len(ctx.needs_input_grad) > 7 and ctx.needs_input_grad[7]
    grad_input, grad_weight, grad_bias = call("log_probs_entropy_backward", grad_log_probs, grad_entropy, input,
                                              weight, target, lse, log_probs, entropy, ctx.temperature,
                                              ctx.ignore_index, need_weight_grad, ctx.skip_ignored_share, bias,
                                              ctx.softcap, need_bias_grad)
    return (grad_input, (grad_weight if need_weight_grad else None), None, None, None, None, None,
            (grad_bias if need_bias_grad else None), None, None)


_register_autograd("log_probs_entropy", _log_probs_backward, _log_probs_setup_context, skip_share_at=5)


def _pairwise_cosine_uses_triton(a):
    return select_tiles(a.device, a.dtype).name == "triton"


@_op("pairwise_cosine")
def pairwise_cosine(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(cos_i, 1/‖a_i‖, 1/‖b_i‖) in fp32 (fp64 for fp64 inputs), norms clamped at 1e-12 as F.normalize."""
    check_embedding_pair(a, b)
    if _pairwise_cosine_uses_triton(a):
        from .triton_kernels.pairwise_cosine import pairwise_cosine_forward
        return pairwise_cosine_forward(a, b)
    acc = accumulation_dtype(a.dtype)
    af, bf = a.to(acc), b.to(acc)
    inv_a = 1.0 / torch.linalg.vector_norm(af, dim=1).clamp_min(NORM_EPS)
    inv_b = 1.0 / torch.linalg.vector_norm(bf, dim=1).clamp_min(NORM_EPS)
    return (af * bf).sum(1) * inv_a * inv_b, inv_a, inv_b


@pairwise_cosine.register_fake
def _(a, b):
    check_embedding_pair(a, b)
    acc = accumulation_dtype(a.dtype)
    return tuple(a.new_empty((a.shape[0],), dtype=acc) for _ in range(3))


@_op("pairwise_cosine_backward")
def pairwise_cosine_backward(grad_cos: Tensor, a: Tensor, b: Tensor, cos: Tensor, inv_a: Tensor,
                             inv_b: Tensor) -> tuple[Tensor, Tensor]:
    if _pairwise_cosine_uses_triton(a):
        from .triton_kernels.pairwise_cosine import pairwise_cosine_backward as triton_backward
        return triton_backward(grad_cos, a, b, cos, inv_a, inv_b)
    acc = cos.dtype
    a_hat, b_hat = a.to(acc) * inv_a[:, None], b.to(acc) * inv_b[:, None]
    g, c = grad_cos.to(acc)[:, None], cos[:, None]
    grad_a = g * inv_a[:, None] * (b_hat - c * a_hat)
    grad_b = g * inv_b[:, None] * (a_hat - c * b_hat)
    return grad_a.to(a.dtype), grad_b.to(b.dtype)


@pairwise_cosine_backward.register_fake
def _(grad_cos, a, b, cos, inv_a, inv_b):
    return _contiguous_like(a), _contiguous_like(b)


def _pairwise_cosine_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)
    ctx.mark_non_differentiable(output[1], output[2])


def _pairwise_cosine_autograd(ctx, grad_cos, grad_inv_a, grad_inv_b):
    # the inverse norms are by-products for the backward pass, not differentiable outputs
    a, b, cos, inv_a, inv_b = ctx.saved_tensors
    return call("pairwise_cosine_backward", grad_cos.contiguous(), a, b, cos, inv_a, inv_b)


_register_autograd("pairwise_cosine", _pairwise_cosine_autograd, _pairwise_cosine_setup_context)


@_op("cosent")
def cosent(scores: Tensor, labels: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(CoSENT loss, dL/dscores), both in the accumulation dtype and computed together (the loss is a scalar,
    so its backward only scales the second output): after the label sort, four parallel Triton scan launches
    on the Triton backend (triton_kernels/cosent_scan.py), PyTorch scans otherwise (pairwise.cosent_loss_and_grad)."""
    check_cosent_arguments(scores, labels, scale)
    if scores.dtype != torch.float64 and _pairwise_cosine_uses_triton(scores):
        from .triton_kernels.cosent_scan import cosent_loss_and_grad as triton_cosent
        loss, grad = triton_cosent(scores, labels, scale)
    else:
        loss, grad = pairwise.cosent_loss_and_grad(scores, labels, scale)
    if labels.is_floating_point():
        # A NaN label has no place in the label order (the sort would put it last, as the largest): the
        # loss and its gradient are NaN then, as torch's losses propagate NaN, rather than a quiet guess
        # (no host sync: a device-side where).
        unordered = torch.isnan(labels).any()
        loss, grad = torch.where(unordered, torch.nan, loss), torch.where(unordered, torch.nan, grad)
    return loss, grad


@cosent.register_fake
def _(scores, labels, scale):
    check_cosent_arguments(scores, labels, scale)
    acc = accumulation_dtype(scores.dtype)
    return scores.new_empty((), dtype=acc), scores.new_empty(scores.shape, dtype=acc)


@_op("cosent_backward", without_autocast=False)
def cosent_backward(grad_loss: Tensor, grad_scores: Tensor, scores: Tensor) -> Tensor:
    """dL/dscores scaled by the upstream gradient, in the scores' dtype. An op without autograd of its own:
    a double backward through CoSENT raises instead of silently treating dL/dscores as constant."""
    return (grad_loss * grad_scores).to(scores.dtype)


@cosent_backward.register_fake
def _(grad_loss, grad_scores, scores):
    return torch.empty_like(scores)


def _cosent_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], inputs[0])
    ctx.mark_non_differentiable(output[1])


def _cosent_autograd(ctx, grad_loss, _grad_of_grad):
    grad_scores, scores = ctx.saved_tensors
    return call("cosent_backward", grad_loss, grad_scores, scores), None, None


_register_autograd("cosent", _cosent_autograd, _cosent_setup_context)


@_op("multilabel_ce")
def multilabel_ce(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """ZLPR per row of logits' last dimension: (loss, L_neg, L_pos), each (numel / C,) in the accumulation dtype, by
    blocks of rows (pairwise.multilabel_ce_rows); the two sides' log(1 + Σ e^{±s}) are the backward's."""
    return pairwise.multilabel_ce_rows(logits, targets)


def _zlpr_rows_fake(logits, *_):
    """The ZLPR ops' (loss, L_neg, L_pos), dense and sparse: each (numel / C,) in the accumulation dtype."""
    return tuple(logits.new_empty(logits.shape[:-1], dtype=accumulation_dtype(logits.dtype)).reshape(-1)
                 for _ in range(3))


def _zlpr_grad_fake(grad_rows, logits, *_):
    return _contiguous_like(logits)


def _zlpr_setup_context(ctx, inputs, output):
    """The ZLPR ops' (dense and sparse): the logits, their labels and both sides saved, the options after them kept."""
    ctx.save_for_backward(inputs[0], inputs[1], output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.options = inputs[2:]


def _zlpr_autograd(name):
    """The backward of ZLPR op `name`: its `<name>_backward` op, which takes (grad_rows, logits, labels, L_neg, L_pos,
    *the op's options)."""
    def backward(ctx, grad_rows, _grad_neg, _grad_pos):
        nothing = (None,) * (1 + len(ctx.options))
        if grad_rows is None or not ctx.needs_input_grad[0]:
            return (None,) + nothing
        logits, labels, L_neg, L_pos = ctx.saved_tensors
        return (call(f"{name}_backward", grad_rows, logits, labels, L_neg, L_pos, *ctx.options),) + nothing
    return backward


multilabel_ce.register_fake(_zlpr_rows_fake)


@_op("multilabel_ce_backward")
def multilabel_ce_backward(grad_rows: Tensor, logits: Tensor, targets: Tensor, L_neg: Tensor, L_pos: Tensor) -> Tensor:
    return pairwise.multilabel_ce_rows_backward(grad_rows, logits, targets, L_neg, L_pos)


multilabel_ce_backward.register_fake(_zlpr_grad_fake)
_register_autograd("multilabel_ce", _zlpr_autograd("multilabel_ce"), _zlpr_setup_context)


@_op("sparse_multilabel_ce")
def sparse_multilabel_ce(logits: Tensor, positives: Tensor, mask_zero: bool,
                         ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """multilabel_ce with the positives as class indices (..., P) (pairwise.sparse_multilabel_ce_rows)."""
    return pairwise.sparse_multilabel_ce_rows(logits, positives, mask_zero, ignore_index)


sparse_multilabel_ce.register_fake(_zlpr_rows_fake)


@_op("sparse_multilabel_ce_backward")
def sparse_multilabel_ce_backward(grad_rows: Tensor, logits: Tensor, positives: Tensor, L_neg: Tensor, L_pos: Tensor,
                                  mask_zero: bool, ignore_index: int) -> Tensor:
    return pairwise.sparse_multilabel_ce_rows_backward(grad_rows, logits, positives, L_neg, L_pos, mask_zero,
                                                       ignore_index)


sparse_multilabel_ce_backward.register_fake(_zlpr_grad_fake)
_register_autograd("sparse_multilabel_ce", _zlpr_autograd("sparse_multilabel_ce"), _zlpr_setup_context)


@_op("global_pointer")
def global_pointer_op(q: Tensor, k: Tensor, positives: Tensor, mask: Optional[Tensor], scale: float, tril: bool,
                      mask_zero: bool, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """GlobalPointer's span ZLPR per (batch, head) row: (loss, L_neg, L_pos), each (B·H,) in the accumulation dtype,
    the (B, H, L, L) logits never made (global_pointer.global_pointer_rows)."""
    return global_pointer.global_pointer_rows(q, k, positives, mask, scale, tril, mask_zero, ignore_index)


@global_pointer_op.register_fake
def _(q, k, positives, mask, scale, tril, mask_zero, ignore_index):
    rows = q.shape[0] * q.shape[2]
    return tuple(q.new_empty(rows, dtype=accumulation_dtype(q.dtype)) for _ in range(3))


@_op("global_pointer_backward")
def global_pointer_backward(grad_rows: Tensor, q: Tensor, k: Tensor, positives: Tensor, mask: Optional[Tensor],
                            L_neg: Tensor, L_pos: Tensor, scale: float, tril: bool, mask_zero: bool,
                            ignore_index: int) -> tuple[Tensor, Tensor]:
    return global_pointer.global_pointer_rows_backward(grad_rows, q, k, positives, mask, L_neg, L_pos, scale, tril,
                                                       mask_zero, ignore_index)


@global_pointer_backward.register_fake
def _(grad_rows, q, k, positives, mask, L_neg, L_pos, scale, tril, mask_zero, ignore_index):
    return _contiguous_like(q), _contiguous_like(k)


def _global_pointer_setup_context(ctx, inputs, output):
    q, k, positives, mask, *options = inputs
    ctx.save_for_backward(q, k, positives, mask, output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.options = options


def _global_pointer_autograd(ctx, grad_rows, _grad_neg, _grad_pos):
    nothing = (None,) * 6
    if grad_rows is None or not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        return (None, None) + nothing
    q, k, positives, mask, L_neg, L_pos = ctx.saved_tensors
    scale, tril, mask_zero, ignore_index = ctx.options
    dq, dk = call("global_pointer_backward", grad_rows, q, k, positives, mask, L_neg, L_pos, scale, tril, mask_zero,
                  ignore_index)
    return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None) + nothing


_register_autograd("global_pointer", _global_pointer_autograd, _global_pointer_setup_context)


@_op("circle")
def circle(embeddings: Tensor, labels: Tensor, m: float, gamma: float, anchor_block: int) -> tuple[Tensor, Tensor]:
    """(per-anchor Circle loss in the accumulation dtype, whether the anchor has a positive and a negative), by blocks
    of anchor_block anchors (0: pairwise.circle_anchor_block's, picked here, at run time, so that a compiled graph
    does not depend on the batch size through it). An op, so that torch.compile and torch.export see one call, not
    a Python loop over the batch (which would fix the batch size in the graph)."""
    check_circle_arguments(embeddings, labels, m, gamma, anchor_block or None)
    return pairwise.circle_rows(embeddings, labels, m, gamma, anchor_block)


@circle.register_fake
def _(embeddings, labels, m, gamma, anchor_block):
    check_circle_arguments(embeddings, labels, m, gamma, anchor_block or None)
    B = embeddings.shape[0]
    return (embeddings.new_empty((B,), dtype=accumulation_dtype(embeddings.dtype)),
            embeddings.new_empty((B,), dtype=torch.bool))


@_op("circle_backward")
def circle_backward(grad_rows: Tensor, embeddings: Tensor, labels: Tensor, m: float, gamma: float,
                    anchor_block: int) -> Tensor:
    return pairwise.circle_rows_backward(grad_rows, embeddings, labels, m, gamma, anchor_block)


@circle_backward.register_fake
def _(grad_rows, embeddings, labels, m, gamma, anchor_block):
    return _contiguous_like(embeddings)


def _circle_setup_context(ctx, inputs, output):
    embeddings, labels, ctx.m, ctx.gamma, ctx.anchor_block = inputs
    ctx.save_for_backward(embeddings, labels)
    ctx.mark_non_differentiable(output[1])


def _circle_autograd(ctx, grad_rows, _grad_valid):
    if grad_rows is None or not ctx.needs_input_grad[0]:
        return (None,) * 5
    embeddings, labels = ctx.saved_tensors
    return call("circle_backward", grad_rows, embeddings, labels, ctx.m, ctx.gamma, ctx.anchor_block), None, None, \
        None, None


_register_autograd("circle", _circle_autograd, _circle_setup_context)


@_op("linear_topk")
def linear_topk(input: Tensor, weight: Tensor, k: int, bias: Optional[Tensor] = None, normalize: bool = False,
                softcap: Optional[float] = None, need_lse: bool = False,
                logit_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(values (N, k) descending, indices (N, k) int64, lse (N,), or (0,) without need_lse) of functional.linear_topk
    on (N, D) rows; arguments checked there. An op (without autograd: inference only) so that torch.compile takes it
    whole: its chunk sizes depend on N, which traced would guard (and recompile) on every new length."""
    values, indices, lse = streaming_topk(input, weight, k, bias, normalize, softcap, need_lse, logit_scale)
    return values, indices, values.new_empty((0,)) if lse is None else lse


@linear_topk.register_fake
def _(input, weight, k, bias=None, normalize=False, softcap=None, need_lse=False, logit_scale=1.0):
    acc, n = accumulation_dtype(input.dtype), input.shape[0]
    return (input.new_empty((n, k), dtype=acc), input.new_empty((n, k), dtype=torch.long),
            input.new_empty((n if need_lse else 0,), dtype=acc))


def _check_proxy_anchor(input, proxies, target, margin, alpha, ignore_index):
    """Proxy-Anchor's arguments as the ops take them (metadata and scalars only: the fakes run it too)."""
    check_classification_inputs(input, proxies, target, weight_name="proxies")
    check_proxy_anchor_options(margin, alpha)
    check_ignore_index(ignore_index)


@_op("proxy_anchor")
def proxy_anchor(input: Tensor, proxies: Tensor, target: Tensor, margin: float, alpha: float,
                 ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Proxy-Anchor loss (), each proxy's negative term L_j (C,), each row's positive weight e^{b_n − Lp_y} (N,),
    the number of proxies with a positive ()), in the accumulation dtype (marginkern.proxy_anchor); the last three
    are by-products the backward op takes."""
    _check_proxy_anchor(input, proxies, target, margin, alpha, ignore_index)
    check_target_values(target, proxies.shape[0], ignore_index)
    return proxy_anchor_forward(input.contiguous(), proxies.contiguous(), target, margin, alpha, ignore_index)


@proxy_anchor.register_fake
def _(input, proxies, target, margin, alpha, ignore_index):
    _check_proxy_anchor(input, proxies, target, margin, alpha, ignore_index)
    acc = accumulation_dtype(input.dtype)
    return (input.new_empty((), dtype=acc), input.new_empty((proxies.shape[0],), dtype=acc),
            input.new_empty((input.shape[0],), dtype=acc), input.new_empty((), dtype=acc))


@_op("proxy_anchor_backward")
def proxy_anchor_backward(grad_loss: Tensor, input: Tensor, proxies: Tensor, target: Tensor, negative: Tensor,
                          row_weight: Tensor, num_positive: Tensor, margin: float, alpha: float, ignore_index: int,
                          need_input_grad: bool, need_proxies_grad: bool) -> tuple[Tensor, Tensor]:
    """(dL/dinput, dL/dproxies) for the loss gradient `grad_loss` (); either is an empty (0,) tensor when not
    asked for. negative, row_weight and num_positive are the forward op's by-products."""
    _check_proxy_anchor(input, proxies, target, margin, alpha, ignore_index)
    acc = accumulation_dtype(input.dtype)
    for name, t, shape in (("negative", negative, (proxies.shape[0],)), ("row_weight", row_weight, (input.shape[0],)),
                           ("num_positive", num_positive, ())):
        if tuple(t.shape) != shape or t.dtype != acc:
            raise ValueError(f"{name} must be the forward op's {shape} {acc} tensor, got a {tuple(t.shape)} "
                             f"{t.dtype} tensor")
    grad_x, grad_w = proxy_anchor_backward_pass(grad_loss, input.contiguous(), proxies.contiguous(), target, negative,
                                                row_weight, num_positive, margin, alpha, ignore_index,
                                                need_input_grad, need_proxies_grad)
    return _or_empty(grad_x, input), _or_empty(grad_w, proxies)


@proxy_anchor_backward.register_fake
def _(grad_loss, input, proxies, target, negative, row_weight, num_positive, margin, alpha, ignore_index,
      need_input_grad, need_proxies_grad):
    return (_contiguous_like(input) if need_input_grad else input.new_empty((0,)),
            _contiguous_like(proxies) if need_proxies_grad else proxies.new_empty((0,)))


def _proxy_anchor_setup_context(ctx, inputs, output):
    input, proxies, target, *options = inputs
    _, negative, row_weight, num_positive = output
    ctx.save_for_backward(input, proxies, target, negative, row_weight, num_positive)
    ctx.mark_non_differentiable(negative, row_weight, num_positive)
    ctx.options = options


def _proxy_anchor_autograd(ctx, grad_loss, *grad_by_products):
    input, proxies, target, negative, row_weight, num_positive = ctx.saved_tensors
    need_input, need_proxies = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_input = grad_proxies = None
    if need_input or need_proxies:
        grad_input, grad_proxies = call("proxy_anchor_backward", grad_loss, input, proxies, target, negative,
                                        row_weight, num_positive, *ctx.options, need_input, need_proxies)
    return (grad_input if need_input else None, grad_proxies if need_proxies else None) + (None,) * 4


_register_autograd("proxy_anchor", _proxy_anchor_autograd, _proxy_anchor_setup_context)


def _check_scales(input, keys, row_scale, col_scale):
    """The rows' and keys' fp32 (fp64 for fp64) logit scales of the contrastive ops: (N,) and (M,) on input's device."""
    acc = accumulation_dtype(input.dtype)
    for name, t, n in (("row_scale", row_scale, input.shape[0]), ("col_scale", col_scale, keys.shape[0])):
        check_tensor(name, t)
        if tuple(t.shape) != (n,) or t.dtype != acc or t.device != input.device:
            raise ValueError(f"{name} must be a ({n},) {acc} tensor on {input.device}, got a {tuple(t.shape)} "
                             f"{t.dtype} tensor on {t.device}")


def _check_siglip(input, keys, target, bias, row_scale, col_scale):
    """SigLIP's arguments as the ops take them (metadata only: the fakes run it too); target: each row's positive
    key, or −1 for none."""
    check_classification_inputs(input, keys, target, weight_name="keys")
    check_tensor("bias", bias)
    if bias.dim() != 0 or not bias.dtype.is_floating_point or bias.device != input.device:
        raise ValueError(f"bias must be a 0-dim floating-point tensor on {input.device}, got a "
                         f"{tuple(bias.shape)} {bias.dtype} tensor on {bias.device}")
    _check_scales(input, keys, row_scale, col_scale)


@_op("siglip")
def siglip(input: Tensor, keys: Tensor, target: Tensor, bias: Tensor, row_scale: Tensor,
           col_scale: Tensor) -> tuple[Tensor, Tensor]:
    """(each row's loss Σ_j −log σ(±(row_scale_i·col_scale_j·input_i·keys_j + bias)) (N,), each row's Σ_j dL_i/dz_ij
    (N,)), in the accumulation dtype (marginkern.siglip); the second is a by-product for the bias's gradient."""
    _check_siglip(input, keys, target, bias, row_scale, col_scale)
    check_target_values(target, keys.shape[0], -1)
    return siglip_forward(input.contiguous(), keys.contiguous(), target.long().contiguous(), bias, row_scale,
                          col_scale)


@siglip.register_fake
def _(input, keys, target, bias, row_scale, col_scale):
    _check_siglip(input, keys, target, bias, row_scale, col_scale)
    acc = accumulation_dtype(input.dtype)
    return input.new_empty((input.shape[0],), dtype=acc), input.new_empty((input.shape[0],), dtype=acc)


@_op("siglip_backward")
def siglip_backward(grad_rows: Tensor, input: Tensor, keys: Tensor, target: Tensor, bias: Tensor, row_scale: Tensor,
                    col_scale: Tensor, need_input_grad: bool, need_keys_grad: bool,
                    need_scale_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dinput, dL/dkeys (the scales held fixed), dL/drow_scale, dL/dcol_scale) for the per-row loss gradient
    `grad_rows` (N,); any not asked for is an empty (0,) tensor."""
    _check_siglip(input, keys, target, bias, row_scale, col_scale)
    if tuple(grad_rows.shape) != (input.shape[0],):
        raise ValueError(f"grad_rows must have shape (N={input.shape[0]},), got shape {tuple(grad_rows.shape)}")
    grads = siglip_backward_pass(grad_rows, input.contiguous(), keys.contiguous(), target.long().contiguous(), bias,
                                 row_scale, col_scale, need_input_grad, need_keys_grad, need_scale_grads)
    return tuple(_or_empty(g, like) for g, like in zip(grads, (input, keys, row_scale, col_scale)))


@siglip_backward.register_fake
def _(grad_rows, input, keys, target, bias, row_scale, col_scale, need_input_grad, need_keys_grad, need_scale_grads):
    return _contrastive_grads_fake(input, keys, row_scale, col_scale, need_input_grad, need_keys_grad,
                                   need_scale_grads)


def _contrastive_grads_fake(input, keys, row_scale, col_scale, need_input_grad, need_keys_grad, need_scale_grads):
    return (_contiguous_like(input) if need_input_grad else input.new_empty((0,)),
            _contiguous_like(keys) if need_keys_grad else keys.new_empty((0,)),
            row_scale.new_empty(row_scale.shape) if need_scale_grads else row_scale.new_empty((0,)),
            col_scale.new_empty(col_scale.shape) if need_scale_grads else col_scale.new_empty((0,)))


def _siglip_setup_context(ctx, inputs, output):
    input, keys, target, bias, row_scale, col_scale = inputs
    _, bias_grad = output
    ctx.save_for_backward(input, keys, target, bias, row_scale, col_scale, bias_grad)
    ctx.mark_non_differentiable(bias_grad)


def _siglip_autograd(ctx, grad_rows, *grad_by_products):
    input, keys, target, bias, row_scale, col_scale, bias_grad = ctx.saved_tensors
    need_input, need_keys, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    need_scales = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
    grads = [None] * 4
    if grad_rows is not None and (need_input or need_keys or need_scales):
        grads = list(call("siglip_backward", grad_rows, input, keys, target, bias, row_scale, col_scale, need_input,
                          need_keys, need_scales))
    grad_bias = None
    if grad_rows is not None and need_bias:
        grad_bias = (grad_rows.to(bias_grad.dtype) * bias_grad).sum().to(bias.dtype)
    return (grads[0] if need_input else None, grads[1] if need_keys else None, None, grad_bias,
            grads[2] if need_scales else None, grads[3] if need_scales else None)


_register_autograd("siglip", _siglip_autograd, _siglip_setup_context)


def _check_info_nce(input, keys, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing):
    """InfoNCE's arguments as the ops take them (metadata and scalars only: the fakes run it too)."""
    for name, t in (("input", input), ("keys", keys)):
        check_tensor(name, t)
        if t.dim() != 2 or t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"{name} must be a 2-D float16/bfloat16/float32/float64 tensor, got a "
                             f"{tuple(t.shape)} {t.dtype} tensor")
    if keys.shape[1] != input.shape[1] or keys.dtype != input.dtype or keys.device != input.device:
        raise ValueError(f"keys must be (M, D={input.shape[1]}) of input's dtype and device, got {tuple(keys.shape)} "
                         f"{keys.dtype} {keys.device}")
    check_int("offset", offset)
    symmetric = check_bool("symmetric", symmetric)
    if offset < 0 or (symmetric and offset):
        raise ValueError(f"offset must be ≥ 0, and 0 when symmetric (the key→query direction reads keys 0..B−1), got "
                         f"{offset}")
    if keys.shape[0] < max(1, offset + input.shape[0]):
        raise ValueError(f"keys must hold at least one row, and row offset + i for each input row i (its positive): "
                         f"got {keys.shape[0]} keys for {input.shape[0]} rows at offset {offset}")
    _check_scales(input, keys, row_scale, col_scale)
    check_finite("margin_logit", margin_logit)
    check_finite("label_smoothing", label_smoothing, 0.0, 1.0)


@_op("info_nce")
def info_nce(input: Tensor, keys: Tensor, row_scale: Tensor, col_scale: Tensor, offset: int, symmetric: bool,
             margin_logit: float, label_smoothing: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(each row's loss (B,) (symmetric: the mean of the pair's two directions), the positives' logits t (B,), each
    direction's log Σ e^{z − t} (B,), (B,) (zeros unless symmetric)), in the accumulation dtype (marginkern.info_nce),
    with the logits z_ij = row_scale_i·col_scale_j·input_i·keys_j and row i's positive key offset + i; the last three
    are by-products the backward op takes."""
    _check_info_nce(input, keys, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing)
    return info_nce_forward(input.contiguous(), keys.contiguous(), row_scale, col_scale, offset, symmetric,
                            margin_logit, label_smoothing)


@info_nce.register_fake
def _(input, keys, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing):
    _check_info_nce(input, keys, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing)
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((input.shape[0],), dtype=acc) for _ in range(4))


@_op("info_nce_backward")
def info_nce_backward(grad_rows: Tensor, input: Tensor, keys: Tensor, row_scale: Tensor, col_scale: Tensor,
                      offset: int, symmetric: bool, target: Tensor, row: Tensor, col: Tensor, margin_logit: float,
                      label_smoothing: float, need_input_grad: bool, need_keys_grad: bool,
                      need_scale_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dinput, dL/dkeys (the scales held fixed), dL/drow_scale, dL/dcol_scale) for the per-row loss gradient
    `grad_rows` (B,); any not asked for is an empty (0,) tensor. target, row and col are the forward op's
    by-products."""
    _check_info_nce(input, keys, row_scale, col_scale, offset, symmetric, margin_logit, label_smoothing)
    acc = accumulation_dtype(input.dtype)
    for name, t in (("grad_rows", grad_rows), ("target", target), ("row", row), ("col", col)):
        if tuple(t.shape) != (input.shape[0],) or (name != "grad_rows" and t.dtype != acc):
            raise ValueError(f"{name} must be a ({input.shape[0]},) tensor" + ("" if name == "grad_rows" else
                             f" of {acc}, the forward op's") + f", got a {tuple(t.shape)} {t.dtype} tensor")
    grads = info_nce_backward_pass(grad_rows, input.contiguous(), keys.contiguous(), row_scale, col_scale, offset,
                                   symmetric, target, row, col, margin_logit, label_smoothing, need_input_grad,
                                   need_keys_grad, need_scale_grads)
    return tuple(_or_empty(g, like) for g, like in zip(grads, (input, keys, row_scale, col_scale)))


@info_nce_backward.register_fake
def _(grad_rows, input, keys, row_scale, col_scale, offset, symmetric, target, row, col, margin_logit,
      label_smoothing, need_input_grad, need_keys_grad, need_scale_grads):
    return _contrastive_grads_fake(input, keys, row_scale, col_scale, need_input_grad, need_keys_grad,
                                   need_scale_grads)


def _info_nce_setup_context(ctx, inputs, output):
    input, keys, row_scale, col_scale, *options = inputs
    _, target, row, col = output
    ctx.save_for_backward(input, keys, row_scale, col_scale, target, row, col)
    ctx.mark_non_differentiable(target, row, col)
    ctx.options = options  # offset, symmetric, margin_logit, label_smoothing


def _info_nce_autograd(ctx, grad_rows, *grad_by_products):
    input, keys, row_scale, col_scale, target, row, col = ctx.saved_tensors
    offset, symmetric, margin_logit, label_smoothing = ctx.options
    need_input, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_scales = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grads = [None] * 4
    if grad_rows is not None and (need_input or need_keys or need_scales):
        grads = list(call("info_nce_backward", grad_rows, input, keys, row_scale, col_scale, offset, symmetric,
                          target, row, col, margin_logit, label_smoothing, need_input, need_keys, need_scales))
    return (grads[0] if need_input else None, grads[1] if need_keys else None, grads[2] if need_scales else None,
            grads[3] if need_scales else None) + (None,) * 4


_register_autograd("info_nce", _info_nce_autograd, _info_nce_setup_context)


def _check_supcon(input, keys, row_scale, col_scale, row_class, key_class, offset):
    """SupCon's arguments as the ops take them (metadata only: the fakes run it too)."""
    _check_info_nce(input, keys, row_scale, col_scale, offset, False, 0.0, 0.0)
    for name, t, n in (("row_class", row_class, input.shape[0]), ("key_class", key_class, keys.shape[0])):
        check_tensor(name, t)
        if tuple(t.shape) != (n,) or t.dtype != torch.int64 or t.device != input.device:
            raise ValueError(f"{name} must be a ({n},) int64 tensor on {input.device}, got a {tuple(t.shape)} "
                             f"{t.dtype} tensor on {t.device}")


@_op("supcon")
def supcon(input: Tensor, keys: Tensor, row_scale: Tensor, col_scale: Tensor, row_class: Tensor, key_class: Tensor,
           offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(each row's SupCon loss log Σ_{a≠own} e^{z_ia} − mean_{p∈P(i)} z_ip (B,) (0 without positives), its largest
    logit M_i but its own (B,), log Σ_{a≠own} e^{z_ia − M_i} (B,), its positives' count (B,)), in the accumulation
    dtype (marginkern.supcon), with the logits z_ia = row_scale_i·col_scale_a·input_i·keys_a, row i's own key offset + i
    and its positives the other keys of its class; the last three are by-products the backward op takes."""
    _check_supcon(input, keys, row_scale, col_scale, row_class, key_class, offset)
    return supcon_forward(input.contiguous(), keys.contiguous(), row_scale, col_scale, row_class.contiguous(),
                          key_class.contiguous(), offset)


@supcon.register_fake
def _(input, keys, row_scale, col_scale, row_class, key_class, offset):
    _check_supcon(input, keys, row_scale, col_scale, row_class, key_class, offset)
    acc = accumulation_dtype(input.dtype)
    return tuple(input.new_empty((input.shape[0],), dtype=acc) for _ in range(4))


@_op("supcon_backward")
def supcon_backward(grad_rows: Tensor, input: Tensor, keys: Tensor, row_scale: Tensor, col_scale: Tensor,
                    row_class: Tensor, key_class: Tensor, offset: int, top: Tensor, log_sum: Tensor, count: Tensor,
                    need_input_grad: bool, need_keys_grad: bool,
                    need_scale_grads: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dL/dinput, dL/dkeys (the scales held fixed), dL/drow_scale, dL/dcol_scale) for the upstream `grad_rows` (B,);
    any not asked for is an empty (0,) tensor. top, log_sum and count: the forward op's by-products."""
    _check_supcon(input, keys, row_scale, col_scale, row_class, key_class, offset)
    acc = accumulation_dtype(input.dtype)
    for name, t in (("grad_rows", grad_rows), ("top", top), ("log_sum", log_sum), ("count", count)):
        if tuple(t.shape) != (input.shape[0],) or (name != "grad_rows" and t.dtype != acc):
            raise ValueError(f"{name} must be a ({input.shape[0]},) tensor" + ("" if name == "grad_rows" else
                             f" of {acc}, the forward op's") + f", got a {tuple(t.shape)} {t.dtype} tensor")
    grads = supcon_backward_pass(grad_rows, input.contiguous(), keys.contiguous(), row_scale, col_scale,
                                 row_class.contiguous(), key_class.contiguous(), offset, top, log_sum, count,
                                 need_input_grad, need_keys_grad, need_scale_grads)
    return tuple(_or_empty(g, like) for g, like in zip(grads, (input, keys, row_scale, col_scale)))


@supcon_backward.register_fake
def _(grad_rows, input, keys, row_scale, col_scale, row_class, key_class, offset, top, log_sum, count, need_input_grad,
      need_keys_grad, need_scale_grads):
    return _contrastive_grads_fake(input, keys, row_scale, col_scale, need_input_grad, need_keys_grad,
                                   need_scale_grads)


def _supcon_setup_context(ctx, inputs, output):
    input, keys, row_scale, col_scale, row_class, key_class, offset = inputs
    _, top, log_sum, count = output
    ctx.save_for_backward(input, keys, row_scale, col_scale, row_class, key_class, top, log_sum, count)
    ctx.mark_non_differentiable(top, log_sum, count)
    ctx.offset = offset


def _supcon_autograd(ctx, grad_rows, *grad_by_products):
    input, keys, row_scale, col_scale, row_class, key_class, top, log_sum, count = ctx.saved_tensors
    need_input, need_keys = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_scales = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
    grads = [None] * 4
    if grad_rows is not None and (need_input or need_keys or need_scales):
        grads = list(call("supcon_backward", grad_rows, input, keys, row_scale, col_scale, row_class, key_class,
                          ctx.offset, top, log_sum, count, need_input, need_keys, need_scales))
    return (grads[0] if need_input else None, grads[1] if need_keys else None, grads[2] if need_scales else None,
            grads[3] if need_scales else None, None, None, None)


_register_autograd("supcon", _supcon_autograd, _supcon_setup_context)
