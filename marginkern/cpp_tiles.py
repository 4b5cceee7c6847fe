"""The tile backends of the compiled extensions: C++ on the CPU (csrc/cpu, the optional extension
marginkern._C) and hand-written CUDA on the GPU (csrc/cuda, the optional extension marginkern._C_cuda).

marginkern._C registers the engine's five class-streaming ops with CPU kernels (schemas in
csrc/cpu/streaming_ce.cpp, math in csrc/cpu/streaming_ce.h and marginkern/engine.py):

    torch.ops.marginkern.streaming_row_stats     the engine's forward step: (lse, Σ_j z)
    torch.ops.marginkern.streaming_grad_logits   dL/da for one class chunk (the tile contract's step)
    torch.ops.marginkern.streaming_grads         the engine's whole backward chunk loop: dX, raw dW, dbias
    torch.ops.marginkern.row_stats_of_dots       the 3-GEMM path's epilogue over a block of dot products:
    torch.ops.marginkern.grads_of_dots_          (lse, Σ_j z), then dL/da in place

and the C++ losses' per-row halves (csrc/cpu/loss_ops.cpp: margin_ce_rows, linear_ce_rows, emo_rows,
log_probs_entropy_rows, kl_divergence_rows, jsd_rows and their backwards), which the loss ops of marginkern/ops.py run on the cpp backend.

marginkern._C_cuda adds CUDA kernels for the first, second and last two (cuBLAS GEMMs per chunk, the
epilogue in csrc/cuda/epilogue_kernels.cu); on the GPU the engine's own loop runs the backward GEMMs.

This module adds the fake kernels, `CppTiles` and `CudaTiles`. It never raises at import: `LOAD_ERROR`
and `CUDA_LOAD_ERROR` are None when the extension loaded, else why it did not (dispatch.py reports it).
"""
import importlib.util

import torch

from .engine import accumulation_dtype, cost_query, gpu_grad_dtype, no_hard_negatives


# The ops marginkern._C must register (an extension built from older sources lacks some: a stale in-place
# build must fall back with a reason, not fail in the middle of a training step).
EXTENSION_OPS = ("streaming_row_stats", "streaming_grad_logits", "streaming_grads", "row_stats_of_dots",
                 "grads_of_dots_", "margin_ce_rows", "margin_ce_rows_backward", "linear_ce_rows",
                 "linear_ce_rows_backward", "emo_rows", "emo_rows_backward", "log_probs_entropy_rows",
                 "log_probs_entropy_rows_backward", "kl_divergence_rows", "kl_divergence_rows_backward", "jsd_rows",
                 "jsd_rows_backward")


# Arguments an extension built from older sources lacks (a changed schema loads fine and fails at the call).
SCHEMA_ARGUMENTS = {"margin_ce_rows": ("subcenters", "lambda_", "row_margins", "hard_negatives"),
                    "margin_ce_rows_backward": ("subcenters", "lambda_", "row_margins", "hard_negatives")}


def _argument_names(op):
    return [a.name for a in getattr(torch.ops.marginkern, op).default._schema.arguments]


def _has_kernel(op, dispatch_key):
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"marginkern::{op}", dispatch_key)
    except RuntimeError:  # no such schema
        return False


def _load_extension(name, what, ops=(), dispatch_key="CPU"):
    """None when marginkern.<name> is loaded (which registers its kernels), else why it is not."""
    rebuild = f"pip install --no-build-isolation -e . (needs torch importable at build time and {what})"
    if not (ops and all(_has_kernel(op, dispatch_key) for op in ops)):
        # Not registered already (by the LibTorch build of the same sources, CMakeLists.txt, loaded by
        # torch.ops.load_library before this import: loading ours too would register every schema twice,
        # which aborts the process from a static initialiser, no Python exception to catch).
        try:
            if importlib.util.find_spec(f"{__package__}.{name}") is None:
                return f"the extension marginkern.{name} is not built; build it with {rebuild}"
            importlib.import_module(f"{__package__}.{name}")
        except (ImportError, OSError, ValueError) as e:  # e.g. built against another torch: undefined symbols
            return f"the extension marginkern.{name} does not load ({e}); rebuild it with {rebuild}"
    missing = [op for op in ops if not hasattr(torch.ops.marginkern, op)]
    if not missing:
        missing = [f"{op}'s {arg} argument" for op, args in SCHEMA_ARGUMENTS.items() if op in ops
                   for arg in args if arg not in _argument_names(op)]
    if missing:
        return (f"the extension marginkern.{name} is older than this package (it lacks {', '.join(missing)}); "
                f"rebuild it with {rebuild}")
    return None


LOAD_ERROR = _load_extension("_C", "a C++ compiler", EXTENSION_OPS)
# The CUDA kernels register into the schemas of marginkern._C: without it they cannot serve anything.
CUDA_LOAD_ERROR = LOAD_ERROR or _load_extension("_C_cuda", "a CUDA build of torch and nvcc",
                                                ("streaming_row_stats",), dispatch_key="CUDA")


def _spec_args(spec):
    """The LogitSpec fields every op takes, in schema order (the target logit is forward-only)."""
    if spec.subcenters != 1:  # the ops' callers route sub-centres to other tiles (ops._margin_tiles)
        raise ValueError(f"the C++ and CUDA tiles have no sub-centres (subcenters={spec.subcenters})")
    no_hard_negatives(spec, "the C++ and CUDA tiles")
    return (spec.row_scale, spec.col_scale, spec.bias,
            None if spec.softcap is None else float(spec.softcap), spec.target)


def _cost_args(cost):
    """The optional EMO cost term (engine.CostSpec) as the ops' trailing cost_* arguments."""
    if cost is None:
        return ()
    return (cost_query(cost), cost.query_scale, cost.keys, cost.key_scale, cost.coef)


class _ExtensionTiles:
    """The tile steps both extensions implement (the dispatcher picks the kernel by device)."""

    def __init__(self, buffer_bytes: int):
        error = self.load_error()
        if error is not None:
            from .dispatch import BackendUnavailable
            raise BackendUnavailable(error)
        self.buffer_bytes = buffer_bytes

    def class_chunk(self, N, x, buffers=1, bytes_per_class=0):
        """Classes per chunk: `buffers` N × chunk buffers in the accumulation dtype, plus `bytes_per_class`
        of the caller's per chunk, fill `buffer_bytes` (the EMO cost term's backward needs a second buffer)."""
        acc_bytes = 8 if x.dtype == torch.float64 else 4
        return max(256, self.buffer_bytes // max(1, buffers * N * acc_bytes + bytes_per_class))

    def row_stats(self, x, w, spec, need_sum_logits):
        lse, sum_logits = torch.ops.marginkern.streaming_row_stats(
            x, w, *_spec_args(spec), spec.target_logit, need_sum_logits, self.class_chunk(x.shape[0], x))
        return lse, (sum_logits if need_sum_logits else None)

    def block_row_stats(self, z, spec, need_sum_logits):
        """engine.TorchTiles.block_row_stats in one fused pass per row; z stays the raw dot products."""
        lse, sum_logits = torch.ops.marginkern.row_stats_of_dots(z, *_spec_args(spec), spec.target_logit,
                                                                 need_sum_logits)
        return lse, (sum_logits if need_sum_logits else None)

    def block_grads_(self, z, spec, lse, coef_p, coef_u, target_grad, out_dtype=None):
        """engine.TorchTiles.block_grads_ from the raw dot products, one fused pass per row, in place
        (the engine casts the accumulation-dtype result to its GEMM dtype)."""
        torch.ops.marginkern.grads_of_dots_(z, *_spec_args(spec), lse, coef_p, coef_u, target_grad)
        return z

    def class_chunks(self, N, C, x, bytes_per_class=0):
        chunk = self.class_chunk(N, x, bytes_per_class=bytes_per_class)
        return [(c0, min(C, c0 + chunk)) for c0 in range(0, C, chunk)]

    def grad_logits(self, x, w, spec, lse, coef_p, coef_u, target_grad, c0, c1, cost=None):
        return torch.ops.marginkern.streaming_grad_logits(
            x, w, *_spec_args(spec), lse, coef_p, coef_u, target_grad, c0, c1, *_cost_args(cost))


class CudaTiles(_ExtensionTiles):
    """The engine's class-streaming steps on the GPU as cuBLAS GEMMs (16-bit operands as they are, fp32
    dot products) into a reused N × chunk buffer plus the hand-written CUDA epilogue of csrc/cuda.
    grad_logits returns dL/da in x's dtype when that is 16-bit, ready for the engine's backward GEMMs."""

    name = "cuda"

    # 32 MB of fp32 dot products per chunk (plus the chunk's 16-bit dL/da in the backward pass): at
    # N = 8192 a chunk of 1024 classes, GEMMs large enough for cuBLAS to run near its peak.
    def __init__(self, buffer_bytes: int = 32 << 20):
        super().__init__(buffer_bytes)

    @staticmethod
    def load_error():
        return CUDA_LOAD_ERROR

    grad_dtype = staticmethod(gpu_grad_dtype)


class CppTiles(_ExtensionTiles):
    """The engine's class-streaming steps in C++ (one GEMM per class chunk into a reused N × chunk
    buffer, the epilogue in one parallel pass over its rows), plus the whole backward chunk loop.

    Every result is in the accumulation dtype; fp16/bf16 inputs are upcast per chunk.
    """

    name = "cpp"

    # 16 MB: the fastest measured on a 2-core Xeon (ArcFace fwd+bwd, N=512, C=200k, D=128: 0.45 s;
    # 4 MB the same, 64 MB 0.53 s): smaller chunks keep the epilogue's rows and dW's chunk in cache.
    def __init__(self, buffer_bytes: int = 16 << 20):
        super().__init__(buffer_bytes)

    @staticmethod
    def load_error():
        return LOAD_ERROR

    def row_stats_with_max(self, x, w, spec, need_sum_logits):
        """engine.streaming_row_stats_with_max (a CPU op only: the CUDA tiles have none)."""
        lse, sum_logits, row_max = torch.ops.marginkern.streaming_row_stats_with_max(
            x, w, *_spec_args(spec), spec.target_logit, need_sum_logits, self.class_chunk(x.shape[0], x))
        return lse, (sum_logits if need_sum_logits else None), row_max

    def streaming_grads(self, x, w, spec, lse, coef_p, coef_u, target_grad, finalize_weight_chunk=None,
                        need_bias_grad=False, cost=None, need_weight_grad=True):
        """engine.streaming_grads with the chunk loop in C++ (the engine delegates here).

        The op returns dW in the accumulation dtype before `finalize_weight_chunk`: the chain through
        what the engine does not know about (row normalisation of W) stays with the loss, in Python,
        applied here chunk by chunk and in place; a chunk of dW is a quarter of `buffer_bytes`, as the
        finalizers make a few temporaries of its size.
        """
        N, (C, D) = x.shape[0], w.shape
        grad_x, grad_w, grad_bias = torch.ops.marginkern.streaming_grads(
            x, w, *_spec_args(spec), lse, coef_p, coef_u, target_grad, need_bias_grad, need_weight_grad,
            self.class_chunk(N, x, buffers=1 if cost is None else 2), *_cost_args(cost))
        if not need_weight_grad:
            return grad_x, None, (grad_bias if need_bias_grad else None)
        if finalize_weight_chunk is not None:
            rows = max(1, self.buffer_bytes // max(1, 4 * D * grad_w.element_size()))
            for c0, c1 in ((c0, min(C, c0 + rows)) for c0 in range(0, C, rows)):
                raw = grad_w[c0:c1]
                done = finalize_weight_chunk(c0, c1, raw)
                if done.data_ptr() != raw.data_ptr():
                    raw.copy_(done)
        return grad_x, grad_w.to(w.dtype), (grad_bias if need_bias_grad else None)


if LOAD_ERROR is None:
    # Fake kernels: shapes and dtypes only, so that torch.compile and opcheck can trace the ops.
    @torch.library.register_fake("marginkern::streaming_row_stats")
    def _(x, w, row_scale, col_scale, bias, softcap, target, target_logit, need_sum_logits, class_chunk):
        acc = accumulation_dtype(x.dtype)
        N = x.shape[0]
        return x.new_empty((N,), dtype=acc), x.new_empty((N if need_sum_logits else 0,), dtype=acc)

    @torch.library.register_fake("marginkern::streaming_row_stats_with_max")
    def _(x, w, row_scale, col_scale, bias, softcap, target, target_logit, need_sum_logits, class_chunk):
        acc = accumulation_dtype(x.dtype)
        N = x.shape[0]
        return (x.new_empty((N,), dtype=acc), x.new_empty((N if need_sum_logits else 0,), dtype=acc),
                x.new_empty((N,), dtype=acc))

    @torch.library.register_fake("marginkern::streaming_grad_logits")
    def _(x, w, row_scale, col_scale, bias, softcap, target, lse, coef_p, coef_u, target_grad, c0, c1,
          *cost):
        torch._check(0 <= c0 <= c1 <= w.shape[0], lambda: f"class range [{c0}, {c1}) outside [0, {w.shape[0]}]")
        sixteen_bit_cuda = x.device.type == "cuda" and x.dtype in (torch.float16, torch.bfloat16)
        return x.new_empty((x.shape[0], c1 - c0), dtype=x.dtype if sixteen_bit_cuda else accumulation_dtype(x.dtype))

    @torch.library.register_fake("marginkern::row_stats_of_dots")
    def _(dots, row_scale, col_scale, bias, softcap, target, target_logit, need_sum_logits):
        N = dots.shape[0]
        return dots.new_empty((N,)), dots.new_empty((N if need_sum_logits else 0,))

    @torch.library.register_fake("marginkern::grads_of_dots_")
    def _(dots, row_scale, col_scale, bias, softcap, target, lse, coef_p, coef_u, target_grad):
        return None

    @torch.library.register_fake("marginkern::margin_ce_rows")
    def _(input, weight, target, scale, m1, m2, m3, normalize, exact_margin_grad, label_smoothing, ignore_index,
          subcenters=1, lambda_=0.0, row_margins=None, hard_negatives=None):
        acc, n = accumulation_dtype(input.dtype), input.shape[0]
        return (input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc),
                input.new_empty((n, 4 if subcenters == 1 else 5), dtype=acc),
                input.new_empty((weight.shape[0] if normalize else 0,), dtype=acc))

    @torch.library.register_fake("marginkern::margin_ce_rows_backward")
    def _(grad_rows, input, weight, target, lse, row_state, col_norm, scale, m1, m2, m3, normalize, exact_margin_grad,
          label_smoothing, ignore_index, need_weight_grad, subcenters=1, lambda_=0.0, row_margins=None,
          hard_negatives=None):
        return input.new_empty(input.shape), weight.new_empty(weight.shape if need_weight_grad else (0,))

    @torch.library.register_fake("marginkern::linear_ce_rows")
    def _(input, weight, target, bias, *options):
        acc, n = accumulation_dtype(input.dtype), input.shape[0]
        return input.new_empty((n,), dtype=acc), input.new_empty((n,), dtype=acc)

    @torch.library.register_fake("marginkern::linear_ce_rows_backward")
    def _(grad_rows, input, weight, target, bias, lse, ignore_index, label_smoothing, z_loss, softcap, focal_gamma,
          gamma_ce, need_weight_grad, need_bias_grad):
        grad_b = bias.new_empty(bias.shape) if bias is not None and need_bias_grad else weight.new_empty((0,))
        return input.new_empty(input.shape), weight.new_empty(weight.shape if need_weight_grad else (0,)), grad_b

    @torch.library.register_fake("marginkern::emo_rows")
    def _(input, weight, target, cost_embedding, ignore_index):
        acc, n = accumulation_dtype(input.dtype), input.shape[0]
        return tuple(input.new_empty((n,), dtype=acc) for _ in range(3))

    @torch.library.register_fake("marginkern::emo_rows_backward")
    def _(grad_ce, grad_emo, input, weight, target, cost_embedding, lse, emo, ignore_index, need_weight_grad):
        return input.new_empty(input.shape), weight.new_empty(weight.shape if need_weight_grad else (0,))

    @torch.library.register_fake("marginkern::log_probs_entropy_rows")
    def _(input, weight, target, temperature, ignore_index, bias=None, softcap=None, top1=False):
        acc, n = accumulation_dtype(input.dtype), input.shape[0]
        top1 = input.new_empty((n if top1 else 0,), dtype=torch.bool)
        return (*(input.new_empty((n,), dtype=acc) for _ in range(3)), top1)

    @torch.library.register_fake("marginkern::log_probs_entropy_rows_backward")
    def _(grad_log_probs, grad_entropy, input, weight, target, lse, log_probs, entropy, temperature, ignore_index,
          need_weight_grad, bias=None, softcap=None, need_bias_grad=False):
        grad_bias = bias.new_empty(bias.shape) if bias is not None and need_bias_grad else weight.new_empty((0,))
        return input.new_empty(input.shape), weight.new_empty(weight.shape if need_weight_grad else (0,)), grad_bias

    @torch.library.register_fake("marginkern::kl_divergence_rows")
    def _(input, weight, teacher_input, teacher_weight, target, temperature, ignore_index, reverse):
        acc, n = accumulation_dtype(input.dtype), input.shape[0]
        return tuple(input.new_empty((n,), dtype=acc) for _ in range(3))

    @torch.library.register_fake("marginkern::kl_divergence_rows_backward")
    def _(grad_kl, input, weight, teacher_input, teacher_weight, target, lse, teacher_lse, kl, temperature,
          ignore_index, reverse, need_weight_grad):
        return input.new_empty(input.shape), weight.new_empty(weight.shape if need_weight_grad else (0,))

    @torch.library.register_fake("marginkern::streaming_grads")
    def _(x, w, row_scale, col_scale, bias, softcap, target, lse, coef_p, coef_u, target_grad, need_bias_grad,
          need_weight_grad, class_chunk, *cost):
        acc = accumulation_dtype(x.dtype)
        return (x.new_empty(x.shape, dtype=acc), w.new_empty(w.shape if need_weight_grad else (0,), dtype=acc),
                w.new_empty((w.shape[0] if need_bias_grad else 0,), dtype=acc))
