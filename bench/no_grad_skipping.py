"""What skip_ignored_rows buys a call that needs no gradient (evaluation, a reference model's log-probs under
torch.no_grad), eager and compiled: forward passes only, with a share of the targets ignored (a prompt).

    python bench/no_grad_skipping.py [--shape N D C] [--dtype float32] [--ignored 0.5]

prints the median time (harness.time_ms: CUDA events on a GPU) of linear_cross_entropy and log_probs_and_entropy,
each eager and under torch.compile (Inductor), skipping the ignored rows (the default) and with every row
(skip_ignored_rows=False), beside the labelled rows' logits as one plain matmul (materialised: on a CPU its
first touch of the N × C output's pages can make it slower than the streamed losses).
"""
import argparse

import torch

import harness

harness.put_repo_on_path()
import marginkern  # noqa: E402  (after the path is set)

LOSSES = {
    "linear_cross_entropy": lambda x, w, t, **k: marginkern.linear_cross_entropy(x, w, t, **k),
    "log_probs_and_entropy": lambda x, w, t, **k: marginkern.log_probs_and_entropy(x, w, t, **k)[0],
}


def measure(fn, device):
    with torch.no_grad():
        fn()  # the first call compiles
        return harness.time_ms(harness.Step(fn), device, quick=False)[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(1024, 256, 16384), metavar=("N", "D", "C"))
    parser.add_argument("--dtype", default="float32", choices=sorted(harness.DTYPES))
    parser.add_argument("--ignored", type=float, default=0.5, help="share of the targets at -100 (default 0.5)")
    args = parser.parse_args()
    N, D, C = args.shape
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = harness.DTYPES[args.dtype]
    torch.manual_seed(0)
    x = torch.randn(N, D, device=device, dtype=dtype)
    w = (torch.randn(C, D, device=device, dtype=dtype) / D ** 0.5).to(dtype)
    target = torch.randint(0, C, (N,), device=device)
    target[: int(args.ignored * N)] = -100
    labelled = x[target != -100]
    print(f"{device} {torch.cuda.get_device_name() if device.type == 'cuda' else ''} torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; N={N} D={D} C={C} {args.dtype}, {args.ignored:.0%} of the targets "
          f"ignored, forward only under torch.no_grad, median ms")
    print(f"{'the labelled rows logits, one matmul':<44} {measure(lambda: labelled @ w.t(), device):9.2f}")
    for name, loss in LOSSES.items():
        for mode in ("eager", "compiled"):
            for skip in (None, False):
                fn = (lambda loss=loss, skip=skip: loss(x, w, target, skip_ignored_rows=skip))
                if mode == "compiled":
                    torch._dynamo.reset()
                    fn = torch.compile(fn, dynamic=False, fullgraph=True)
                label = f"{name} {mode} {'skipping' if skip is None else 'every row'}"
                print(f"{label:<44} {measure(fn, device):9.2f}", flush=True)


if __name__ == "__main__":
    main()
