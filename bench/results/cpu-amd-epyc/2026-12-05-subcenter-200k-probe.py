"""Sub-centres at the csrc issue's CPU scale: N = 512, D = 128, 200000 classes × 3 sub-centres (600000 rows),
fp32, fwd+bwd. Each variant in its own process: median of 3 timed steps after one warm-up, and the peak RSS
growth of one step over the resident set before it (VmHWM reset through /proc/self/clear_refs)."""
import subprocess
import sys

VARIANT = r'''
import re, sys, time, torch, torch.nn.functional as F
import marginkern as mk
torch.manual_seed(0)
N, D, C, K = 512, 128, 200_000, 3
x = torch.randn(N, D, requires_grad=True)
w = (torch.randn(C * K, D) / D ** 0.5).requires_grad_()
t = torch.randint(0, C, (N,))

def naive():
    cos = F.linear(F.normalize(x), F.normalize(w)).unflatten(1, (-1, K)).max(2).values
    rows = torch.arange(N)
    theta = torch.arccos(cos[rows, t].clamp(-1, 1))
    logits = cos.clamp(-1, 1).index_put((rows, t), torch.cos(theta + 0.5))
    return F.cross_entropy(logits * 64.0, t)

def ours():
    return mk.margin_cross_entropy(x, w, t, subcenters=K)

step = {"marginkern": ours, "naive": naive}[sys.argv[1]]
def status(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
def run():
    x.grad = w.grad = None
    loss = step()
    loss.backward()
    return loss.item()
run()
times = []
for _ in range(3):
    t0 = time.perf_counter(); loss = run(); times.append(time.perf_counter() - t0)
x.grad = w.grad = None
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
run()
print(f"{sys.argv[1]}: loss {loss:.4f}, fwd+bwd median {sorted(times)[1] * 1e3:.0f} ms (of {', '.join(f'{s * 1e3:.0f}' for s in times)}), "
      f"peak RSS growth of a step {status('VmHWM') - before:.0f} MiB (gradients: {(N + C * K) * D * 4 / 2**20:.0f} MiB)")
'''

for variant in ("marginkern", "naive"):
    subprocess.run([sys.executable, "-c", VARIANT, variant], check=True)
