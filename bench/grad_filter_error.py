"""The error and the work saved by linear_cross_entropy's gradient filtering (grad_filter_eps).

A synthetic LM head whose softmax looks like a trained one: Zipf unigram prior (bias −1.1·log rank),
content logits of standard deviation `--content-std`, and targets sampled from the model itself (so p_t and
the tail are what training sees). For each eps: the fraction of (class chunk, class) columns the backward
pass keeps, the relative error of dX and dW against the exact gradients (Frobenius and max-entry), and
the fwd+bwd time. Writes bench/results/<device>/<date>-grad-filter.{json,md}.

    python bench/grad_filter_error.py [--device cuda] [--dtype bfloat16] [--N 8192 --D 4096 --V 128256]
"""
import argparse
import datetime
import json
import pathlib
import sys
import time

import torch

import marginkern as mk
import marginkern.engine as engine

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from harness import device_slug  # noqa: E402


def synthetic_head(N, D, V, dtype, device, content_std, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * (content_std / D ** 0.5)
    rank = torch.randperm(V, generator=gen).double() + 1
    bias = (-1.1 * torch.log(rank)).float()
    with torch.no_grad():  # targets drawn from the model's own distribution, in row blocks
        target = torch.cat([torch.multinomial(torch.softmax(x[i:i + 256] @ w.t() + bias, 1), 1, generator=gen)[:, 0]
                            for i in range(0, N, 256)])
    to = dict(device=device, dtype=dtype)
    return x.to(**to), w.to(**to), bias.to(**to), target.to(device)


def fwd_bwd(x, w, b, t, **knobs):
    leaves = [v.detach().requires_grad_() for v in (x, w)]
    loss = mk.linear_cross_entropy(leaves[0], leaves[1], t, b, **knobs)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--N", type=int, default=None)
    parser.add_argument("--D", type=int, default=None)
    parser.add_argument("--V", type=int, default=None)
    parser.add_argument("--content-std", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    N, D, V = (args.N or (8192 if cuda else 512), args.D or (4096 if cuda else 256),
               args.V or (128_256 if cuda else 16_384))
    x, w, b, t = synthetic_head(N, D, V, dtype, args.device, args.content_std)

    exact_loss, (exact_gx, exact_gw) = fwd_bwd(x, w, b, t)
    rows = []
    for eps in (None, "auto", 2.0 ** -12, 1e-3, 1e-2):  # 2⁻¹² is "auto" for bf16
        with engine.count_kept_columns() as kept:
            loss, (gx, gw) = fwd_bwd(x, w, b, t, grad_filter_eps=eps)
        total, survived = map(sum, zip(*kept)) if kept else (V, V)
        err = {}
        for name, got, want in (("dX", gx, exact_gx), ("dW", gw, exact_gw)):
            diff = (got.double() - want.double())
            err[name + " rel fro"] = float(diff.norm() / want.double().norm())
            err[name + " rel max"] = float(diff.abs().max() / want.double().abs().max())
        ms = timed(lambda: fwd_bwd(x, w, b, t, grad_filter_eps=eps), args.repeats)
        rows.append(dict(grad_filter_eps=str(eps), kept_fraction=survived / total, loss=float(loss), ms=ms, **err))
        print(rows[-1], flush=True)

    record = dict(device=device_slug(args.device), date=datetime.date.today().isoformat(), N=N, D=D, V=V,
                  dtype=str(dtype).replace("torch.", ""), content_std=args.content_std,
                  exact_loss=float(exact_loss), rows=rows)
    out = pathlib.Path(__file__).parent / "results" / record["device"] / f"{record['date']}-grad-filter"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    head = (f"Gradient filtering, synthetic Zipf LM head N={N}, D={D}, V={V}, {record['dtype']}, content std "
            f"{args.content_std}, exact loss {record['exact_loss']:.4f} ({record['device']}, {record['date']})\n\n")
    cols = ["grad_filter_eps", "kept_fraction", "dX rel fro", "dX rel max", "dW rel fro", "dW rel max", "ms"]
    table = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        table += "| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |\n"
    out.with_suffix(".md").write_text(head + table)
    print(head + table)


if __name__ == "__main__":
    main()
