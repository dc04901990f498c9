"""Linear evaluation: how good are a pre-trained encoder's features, stage by stage?

    python linear_eval.py runs/loco/ckpt.pt                    # fast (default), see below
    python linear_eval.py runs/loco/ckpt.pt --protocol paper   # the paper's (Sec. 5.1)
    python linear_eval.py runs/loco/ckpt.pt --random-init      # same probe, untrained encoder

The encoder is rebuilt from the configuration stored in the checkpoint and frozen. Features are
each stage's output, global-average-pooled, and every stage gets its own linear classifier, so the
table shows where in the network each method's representation becomes good. Plus kNN accuracy on
the final stage (k=200, cosine similarity, votes weighted by exp(similarity / 0.1)).

Protocols:
- fast: features computed once without augmentation; one multinomial logistic regression per
  stage (standardised features, full-batch L-BFGS), its L2 weight chosen on a held-out 10% of the
  training split, never on the test split, then refit on the whole training split.
- paper: SGD without momentum, learning rate 30, 100 epochs, x0.1 at epochs 30, 60 and 90,
  batch 256, random resized crop and flip (as MoCo's linear evaluation, which the paper follows).
  Learning rate 30 suits the small, sparse features of a full-size ResNet-50. On raw features
  of a narrow encoder (large, shared offsets in every dimension) plain SGD oscillates or crawls:
  the fast protocol standardises features and does not have this problem.

Why the frozen encoder runs in eval mode: in train mode BatchNorm normalises with the statistics
of the current batch and updates its running averages at every forward. The features would then
depend on what else is in the batch, and the running averages, which are part of the encoder,
would drift: an evaluation that quietly adapts the backbone. In eval mode BatchNorm uses the
statistics stored at pre-training. The script checks at the end that every tensor of the
encoder's state is bit-identical to what it loaded.

Writes the table as JSON beside the checkpoint: linear_eval_<protocol>[_random].json.
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import cli
import augment
import data
import model
import recipe
import runtime
from cli import UserError


MIN_IMAGES = 20
KNN_K = 200


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cli.parser(__doc__, "linear_eval.py")
    p.add_argument("ckpt", help="a ckpt.pt written by train.py")
    p.add_argument("--protocol", default="fast", choices=["fast", "paper"])
    p.add_argument("--random-init", action="store_true", help="evaluate an untrained encoder")
    p.add_argument("--data-dir", default=None, help="default: the one used in pre-training")
    p.add_argument("--subset", type=cli.at_least_zero(int), default=0,
                   help="quick check: the first N train and N test images only (0: all)")
    p.add_argument("--epochs", type=cli.positive(int), default=100, help="paper protocol only")
    p.add_argument("--batch-size", type=cli.positive(int), default=256, help="paper protocol only")
    p.add_argument("--lr", type=cli.positive(float), default=30.0, help="paper protocol only")
    p.add_argument("--out", default=None, help="the JSON; default: beside the checkpoint, "
                   "linear_eval_<protocol>[_random].json")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS)
    args = p.parse_args(argv)
    if 0 < args.subset < MIN_IMAGES:
        p.error(f"--subset {args.subset}: the fast probe holds out a tenth of the training "
                f"images to choose its L2 penalty; give at least {MIN_IMAGES} (or 0: all)")
    return args


@torch.no_grad()
def stage_features(encoder: model.StagedEncoder, batches, info: data.DatasetInfo,
                   rt: runtime.Runtime) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Global-average-pooled output of every stage, a list of (N, C_k) float32, and labels (N,),
    from (uint8 images, labels) batches. The encoder runs in eval mode (module docstring: why)."""
    encoder.eval()
    out, labels = [[] for _ in encoder.stages], []
    for x, y in batches:
        h = rt.prepare(augment.standardize(x.to(rt.device), info.mean, info.std))
        for k, stage in enumerate(encoder.stages):
            h = stage(h)
            out[k].append(h.float().mean((2, 3)))   # (b, C_k)
        labels.append(y.to(rt.device))
    return [torch.cat(f) for f in out], torch.cat(labels)


def fit_linear(x: torch.Tensor, y: torch.Tensor, classes: int, l2: float,
               steps: int = 200) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty, by full-batch L-BFGS."""
    clf = nn.Linear(x.shape[1], classes).to(x.device)
    opt = torch.optim.LBFGS(clf.parameters(), max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return clf


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def fast_protocol(train_f, train_y, test_f, test_y, classes: int, seed: int) -> list[dict]:
    """Per stage: the L2 weight that does best on a held-out 10% of train, refit, test top-1."""
    held = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    held = held.to(train_y.device)
    val, fit = held[:len(held) // 10], held[len(held) // 10:]
    rows = []
    for xtr, xte in zip(train_f, test_f):
        mean, std = xtr.mean(0), xtr.std(0) + 1e-6              # standardise with train stats
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
        scores = {l2: accuracy(fit_linear(xtr[fit], train_y[fit], classes, l2)(xtr[val]),
                               train_y[val]) for l2 in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)}
        l2 = max(scores, key=scores.get)
        clf = fit_linear(xtr, train_y, classes, l2)
        rows.append({"top1": accuracy(clf(xte), test_y), "l2": l2, "val_top1": scores[l2]})
    return rows


def paper_protocol(encoder, train_x, train_y, test_f, test_y, info, classes: int,
                   epochs: int, batch: int, lr: float, seed: int, rt: runtime.Runtime) -> list[dict]:
    """All stages' classifiers trained side by side, each on its stage's pooled features."""
    if len(train_x) < batch:
        raise UserError(f"--batch-size {batch}: the paper protocol trains on {len(train_x)} "
                        f"images, fewer than one batch; lower --batch-size or raise --subset",
                        flag=True)
    device = next(encoder.parameters()).device
    clfs = nn.ModuleList(nn.Linear(c, classes) for c in encoder.channels).to(device)
    opt = torch.optim.SGD(clfs.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(  # x0.1 at 30%, 60%, 90% of training
        opt, [round(epochs * f) for f in (0.3, 0.6, 0.9)], 0.1)
    crop = augment.SimCLRAugment.for_dataset(info)
    g = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(seed)
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=g, device=g.device).to(train_x.device)
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i:i + batch]
            x, y = train_x[idx].to(device), train_y[idx].to(device)
            p = crop.sample_params(len(x), g)          # random resized crop and flip only
            x = augment.resized_crop_flip(x.float() / 255, p["box"].to(device), p["flip"].to(device),
                                       info.size)
            with torch.no_grad(), rt.autocast():
                h, feats = rt.prepare(augment.standardize(x, info.mean, info.std)), []
                for stage in encoder.stages:
                    h = stage(h)
                    feats.append(h.float().mean((2, 3)))
            loss = sum(F.cross_entropy(clf(f), y) for clf, f in zip(clfs, feats))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise UserError(f"the linear classifiers diverged at epoch {epoch}: lower --lr",
                            flag=True)
    with torch.no_grad():
        return [{"top1": accuracy(clf(f), test_y)} for clf, f in zip(clfs, test_f)]


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, classes: int, k: int = KNN_K,
                 t: float = 0.1) -> float:
    """Weighted kNN: the k most cosine-similar training images vote with weight exp(sim / t)."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim, idx = (test_f[i:i + 1024] @ train_f.T).topk(k, dim=1)     # (b, k)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100.0 * correct / len(test_y)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    rt = runtime.setup(args.device, args.precision)
    out = cli.check_writable(args.out or Path(args.ckpt).parent / (
        f"linear_eval_{args.protocol}{'_random' if args.random_init else ''}.json"), "--out")
    encoder, ckpt = recipe.load_encoder(args.ckpt, rt.device, args.random_init)
    cfg = ckpt["config"]
    if args.protocol == "paper" and not data.DATASETS[cfg["dataset"]].in_memory:
        raise UserError("--protocol paper augments images in memory: use it with cifar10, "
                        "cifar100, stl10 or synthetic, or --protocol fast", flag=True)
    encoder.to(memory_format=rt.memory_format)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    name, info = cfg["dataset"], data.DATASETS[cfg["dataset"]]
    data_dir = args.data_dir or cli.resolve(cfg["data_dir"])
    kept = []                             # the paper protocol's training images, read once

    def batches(split):                   # (images, labels), the first --subset only if given
        seen = 0
        for x, y in data.eval_batches(name, data_dir, split, 1024, rt.device, limit=args.subset):
            if args.subset:
                x, y = x[:args.subset - seen], y[:args.subset - seen]
            if len(x) == 0:
                return
            if split == "train" and args.protocol == "paper":
                kept.append(x)
            yield x, y
            seen += len(x)

    with rt.autocast():
        train_f, train_y = stage_features(encoder, batches("train"), info, rt)
        test_f, test_y = stage_features(encoder, batches("test"), info, rt)
    classes = info.num_classes
    if len(train_y) < MIN_IMAGES or len(test_y) == 0:
        raise UserError(f"{data_dir}: {len(train_y)} training and {len(test_y)} test images of "
                        f"{name}; the probe needs at least {MIN_IMAGES} and 1")
    if args.protocol == "fast":
        rows = fast_protocol(train_f, train_y, test_f, test_y, classes, cfg["seed"])
    else:
        train_x = torch.cat(kept)
        rows = paper_protocol(encoder, train_x, train_y, test_f, test_y, info, classes,
                              args.epochs, args.batch_size, args.lr, cfg["seed"], rt)
    k = min(KNN_K, len(train_y))         # a --subset smaller than k: every image votes
    knn = knn_accuracy(train_f[-1], train_y, test_f[-1], test_y, classes, k)

    changed = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
    if changed:
        raise RuntimeError(f"the frozen encoder changed during evaluation: {changed[:5]}")

    result = {"checkpoint": cli.portable(args.ckpt), "method": cfg["method"], "arch": cfg["arch"],
              "dataset": name, "protocol": args.protocol, "random_init": args.random_init,
              "epoch": ckpt["epoch"], "train_images": len(train_y), "test_images": len(test_y),
              "stages": [{"stage": k + 1, "channels": c, **r}
                         for k, (c, r) in enumerate(zip(encoder.channels, rows))],
              "knn_top1": knn, "knn_k": k, "config": cfg, "provenance": runtime.provenance(rt),
              "checkpoint_provenance": ckpt.get("provenance")}
    print(f"{cfg['method']} {cfg['arch']} on {name}, {args.protocol} protocol"
          f"{' (random init)' if args.random_init else ''}")
    print("stage  channels  linear top-1")
    for r in result["stages"]:
        print(f"{r['stage']:>5}  {r['channels']:>8}  {r['top1']:>11.2f}")
    print(f"kNN (k={k}, final stage): {knn:.2f}")
    cli.write_atomic(out, json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    cli.run(main, "linear_eval.py")
