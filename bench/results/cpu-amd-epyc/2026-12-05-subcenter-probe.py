"""Sub-centres on the CPU at (256, 128, 60000 rows): the C++ op halves at K = 1 and K = 3 over the same rows,
and a whole fwd+bwd on each CPU backend (median of 7 calls, ms)."""
import os
import time

import torch

import marginkern as mk

torch.manual_seed(0)
N, D, R = 256, 128, 60000
x = torch.randn(N, D, requires_grad=True)
w = (torch.randn(R, D) / D ** 0.5).requires_grad_()
t = torch.randint(0, R, (N,))
op = torch.ops.marginkern


def median_ms(f, reps=7):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return sorted(times)[reps // 2] * 1e3


for K in (1, 3):
    tk = t // K
    args = (64.0, 1.0, 0.5, 0.0, True, True, 0.0, -100)
    forward = lambda: op.margin_ce_rows(x.detach(), w.detach(), tk, *args, K)  # noqa: E731
    loss, lse, state, norms = forward()
    backward = lambda: op.margin_ce_rows_backward(torch.ones(N), x.detach(), w.detach(), tk, lse, state, norms,  # noqa
                                                  *args, True, K)
    print(f"C++ op halves, K={K}: forward {median_ms(forward):.1f} ms, backward {median_ms(backward):.1f} ms")


def step(K):
    def run():
        x.grad = w.grad = None
        mk.margin_cross_entropy(x, w, t // K, subcenters=K).backward()
    return run


for backend in ("cpp", "reference"):
    os.environ["MARGINKERN_BACKEND"] = backend
    print(f"fwd+bwd on {backend}: K=1 {median_ms(step(1)):.1f} ms, K=3 {median_ms(step(3)):.1f} ms")
