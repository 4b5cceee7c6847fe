"""Which backend runs an op, and why (DESIGN.md §5).

    triton     marginkern.triton_kernels: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1
    cuda       hand-written CUDA of csrc/cuda (marginkern.cpp_tiles.CudaTiles: cuBLAS GEMMs per class chunk
               plus CUDA epilogue kernels): CUDA tensors, when the extension marginkern._C_cuda is built.
               Opt-in only (MARGINKERN_BACKEND=cuda), never picked by itself, until it has run on a GPU and a
               measurement shows it beating Triton
    cpp        the C++ CPU kernels of csrc/cpu (marginkern.cpp_tiles.CppTiles): CPU tensors, when the
               extension marginkern._C is built; the default on the CPU then
    reference  the engine with plain-PyTorch tiles (marginkern.engine.TorchTiles): any device

MARGINKERN_BACKEND forces one; a forced backend that cannot serve the call raises BackendUnavailable
with the reason instead of silently falling back.
"""
import functools
import os
import warnings

import torch

from . import cpp_tiles
from .engine import TorchTiles

BACKENDS = ("triton", "cuda", "cpp", "reference")


class BackendUnavailable(RuntimeError):
    pass


# The oldest Triton whose compiler was checked to take every kernel launch the interpreter tier records (for sm_90,
# without a GPU: bench/sm90_compile.py --launches; 3.3, 3.4, 3.6, 3.8 and 3.9 on 2026-12-06, 3.7 on 2026-12-07);
# Triton 3.2 (torch 2.6's) cannot be checked that way (another compiler API) and its interpreter fails the kernels.
# The GPU runs so far used Triton 3.6. Not a pip requirement: a CUDA torch pins its Triton, and a floor above that
# pin would make pip replace the user's torch.
MIN_TRITON = (3, 3)
# The oldest Triton whose interpreter (TRITON_INTERPRET=1, CPU tensors) was seen to run the interpreter tier (3.7, 3.8
# and 3.9): 3.6's and 3.2's fail on a loop bound that is a tensor (`tl.range(c_begin, c_end, ...)`: int() of a
# one-element array, which NumPy 2.4 refuses).
MIN_TRITON_INTERPRETER = (3, 7)


def triton_version_reason(version: str, minimum=MIN_TRITON,
                          what="checked to compile every kernel (torch 2.7 brings 3.3)"):
    """None when Triton `version` (e.g. "3.6.0", "3.7.0+git1234") is at least `minimum`, else why it cannot serve."""
    parts = version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None  # a development build with an unreadable version: let it try
    if (major, minor) >= minimum:
        return None
    return f"triton {version} is older than {minimum[0]}.{minimum[1]}, the oldest {what}"


def interpreter_version_reason(version: str):
    """triton_version_reason for Triton's interpreter (MIN_TRITON_INTERPRETER)."""
    return triton_version_reason(version, MIN_TRITON_INTERPRETER,
                                 "whose interpreter runs the kernels (TRITON_INTERPRET=1)")


@functools.lru_cache(maxsize=None)
def _triton_tiles():
    """TritonTiles, or the reason it cannot be loaded (str)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); pip install triton"
    from .triton_kernels import TritonTiles
    return TritonTiles()


@functools.lru_cache(maxsize=None)
def _triton_version_reasons():
    """(why the installed Triton cannot run the kernels on a GPU, why not in its interpreter): None each when it can;
    once per process (dispatch runs on every call)."""
    import triton
    return triton_version_reason(triton.__version__), interpreter_version_reason(triton.__version__)


def _why_not(backend, device, dtype=torch.float32):
    """None when `backend` can serve `dtype` tensors on `device`, else the reason."""
    if backend == "reference":
        return None
    if backend == "triton":
        tiles = _triton_tiles()
        if isinstance(tiles, str):
            return tiles
        if dtype == torch.float64:
            return "the Triton kernels compute in fp32 and take fp32/fp16/bf16 inputs, got float64"
        if device.type == "cuda":
            return _triton_version_reasons()[0]
        if os.environ.get("TRITON_INTERPRET") == "1":
            return _triton_version_reasons()[1]
        return (f"the Triton kernels need CUDA tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
                "before triton is first imported to run them on the CPU through Triton's interpreter")
    if backend == "cpp":
        if cpp_tiles.LOAD_ERROR is not None:
            return cpp_tiles.LOAD_ERROR
        if device.type != "cpu":
            return f"the C++ kernels of csrc/cpu take CPU tensors, got {device.type} tensors"
        return None
    if backend == "cuda":
        if cpp_tiles.CUDA_LOAD_ERROR is not None:
            return cpp_tiles.CUDA_LOAD_ERROR
        if device.type != "cuda":
            return f"the CUDA kernels of csrc/cuda take CUDA tensors, got {device.type} tensors"
        if dtype == torch.float64:
            return "the CUDA kernels take fp32/fp16/bf16 inputs, got float64"
        return None
    return f"unknown backend {backend!r}; expected one of {BACKENDS}"


def forced_backend():
    name = os.environ.get("MARGINKERN_BACKEND", "").strip().lower()
    if name and name not in BACKENDS:
        raise BackendUnavailable(f"MARGINKERN_BACKEND={name!r} is not a backend; expected one of {BACKENDS}")
    return name or None


@functools.lru_cache(maxsize=None)
def _warn_fallback(reason):
    warnings.warn(f"marginkern: using the plain-PyTorch reference backend because {reason}", stacklevel=3)


def select_tiles(device: torch.device, dtype: torch.dtype):
    """The tile backend for `dtype` tensors on `device` (see the module docstring)."""
    forced = forced_backend()
    if forced:
        reason = _why_not(forced, device, dtype)
        if reason:
            raise BackendUnavailable(f"MARGINKERN_BACKEND={forced} cannot run this call: {reason}")
        if forced == "triton":
            return _triton_tiles()
        if forced == "cuda":
            return cpp_tiles.CudaTiles()
        return cpp_tiles.CppTiles() if forced == "cpp" else TorchTiles()
    if device.type == "cpu":
        reason = _why_not("cpp", device, dtype)
        if reason is None:
            return cpp_tiles.CppTiles()
        _warn_fallback(reason)
    if device.type == "cuda":
        reason = _why_not("triton", device, dtype)
        if reason is None:
            return _triton_tiles()
        if dtype != torch.float64:  # float64 on the GPU is a deliberate choice, not a fallback
            _warn_fallback(reason)
    return TorchTiles()


def select_tiles_except(unsupported, what, device: torch.device, dtype: torch.dtype):
    """select_tiles, with the PyTorch tiles standing in for the backends named in `unsupported`, which cannot
    serve `what`; BackendUnavailable when MARGINKERN_BACKEND forces one of them."""
    tiles = select_tiles(device, dtype)
    if tiles.name in unsupported:
        if forced_backend():
            raise BackendUnavailable(f"MARGINKERN_BACKEND={forced_backend()} cannot run this call: it has no {what}")
        tiles = TorchTiles()
    return tiles


def selected_backend(device="cpu", dtype=torch.float32):
    """The name of the backend a call with `dtype` tensors on `device` runs on now (env included)."""
    return select_tiles(torch.device(device), dtype).name


def explain(device="cpu"):
    """One line per backend: whether it can serve `device` and why not."""
    device = torch.device(device)
    return "\n".join(f"{b:10s} {'ok' if _why_not(b, device) is None else _why_not(b, device)}" for b in BACKENDS)
