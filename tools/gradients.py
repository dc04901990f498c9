"""Which way each unit pulls the stages it trains: a trained run's per-unit weight gradients.

    python -m tools.gradients runs/gap/loco_none_seed0/ckpt.pt --data-dir data

For one augmented batch of the run's own data, every unit's loss is differentiated alone, attached
end to end, with respect to the weights of each stage it learns. Printed per stage: each unit's
gradient norm, and for a stage two units share (LoCo), the cosine between their gradients and the
ratio of their norms. Under LARS a stage moves along the sum of its units' gradients, whatever its
size: if the two point apart, or one dwarfs the other, how they are weighted decides what the
stage learns; if they agree, the weighting cannot matter much (docs/gap.md).
"""

import torch
import torch.nn.functional as F

import cli
import data
import recipe
import runtime
from losses import info_nce


def unit_gradients(run: recipe.Run, x: torch.Tensor, tau: float) -> dict:
    """(unit, piece) -> the unit's gradient on the piece's weight tensors (conv and linear),
    flattened, at the run's weights, for the batch x (2B, 3, H, W)."""
    outputs, h = [], x
    for piece in run.pieces:
        h = piece(h)
        outputs.append(h)
    grads = {}
    for i, (u, head) in enumerate(zip(run.units, run.heads)):
        loss = info_nce(head(outputs[u.last]), tau)
        for j in sorted(u.learns):
            weights = [p for p in run.pieces[j].parameters() if p.dim() > 1]
            g = torch.autograd.grad(loss, weights, retain_graph=True)
            grads[i, j] = torch.cat([t.flatten() for t in g])
    return grads


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser(__doc__, "python -m tools.gradients")
    p.add_argument("ckpt", help="a ckpt.pt written by train.py")
    p.add_argument("--data-dir", default=None, help="default: the one used in pre-training")
    p.add_argument("--batch", type=cli.positive(int), default=256)
    p.add_argument("--seed", type=int, default=0, help="which batch (the data order's seed)")
    args = p.parse_args(argv)
    ckpt = recipe.load_checkpoint(args.ckpt)
    cfg = ckpt["config"]
    rt = runtime.Runtime(torch.device("cpu"), False, torch.float32, False)
    torch.manual_seed(cfg["seed"])
    run = recipe.build(cfg, rt)
    run.encoder.load_state_dict(ckpt["encoder"]), run.heads.load_state_dict(ckpt["heads"])
    loader = data.pretrain_loader(cfg["dataset"], args.data_dir or cli.resolve(cfg["data_dir"]),
                                  args.batch, args.seed, rt.device)
    x1, x2 = next(iter(loader.epoch(0)))
    tau = cfg["tau"] if cfg.get("tau") is not None else data.DATASETS[cfg["dataset"]].tau
    grads = unit_gradients(run, torch.cat([x1, x2]), tau)
    rows = []
    print(f"{cli.portable(args.ckpt)}: {cfg['method']}, epoch {ckpt['epoch'] + 1}, "
          f"batch {args.batch}")
    for j in range(len(run.pieces)):
        units = [i for i in range(len(run.units)) if (i, j) in grads]
        row = {"stage": run.stage_of[j] + 1, "units": [i + 1 for i in units],
               "norms": [grads[i, j].norm().item() for i in units]}
        if len(units) == 2:
            a, b = (grads[i, j] for i in units)
            row["cosine"] = F.cosine_similarity(a, b, dim=0).item()
            row["lower_over_upper"] = row["norms"][0] / row["norms"][1]
        rows.append(row)
        print(f"stage {row['stage']}: " + ", ".join(
            f"unit {u} |g| {n:.4f}" for u, n in zip(row["units"], row["norms"]))
            + (f"; cosine {row['cosine']:.2f}, lower/upper {row['lower_over_upper']:.2f}"
               if "cosine" in row else ""))
    return rows


if __name__ == "__main__":
    cli.run(main, "python -m tools.gradients")
