"""Peak of the bytes held by tensors created during a call, from torch.profiler's memory timeline: exact on a CPU,
where the harness can only read the process's resident-set high-water mark (glibc keeps freed blocks).

    python bench/allocation_peak.py    # skip_ignored_rows' memory: linear CE fwd+bwd, fp32, PyTorch tiles

prints, per share of labelled rows, the peak with every row and with skipping, in units of the input's bytes, and the
tensors of at least 1/16 of an input alive at each peak.
"""
import argparse
import os

import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import Action


def allocation_peak(fn):
    """(peak bytes of the tensors fn creates that are alive at once, the sizes of those alive at that moment)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    timeline = prof._memory_profile().timeline
    live, peak, peak_at = 0, 0, -1
    for i, (_, action, _, size) in enumerate(timeline):
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        if live > peak:
            peak, peak_at = live, i
    alive = {}
    for _, action, (key, _), size in timeline[:peak_at + 1]:
        if action == Action.CREATE:
            alive[key] = size
        elif action == Action.DESTROY:
            alive.pop(key, None)
    return peak, sorted(alive.values(), reverse=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(4096, 512, 8192), metavar=("N", "D", "C"))
    parser.add_argument("--backend", default="reference", help="MARGINKERN_BACKEND for the run (default: reference)")
    args = parser.parse_args()
    os.environ["MARGINKERN_BACKEND"] = args.backend
    import marginkern as mk
    N, D, C = args.shape
    torch.manual_seed(0)
    x, w = torch.randn(N, D).requires_grad_(), (0.05 * torch.randn(C, D)).requires_grad_()
    unit = x.numel() * x.element_size()
    print(f"linear_cross_entropy fwd+bwd, N={N} D={D} C={C} fp32, backend {args.backend}; bytes / input bytes")
    for labelled in (1.0, 7 / 8, 3 / 4, 1 / 2, 1 / 4):
        target = torch.randint(0, C, (N,))
        target[:N - int(labelled * N)] = -100
        cells = []
        for skip in (False, True):
            def step():
                mk.linear_cross_entropy(x, w, target, skip_ignored_rows=skip).backward()
            step()  # warm-up: workspaces, lazy initialisation
            x.grad = w.grad = None
            peak, alive = allocation_peak(step)
            x.grad = w.grad = None
            cells.append(f"{peak / unit:6.2f} (alive: {' '.join(f'{s / unit:.3g}' for s in alive if s >= unit / 16)})")
        print(f"labelled {labelled:5.3f}: every row {cells[0]}; skipping {cells[1]}")


if __name__ == "__main__":
    main()
