"""End to end: train a small embedding network with an ArcFace head on real data (scikit-learn's bundled
8×8 handwritten digits, no download), then classify held-out digits by their nearest class centre.

    pip install scikit-learn && python examples/arcface_digits.py [--loss arcface|cosface|sphereface|subcenter|
                                                                   adaface|magface|elastic|curricularface|mv|
                                                                   arcface-filtered|proxy-anchor]
                                                                  [--epochs 30] [--label-noise 0.2]
                                                                  [--split-classes 0.3]

The head's class centres are the only classifier: after training, argmax_j cos(x, w_j) is the prediction
(with sub-centres, the best of each class's), which is how face-recognition heads are used for
identification. --label-noise p gives a fraction p of the training digits a wrong label; with
--loss subcenter the example then runs sub-center ArcFace's cleaning step: the training digits more than a
threshold away from their class's dominant sub-centre are flagged (`outliers`), the flags are scored against
the labels that were actually flipped, and an ArcFace head is retrained on the digits that were kept.
--split-classes p moves a fraction p of each digit's training labels to a twin class (20 classes, two per digit;
a prediction of either twin counts as its digit): the setting of --loss arcface-filtered, insightface's inter-class
filtering. --loss proxy-anchor trains with Proxy-Anchor (metric learning's proxy loss: no softmax over classes, each
proxy pulls its class's digits and pushes the others) and classifies by the nearest proxy the same way.
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
    "subcenter": lambda d, c: mk.SubCenterArcFaceLoss(d, c, scale=16.0, margin=0.3, subcenters=3),
    # per-sample margins; their norm-based defaults are for face backbones (norms ~ 10–100): these suit the
    # small network here, whose embedding norms start near 1
    "adaface": lambda d, c: mk.AdaFaceLoss(d, c, scale=16.0, margin=0.3, t_alpha=0.1),
    "magface": lambda d, c: mk.MagFaceLoss(d, c, scale=16.0, lower_margin=0.2, upper_margin=0.4, lower_norm=1.0,
                                           upper_norm=10.0, lambda_g=1.0),
    "elastic": lambda d, c: mk.ElasticArcFaceLoss(d, c, scale=16.0, margin=0.3, std=0.05),
    # hard negatives re-weighted (CurricularFace's running t moves faster here: 10 classes, few steps)
    "curricularface": lambda d, c: mk.CurricularFaceLoss(d, c, scale=16.0, margin=0.3, momentum=0.1),
    "mv": lambda d, c: mk.MVSoftmaxLoss(d, c, scale=16.0, margin=0.2, mv_weight=1.12),
    # insightface's inter-class filtering: a non-target cosine above the threshold (a digit that looks like another
    # class, e.g. under a flipped label) counts as 0, without gradient
    "arcface-filtered": lambda d, c: mk.ArcFaceLoss(d, c, scale=16.0, margin=0.3,
                                                    interclass_filtering_threshold=FILTERING_THRESHOLD),
    # a proxy loss instead of a margin softmax, its paper's δ = 0.1, α = 32
    "proxy-anchor": lambda d, c: mk.ProxyAnchorLoss(d, c),
}
FILTERING_THRESHOLD = 0.6


def class_centres(head):
    """The head's (C·K, D) class centres: a margin head's weight, Proxy-Anchor's proxies."""
    return head.proxies if isinstance(head, mk.ProxyAnchorLoss) else head.weight


def flip_labels(y, fraction, seed=1):
    """y with a `fraction` of its labels replaced by another class, and which ones."""
    g = torch.Generator().manual_seed(seed)
    flipped = torch.rand(len(y), generator=g) < fraction
    return torch.where(flipped, (y + torch.randint(1, 10, (len(y),), generator=g)) % 10, y), flipped


def split_classes(y, fraction, seed=2):
    """y with a `fraction` of each digit's labels moved to a twin class (digit + 10): one identity under two labels,
    the inter-class conflict of web-crawled face datasets that insightface's inter-class filtering is for."""
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(len(y), generator=g) < fraction, y + 10, y)


def train(loss, x, y, epochs, embedding_dim, num_classes=10):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, embedding_dim))
    head = HEADS[loss](embedding_dim, num_classes)
    opt = torch.optim.Adam(list(net.parameters()) + list(head.parameters()), lr=3e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            batch_loss = head(net(x[idx]), y[idx])
            opt.zero_grad()
            batch_loss.backward()
            opt.step()
            total += batch_loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"epoch {epoch:3d}  train loss {total / len(x):.3f}")
    return net, head


@torch.no_grad()
def nearest_centre_accuracy(net, head, x, y):
    emb = nn.functional.normalize(net(x), dim=1)
    cosines = emb @ nn.functional.normalize(class_centres(head), dim=1).t()
    cosines = cosines.unflatten(1, (head.num_classes, -1)).amax(2)  # each class's best sub-centre (one without)
    return float((cosines.argmax(1) % 10 == y).float().mean())  # a twin class (--split-classes) is its digit


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=sorted(HEADS), default="arcface")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--label-noise", type=float, default=0.0, help="fraction of training labels flipped")
    parser.add_argument("--split-classes", type=float, default=0.0,
                        help="fraction of each digit's training labels moved to a twin class (digit + 10)")
    parser.add_argument("--outlier-threshold", type=float, default=30.0,
                        help="degrees from the dominant sub-centre beyond which a digit is dropped (subcenter)")
    args = parser.parse_args()

    x_tr, x_te, y_tr, y_te = load_digits_split()
    labels, flipped = flip_labels(y_tr, args.label_noise)
    if args.split_classes > 0:
        labels = split_classes(labels, args.split_classes)
    net, head = train(args.loss, x_tr, labels, args.epochs, args.embedding_dim, 20 if args.split_classes > 0 else 10)
    accuracy = nearest_centre_accuracy(net, head, x_te, y_te)
    noise = f", {flipped.float().mean():.0%} of the training labels flipped" if args.label_noise > 0 else ""
    if args.split_classes > 0:
        noise += f", {(labels >= 10).float().mean():.0%} under a twin class's label"
        with torch.no_grad():  # how close the two centres of one digit ended
            w = nn.functional.normalize(class_centres(head), dim=1)
            twins = (w[:10] * w[10:]).sum(1).mean()
        noise += f"; mean cosine between twin centres {twins:.3f}"
    print(f"{args.loss}: nearest-centre accuracy on {len(y_te)} held-out digits: {accuracy:.3f}{noise}")
    if args.loss != "subcenter" or args.label_noise == 0 or args.split_classes > 0:
        return accuracy

    with torch.no_grad():
        embeddings = net(x_tr)
    dominant = head.subcenter_counts(embeddings, labels).argmax(1)
    print("threshold  flagged  of them flipped (precision)  flipped found (recall)")
    for threshold in sorted({15.0, 30.0, 45.0, 60.0, 75.0, args.outlier_threshold}):
        flagged = head.outliers(embeddings, labels, threshold=threshold, dominant=dominant)
        hits = int((flagged & flipped).sum())
        print(f"{threshold:8.0f}°  {int(flagged.sum()):7d}  {hits / max(1, int(flagged.sum())):27.2f}  "
              f"{hits / max(1, int(flipped.sum())):22.2f}")
    kept = ~head.outliers(embeddings, labels, threshold=args.outlier_threshold, dominant=dominant)
    print(f"retraining ArcFace on the {int(kept.sum())} digits within {args.outlier_threshold:.0f}°")
    net, head = train("arcface", x_tr[kept], labels[kept], args.epochs, args.embedding_dim)
    cleaned = nearest_centre_accuracy(net, head, x_te, y_te)
    print(f"after cleaning: nearest-centre accuracy {cleaned:.3f} (sub-center ArcFace on the noisy labels: "
          f"{accuracy:.3f})")
    return cleaned


if __name__ == "__main__":
    main()
