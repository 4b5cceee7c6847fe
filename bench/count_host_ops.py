"""Count the host-side work of one fwd+bwd step on the CPU: the outermost ATen ops (each a kernel launch or
a dispatcher call on the GPU) and the Triton launches, per op of marginkern. A proxy for the per-step host
cost that makes small GPU cases launch-bound, countable without a GPU.

    TRITON_INTERPRET=1 MARGINKERN_BACKEND=triton python bench/count_host_ops.py margin --dtype bfloat16

Run through Triton's interpreter (the GPU path's host code); the interpreter's own work inside a launch
is left out. Views and no-op casts count too (they cost dispatcher time, not launches). Prints, writes
nothing.
"""
import argparse
import collections

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


def step_of(loss, dtype, N=64, D=64, C=3000):
    import marginkern as mk
    torch.manual_seed(0)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(C, D, dtype=dtype, requires_grad=True)
    t = torch.randint(0, C, (N,))
    fn = {"margin": lambda: mk.margin_cross_entropy(x, w, t),
          "linear": lambda: mk.linear_cross_entropy(x, w, t),
          "emo": lambda: mk.emo_cross_entropy(x, w, t)}[loss]
    return lambda: fn().backward()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loss", choices=["margin", "linear", "emo"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args()
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
