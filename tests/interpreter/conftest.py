"""MARGINKERN_RECORD_LAUNCHES=PATH: every Triton kernel launch of this tier is written to PATH (JSON) as the
launcher on a GPU would specialise it (argument types, 16-divisible sizes and pointers, integers equal to 1 made
constants, constexprs, num_warps / num_stages), so that scripts/test.sh can compile each one for sm_90 afterwards
(bench/sm90_compile.py --launches): the interpreter runs the kernels' Python, not Triton's compiler, and code that
only fails to compile (B.to() on a B the launcher made the constant 1) would otherwise wait for a GPU visit."""
import json
import os

import pytest

from tests.helpers import TRITON_COMPILER_UNSUPPORTED, TRITON_INTERPRETER_UNSUPPORTED

# this tier runs in Triton's interpreter (TRITON_INTERPRET=1, CI) or compiled on a GPU (scripts/gpu_session.sh
# triton-tier): each has its own oldest Triton (marginkern.dispatch)
TRITON_UNSUPPORTED = (TRITON_INTERPRETER_UNSUPPORTED if os.environ.get("TRITON_INTERPRET") == "1"
                      else TRITON_COMPILER_UNSUPPORTED)
RECORD_PATH = os.environ.get("MARGINKERN_RECORD_LAUNCHES")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion")
_launches = {}


_binders = {}


def _binder(kernel):
    """Triton's own launcher binder for an interpreted kernel: (bound arguments, their specialisation, the launch
    options) as a GPU launch would make them (do_not_specialize and typed parameters included)."""
    if kernel.fn not in _binders:
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        jitted = JITFunction(kernel.fn, **kernel.kwargs)
        _binders[kernel.fn] = create_function_from_signature(jitted.signature, jitted.params, BaseBackend)
    return _binders[kernel.fn]


def _record(kernel, args, kwargs):
    bound, specialization, options = _binder(kernel)(*args, **kwargs)
    unknown = set(options) - set(LAUNCH_OPTIONS)
    if unknown:
        raise ValueError(f"{kernel.fn.__name__} was launched with {sorted(unknown)}: the launch recorder "
                         f"(tests/interpreter/conftest.py) knows {LAUNCH_OPTIONS}")
    arguments = {}
    for name, (kind, key) in zip(bound, specialization):
        if kind == "constexpr":
            if not isinstance(key, (bool, int, float, str, type(None))):
                raise ValueError(f"{kernel.fn.__name__}'s constexpr {name} = {key!r}: the launch recorder stores "
                                 "numbers, strings and None only")
            arguments[name] = [kind, key]
        else:
            arguments[name] = [kind, key or ""]
    if "enable_fp_fusion" not in options:
        raise ValueError(f"{kernel.fn.__name__} was launched without enable_fp_fusion: every launch passes "
                         "triton_kernels.device.FP_FUSION (Triton 3.10 changed the default)")
    launch = {k: options[k] for k in LAUNCH_OPTIONS if k in options}
    entry = {"module": kernel.fn.__module__, "kernel": kernel.fn.__name__, "arguments": arguments, "launch": launch}
    _launches.setdefault(json.dumps(entry, sort_keys=True), entry)


if RECORD_PATH and not TRITON_UNSUPPORTED:  # (an older Triton's interpreter has no InterpretedFunction.run)
    from triton.runtime.interpreter import InterpretedFunction

    _interpreted_run = InterpretedFunction.run

    def _recording_run(self, *args, grid, warmup, **kwargs):
        _record(self, args, kwargs)
        return _interpreted_run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = _recording_run

    def pytest_sessionfinish(session, exitstatus):
        with open(RECORD_PATH, "w") as f:
            json.dump(sorted(_launches.values(), key=lambda e: (e["module"], e["kernel"])), f, indent=0)


# NumPy's floating-point warnings from inside the interpreter: it evaluates both sides of every tl.where, so the
# lanes a kernel masks out (−inf beyond the classes, 0·inf, log 0, the inf/NaN inputs tests feed on purpose) warn
# where a GPU computes and discards them silently; the values are what the tests check
_INTERPRETER_FP_WARNINGS = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")


def pytest_collection_modifyitems(items):
    for item in items:
        if TRITON_UNSUPPORTED:  # one reason for the whole tier, not a failure per test
            item.add_marker(pytest.mark.skip(reason=TRITON_UNSUPPORTED))
        item.add_marker(_INTERPRETER_FP_WARNINGS)
