"""Where one training step's time goes: torch.profiler over a few fwd+bwd steps of one (case, provider).

    python bench/profile_step.py face face-small-100k marginkern [more providers...]

Prints, per provider: wall time per step (host clock, synchronized), the GPU's busy time per step (sum of
its kernels), kernel launches per step, and the kernels that take the most GPU time. Wall ≫ GPU busy
means the step is bound by the host (launches, Python); a kernel far above its FLOP/byte share is the
one to fix. On the CPU (--device cpu, or without CUDA) the same table lists the ops by their own CPU
time instead of kernels. Prints, writes nothing.
"""
import argparse
import importlib
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import harness
from run import CASE_MODULES


def profile_provider(module, case, provider, device, steps=5, top=12):
    torch.manual_seed(0)
    step = module.PROVIDERS[provider](case, device)
    for _ in range(3):
        step.fn()
    harness.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step.fn()
    harness.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step.fn()
        harness.synchronize(device)
    kernels = defaultdict(lambda: [0, 0.0])  # name → [launches (CPU: calls), µs]
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.device_time_total
        elif not cuda and event.name.startswith("aten::"):
            kernels[event.name][0] += 1
            kernels[event.name][1] += event.self_cpu_time_total
    busy_ms = sum(us for _, us in kernels.values()) / 1e3 / steps
    launches = sum(n for n, _ in kernels.values()) / steps
    what = ("GPU busy", "kernels") if cuda else ("in aten ops", "aten calls")
    print(f"\n== {case.name} (N={case.N}, D={case.D}, C={case.C}, {case.dtype}) · {provider}: "
          f"wall {wall_ms:.3f} ms/step, {what[0]} {busy_ms:.3f} ms/step, {launches:.0f} {what[1]}/step")
    for name, (n, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"  {us / steps / 1e3:9.3f} ms  {n / steps:5.1f}×  {name[:110]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=list(CASE_MODULES))
    parser.add_argument("case")
    parser.add_argument("providers", nargs="+")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    args = parser.parse_args()
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    harness.put_repo_on_path()
    module = importlib.import_module(CASE_MODULES[args.family])
    cases = {c.name: c for c in module.cases(device_type, False)}
    if args.case not in cases:
        raise SystemExit(f"case: no {args.case!r} on {device_type}; expected one of {', '.join(cases)}")
    for provider in args.providers:
        try:
            profile_provider(module, cases[args.case], provider, torch.device(device_type))
        except Exception as e:  # one provider's failure (a Skip, an OOM) must not hide the others'
            print(f"\n== {args.case} · {provider}: {type(e).__name__}: {e}")
        if device_type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
