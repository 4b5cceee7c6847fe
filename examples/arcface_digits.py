"""End to end: train a small embedding network with an ArcFace head on real data (scikit-learn's bundled
8×8 handwritten digits, no download), then classify held-out digits by their nearest class centre.

    pip install scikit-learn && python examples/arcface_digits.py [--loss arcface|cosface|sphereface] [--epochs 30]

The head's class centres are the only classifier: after training, argmax_j cos(x, w_j) is the prediction,
which is how face-recognition heads are used for identification.
"""
import argparse

import torch
from torch import nn

import marginkern as mk


def load_digits_split(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return x_tr, x_te, y_tr, y_te


HEADS = {
    "arcface": lambda d, c: mk.ArcFaceLoss(d, c, scale=16.0, margin=0.3),
    "cosface": lambda d, c: mk.CosFaceLoss(d, c, scale=16.0, margin=0.2),
    "sphereface": lambda d, c: mk.SphereFaceLoss(d, c, scale=16.0, margin=2),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=sorted(HEADS), default="arcface")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--embedding-dim", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    x_tr, x_te, y_tr, y_te = load_digits_split()
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, args.embedding_dim))
    head = HEADS[args.loss](args.embedding_dim, 10)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3)
    for epoch in range(args.epochs):
        perm = torch.randperm(len(x_tr))
        total = 0.0
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            loss = head(net(x_tr[idx]), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        if epoch % 10 == 0 or epoch == args.epochs - 1:
            print(f"epoch {epoch:3d}  train loss {total / len(x_tr):.3f}")

    with torch.no_grad():
        emb = nn.functional.normalize(net(x_te), dim=1)
        centres = nn.functional.normalize(head.weight, dim=1)
        accuracy = float(((emb @ centres.t()).argmax(1) == y_te).float().mean())
    print(f"{args.loss}: nearest-centre accuracy on {len(y_te)} held-out digits: {accuracy:.3f}")
    return accuracy


if __name__ == "__main__":
    main()
