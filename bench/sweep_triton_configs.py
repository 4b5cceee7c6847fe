"""Tune the Triton kernels' block sizes on the GPU: time one forward (row statistics over all classes) and
one backward chunk (dL/da, the kernel part only) per configuration, for the face and LLM standard shapes.

    python bench/sweep_triton_configs.py [--case all|arcface-1M,llama3-8b,gemma2-2b] [--quick]

Each configuration runs in this process through MARGINKERN_TRITON_CONFIG; one that does not compile (e.g.
out of shared memory) is recorded with its error. Writes bench/results/<device>/<date>-sweep[-k].json (or
into --out-dir) and
prints the fastest configurations. Put the winner into triton_kernels/tiles.py GPU_CONFIG and rerun the
benchmarks. CUDA only.
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch

import harness

CASES = {"arcface-1M": (1024, 512, 1_000_000, True), "llama3-8b": (8192, 4096, 128_256, False),
         "gemma2-2b": (8192, 2304, 256_000, False)}  # (N, D, C, normalized)


KEYS = ("BLOCK_N", "BLOCK_C", "BLOCK_D", "GROUP_N", "FLATTEN", "num_warps", "num_stages")


def grid(quick):
    if quick:  # the current default, the tile shapes Triton's Hopper matmuls usually win with, the
        # backward's program order (GROUP_N=128 puts all Llama row blocks in one group: the order before
        # grouping, with x blocks beyond L2) and the forward's flattened loop nest (FLATTEN=1). Left out:
        # the shapes bench/sm90_compile.py shows spilling registers (128×256 and 256×128 with 8 warps,
        # 128×128 and 64×256 with 4), as compiled by Triton 3.6 and 3.9 for sm_90.
        shapes = [(64, 128, 64, 8, 0, 8, 3), (128, 128, 64, 8, 0, 8, 3), (64, 128, 64, 8, 1, 8, 3),
                  (128, 128, 64, 8, 1, 8, 3), (64, 128, 64, 128, 0, 8, 3), (128, 64, 64, 8, 0, 4, 4),
                  (128, 128, 128, 8, 0, 8, 3), (128, 128, 64, 16, 0, 8, 3)]
    else:
        shapes = itertools.product((64, 128), (64, 128, 256), (32, 64, 128), (8,), (0, 1), (4, 8), (3, 4))
    return [dict(zip(KEYS, shape)) for shape in shapes]


def measure(name, config):
    from triton.testing import do_bench

    from marginkern.dispatch import select_tiles
    from marginkern.engine import LogitSpec
    N, D, C, normalized = CASES[name]
    os.environ["MARGINKERN_TRITON_CONFIG"] = ",".join(f"{k}={v}" for k, v in config.items())
    torch.manual_seed(0)
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, D, device="cuda", dtype=torch.bfloat16) / D ** 0.5
    target = torch.randint(0, C, (N,), device="cuda")
    ones = torch.ones(N, device="cuda")
    col_scale = (1.0 / w.float().norm(dim=1)) if normalized else None
    spec = LogitSpec(ones * (64.0 if normalized else 1.0), col_scale, None, None, target, torch.zeros(N, device="cuda"))
    tiles = select_tiles(x.device, x.dtype)
    lse, _ = tiles.row_stats(x, w, spec, False)
    c0, c1 = tiles.class_chunks(N, C, x, bytes_per_class=4 * D)[0]  # the backward's chunk (G and fp32 dW)
    fwd_ms = do_bench(lambda: tiles.row_stats(x, w, spec, False), warmup=5, rep=50)
    chunk_ms = do_bench(lambda: tiles.grad_logits(x, w, spec, lse, ones / N, ones * 0, ones * 0, c0, c1),
                        warmup=5, rep=50)
    # the forward is 1 GEMM-equivalent over all classes; the chunk kernel is 1 over c1 − c0 classes
    flop = 2 * N * D
    return {"fwd_ms": fwd_ms, "fwd_tflops": flop * C / fwd_ms / 1e9,
            "chunk_ms": chunk_ms, "chunk_classes": c1 - c0, "chunk_tflops": flop * (c1 - c0) / chunk_ms / 1e9}


def step_ms(row):
    """The kernels' share of one fwd+bwd: the forward plus the dL/da kernel over all C classes."""
    C = CASES[row["case"]][2]
    return row["fwd_ms"] + row["chunk_ms"] * C / row["chunk_classes"]


def write_best(rows, names, path):
    """'<case> <MARGINKERN_TRITON_CONFIG value>' per case with a measured configuration, fastest by step_ms."""
    lines = []
    for name in names:
        ok = [r for r in rows if r["case"] == name and r["status"] == "ok"]
        if ok:
            best = min(ok, key=step_ms)
            lines.append(f"{name} " + ",".join(f"{k}={int(best[k])}" for k in KEYS) + "\n")
    with open(path, "w") as f:
        f.write("".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="all", help=f"all, or comma-separated of: {', '.join(CASES)}")
    parser.add_argument("--quick", action="store_true", help="eight configurations instead of the full grid")
    parser.add_argument("--best-out", help="write '<case> <MARGINKERN_TRITON_CONFIG value>' of each case's fastest "
                        "configuration to this file (scripts/gpu_session.sh benchmarks with it)")
    parser.add_argument("--out-dir", default=None, help="folder of the sweep's JSON (default: bench/results/<device>/)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("sweep_triton_configs.py needs a CUDA GPU")
    harness.put_repo_on_path()
    names = list(CASES) if args.case == "all" else args.case.split(",")
    if set(names) - set(CASES):
        sys.exit(f"--case: unknown {', '.join(sorted(set(names) - set(CASES)))}; expected all or of {', '.join(CASES)}")
    rows = []
    for config in grid(args.quick):  # config-major: a sweep cut short has measured every case
        for name in names:
            start = time.perf_counter()
            try:
                row = {"case": name, **config, **measure(name, config), "status": "ok"}
            except Exception as e:  # e.g. out of shared memory for this block shape
                row = {"case": name, **config, "status": f"error: {type(e).__name__}: {str(e)[:200]}"}
            row["wall_s"] = time.perf_counter() - start
            print(json.dumps(row), flush=True)
            rows.append(row)
            if args.best_out:  # after every row: a sweep cut short by its time budget still names its best
                write_best(rows, names, args.best_out)
    out = harness.new_result_stem("cuda", "sweep", args.out_dir).with_suffix(".json")  # never over an earlier one
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    for name in names:
        ok = sorted((r for r in rows if r["case"] == name and r["status"] == "ok"), key=step_ms)
        for r in ok[:3]:
            print(f"{name}: kernels {step_ms(r):.3f} ms, fwd {r['fwd_ms']:.3f} ms ({r['fwd_tflops']:.0f} TFLOP/s), "
                  f"chunk {r['chunk_ms']:.3f} ms "
                  f"({r['chunk_tflops']:.0f} TFLOP/s) with " + ",".join(f"{k}={r[k]}" for k in KEYS))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
