"""Count the host-side work of one fwd+bwd step on the CPU: the outermost ATen ops (each a kernel launch or
a dispatcher call on the GPU) and the Triton launches, per op of marginkern. A proxy for the per-step host
cost that makes small GPU cases launch-bound, countable without a GPU.

    TRITON_INTERPRET=1 MARGINKERN_BACKEND=triton python bench/count_host_ops.py margin --dtype bfloat16

Run through Triton's interpreter (the GPU path's host code); the interpreter's own work inside a launch
is left out. Views and no-op casts count too (they cost dispatcher time, not launches). Prints, writes
nothing.

    TRITON_INTERPRET=1 MARGINKERN_BACKEND=triton python bench/count_host_ops.py margin --time

`--time` times the step's host side instead: every Triton launch replaced by a no-op, tiny shapes (the
ATen ops then cost about their dispatch, as a CUDA launch's host side does), one thread. It leaves out
Triton's own launch path (argument binding, the driver call: tens of µs each on a GPU host), so it is a
lower bound of the host time of a GPU step, on this machine's CPU.
"""
import argparse
import collections
import time

import torch
from torch.profiler import ProfilerActivity, profile

LAUNCH = "triton launch: "


def count_launches():
    """Wrap the interpreter's kernel runs in profiler ranges, so that their inner ops can be told apart."""
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def traced(self, *args, **kwargs):
        with torch.profiler.record_function(LAUNCH + self.fn.__name__):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = traced


def skip_launches():
    """Every Triton launch does nothing (the outputs stay uninitialised): the host side alone is timed."""
    from triton.runtime.interpreter import InterpretedFunction
    InterpretedFunction.run = lambda self, *args, **kwargs: None


def host_microseconds(step, reps=300):
    for _ in range(20):
        step()
    start = time.perf_counter()
    for _ in range(reps):
        step()
    return (time.perf_counter() - start) / reps * 1e6


def step_of(loss, dtype, N=64, D=64, C=3000):
    import marginkern as mk
    torch.manual_seed(0)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(C, D, dtype=dtype, requires_grad=True)
    t = torch.randint(0, C, (N,))
    fn = {"margin": lambda: mk.margin_cross_entropy(x, w, t),
          "linear": lambda: mk.linear_cross_entropy(x, w, t),
          "emo": lambda: mk.emo_cross_entropy(x, w, t),
          # CoSENT from embeddings: N pairs of the rows of x and the first N rows of w, integer labels
          "cosent": lambda: mk.cosent_embedding_loss(x, w[:N], t % 5)}[loss]
    def step():
        x.grad = w.grad = None
        fn().backward()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loss", choices=["margin", "linear", "emo", "cosent"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--time", action="store_true", help="time the host side (no-op launches, tiny shapes)")
    args = parser.parse_args()
    if args.time:
        torch.set_num_threads(1)
        skip_launches()
        step = step_of(args.loss, getattr(torch, args.dtype), N=256, D=16, C=256)
        print(f"{args.loss}, {args.dtype}: {host_microseconds(step):.0f} µs of host time per fwd+bwd "
              "(Triton launches skipped: a lower bound)")
        return
    try:
        count_launches()
    except ImportError:  # no Triton: the ops of another backend are counted all the same
        pass
    step = step_of(args.loss, getattr(torch, args.dtype))
    step()  # compile, warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    by_op, launches = collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.name.startswith(LAUNCH):
            launches[event.name[len(LAUNCH):]] += 1
        if not event.name.startswith("aten::"):
            continue
        owner, parent = "outside marginkern's ops", event.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue  # an op inside another op: not a call of its own
        inside_launch = False
        while parent is not None:
            inside_launch |= parent.name.startswith(LAUNCH)
            if parent.name.startswith("marginkern::"):
                owner = parent.name
            parent = parent.cpu_parent
        if not inside_launch:
            by_op[owner] += 1
    print(f"{args.loss}, {args.dtype}: {sum(by_op.values())} outermost ATen ops, "
          f"{sum(launches.values())} Triton launches")
    for owner, n in by_op.most_common():
        print(f"  {n:4d}  {owner}")
    for name, n in launches.most_common():
        print(f"  {n:4d}× {name}")


if __name__ == "__main__":
    main()
