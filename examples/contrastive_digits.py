"""End to end: train two encoders contrastively on real data (scikit-learn's bundled 8×8 handwritten digits, no
download) so that the top half of a digit finds its own bottom half among all held-out bottom halves.

    pip install scikit-learn && python examples/contrastive_digits.py [--loss clip|siglip|mnrl] [--steps 300]

Each training step is one batch of every training pair (1347 tops against 1347 bottoms: the in-batch negatives are
all the other digits), with CLIP's symmetric InfoNCE and a learned temperature (`mk.InfoNCELoss(learnable_scale=True,
symmetric=True)`), SigLIP's sigmoid loss with its learned scale and bias (`mk.SigLIPLoss()`), or sentence-transformers'
MultipleNegativesRankingLoss (`mk.info_nce_loss`, scale 20, one direction). Reported on the 450 held-out digits before
and after training: how often a top half's nearest bottom half (cosine) is its own (exact pair, chance 1/450), and how
often it is one of the same digit.
"""
import argparse
import math

import torch
from torch import nn

import marginkern as mk


def load_halves(seed=0):
    """(train tops, train bottoms, test tops, test bottoms, test labels): rows 0–3 and 4–7 of each 8×8 digit."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    train, test = train_test_split(torch.arange(len(labels)), test_size=0.25, random_state=seed, stratify=labels)
    tops, bottoms = images[:, :4].flatten(1), images[:, 4:].flatten(1)
    return tops[train], bottoms[train], tops[test], bottoms[test], labels[test]


def encoder(dim):
    return nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, dim))


@torch.no_grad()
def retrieval(top_net, bottom_net, tops, bottoms, labels):
    """(exact-pair top-1 accuracy, same-digit top-1 accuracy) of each top half's nearest bottom half."""
    a = nn.functional.normalize(top_net(tops), dim=1)
    b = nn.functional.normalize(bottom_net(bottoms), dim=1)
    nearest = (a @ b.T).argmax(1)
    own = torch.arange(len(tops))
    return (nearest == own).float().mean().item(), (labels[nearest] == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", default="clip", choices=["clip", "siglip", "mnrl"])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tr_top, tr_bottom, te_top, te_bottom, te_labels = load_halves(args.seed)
    top_net, bottom_net = encoder(args.dim), encoder(args.dim)
    if args.loss == "clip":
        loss_fn = mk.InfoNCELoss(1 / 0.07, learnable_scale=True, symmetric=True)
    elif args.loss == "siglip":
        loss_fn = mk.SigLIPLoss()
    else:
        loss_fn = mk.InfoNCELoss(20.0)
    before = retrieval(top_net, bottom_net, te_top, te_bottom, te_labels)
    params = list(top_net.parameters()) + list(bottom_net.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-4)
    for step in range(args.steps):
        loss = loss_fn(top_net(tr_top), bottom_net(tr_bottom))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if hasattr(loss_fn, "log_scale"):
            loss_fn.log_scale.data.clamp_(max=math.log(100.0))  # CLIP's clamp of its temperature
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    after = retrieval(top_net, bottom_net, te_top, te_bottom, te_labels)
    print(f"held-out retrieval ({len(te_top)} digits, {args.loss}): exact pair {before[0]:.3f} -> {after[0]:.3f} "
          f"(chance {1 / len(te_top):.4f}), same digit {before[1]:.3f} -> {after[1]:.3f}")
    return after


if __name__ == "__main__":
    main()
