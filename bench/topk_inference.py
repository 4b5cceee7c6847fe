"""Top-k of an LM head's (or a face head's) logits, inference only: marginkern.linear_topk against torch.topk of the
materialised logits (and their log-sum-exp), time and peak memory, each provider in a fresh process.

    python bench/topk_inference.py                       # CPU: N=2048, D=256, C=128000, k=64, fp32
    python bench/topk_inference.py --n 8192 --d 4096 --c 128256 --dtype bfloat16   # a GPU, Llama-3-8B's head

Forward only, so not a family of bench/run.py (whose steps are training steps and whose floor is 3 GEMMs): here the
floor is the one logits GEMM. Extra memory: CUDA max_memory_allocated above the inputs; CPU the resident set's
high-water mark (ru_maxrss) above the resident set with the inputs made. Prints one line per provider.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch


def inputs(args, device):
    """(x, w) made in their dtype and scaled in place: no temporary raises the CPU's high-water mark before the
    measurement's baseline."""
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.n, args.d, device=device, dtype=dtype)
    w = torch.randn(args.c, args.d, device=device, dtype=dtype).div_(args.d ** 0.5)
    return x, w


def materialised(x, w, k):
    z = (x @ w.t()).float()
    values, indices = z.topk(k, dim=1)
    return values, indices, z.logsumexp(1)


def provider_fn(name, k):
    import marginkern as mk
    if name == "marginkern":
        return lambda x, w: mk.linear_topk(x, w, k, return_lse=True)
    if name == "materialised":
        return lambda x, w: materialised(x, w, k)
    if name == "logits GEMM (floor)":
        return lambda x, w: x @ w.t()
    raise ValueError(name)


def _current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(args, name):
    """(median ms, extra MB) of one provider in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    x, w = inputs(args, device)
    fn = provider_fn(name, args.k)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # the resident set now, not the high-water mark so far (importing torch peaks above what stays); a peak before
    # this point above now + the provider's own would hide part of it: the inputs are made without temporaries
    rss_before = _current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.no_grad():
        fn(x, w)  # warm-up (and the memory high-water mark)
        sync()
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            fn(x, w)
            sync()
            times.append((time.perf_counter() - start) * 1e3)
    if device.type == "cuda":
        extra = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    return statistics.median(times), extra, str(device)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--c", type=int, default=128_000)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--cpu", action="store_true", help="the CPU even where CUDA is present")
    parser.add_argument("--provider", default=None, help=argparse.SUPPRESS)  # the child process's one provider
    args = parser.parse_args()
    if args.provider:
        print(json.dumps(measure(args, args.provider)))
        return
    print(f"# linear_topk: N={args.n} D={args.d} C={args.c} k={args.k} {args.dtype}, median of {args.reps}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")
    for name in ("logits GEMM (floor)", "materialised", "marginkern"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--provider", name], capture_output=True,
                             text=True, check=True).stdout
        ms, extra, device = json.loads(out.strip().splitlines()[-1])
        print(f"{name:22s} {device:5s} {ms:9.2f} ms   extra {extra:8.1f} MB")


if __name__ == "__main__":
    main()
