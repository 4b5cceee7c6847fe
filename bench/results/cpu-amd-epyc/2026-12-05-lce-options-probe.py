"""linear_cross_entropy's options on the CPU at the csrc issue's (512, 128, 200000) fp32: fwd+bwd time of the plain
call against label smoothing, class weights, the returned lse, the token accuracy and the 3-GEMM knob, one process,
alternating, median of 5 calls after one warm-up each. Output: the .txt of the same name."""
import statistics
import time

import torch

import marginkern as mk

torch.manual_seed(0)
N, D, C = 512, 128, 200_000
x = torch.randn(N, D, requires_grad=True)
w = (torch.randn(C, D) / D ** 0.5).requires_grad_()
t = torch.randint(0, C, (N,))
c = torch.rand(C) + 0.5
CONFIGS = {
    "plain": {},
    "label_smoothing=0.1": dict(label_smoothing=0.1),
    "class_weight": dict(class_weight=c),
    "class_weight + label_smoothing=0.1": dict(class_weight=c, label_smoothing=0.1),
    "return_lse": dict(return_lse=True),
    "return_token_accuracy": dict(return_token_accuracy=True),
    "logits_buffer_mb=64": dict(logits_buffer_mb=64),
    "logits_buffer_mb=256": dict(logits_buffer_mb=256),
}


def step(kw):
    x.grad = w.grad = None
    start = time.perf_counter()
    out = mk.linear_cross_entropy(x, w, t, **kw)
    (out[0] if isinstance(out, tuple) else out).backward()
    return time.perf_counter() - start


times = {name: [] for name in CONFIGS}
for kw in CONFIGS.values():
    step(kw)  # warm-up
for _ in range(5):
    for name, kw in CONFIGS.items():
        times[name].append(step(kw))
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, (N, D, C) = ({N}, {D}, {C}) fp32, fwd+bwd")
for name, ts in times.items():
    print(f"{name:36s} median {1000 * statistics.median(ts):7.1f} ms   calls " + " ".join(f"{1000 * v:.0f}" for v in ts))
