"""t-SNE of what each method learned: the paper's Fig. 3, one panel per checkpoint.

    python tsne.py runs/simclr/ckpt.pt runs/gim/ckpt.pt runs/loco/ckpt.pt --out tsne.png

Test images of the first 10 classes, 50 of each (the paper: 500 ImageNet validation images of
the first 10 classes), embedded by the global-average-pooled output of the encoder's last stage,
then t-SNE (scikit-learn, fixed seed). Points are coloured by class, panels titled by method.
"""

import matplotlib
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import torch
from sklearn.manifold import TSNE

import cli
import data
import runtime
import recipe
from linear_eval import stage_features
from cli import TITLES


def first_per_class(name: str, data_dir: str, classes: int = 10, per_class: int = 50):
    """uint8 images and labels: the first `per_class` test images of each of the first classes."""
    xs, ys = [], []
    for x, y in data.eval_batches(name, data_dir, "test", 1024, torch.device("cpu")):
        xs.append(x), ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    keep = torch.cat([(y == c).nonzero().squeeze(1)[:per_class] for c in range(classes)])
    return x[keep], y[keep]


def main(argv: list[str] | None = None) -> plt.Figure:
    p = cli.parser(__doc__, "tsne.py")
    p.add_argument("ckpts", nargs="+", help="ckpt.pt files written by train.py")
    p.add_argument("--out", default="tsne.png")
    p.add_argument("--data-dir", default=None, help="default: the one used in pre-training")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    args = p.parse_args(argv)
    cli.check_writable(args.out, "--out")
    rt = runtime.setup(args.device, "fp32")    # 500 images: exact features cost nothing, so no
                                               # autocast around stage_features

    fig, axes = plt.subplots(1, len(args.ckpts), figsize=(3.2 * len(args.ckpts), 3.4),
                             squeeze=False)
    for ax, path in zip(axes[0], args.ckpts):
        encoder, ckpt = recipe.load_encoder(path, rt.device)
        cfg = ckpt["config"]
        data_dir = args.data_dir or cli.resolve(cfg["data_dir"])
        x, y = first_per_class(cfg["dataset"], data_dir)
        if len(x) < 10:
            raise cli.UserError(f"{data_dir}: {len(x)} test images of {cfg['dataset']}'s first "
                                f"classes; t-SNE needs at least 10")
        feats, _ = stage_features(encoder, [(x, y)], data.DATASETS[cfg["dataset"]], rt)
        perplexity = min(30, (len(x) - 1) / 3)      # t-SNE needs it below the number of points
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=0).fit_transform(
            feats[-1].cpu().numpy())
        ax.scatter(xy[:, 0], xy[:, 1], c=y.numpy(), cmap="tab10", s=6, vmin=0, vmax=9)
        ax.set_title(TITLES.get(cfg["method"], cfg["method"]))
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    cli.save_figure(fig, args.out)
    return fig


if __name__ == "__main__":
    cli.run(main, "tsne.py")
