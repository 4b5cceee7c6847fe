"""End to end: DPO teaches a word-level LM a style, on real text, without ever building its logits.

The LM of word_lm_stdlib.py (an n-gram MLP over a vocabulary of the stdlib source's most frequent tokens) is first
trained on that source with marginkern's fused linear cross-entropy. Then, with a frozen copy as the reference
model, DPO (marginkern.LinearDPOLoss, reference log-probabilities precomputed by marginkern.sequence_log_probs)
trains it to prefer single-quoted strings: each pair is a real 8-token continuation containing a quote mark, chosen
with every quote written ', rejected with every quote written ". On held-out text the script reports, before and
after DPO, how often the implicit reward ranks the pairs right and the probability the model gives ' against " where
the source has a quote mark next.

    python examples/dpo_quotes_stdlib.py [--sft-steps 300] [--dpo-steps 150]
"""
import argparse
import copy

import torch

import marginkern as mk
from word_lm_stdlib import NGramLM, encode, stdlib_tokens, windows

PROMPT, COMPLETION = 4, 8  # the n-gram context, then the tokens the preference is about


def quote_pairs(ids, single, double, starts):
    """(chosen, rejected) token sequences (n, PROMPT + COMPLETION) from the windows at `starts` whose completion holds
    a quote mark: every quote of the completion written ' (chosen) or " (rejected); the prompt as it is."""
    offsets = torch.arange(PROMPT + COMPLETION)
    seq = ids[starts[:, None] + offsets]
    completion = seq[:, PROMPT:]
    keep = ((completion == single) | (completion == double)).any(1)
    seq = seq[keep]
    quote = torch.zeros_like(seq, dtype=torch.bool)
    quote[:, PROMPT:] = (seq[:, PROMPT:] == single) | (seq[:, PROMPT:] == double)
    return torch.where(quote, single, seq), torch.where(quote, double, seq)


def completion_hidden(model, seq):
    """The hidden state before each completion token (B, COMPLETION, D) and the completion tokens (B, COMPLETION)."""
    contexts = torch.stack([seq[:, t - PROMPT:t] for t in range(PROMPT, PROMPT + COMPLETION)], 1)  # (B, L, PROMPT)
    hidden = model.hidden(contexts.reshape(-1, PROMPT)).reshape(seq.shape[0], COMPLETION, -1)
    return hidden, seq[:, PROMPT:]


def pair_batch(model, chosen, rejected):
    """The DPO head's layout: the chosen sequences, then the rejected ones."""
    hidden, target = completion_hidden(model, torch.cat([chosen, rejected]))
    return hidden, target


@torch.no_grad()
def evaluate(model, reference, ids, single, double):
    """(share of held-out pairs the implicit reward ranks right, ties counting half (before DPO the policy is the
    reference: every margin 0), mean P(') / (P(') + P(")) where a quote mark is next in the held-out source)."""
    starts = torch.arange(0, len(ids) - PROMPT - COMPLETION, 5)
    chosen, rejected = quote_pairs(ids, single, double, starts)
    hidden, target = pair_batch(model, chosen, rejected)
    ref_hidden, _ = pair_batch(reference, chosen, rejected)
    n = chosen.shape[0]
    margin = (mk.sequence_log_probs(hidden, model.embedding.weight, target)
              - mk.sequence_log_probs(ref_hidden, reference.embedding.weight, target))
    accuracy = float(((margin[:n] > margin[n:]).float() + 0.5 * (margin[:n] == margin[n:]).float()).mean())
    at = torch.nonzero((ids[PROMPT:] == single) | (ids[PROMPT:] == double))[:, 0]
    probs = torch.softmax(model.hidden(windows(ids, PROMPT, at)[0]) @ model.embedding.weight.t(), -1)
    share = float((probs[:, single] / (probs[:, single] + probs[:, double])).mean())
    return accuracy, share, n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=150)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=96)
    parser.add_argument("--pairs", type=int, default=64, help="pairs per DPO step")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-chars", type=int, default=2_000_000)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    tokens = stdlib_tokens(args.max_chars)
    ids = encode(tokens, args.vocab)
    vocabulary = {tok: int(i) for tok, i in zip(tokens, ids) if i}
    single, double = vocabulary["'"], vocabulary['"']
    split = int(0.9 * len(ids))
    train, held_out = ids[:split], ids[split:]

    model = NGramLM(args.vocab, args.dim, PROMPT)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(args.sft_steps):  # supervised pre-training: the fused linear cross-entropy
        x_ids, target = windows(train, PROMPT, torch.randint(0, len(train) - PROMPT, (512,)))
        loss = mk.linear_cross_entropy(model.hidden(x_ids), model.embedding.weight, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"SFT: {args.sft_steps} steps, last loss {float(loss.detach()):.3f}")

    reference = copy.deepcopy(model).requires_grad_(False)
    before = evaluate(model, reference, held_out, single, double)
    print(f"before DPO: implicit-reward accuracy {before[0]:.3f} on {before[2]} held-out pairs, "
          f"P(') / (P(') + P(\")) where a quote is next {before[1]:.3f}")

    head = mk.LinearDPOLoss(beta=args.beta)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(args.dpo_steps):
        chosen, rejected = quote_pairs(train, single, double,
                                       torch.randint(0, len(train) - PROMPT - COMPLETION, (16 * args.pairs,)))
        chosen, rejected = chosen[:args.pairs], rejected[:args.pairs]
        with torch.no_grad():
            ref_hidden, target = pair_batch(reference, chosen, rejected)
            ref = mk.sequence_log_probs(ref_hidden, reference.embedding.weight, target)
        hidden, target = pair_batch(model, chosen, rejected)
        n = chosen.shape[0]
        out = head(hidden, model.embedding.weight, target, ref_chosen_logps=ref[:n], ref_rejected_logps=ref[n:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.dpo_steps - 1:
            accuracy = float((out.chosen_rewards > out.rejected_rewards).float().mean())
            print(f"DPO step {step:4d}  loss {float(out.loss.detach()):.4f}  reward accuracy {accuracy:.2f}  "
                  f"margin {float((out.chosen_rewards - out.rejected_rewards).mean()):.3f}")

    after = evaluate(model, reference, held_out, single, double)
    print(f"after DPO: implicit-reward accuracy {after[0]:.3f} on {after[2]} held-out pairs, "
          f"P(') / (P(') + P(\")) where a quote is next {after[1]:.3f}")
    return before, after


if __name__ == "__main__":
    main()
