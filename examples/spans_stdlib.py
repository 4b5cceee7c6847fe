"""End to end: GlobalPointer span extraction trained with marginkern's fused span loss on real text that every Python
install has: lines of the standard library's source. Three span types, labelled by rule from the tokens: string
literals (from the opening quote to its closing quote), names being called (`name(`) and numbers. The model never
sees the rule; it sees token ids.

    python examples/spans_stdlib.py [--steps 800]

The encoder is a small Transformer over each line's tokens; the GlobalPointer head projects every token to a start
and an end vector per span type, rotates them by position (RoPE, as GlobalPointer does) and scores span (m, n) as
q_m·k_n/√d. `mk.global_pointer_loss` takes q and k (B, L, H, d), the positive spans as m·L + n, and the padding
mask, and never makes the (B, H, L, L) logits; on the held-out lines a span is predicted where its logit is > 0 (ZLPR's
threshold), and the example reports precision, recall and F1 of the predicted spans per type (F1 0.87 strings,
0.90 calls, 0.93 numbers after the default 800 steps, about 40 s on a 2-core VM; about 0.01 before training).
"""
import argparse
import collections
import pathlib
import re
import sysconfig

import torch
from torch import nn

import marginkern as mk

TOKEN = re.compile(r"[A-Za-z_]+|\d+|[^\sA-Za-z_\d]")
TYPES = ("string", "call", "number")


def stdlib_lines(max_lines, min_tokens=4, max_tokens=32):
    """Token lists of the stdlib's source lines (4–32 tokens; lines with an odd number of either quote mark, or with
    a backslash, are left out: their string spans would be ambiguous)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    lines = []
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        for line in text.splitlines():
            tokens = TOKEN.findall(line)
            if not min_tokens <= len(tokens) <= max_tokens or "\\" in tokens:
                continue
            if tokens.count("'") % 2 or tokens.count('"') % 2:
                continue
            lines.append(tokens)
            if len(lines) >= max_lines:
                return lines
    return lines


def spans_of(tokens):
    """{type: [(start, end), ...]} by rule: each quote mark paired with the next one of its kind (strings), a name
    followed by "(" (calls), a run of digits (numbers)."""
    spans = {t: [] for t in TYPES}
    open_quote = {}
    for i, tok in enumerate(tokens):
        if tok in ("'", '"'):
            if tok in open_quote:
                spans["string"].append((open_quote.pop(tok), i))
            elif not open_quote:  # a quote inside another string is that string's text
                open_quote[tok] = i
        elif open_quote:
            continue
        elif tok.isdigit():
            spans["number"].append((i, i))
        elif re.fullmatch(r"[A-Za-z_]+", tok) and i + 1 < len(tokens) and tokens[i + 1] == "(":
            spans["call"].append((i, i))
    return spans


def encode(lines, vocab_size, L):
    """(ids (N, L), mask (N, L), positives (N, H, P) spans m·L + n padded with −100)."""
    counts = collections.Counter(tok for line in lines for tok in line)
    index = {tok: i + 2 for i, (tok, _) in enumerate(counts.most_common(vocab_size - 2))}  # 0 padding, 1 unknown
    ids = torch.zeros(len(lines), L, dtype=torch.long)
    spans = [spans_of(line) for line in lines]
    P = max(1, max(len(s[t]) for s in spans for t in TYPES))
    positives = torch.full((len(lines), len(TYPES), P), -100)
    for i, (line, line_spans) in enumerate(zip(lines, spans)):
        ids[i, :len(line)] = torch.tensor([index.get(tok, 1) for tok in line])
        for h, t in enumerate(TYPES):
            for j, (m, n) in enumerate(line_spans[t]):
                positives[i, h, j] = m * L + n
    return ids, ids != 0, positives


def rope(x):
    """Rotary position embedding of x (B, L, H, d) along L, as GlobalPointer applies it to its starts and ends."""
    B, L, H, d = x.shape
    position = torch.arange(L, dtype=torch.float32)[:, None]
    frequency = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angle = (position * frequency)[None, :, None, :]  # (1, L, 1, d/2)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * angle.cos() - odd * angle.sin(), even * angle.sin() + odd * angle.cos()], -1).flatten(-2)


class SpanModel(nn.Module):
    def __init__(self, vocab_size, L, width=64, heads=len(TYPES), head_dim=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width, padding_idx=0)
        self.position = nn.Parameter(torch.randn(L, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.heads, self.head_dim = heads, head_dim
        self.pointer = nn.Linear(width, heads * 2 * head_dim)

    def forward(self, ids, mask):
        """(q, k) (B, L, H, d): each token's start and end vectors per span type, rotated by position."""
        h = self.encoder(self.embed(ids) + self.position, src_key_padding_mask=~mask)
        B, L, _ = h.shape
        qk = self.pointer(h).view(B, L, self.heads, 2 * self.head_dim)
        return rope(qk[..., :self.head_dim]), rope(qk[..., self.head_dim:])


@torch.no_grad()
def span_scores(model, ids, mask, positives):
    """{type: (precision, recall, F1)} of the spans whose logit is > 0 (upper triangle, no padding) against the
    labelled ones."""
    q, k = model(ids, mask)
    B, L, H, d = q.shape
    logits = torch.einsum("bmhd,bnhd->bhmn", q, k) / d ** 0.5
    kept = mask[:, None, :, None] & mask[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).triu()
    predicted = (logits > 0) & kept
    gold = torch.zeros(B, H, L * L + 1, dtype=torch.bool).scatter_(-1, torch.where(positives >= 0, positives, L * L),
                                                                   True)[..., :L * L].view(B, H, L, L)
    scores = {}
    for h, t in enumerate(TYPES):
        hit = (predicted[:, h] & gold[:, h]).sum().item()
        n_predicted, n_gold = predicted[:, h].sum().item(), gold[:, h].sum().item()
        precision, recall = hit / max(n_predicted, 1), hit / max(n_gold, 1)
        scores[t] = (precision, recall, 2 * precision * recall / max(precision + recall, 1e-12))
    return scores


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    L = 32
    lines = stdlib_lines(args.lines)
    ids, mask, positives = encode(lines, args.vocab, L)
    order = torch.randperm(len(lines))
    test, train = order[:2000], order[2000:]
    model = SpanModel(args.vocab, L)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    before = span_scores(model, ids[test], mask[test], positives[test])
    for step in range(args.steps):
        batch = train[torch.randint(0, len(train), (args.batch,))]
        q, k = model(ids[batch], mask[batch])
        # ZLPR per (line, span type), summed over the types and averaged over the lines as GPLinker does
        loss = mk.global_pointer_loss(q, k, positives[batch], mask=mask[batch], reduction="none").sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    after = span_scores(model, ids[test], mask[test], positives[test])
    print(f"{len(train)} training lines, {len(test)} held out; spans with logit > 0 against the rule's labels:")
    print(f"{'type':8s} {'P':>6s} {'R':>6s} {'F1':>6s}   (before training: F1)")
    for t in TYPES:
        p, r, f = after[t]
        print(f"{t:8s} {p:6.3f} {r:6.3f} {f:6.3f}   ({before[t][2]:.3f})")
    return before, after


if __name__ == "__main__":
    main()
