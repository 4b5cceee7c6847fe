"""MARGINKERN_RECORD_LAUNCHES=PATH: every Triton kernel launch of this tier is written to PATH (JSON) as the
launcher on a GPU would specialise it (argument types, 16-divisible sizes and pointers, integers equal to 1 made
constants, constexprs, num_warps / num_stages), so that scripts/test.sh can compile each one for sm_90 afterwards
(bench/sm90_compile.py --launches): the interpreter runs the kernels' Python, not Triton's compiler, and code that
only fails to compile (B.to() on a B the launcher made the constant 1) would otherwise wait for a GPU visit."""
import json
import os

RECORD_PATH = os.environ.get("MARGINKERN_RECORD_LAUNCHES")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
_launches = {}


def _specialised(value, is_constexpr):
    """[type, key] as Triton's launcher specialises the argument: ("constexpr", value) for a constexpr (and for
    an integer equal to 1 or None), else its type (*bf16, i32, fp32, ...) and "D" when divisible by 16."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl
    if is_constexpr:
        if not isinstance(value, (bool, int, float, str, type(None))):
            value = str(value)  # e.g. a tl.dtype: named, not compiled from the record
        return ["constexpr", value]
    kind, key = native_specialize_impl(BaseBackend, value, False, True, True)
    return [kind, key if kind == "constexpr" else (key or "")]


def _record(kernel, args, kwargs):
    import inspect

    import triton.language as tl
    params = inspect.signature(kernel.fn).parameters
    bound = dict(zip(params, args))
    bound.update({k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS})
    arguments = {}
    for name, param in params.items():
        value = bound[name] if name in bound else param.default
        arguments[name] = _specialised(value, param.annotation is tl.constexpr or param.annotation == "tl.constexpr")
    launch = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    entry = {"module": kernel.fn.__module__, "kernel": kernel.fn.__name__, "arguments": arguments, "launch": launch}
    _launches.setdefault(json.dumps(entry, sort_keys=True), entry)


if RECORD_PATH:
    from triton.runtime.interpreter import InterpretedFunction

    _interpreted_run = InterpretedFunction.run

    def _recording_run(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs)
        return _interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = _recording_run

    def pytest_sessionfinish(session, exitstatus):
        with open(RECORD_PATH, "w") as f:
            json.dump(sorted(_launches.values(), key=lambda e: (e["module"], e["kernel"])), f, indent=0)
