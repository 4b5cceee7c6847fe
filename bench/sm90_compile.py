"""Compile the engine's Triton kernels for Hopper (sm_90) on any machine, no GPU needed, and report what the
compiler made of them: wgmma (Hopper tensor cores) or not, cp.async software pipelining, shared memory,
registers, stack frame and spills (cuobjdump of the cubin; where it shows a stack frame, ptxas -v again on the PTX
with Triton's flags says whether the frame holds spilled registers or only a call's, e.g. libdevice's cos/sin or an
IEEE division's slow path; Triton's wheel ships ptxas and cuobjdump).

    python bench/sm90_compile.py                  # GPU_CONFIG and the sweep's quick grid
    python bench/sm90_compile.py 128,128,64,8,0,8,3  # BLOCK_N,BLOCK_C,BLOCK_D,GROUP_N,FLATTEN,num_warps,num_stages
    python bench/sm90_compile.py --launches FILE [--gpu-tiles]  # every launch the interpreter tier recorded
                                                                # (scripts/test.sh); --gpu-tiles: the engine's
                                                                # at GPU_CONFIG too

It screens tile configurations before a GPU visit (one that spills or does not pipeline is not worth GPU
time) and tests/test_sm90_compile.py keeps the default compiling to wgmma + cp.async without spills. The
arguments are specialised as Triton's launcher would at the benchmark shapes: 16-byte aligned pointers,
sizes and strides divisible by 16 (without that, no cp.async: the loads could not be vectorised).
A compile is not a measurement: speed still needs the GPU (bench/NOTES.md).
"""
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from marginkern.triton_kernels.device import FP_FUSION

HOPPER = GPUTarget("cuda", 90, 32)  # sm_90, 32 threads a warp
# Argument types of the engine's kernels by name (anything else: i32).
POINTER_TYPES = {
    "x_ptr": "*bf16", "w_ptr": "*bf16", "grad_ptr": "*bf16", "keys_ptr": "*bf16", "target_ptr": "*i64",
    "query_rows_ptr": "*i64", "g_ptr": "*fp32", "out_ptr": "*bf16", "a_ptr": "*bf16", "b_ptr": "*bf16",
    "da_ptr": "*bf16", "db_ptr": "*bf16", "target_subcenter_ptr": "*i64", "teacher_x_ptr": "*bf16",
    "teacher_w_ptr": "*bf16",
}
FLOAT_ARGS = ("softcap", "eps", "scale", "beta", "one_minus_beta", "jsd_beta", "jsd_one_minus_beta")
DIVISIBLE_BY_16 = ("N", "C", "D", "E", "R", "B", "stride_x", "stride_w", "stride_g", "stride_k", "stride_a", "stride_b",
                   "stride_out", "stride_tx", "stride_tw")


def integers_as_ones(kernel, constexprs, types=None):
    """constexprs with every other integer argument set to the constant 1, as Triton's launcher specialises an int
    equal to 1 (N = 1, a single class split, a unit stride): code that treats one as a tensor (`.to(...)`) fails
    only then, and only when compiled (the interpreter does not specialise). `types`: as compile_sm90's."""
    declared = {p.name for p in kernel.params if p.is_constexpr}
    floats = set(FLOAT_ARGS) | {n for n, t in (types or {}).items() if t.startswith("fp")}
    ints = [n for n in kernel.arg_names
            if n not in constexprs and n not in declared and not n.endswith("_ptr") and n not in floats]
    return {**constexprs, **{n: 1 for n in ints}}


def compile_sm90(kernel, constexprs, num_warps, num_stages, types=None, divisible_sizes=True):
    """Compile `kernel` for sm_90; returns a dict of what the compiler produced (see the module docstring).
    divisible_sizes=False: no size or stride is known to be a multiple of 16 (a chunk of odd width), only the
    pointers' alignment."""
    types = {**POINTER_TYPES, **(types or {})}
    # constexpr parameters left out take their defaults, as at a launch
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = types.get(name, "*fp32")
        else:
            signature[name] = types.get(name, "fp32" if name in FLOAT_ARGS else "i32")
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or (divisible_sizes and n in DIVISIBLE_BY_16 and t != "constexpr")}
    return _compile(kernel, signature, constexprs, attrs, num_warps, num_stages)


def _compile(kernel, signature, constexprs, attrs, num_warps, num_stages):
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages, **FP_FUSION})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", cubin], capture_output=True, text=True, check=True).stdout
    resources = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    regs, stack, _, local = (int(v) for v in resources.groups())
    return {"wgmma": ptx.count("wgmma.mma_async"), "cp_async": ptx.count("cp.async"),
            "shared_bytes": compiled.metadata.shared, "registers": regs, "stack_bytes": stack, "local_bytes": local,
            "spill_bytes": _spill_bytes(ptx) if stack or local else 0}


def _spill_bytes(ptx):
    """Bytes of spill stores + loads that ptxas reports for the PTX, assembled as Triton's make_cubin does (-v,
    -lineinfo, --regAllocOptLevel=2, FP fusion on: every launch asks for it, device.FP_FUSION)."""
    from triton.backends.nvidia.compiler import get_ptxas
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        try:
            ptxas = get_ptxas(90)
        except TypeError:  # Triton <= 3.4: get_ptxas() takes no architecture (3.3: returns (path, version))
            ptxas = get_ptxas()
        ptxas_path = getattr(ptxas, "path", None) or ptxas[0]
        log = subprocess.run([ptxas_path, "-lineinfo", "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a",
                              source, "-o", os.path.join(tmp, "kernel.o")], capture_output=True, text=True,
                             check=True).stderr
    return sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))


def recorded_launches(path, gpu_tiles=False):
    """[(label, kernel, signature, constexprs, attrs, num_warps, num_stages)] of the launches that
    tests/interpreter/conftest.py recorded (MARGINKERN_RECORD_LAUNCHES), each as the interpreter ran it, each with
    fp16 operands once more in bf16 (the interpreter has no bf16) and, with gpu_tiles, the streaming engine's (the
    interpreter's small blocks) once more at the GPU's (GPU_CONFIG, re-blocked for sub-centres as the launcher does):
    the flag combinations the tests reach, at the tiles a GPU runs (~400 more compiles of the large tiles: 4 more
    minutes on 2 cores)."""
    import importlib
    import json
    from marginkern.triton_kernels.tiles import GPU_CONFIG, INTERPRETER_BLOCKS, subcenter_blocks
    with open(path) as f:
        entries = json.load(f)
    out, seen = [], set()
    for entry in entries:
        kernel = getattr(importlib.import_module(entry["module"]), entry["kernel"])
        arguments = entry["arguments"]
        if list(arguments) != kernel.arg_names:
            raise ValueError(f"{path}: {entry['kernel']} was recorded with the arguments {list(arguments)}, the code "
                             f"takes {kernel.arg_names}: record the launches again")
        constexprs = {n: v for n, (kind, v) in arguments.items() if kind == "constexpr"}
        signature = {n: kind for n, (kind, _) in arguments.items()}
        attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n, (kind, key) in arguments.items()
                 if kind != "constexpr" and key == "D"}
        warps, stages = entry["launch"].get("num_warps", 4), entry["launch"].get("num_stages", 3)
        variants = [(signature, constexprs, warps, stages, "")]
        if any(kind == "*fp16" for kind in signature.values()):
            # the interpreter tier runs no bf16 (numpy has none), the GPU's main dtype: its 16-bit launches once more
            # with bf16 in place of fp16 (without fp16's gradient saturation, which the host sets for fp16 only)
            variants.append(({n: "*bf16" if kind == "*fp16" else kind for n, kind in signature.items()},
                             {**constexprs, **({"SATURATE_FP16": False} if "SATURATE_FP16" in constexprs else {})},
                             warps, stages, " as bf16"))
        tiled = [k for k in INTERPRETER_BLOCKS if k in constexprs]
        if gpu_tiles and {"BLOCK_N", "BLOCK_C", "BLOCK_D"} <= set(tiled) and all(constexprs[k] == INTERPRETER_BLOCKS[k]
                                                                                  for k in tiled):
            blocks = subcenter_blocks({k: GPU_CONFIG[k] for k in INTERPRETER_BLOCKS}, GPU_CONFIG["num_warps"],
                                      constexprs.get("SUBCENTERS", 1))
            variants += [(sig, {**consts, **{k: blocks[k] for k in tiled}}, GPU_CONFIG["num_warps"],
                          GPU_CONFIG["num_stages"], where + " at GPU_CONFIG") for sig, consts, _, _, where in variants]
        declared = {p.name for p in kernel.params if p.is_constexpr}
        for sig, consts, warps, stages, where in variants:
            key = json.dumps([entry["module"], entry["kernel"], sig, consts, sorted(attrs), warps, stages],
                             sort_keys=True, default=str)
            if key in seen:
                continue
            seen.add(key)
            flags = ", ".join(f"{n}={v}" for n, v in consts.items() if n in declared and not n.startswith("BLOCK"))
            # the integers the launcher made constants (equal to 1) or None
            specialised = ", ".join(f"{n}={v}" for n, v in consts.items() if n not in declared)
            label = f"{entry['kernel']}({flags}){where}" + (f" [{specialised}]" if specialised else "")
            out.append((label, kernel, sig, consts, attrs, warps, stages))
    return out


_LAUNCHES = {}
HOPPER_SHARED_BYTES = 227 * 1024  # per block, the opt-in maximum: a kernel that needs more fails at its launch


def _compile_recorded_one(path, gpu_tiles, index):
    """(label, report, error or None) of recorded_launches(path)[index] (a worker process's task: each reads the file
    once); more shared memory than an sm_90 block has is an error (the launch would fail)."""
    if (path, gpu_tiles) not in _LAUNCHES:
        _LAUNCHES[path, gpu_tiles] = recorded_launches(path, gpu_tiles)
    label, kernel, signature, constexprs, attrs, warps, stages = _LAUNCHES[path, gpu_tiles][index]
    try:
        report = _compile(kernel, signature, constexprs, attrs, warps, stages)
    except Exception as e:  # noqa: BLE001 — every failure is reported, not just the first
        return label, None, f"{type(e).__name__}: {e}"
    if report["shared_bytes"] > HOPPER_SHARED_BYTES:
        return label, report, f"needs {report['shared_bytes']} bytes of shared memory, sm_90 has {HOPPER_SHARED_BYTES}"
    return label, report, None


def compile_recorded(path, gpu_tiles=False, jobs=None):
    """Compile every launch of recorded_launches(path, gpu_tiles) for sm_90 in `jobs` processes (default: one per
    core); returns [(label, report or None, error or None)]."""
    from concurrent.futures import ProcessPoolExecutor
    count = len(recorded_launches(path, gpu_tiles))
    if count == 0:
        raise ValueError(f"{path} records no kernel launch: was the interpreter tier run with "
                         "MARGINKERN_RECORD_LAUNCHES set, and did it run any test?")
    with ProcessPoolExecutor(jobs or len(os.sched_getaffinity(0))) as pool:
        return list(pool.map(_compile_recorded_one, [path] * count, [gpu_tiles] * count, range(count), chunksize=4))


def engine_kernels(config, has_cost=False, from_dots=False, subcenters=1, has_entropy=False, has_teacher=False,
                   jsd=False, softcap=False, hard_negatives=False):
    """(label, kernel, constexprs) of the streaming engine's two kernels at `config`, bf16 operands, with
    the margin family's column scale (the epilogue every face case runs); `subcenters` K: sub-center ArcFace;
    `has_entropy`: the token-entropy epilogue (log_probs_and_entropy); `has_teacher`: distillation's teacher
    plane (linear_kl_divergence; with the entropy term too, as reverse KL's backward runs); `jsd`: the generalized
    JSD's sums kernel and dL/da kernel (linear_jsd); `softcap`: Gemma-2's soft-capped LM head instead (no column
    scale, a bias, the softcap's tanh); `hard_negatives`: CurricularFace's / MV-Softmax's re-weighting."""
    from marginkern.triton_kernels.streaming_ce import (jsd_row_sums_kernel, streaming_ce_fwd_kernel,
                                                        streaming_ce_grad_logits_kernel)
    from marginkern.triton_kernels.tiles import subcenter_blocks
    config = subcenter_blocks(config, config["num_warps"], subcenters)  # the tile the kernels run with then
    flags = dict(HAS_COL_SCALE=not softcap, HAS_BIAS=softcap, HAS_SOFTCAP=softcap, DOT_PRECISION="tf32",
                 BLOCK_N=config["BLOCK_N"], BLOCK_C=config["BLOCK_C"], BLOCK_D=config["BLOCK_D"], FROM_DOTS=from_dots,
                 EVEN_D=True, SUBCENTERS=subcenters, HAS_TEACHER=has_teacher)
    if hard_negatives:
        flags["HAS_HARD_NEGATIVES"] = True
    cost = dict(HAS_COST=has_cost, COST_DOT_PRECISION="tf32", EVEN_E=True)
    if jsd:
        tile = {k: flags[k] for k in ("HAS_COL_SCALE", "HAS_BIAS", "HAS_SOFTCAP", "DOT_PRECISION", "BLOCK_N", "BLOCK_C",
                                      "BLOCK_D", "EVEN_D")}
        return [("JSD sums", jsd_row_sums_kernel, dict(tile, TEACHER_DOT_PRECISION="tf32", EVEN_E=True)),
                ("dL/da", streaming_ce_grad_logits_kernel,
                 dict(flags, **cost, HAS_TEACHER=True, JSD=True, SATURATE_FP16=False, GROUP_N=config["GROUP_N"]))]
    return [("forward", streaming_ce_fwd_kernel,
             dict(flags, **cost, NEED_SUM_LOGITS=False, FLATTEN=bool(config["FLATTEN"]), HAS_ENTROPY=has_entropy)),
            ("dL/da", streaming_ce_grad_logits_kernel,
             dict(flags, **cost, SATURATE_FP16=False, GROUP_N=config["GROUP_N"],
                  HAS_ENTROPY=has_entropy or has_teacher))]


def main():
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from marginkern.dispatch import triton_version_reason
    too_old = triton_version_reason(triton.__version__)
    if too_old:  # as the tests skip (scripts/test.sh runs this after the interpreter tier): said, not failed
        print(f"nothing compiled: {too_old}")
        return
    if sys.argv[1:2] == ["--launches"]:
        results = compile_recorded(sys.argv[2], gpu_tiles="--gpu-tiles" in sys.argv[3:])
        failures = [(label, error) for label, _, error in results if error]
        compiled = [r for _, r, error in results if not error]
        spills = [(label, r) for label, r, error in results if not error and r["spill_bytes"]]
        for label, r in spills:  # not an error: a slower kernel, which the benchmarks would show
            print(f"spills {label}: {r['spill_bytes']} B spill stores + loads, {r['stack_bytes']} B stack, "
                  f"{r['local_bytes']} B local, {r['registers']} regs")
        for label, error in failures:
            print(f"FAILED {label}: {error[:2000]}\n")
        frames = sum(1 for r in compiled if r["stack_bytes"] and not r["spill_bytes"])
        print(f"{len(results) - len(failures)} of {len(results)} recorded kernel launches compile for sm_90 "
              f"({len(spills)} with register spills; {frames} more with a stack frame that holds no spill: calls)")
        sys.exit(1 if failures else 0)
    from marginkern.triton_kernels.tiles import GPU_CONFIG
    from sweep_triton_configs import KEYS, grid
    if len(sys.argv) > 1:
        configs = [dict(zip(KEYS, (int(v) for v in arg.split(",")))) for arg in sys.argv[1:]]
    else:
        configs = [GPU_CONFIG] + [c for c in grid(quick=True) if c != GPU_CONFIG]
    print("config (" + ",".join(KEYS) + ") | kernel | wgmma | cp.async | smem KB | regs | "
          "stack B | spill B")
    for config in configs:
        name = ",".join(str(int(config[k])) for k in KEYS)
        for label, kernel, constexprs in engine_kernels(config):
            try:
                r = compile_sm90(kernel, constexprs, config["num_warps"], config["num_stages"])
            except Exception as e:  # e.g. out of shared memory, or registers
                print(f"{name} | {label} | failed: {type(e).__name__}: {str(e)[:150]}")
                continue
            print(f"{name} | {label} | {r['wgmma']} | {r['cp_async']} | {r['shared_bytes'] / 1024:.0f} | "
                  f"{r['registers']} | {r['stack_bytes']} | {r['spill_bytes'] or 'no'}")


if __name__ == "__main__":
    main()
