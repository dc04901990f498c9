"""Every decoder's training loss over time, from train.py's log.csv: the paper's Fig. 2.

    python curves.py runs/simclr runs/gim runs/loco --out curves.png

One panel per run, one line per unit (a unit is named by the stages its loss trains: LoCo's
"stages 1-2" is the decoder on stage 2 whose loss also reaches stage 1). If a SimCLR run is among
the inputs, its single loss is drawn in every other panel as a dashed grey reference, which is
how the paper compares: LoCo's decoders track SimCLR's loss, GIM's low decoders do not.
"""

import csv
import json
from pathlib import Path

import matplotlib
matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np

import cli
from cli import TITLES, UserError


def read_log(run: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Fractional epochs (T,) and each unit's loss (T,) from run/log.csv, columns by name."""
    path = run / "log.csv"
    if not path.is_file():
        raise UserError(f"{path}: no such file: give run directories written by train.py")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    units = [k for k in (rows[0] if rows else {}) if k.startswith("loss_")]
    if not units:
        raise UserError(f"{path} holds no logged step: train the run for an epoch first")
    epoch = np.array([int(r["epoch"]) for r in rows])
    step = np.array([int(r["step"]) for r in rows], float)
    steps_per_epoch = max(1, int((epoch == epoch[0]).sum()))
    return step / steps_per_epoch, {k: np.array([float(r[k]) for r in rows]) for k in units}


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Moving average; the first points average over what exists so far."""
    c = np.cumsum(np.insert(y, 0, 0.0))
    n = np.minimum(np.arange(1, len(y) + 1), window)
    return (c[1:] - c[np.arange(1, len(y) + 1) - n]) / n


def method_of(run: Path) -> str:
    """The run's method, from the config.json train.py writes beside the log."""
    config = run / "config.json"
    if not config.is_file():
        return run.name
    try:
        return json.loads(config.read_text())["method"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{config} is not the configuration train.py writes ({type(e).__name__}"
                        f"): delete it to label the curves by the folder's name")


def main(argv: list[str] | None = None) -> plt.Figure:
    p = cli.parser(__doc__, "curves.py")
    p.add_argument("runs", nargs="+", type=Path, help="run directories holding log.csv")
    p.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    cli.check_writable(args.out, "--out")

    runs = [(run, method_of(run), *read_log(run)) for run in args.runs]
    simclr = next(((t, next(iter(losses.values()))) for _, m, t, losses in runs
                   if m == "simclr"), None)
    fig, axes = plt.subplots(1, len(runs), figsize=(4 * len(runs), 3.2), squeeze=False,
                             sharey=True)
    for ax, (run, method, t, losses) in zip(axes[0], runs):
        window = max(1, len(t) // 50)
        if simclr is not None and method != "simclr":
            ax.plot(simclr[0], smooth(simclr[1], max(1, len(simclr[0]) // 50)), "--",
                    color="grey", label="SimCLR")
        for name, y in losses.items():
            stages = name.removeprefix("loss_s")
            ax.plot(t, smooth(y, window), label=("stages " if "-" in stages else "stage ") + stages)
        ax.set_title(TITLES.get(method, method))
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("InfoNCE loss")
    fig.tight_layout()
    cli.save_figure(fig, args.out)
    return fig


if __name__ == "__main__":
    cli.run(main, "curves.py")
