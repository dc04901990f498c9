"""Pre-train an encoder with SimCLR, GIM or LoCo.

    python train.py --method loco --width 0.25 --subset 8192 --epochs 3 --batch-size 256 --lr 2  # a first run
    python train.py --method loco                              # one process: CUDA, MPS or CPU
    torchrun --nproc_per_node=8 train.py --method loco         # 8 GPUs on one machine
    torchrun --nproc_per_node=2 train.py --method loco --pipeline 2   # 2 processes, 2 stages each
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --method loco                                 # the same on each of 2 machines

The first line needs no download (synthetic shapes, drawn by shapes.py) and takes about a minute
on a 2-core CPU; the defaults (the paper's recipe, 100 epochs of 50,000 images at full width) are
a GPU's job: days on a 2-core CPU (README, Real runs).

Reads top to bottom: the configuration (every flag and its default), then `main` (processes,
device, and what a failure leaves behind) and `train`, the whole run in order: data, model and
optimizer, resume, the loop, and a checkpoint after every epoch. In the loop body, one step is
the method's call, `local_units.train_step` (every unit's forward and local backward), the
gradients averaged over processes, and the LARS update; the recipe (LARS, learning rate, warm-up
and cosine decay) is in recipe.py. The steps `train` names follow it, in the order it calls them:
resume, the log, the checkpoint.

Writes into --out (default runs/<method>): `log.csv`, every unit's loss at every step (the paper's
Fig. 2), and `ckpt.pt` after every epoch (encoder, heads, optimizer, epoch, the full configuration
and the code's git commit), written atomically by rank 0.
"""

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

import cli
import data
import decoders
import local_units as L
import model
import recipe
import pipeline
import runtime
from cli import UserError

# Flags that may differ when a run is resumed: where it runs and how it reports, not what it
# computes. --epochs and --lr may be typed anew too: the schedule then differs from an
# uninterrupted run's, and the run says so (`continued`).
RESUMABLE = {"resume", "out", "data_dir", "device", "workers", "log_every", "time_limit"}
RETUNABLE = {"epochs", "lr"}


def parser() -> argparse.ArgumentParser:
    p = cli.parser(__doc__, "train.py")
    pos, nonneg = cli.positive, cli.at_least_zero
    what = p.add_argument_group("what is trained")
    what.add_argument("--method", default="loco", choices=L.METHODS)
    what.add_argument("--arch", default="resnet18", choices=list(model.ENCODERS))
    what.add_argument("--width", type=pos(float), default=1.0, help="channel multiplier")
    what.add_argument("--decoder", default=None, choices=decoders.DECODERS,
                      help="conv layers before every decoder's pooling and MLP (Table 4); "
                           "default: the paper's, block for gim and loco (Sec. 5.4), none for "
                           "simclr")
    what.add_argument("--top-decoder", default=None, choices=decoders.DECODERS[:4],
                      help="GIM and LoCo: conv layers of the decoders on the top stage; default: "
                           "those of --decoder")
    what.add_argument("--mlp-layers", type=int, default=2, choices=[2, 4], help="decoder MLP depth")
    what.add_argument("--sharing", default="stage", choices=L.SHARING,
                      help="how LoCo's units share the stage between them (Table 5)")
    what.add_argument("--soft-coef", type=pos(float), default=None,
                      help=f"--sharing soft: L2 penalty coefficient; default {recipe.SOFT_COEF:g}")
    what.add_argument("--top-unit", action=argparse.BooleanOptionalAction, default=True,
                      help="LoCo: a unit of the top stage alone (without: the paper's Fig. 1, "
                           "the top stage learns from one loss)")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", default="synthetic", choices=list(data.DATASETS))
    d.add_argument("--data-dir", default="data", help="where datasets are read (or downloaded)")
    d.add_argument("--subset", type=nonneg(int), default=0, help="train on the first N images (0: all)")
    r = p.add_argument_group("recipe (paper, Sec. 5.1)")
    r.add_argument("--epochs", type=pos(int), default=100)
    r.add_argument("--batch-size", type=pos(int), default=512, help="global: split over processes")
    r.add_argument("--lr", type=pos(float), default=None, help="peak learning rate; default: "
                   "0.3 x batch / 256")
    r.add_argument("--warmup-epochs", type=nonneg(float), default=None,
                   help="linear warm-up, then cosine decay to 0; default: a tenth of --epochs, "
                        "at most the paper's 10; must be shorter than --epochs")
    r.add_argument("--weight-decay", type=nonneg(float), default=1e-6)
    r.add_argument("--tau", type=pos(float), default=None,
                   help="InfoNCE temperature; default: the dataset's (data.py)")
    r.add_argument("--seed", type=int, default=0)
    m = p.add_argument_group("where it runs (runtime.py)")
    m.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    m.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                   help="auto: bf16 autocast where the device computes bf16 natively")
    m.add_argument("--memory-format", default="auto", choices=runtime.MEMORY_FORMATS,
                   help="auto: channels_last on CUDA and CPU")
    m.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                   help="several processes: BatchNorm statistics over the global batch, as one "
                        "process computes them (SimCLR's global BN); without, each process "
                        "normalises its own slice and the saved running statistics are rank 0's")
    m.add_argument("--pipeline", type=pos(int), default=1,
                   help="model parallel: the stages in P groups, one per process (pipeline.py); "
                        "run with torchrun and P processes, or D x P for D replicas of the "
                        "pipeline (the batch then splits D ways)")
    m.add_argument("--pipeline-mode", default=None, choices=pipeline.MODES,
                   help="sync: the exact step; async: the straddling unit's gradient one step "
                        "late, no waiting; default: async for gim and loco, sync for simclr")
    m.add_argument("--placement", default=None,
                   help="the pieces of each process, e.g. 2,2 (default: the placement that "
                        "balances their measured cost; a resumed run keeps its own)")
    m.add_argument("--compile", action="store_true", help="torch.compile each stage and head")
    m.add_argument("--workers", type=nonneg(int), default=8, help="DataLoader workers (imagefolder)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="run directory; default: runs/<method>")
    o.add_argument("--resume", action="store_true",
                   help="continue the run in --out as it was written: flags left out take its "
                        "values; typed ones must agree, except paths, logging, --time-limit, "
                        "and --epochs and --lr (a new schedule from here on, said)")
    o.add_argument("--log-every", type=pos(int), default=20, help="steps between console lines")
    o.add_argument("--time-limit", type=pos(float), default=None,
                   help="minutes: stop after the epoch in which they run out (continue with --resume)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked before any work (contradictions, ranges), then resolved: every default
    made the value the run uses (recipe.resolved), as config.json records it."""
    args = parser().parse_args(argv)
    recipe.check(vars(args))             # flags that contradict each other, as typed
    pipeline.check(vars(args), model.STAGES[args.arch])
    vars(args).update(recipe.resolved(vars(args)))
    args.out = args.out or f"runs/{args.method}"
    return args


def typed(argv: list[str] | None = None) -> set[str]:
    """The flags the command line gives, rather than leaves to their defaults."""
    q = parser()
    for action in q._actions:            # a flag left out then leaves no attribute
        action.default = argparse.SUPPRESS
    return set(vars(q.parse_args(argv)))


def differences(args: argparse.Namespace, flags: set[str], config: dict) -> dict:
    """Of `flags`, those whose resolved value here differs from a recorded configuration's:
    {flag: (recorded, now)}. Where it runs and reports is not compared; --precision and
    --memory-format auto ask for the rule's choice, which the record holds."""
    before = recipe.upgraded(config)
    now = vars(args)
    return {k: (before.get(k), now[k]) for k in sorted(flags) if k in now
            and k not in RESUMABLE and before.get(k) != now[k]
            and not (k in ("precision", "memory_format") and now[k] == "auto")}


def continued(args: argparse.Namespace, flags: set[str], config: dict,
              ckpt_path: Path) -> argparse.Namespace:
    """--resume: the run continues as its checkpoint recorded it. A flag left out takes the
    run's value; a typed one must agree with it, except where the run is and how it reports
    (RESUMABLE), and --epochs and --lr, which start a new schedule from here (said)."""
    before = recipe.upgraded(config)
    diff = {k: v for k, v in differences(args, flags, config).items() if k not in RETUNABLE}
    if diff:
        said = ", ".join(f"--{k.replace('_', '-')} {a} (now {b})" for k, (a, b) in diff.items())
        raise UserError(f"{ckpt_path} was written with {said}: a resumed run keeps every flag "
                        f"that decides what it computes (only paths, logging, --time-limit, "
                        f"--epochs and --lr may change); leave those flags out to continue it, "
                        f"or start a new run in another --out", flag=True)
    now = vars(args)
    keep = lambda k: k in RESUMABLE or (k in RETUNABLE and k in flags) or k not in before
    merged = argparse.Namespace(**{k: now[k] if keep(k) else before[k] for k in now})
    for k in RETUNABLE:
        if now[k] != before[k] and k in flags:
            print(f"--resume: --{k} {before[k]:g} -> {now[k]:g}: the schedule from here on "
                  + ("ends at the new epoch count" if k == "epochs" else
                     "is the same warm-up and cosine, scaled to the new peak")
                  + "; this run is not the one either value gives alone", flush=True)
    if merged.warmup_epochs >= merged.epochs:
        raise UserError(f"--epochs {merged.epochs}: this run warms up for "
                        f"{merged.warmup_epochs:g} epochs; resume it with more", flag=True)
    recipe.check(vars(merged))
    return merged


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)

    out = cli.check_writable(args.out, "--out", is_dir=True)
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists() and not args.resume:
        raise UserError(f"{ckpt_path} exists: add --resume to continue that run, or choose "
                        f"another --out", flag=True)
    if args.resume and not ckpt_path.exists():
        raise UserError(f"--resume: no checkpoint at {ckpt_path} (leave --resume out to start)",
                        flag=True)
    if args.resume:                      # the run as it was written
        args = continued(args, typed(argv), recipe.load_checkpoint(ckpt_path)["config"],
                         ckpt_path)

    # Processes and device: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them, one process.
    check_world(args, runtime.torchrun_env()[1])
    rt = runtime.setup(args.device, args.precision, args.memory_format, distributed=True,
                       pipeline=args.pipeline)
    # How a job of several processes ends (runtime.finish): all of them succeed together, after a
    # last barrier, or each stops with one line; a process whose peer is gone leaves at once,
    # without tearing down the broken process group (cli.stopping).
    try:
        train(args, rt, out, ckpt_path)
        runtime.finish()
    except KeyboardInterrupt:
        cli.stopping(abandon=rt.world > 1)
        raise KeyboardInterrupt(saved(ckpt_path)) from None
    except RuntimeError as e:            # a process of this run died: gloo/NCCL say so here
        if rt.world > 1 and runtime.peer_lost(e):
            cli.stopping(abandon=True)
            raise UserError(f"rank {rt.rank}: another process of this run stopped (its own "
                            f"message says why), so this one stops too. {saved(ckpt_path)}")
        raise
    finally:
        if not cli.abandoned():
            runtime.shutdown()
    return out


def check_world(args: argparse.Namespace, world: int) -> int:
    """The data-parallel processes of `world`: all of them, or with --pipeline P the D replicas
    of the pipeline (world = D x P), over which the batch splits (a pipeline's first process
    reads its replica's whole share). Refuses a world or a batch that does not split."""
    replicas = runtime.replicas(world, args.pipeline)
    data.local_batch(args.batch_size, replicas)
    return replicas


def train(args: argparse.Namespace, rt: runtime.Runtime, out: Path, ckpt_path: Path) -> None:
    """The run: data, model and optimizer, resume, then the loop with a checkpoint every epoch."""
    torch.manual_seed(args.seed)

    # Data: every data-parallel process gets its slice of the same global batch (data.py); in a
    # pipeline, the first process of each replica reads that replica's slice.
    try:
        loader = (data.pretrain_loader(args.dataset, args.data_dir, args.batch_size, args.seed,
                                       rt.device, rt.data_rank, rt.data_world, args.workers,
                                       subset=args.subset) if rt.stage_rank == 0 else None)
    except data.MissingData as e:
        raise data.MissingData(f"{e}, or train without data: --dataset synthetic") from None
    tau, base_lr = args.tau, args.lr     # resolved (recipe.resolved): the dataset's, the rule's

    # Model, decoders, units and LARS (recipe.py); the units decide which stages each loss trains.
    run = recipe.build(vars(args), rt, base_lr)
    names = unit_names(run)
    steps_per_epoch = pipeline.steps_per_epoch(loader, rt)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)

    start_epoch = resume(args, run, ckpt_path) if args.resume else 0
    pipe = None                              # model parallel: this process's stages (pipeline.py)
    if rt.stages > 1:
        pipe = pipeline.build(run, rt, vars(args), data.DATASETS[args.dataset].size, tau,
                              pipeline.seconds_per_batch(loader))
        args.placement = pipeline.placement(pipe.groups)   # part of the run: resume keeps it
        if args.resume:
            pipeline.restore_pending(run, pipe, recipe.load_checkpoint(ckpt_path).get(
                "pipeline_pending", {}))
    log = Log(out / "log.csv", names, start_epoch * steps_per_epoch, args.batch_size, rt,
              ckpt_path, base_lr)
    if rt.rank == 0:
        cli.write_atomic(out / "config.json", json.dumps(recorded(args, rt), indent=2))
        print(f"{args.method} | {args.arch} x{args.width} | {args.dataset} | {rt} | batch "
              f"{args.batch_size} | {steps_per_epoch} steps/epoch | lr {base_lr:g} after "
              f"{args.warmup_epochs:g} warm-up epochs ({warmup_steps} steps), cosine to 0 at "
              f"epoch {args.epochs} | units {names}", flush=True)

    # The loop. One step: the method's forward and local backward of every unit
    # (local_units.train_step), the gradients averaged over processes, one LARS update.
    deadline = time.time() + 60 * args.time_limit if args.time_limit else math.inf
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, args.epochs):
        run.encoder.train(), run.heads.train()
        for x1, x2 in pipeline.batches(loader, epoch, steps_per_epoch):
            lr = recipe.lr_at(step, base_lr, warmup_steps, total_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            if pipe:                         # model parallel: this process's pieces and units
                losses = pipe.step(x1, x2, tau)
            else:
                with rt.autocast():
                    losses = L.train_step(run.pieces, run.heads, run.units, rt.prepare(x1),
                                          rt.prepare(x2), tau, rt.data_group)
            if rt.data_world > 1:            # data parallel (a pipeline's replicas too): one
                runtime.average_gradients(run.params, rt)   # all-reduce of every gradient
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            log.add(epoch, step, lr, losses, total_steps,
                    last=step % args.log_every == 0 or step == (epoch + 1) * steps_per_epoch)
        if pipe:
            pipe.drain()                     # the last batch's late gradient, kept for resume
        check_weights(run, epoch, ckpt_path, base_lr)
        state = pipeline.gather(run, pipe) if pipe else run_state(run)
        if rt.rank == 0:
            save_checkpoint(state, epoch, step, args, rt, ckpt_path)
        if time.time() > deadline and epoch + 1 < args.epochs:
            print(f"--time-limit: stopped after epoch {epoch + 1} of {args.epochs}; "
                  f"continue with the same command and --resume", flush=True)
            break


def unit_names(run: recipe.Run) -> list[str]:
    """log.csv's column of each unit, by the stages its loss trains: LoCo's "loss_s1-2" reaches
    stages 1 and 2; a primed stage is the unit's own copy (soft sharing)."""
    names = []
    for u, head in zip(run.units, run.heads):
        a, b = run.stage_of[u.first] + 1, run.stage_of[u.last] + 1
        top = f"{head.tied_to + 1}'" if head.tied is not None else f"{b}" if b > a else ""
        names.append(f"loss_s{a}" + (f"-{top}" if top else ""))
    return names


def resume(args: argparse.Namespace, run: recipe.Run, ckpt_path: Path) -> int:
    """Load the run's checkpoint (its configuration is args already: `continued`). Returns the
    next epoch."""
    ckpt = recipe.load_checkpoint(ckpt_path)
    run.encoder.load_state_dict(ckpt["encoder"]), run.heads.load_state_dict(ckpt["heads"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["epoch"] + 1 >= args.epochs:
        print(f"--resume: {ckpt_path} already holds all {args.epochs} epochs; nothing to do")
    return ckpt["epoch"] + 1


class Log:
    """log.csv (every unit's loss at every step) and a console line every few steps. Losses wait
    on the device and are fetched once per line, not per step (one sync per interval), and a NaN
    or infinite loss stops the run before anything of its epoch is saved."""

    def __init__(self, path: Path, names: list[str], keep_steps: int, batch: int,
                 rt: runtime.Runtime, ckpt_path: Path, peak_lr: float):
        self.path, self.names, self.batch, self.rt = path, names, batch, rt
        self.ckpt_path, self.peak_lr = ckpt_path, peak_lr
        self.pending, self.t0 = [], time.time()
        if rt.rank == 0:             # keep the steps before the checkpoint, drop a torn line
            path.parent.mkdir(parents=True, exist_ok=True)
            header = ["epoch", "step", "lr", *names]
            rows = []
            if keep_steps and path.exists():
                for row in csv.reader(io.StringIO(path.read_text(errors="replace"))):
                    if len(row) == len(header) and row[1].isdigit() and int(row[1]) < keep_steps:
                        rows.append(row)
            text = io.StringIO()
            csv.writer(text).writerows([header, *rows])
            cli.write_atomic(path, text.getvalue())   # a crash leaves the old log or the new one

    def add(self, epoch: int, step: int, lr: float, losses: list[torch.Tensor], total: int,
            last: bool) -> None:
        self.pending.append((epoch, step - 1, lr, torch.stack(losses).float()))
        if not last:
            return
        logged = torch.stack([p[3] for p in self.pending])   # (steps, units): one sync
        if self.rt.world > 1:            # data parallel: the mean; a pipeline: each unit's own
            dist.all_reduce(logged)
            logged /= self.rt.data_world
        logged = logged.cpu()
        if not torch.isfinite(logged).all():
            bad = [n for n, ok in zip(self.names, torch.isfinite(logged).all(0)) if not ok]
            raise UserError(f"the loss of {', '.join(bad)} became NaN or infinite at epoch "
                            f"{epoch}, step {step}. {diverged(self.ckpt_path, self.peak_lr)}")
        if self.rt.rank == 0:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerows([e, s, f"{lr_:.6g}", *(f"{v:.5f}" for v in row)]
                                        for (e, s, lr_, _), row in zip(self.pending, logged.tolist()))
            rate = len(self.pending) * self.batch / (time.time() - self.t0)   # images/s
            losses_now = " ".join(f"{n} {v:.4f}" for n, v in zip(self.names, logged[-1]))
            print(f"epoch {epoch} step {step}/{total} | {losses_now} | lr {lr:.4g} | "
                  f"{rate:,.0f} img/s | eta {(total - step) * self.batch / rate / 60:.1f} min",
                  flush=True)
        self.pending, self.t0 = [], time.time()


def saved(ckpt_path: Path) -> str:
    """What a failure leaves behind, for its message."""
    if ckpt_path.exists():
        epoch = recipe.load_checkpoint(ckpt_path)["epoch"]
        return (f"Nothing of this epoch was saved: {ckpt_path} holds epoch {epoch}, the last "
                f"good one (continue from it with --resume).")
    return "No checkpoint was written yet (start again without --resume)."


def diverged(ckpt_path: Path, peak_lr: float) -> str:
    """What a diverged run leaves behind, and two ways on: resumed exactly it would diverge at
    the same step again, so at a lower peak lr (which --resume allows), or a new run."""
    new_run = "start a new run in another --out with a lower --lr or a higher --tau"
    if not ckpt_path.exists():
        return f"No checkpoint was written yet: {new_run}, or start this one again with them."
    epoch = recipe.load_checkpoint(ckpt_path)["epoch"]
    return (f"Nothing of this epoch was saved: {ckpt_path} holds epoch {epoch}, the last good "
            f"one. Continue it at a lower peak learning rate (the same command with --resume "
            f"--lr {peak_lr / 2:g}), or {new_run}.")


def check_weights(run: recipe.Run, epoch: int, ckpt_path: Path, peak_lr: float) -> None:
    """Never save blown-up weights as the last good epoch: an update can make them infinite, or
    huge, while the loss computed before it is still finite."""
    for part, module in (("encoder", run.encoder), ("heads", run.heads)):
        bad = recipe.bad_tensor(module.state_dict())
        if bad:
            raise UserError(f"weights went wrong in epoch {epoch}: {part}.{bad}. "
                            f"{diverged(ckpt_path, peak_lr)}")


def recorded(args: argparse.Namespace, rt: runtime.Runtime) -> dict:
    """The configuration as saved: every flag's resolved value, the number format and layout
    the device rule chose, and paths inside the repository relative to it, so that a committed
    result names no machine's folders."""
    precision = "fp64" if rt.dtype == torch.float64 else "bf16" if rt.bf16 else "fp32"
    return {**vars(args), "precision": precision,
            "memory_format": "channels_last" if rt.channels_last else "contiguous",
            "data_dir": cli.portable(args.data_dir), "out": cli.portable(args.out)}


def run_state(run: recipe.Run) -> dict:
    return {"encoder": run.encoder.state_dict(), "heads": run.heads.state_dict(),
            "optimizer": run.optimizer.state_dict(), "units": [[u.first, u.last] for u in run.units],
            "stage_of": run.stage_of}


def save_checkpoint(state: dict, epoch: int, step: int, args: argparse.Namespace,
                    rt: runtime.Runtime, path: Path) -> None:
    """The run's state (run_state, or pipeline.gather: the same keys), written whole or not at
    all (cli.write_atomic): a crash or a full disk mid-write leaves the previous checkpoint, and
    a full disk says so."""
    buffer = io.BytesIO()
    torch.save({**state, "epoch": epoch, "step": step, "config": recorded(args, rt),
                "provenance": runtime.provenance(rt)}, buffer)
    try:
        cli.write_atomic(path, buffer.getvalue())
    except OSError as e:
        raise UserError(f"{path}: writing epoch {epoch} failed ({e.strerror or e}). "
                        f"{saved(path)}") from None


if __name__ == "__main__":
    cli.run(main, "train.py")
