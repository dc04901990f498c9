"""Pre-train an encoder with SimCLR, GIM or LoCo.

    python train.py --method loco                              # one process: CUDA, MPS or CPU
    torchrun --nproc_per_node=8 train.py --method loco         # 8 GPUs on one machine
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --method loco                                 # the same on each of 2 machines

Reads top to bottom: configuration, distributed set-up, data, model and heads, optimizer and
schedule, resume, then the loop with its logging and checkpoints. The method itself is one call,
`local_units.train_step`; everything else here is the paper's recipe (Sec. 5.1): LARS, learning
rate 0.3 x batch/256 (4.8 at 4096), 10 warm-up epochs then cosine decay, both per step, weight
decay 1e-6.

Writes into --out: `log.csv` (every unit's loss at every step: the paper's Fig. 2) and `ckpt.pt`
after every epoch (encoder, heads, optimizer, epoch, config), written atomically by rank 0.
"""

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

import data
import local_units as L
import model
import recipe
import runtime


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--method", default="loco", choices=L.METHODS)
    p.add_argument("--arch", default="resnet18", choices=list(model.ENCODERS))
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of the encoder")
    p.add_argument("--dataset", default="synthetic", choices=list(data.DATASETS))
    p.add_argument("--data-dir", default="data", help="where datasets are read (or downloaded)")
    p.add_argument("--subset", type=int, default=0, help="train on the first N images only (0: all)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=512, help="global: split over processes")
    p.add_argument("--lr", type=float, default=None, help="default: 0.3 * batch / 256")
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--weight-decay", type=float, default=1e-6)
    p.add_argument("--tau", type=float, default=None, help="default: the dataset's (data.py)")
    p.add_argument("--out", default="runs/loco", help="run directory: log.csv and ckpt.pt")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20, help="steps between console lines")
    p.add_argument("--workers", type=int, default=8, help="DataLoader workers (imagefolder only)")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage and head")
    p.add_argument("--sync-bn", action="store_true", help="BatchNorm statistics over all processes")
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help="auto: bf16 autocast where the device computes bf16 natively (runtime.py)")
    p.add_argument("--memory-format", default="auto", choices=runtime.MEMORY_FORMATS,
                   help="auto: channels_last on CUDA and CPU (runtime.py)")
    return p.parse_args(argv)


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash mid-write leaves the old file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    # Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them, one process.
    data.local_batch(args.batch_size, runtime.torchrun_env()[1])  # refuses a batch that won't split
    rt = runtime.setup(args.device, args.precision, args.memory_format, distributed=True)
    rank, world, device = rt.rank, rt.world, rt.device
    master = rank == 0
    out = Path(args.out)
    ckpt_path, log_path = out / "ckpt.pt", out / "log.csv"
    if master and ckpt_path.exists() and not args.resume:
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, "
                              f"or choose another --out")
    if args.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
    torch.manual_seed(args.seed)

    # Data: every process gets its slice of the same global batch (data.py).
    info = data.DATASETS[args.dataset]
    loader = data.pretrain_loader(args.dataset, args.data_dir, args.batch_size, args.seed, device,
                                  rank, world, args.workers, subset=args.subset)
    tau = args.tau or info.tau

    # Model, heads and optimizer: the units decide which stages each loss trains (local_units.py).
    stem = info.stem
    base_lr = args.lr or 0.3 * args.batch_size / 256
    run = recipe.build(vars(args), rt, base_lr)
    encoder, heads, units, optimizer, params = run.encoder, run.heads, run.units, run.optimizer, run.params
    names = ["loss_s" + (f"{u.first + 1}" if u.first == u.last else f"{u.first + 1}-{u.last + 1}")
             for u in units]

    # Schedule, per step.
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    # Resume: same config, then carry on from the epoch after the checkpoint's.
    start_epoch = 0
    if args.resume:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if not isinstance(ckpt, dict) or not {"config", "encoder", "heads"} <= set(ckpt):
            raise ValueError(f"{ckpt_path} is not a checkpoint written by train.py")
        keep = ("method", "arch", "width", "dataset", "batch_size", "seed", "subset")
        diff = {k: (ckpt["config"].get(k), getattr(args, k)) for k in keep
                if ckpt["config"].get(k) != getattr(args, k)}
        if diff:
            raise ValueError(f"{ckpt_path} was written with another configuration "
                             f"(checkpoint vs now: {diff}): resume with the same flags")
        encoder.load_state_dict(ckpt["encoder"]), heads.load_state_dict(ckpt["heads"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch = ckpt["epoch"] + 1
    if master:
        out.mkdir(parents=True, exist_ok=True)
        rows = []
        if args.resume and log_path.exists():  # drop steps logged after the checkpoint
            with open(log_path) as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if int(r[1]) < start_epoch * steps_per_epoch]
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerows([["epoch", "step", "lr", *names], *rows])
        print(f"{args.method} | {args.arch} x{args.width} ({stem} stem) | {args.dataset} | "
              f"{rt} | batch {args.batch_size} | {steps_per_epoch} "
              f"steps/epoch | units {names}", flush=True)

    # The loop.
    step = start_epoch * steps_per_epoch
    pending, lrs, t0, seen = [], [], time.time(), 0
    for epoch in range(start_epoch, args.epochs):
        encoder.train(), heads.train()
        for x1, x2 in loader.epoch(epoch):
            lr = recipe.lr_at(step, base_lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses = run.step(x1, x2, tau, rt)
            pending.append(torch.stack(losses).float())   # stays on the device: no sync here
            lrs.append(lr)
            step += 1
            seen += args.batch_size
            last = step == (epoch + 1) * steps_per_epoch
            if step % args.log_every == 0 or last:
                # One sync per interval, not per step: losses wait on the device until here.
                logged = torch.stack(pending)
                pending = []
                if world > 1:
                    dist.all_reduce(logged)
                    logged /= world
                logged = logged.cpu()
                if not torch.isfinite(logged).all():
                    bad = [n for n, ok in zip(names, torch.isfinite(logged).all(0)) if not ok]
                    raise FloatingPointError(
                        f"loss became NaN or infinite at epoch {epoch}, step {step} (units {bad}). "
                        f"Nothing from this epoch was saved; {ckpt_path} holds the last good "
                        f"epoch. Try a lower --lr or a higher --tau, then --resume.")
                if master:
                    first = step - len(logged)
                    with open(log_path, "a", newline="") as f:
                        csv.writer(f).writerows(
                            [epoch, first + i, f"{lr_i:.6g}", *(f"{v:.5f}" for v in r)]
                            for i, (lr_i, r) in enumerate(zip(lrs, logged.tolist())))
                    rate = seen / (time.time() - t0)
                    eta = (total_steps - step) * args.batch_size / rate
                    units_str = " ".join(f"{n} {v:.4f}" for n, v in zip(names, logged[-1]))
                    print(f"epoch {epoch} step {step}/{total_steps} | {units_str} | lr {lr:.4g} | "
                          f"{rate:,.0f} img/s | eta {eta / 60:.1f} min", flush=True)
                seen, t0, lrs = 0, time.time(), []
        if master:
            save_atomic({"encoder": encoder.state_dict(), "heads": heads.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "step": step,
                         "config": vars(args), "units": [[u.first, u.last] for u in units]},
                        ckpt_path)
    runtime.shutdown()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")
