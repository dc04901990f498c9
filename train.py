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
    return p.parse_args(argv)


class LARS(torch.optim.Optimizer):
    """SGD with momentum, scaled per layer by the trust ratio eta * |w| / |g| (You et al., 2017),
    as in SimCLR. Groups with `lars=False` (BatchNorm and bias parameters) get neither weight decay
    nor the trust ratio. Vectorised: torch._foreach_* ops over all tensors, no per-tensor loop."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6,
                 eta: float = 1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars=True))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            gs = [p.grad for p in ps]
            if group["lars"]:
                gs = torch._foreach_add(gs, ps, alpha=group["weight_decay"])
                w, g = torch.stack(torch._foreach_norm(ps)), torch.stack(torch._foreach_norm(gs))
                trust = torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w))
                gs = torch._foreach_mul(gs, list(trust.unbind()))
            bufs = [self.state[p].setdefault("momentum", torch.zeros_like(p)) for p in ps]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, gs, alpha=group["lr"])
            torch._foreach_sub_(ps, bufs)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class AllReduce(torch.autograd.Function):
    """Sum over processes; its backward sums the gradients, as every process's loss uses the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every process's batch, where nn.SyncBatchNorm cannot run (it
    needs CUDA). Its all-reduce carries gradient back, so N processes normalise and differentiate
    exactly as one process holding all N batches. Same parameters and buffers as BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        n = x.numel() // x.shape[1] * dist.get_world_size()
        mean = AllReduce.apply(x.sum(dims)) / n                    # (C,), over all processes
        # Two passes: E[x^2] - E[x]^2 in float32 loses enough digits to move gradients by 1e-2.
        var = AllReduce.apply((x - mean.view(shape)).pow(2).sum(dims)) / n
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        scale = self.weight * torch.rsqrt(var + self.eps)
        return x * scale.view(shape) + (self.bias - mean * scale).view(shape)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device)
    return module


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average every gradient over processes, once per step: LoCo backpropagates several losses
    per step, so DDP's per-backward hooks would reduce too early or twice. One flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def compile_in_place(modules: list[nn.Module]) -> None:
    """torch.compile each stage and head in place (no "_orig_mod." prefix in state_dict keys).

    LoCo backpropagates twice through a shared stage, the first time with retain_graph=True, and
    two settings make that correct: no donated buffers (they refuse retain_graph), and static
    shapes: with automatic dynamic shapes, inductor (torch 2.14, CPU) gave wrong weight gradients
    on the second backward through a stage compiled after a same-code stage of another shape.
    test_train.py compares a compiled LoCo step with an eager one."""
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    for m in modules:
        m.compile(dynamic=False)


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a crash mid-write leaves the old file."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    # Distributed set-up: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them, one process.
    rank, world, local = (int(os.environ.get(k, d)) for k, d in
                          [("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)])
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} processes: "
                         f"use a multiple of {world}")
    if args.device:
        device = torch.device(args.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", local)
    elif torch.backends.mps.is_available() and world == 1:
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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

    # Model and heads: the units decide which stages each loss trains (local_units.py).
    stem = info.stem
    encoder = model.build_encoder(args.arch, args.width, stem)
    units = L.make_units(args.method, len(encoder.stages))
    heads = L.make_heads(args.method, encoder.channels, units)
    if args.sync_bn and world > 1:
        encoder, heads = sync_batchnorm(encoder, device), sync_batchnorm(heads, device)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder.to(device, memory_format=fmt), heads.to(device, memory_format=fmt)
    if args.compile:
        compile_in_place([*encoder.stages, *heads])
    names = ["loss_s" + (f"{u.first + 1}" if u.first == u.last else f"{u.first + 1}-{u.last + 1}")
             for u in units]

    # Optimizer and schedule, both per step.
    params = [*encoder.parameters(), *heads.parameters()]
    base_lr = args.lr or 0.3 * args.batch_size / 256
    optimizer = LARS([{"params": [p for p in params if p.ndim > 1]},
                      {"params": [p for p in params if p.ndim <= 1], "lars": False,
                       "weight_decay": 0.0}], lr=base_lr, weight_decay=args.weight_decay)
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
              f"{world} process(es) on {device} | batch {args.batch_size} | {steps_per_epoch} "
              f"steps/epoch | units {names}", flush=True)

    # The loop.
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
    step = start_epoch * steps_per_epoch
    pending, lrs, t0, seen = [], [], time.time(), 0
    for epoch in range(start_epoch, args.epochs):
        encoder.train(), heads.train()
        for x1, x2 in loader.epoch(epoch):
            lr = lr_at(step, base_lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x1, x2 = (x.contiguous(memory_format=fmt) for x in (x1, x2))
            with autocast:
                losses = L.train_step(encoder, heads, units, x1, x2, tau)
            if world > 1:
                average_gradients(params, world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
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
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")
