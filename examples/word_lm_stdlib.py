"""End to end: a word-level language model over a 16k vocabulary, trained with marginkern's fused linear
cross-entropy (tied input/output embedding, z-loss) on real text that every Python install has: the source
of the standard library. Then, on held-out text and the trained head, what gradient filtering would drop
and how much it changes the gradients (linear_cross_entropy(grad_filter_eps=...)).

    python examples/word_lm_stdlib.py [--steps 400] [--vocab 16384] [--write-results]

The model is a Bengio-style n-gram MLP (the previous `--context` tokens' embeddings → hidden state of the
embedding width), small enough for a CPU; the loss never materialises the batch × vocabulary logits.
"""
import argparse
import collections
import datetime
import math
import pathlib
import re
import sys
import sysconfig

import torch
import torch.nn.functional as F
from torch import nn

import marginkern as mk

TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")


def stdlib_tokens(max_chars):
    """Tokens (identifiers/words, numbers, single punctuation marks) of the stdlib's .py files, sorted by path."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text, size = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            chunk = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        text.append(chunk)
        size += len(chunk)
        if size >= max_chars:
            break
    return TOKEN.findall("\n".join(text))


def encode(tokens, vocab_size):
    """Ids of the vocab_size − 1 most frequent tokens, the rest → 0 (<unk>)."""
    common = [tok for tok, _ in collections.Counter(tokens).most_common(vocab_size - 1)]
    index = {tok: i + 1 for i, tok in enumerate(common)}
    return torch.tensor([index.get(tok, 0) for tok in tokens])


class NGramLM(nn.Module):
    def __init__(self, vocab, dim, context):
        super().__init__()
        self.embedding = nn.Embedding(vocab, dim)
        nn.init.normal_(self.embedding.weight, std=dim ** -0.5)
        self.mlp = nn.Sequential(nn.Linear(context * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
                                 nn.LayerNorm(dim))

    def hidden(self, context_ids):
        return self.mlp(self.embedding(context_ids).flatten(1))


def windows(ids, context, starts):
    """(context ids (B, context), next ids (B,)) for the given start positions."""
    offsets = torch.arange(context)
    return ids[starts[:, None] + offsets], ids[starts + context]


def filter_effect(model, ids, context, batch, eps_list):
    """Per eps: kept fraction of (chunk, class) columns and relative errors of dX, dW vs exact."""
    import marginkern.engine as engine
    starts = torch.linspace(0, len(ids) - context - 1, batch).long()  # spread over the held-out text
    x_ids, target = windows(ids, context, starts)
    with torch.no_grad():
        hidden = model.hidden(x_ids)
    weight = model.embedding.weight.detach()

    def grads(eps):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        return torch.autograd.grad(mk.linear_cross_entropy(h, w, target, z_loss=1e-4, grad_filter_eps=eps), (h, w))

    exact = grads(None)
    rows = []
    for eps in eps_list:
        with engine.count_kept_columns() as kept:
            got = grads(eps)
        total, survived = map(sum, zip(*kept))
        errors = [float((g - e).norm() / e.norm()) for g, e in zip(got, exact)]
        rows.append((eps, survived / total, *errors))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--max-chars", type=int, default=4_000_000)
    parser.add_argument("--write-results", action="store_true",
                        help="write the filtering table to bench/results/<device>/<date>-grad-filter-word-lm.md")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    ids = encode(stdlib_tokens(args.max_chars), args.vocab)
    split = int(0.9 * len(ids))
    train, held_out = ids[:split], ids[split:]
    print(f"{len(ids)} tokens of CPython's stdlib source, vocabulary {args.vocab} "
          f"({float((ids == 0).float().mean()):.1%} <unk>)")

    model = NGramLM(args.vocab, args.dim, args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(args.steps):
        x_ids, target = windows(train, args.context, torch.randint(0, len(train) - args.context, (args.batch,)))
        loss = mk.linear_cross_entropy(model.hidden(x_ids), model.embedding.weight, target, z_loss=1e-4)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train loss {float(loss.detach()):.3f}")

    with torch.no_grad():  # held-out loss, fused and materialised (they must agree)
        x_ids, target = windows(held_out, args.context, torch.arange(0, len(held_out) - args.context - 1, 3)[:4096])
        hidden = model.hidden(x_ids)
        fused = float(mk.linear_cross_entropy(hidden, model.embedding.weight, target))
        materialised = float(F.cross_entropy(hidden @ model.embedding.weight.t(), target))
    print(f"held-out loss {fused:.4f} (perplexity {math.exp(fused):.1f}; materialised logits: {materialised:.4f}; "
          f"uniform over the vocabulary: {math.log(args.vocab):.2f})")

    eps_list = [2.0 ** -12, 1e-3, 1e-2]
    rows = filter_effect(model, held_out, args.context, 2048, eps_list)
    table = ("| grad_filter_eps | kept classes | dX rel. error | dW rel. error |\n|---|---|---|---|\n"
             + "".join(f"| {eps:.3g} | {k:.1%} | {ex:.2e} | {ew:.2e} |\n" for eps, k, ex, ew in rows))
    print("gradient filtering on 2048 held-out positions of the trained model:\n" + table)
    if args.write_results:
        repo = pathlib.Path(__file__).resolve().parents[1]
        sys.path.insert(0, str(repo / "bench"))
        from harness import device_slug
        out = repo / "bench" / "results" / device_slug("cpu") / f"{datetime.date.today()}-grad-filter-word-lm.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"Gradient filtering on a word-level LM (examples/word_lm_stdlib.py, {args.steps} steps, "
                       f"vocabulary {args.vocab}, dim {args.dim}), 2048 held-out positions, fp32, "
                       f"held-out loss {fused:.4f}\n\n" + table)
        print(f"wrote {out}")
    return fused, materialised, rows


if __name__ == "__main__":
    main()
