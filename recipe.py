"""The paper's pre-training recipe in one place (Sec. 5.1): what a configuration builds, and how it
is optimised. Every script that trains or times a step builds it here, so they all run the same.

    run = recipe.build(cfg, rt)     # encoder, heads (decoders), units, optimizer, on rt's device
    recipe.lr_at(step, base, warmup, total)

LARS (You et al., 2017) as in SimCLR: SGD with momentum 0.9, each weight tensor's step scaled by
the trust ratio eta * |w| / |g|, weight decay 1e-6; BatchNorm and bias parameters get neither
weight decay nor the trust ratio. Learning rate 0.3 x batch/256 (4.8 at the paper's 4096), linear
warm-up for 10 epochs then cosine decay to 0, both per step.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import data
import decoders
import local_units as L
import model
import runtime
from cli import UserError
from runtime import Runtime


class LARS(torch.optim.Optimizer):
    """SGD with momentum, each tensor's step scaled by the trust ratio eta * |w| / |g|. Groups with
    `lars=False` (BatchNorm and bias parameters) get neither weight decay nor the trust ratio.
    Vectorised: torch._foreach_* ops over all tensors, no per-tensor Python loop."""

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


def lars(params: list[nn.Parameter], lr: float, weight_decay: float = 1e-6) -> LARS:
    """LARS over weight tensors; BatchNorm and bias parameters (1-d) in a plain-SGD group."""
    return LARS([{"params": [p for p in params if p.ndim > 1]},
                 {"params": [p for p in params if p.ndim <= 1], "lars": False,
                  "weight_decay": 0.0}], lr=lr, weight_decay=weight_decay)


def lr_at(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 for `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class Run:
    encoder: model.StagedEncoder
    heads: nn.ModuleList                  # one decoder per unit
    units: list[L.Unit]
    optimizer: LARS
    pieces: list[nn.Module]               # what a step runs: the stages, or finer (local_units)
    stage_of: list[int]                   # the stage of each piece

    @property
    def params(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.heads.parameters()]

    def step(self, x1: torch.Tensor, x2: torch.Tensor, tau: float, rt: Runtime) -> list[torch.Tensor]:
        """One training step on two views: the method's forward and backward (local_units), the
        gradients averaged over processes, one LARS update. Returns every unit's loss."""
        with rt.autocast():
            losses = L.train_step(self.pieces, self.heads, self.units, rt.prepare(x1),
                                  rt.prepare(x2), tau)
        if rt.world > 1:
            runtime.average_gradients(self.params, rt.world)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return losses


def build(cfg: dict, rt: Runtime, lr: float = 0.0) -> Run:
    """Encoder, decoders, units and LARS of a configuration (train.py's flags as a dict), on rt's
    device in rt's dtype and memory format. The caller seeds torch first: same seed, same weights."""
    method, sharing = cfg["method"], cfg.get("sharing", "stage")
    if method != "loco" and sharing != "stage":
        raise UserError(f"--sharing {sharing}: sharing strategies are LoCo's (Table 5); "
                        f"use --method loco, or leave --sharing out", flag=True)
    if method == "simclr" and cfg.get("top_decoder"):
        raise UserError("--top-decoder: SimCLR's one head is on the top stage; choose its "
                        "decoder with --decoder", flag=True)
    encoder = model.build_encoder(cfg["arch"], cfg["width"], data.DATASETS[cfg["dataset"]].stem)
    pieces, stage_of = L.make_pieces(encoder.stages, sharing)
    units = L.make_units(method, stage_of, cfg.get("top_unit", True), sharing)
    decoder = cfg.get("decoder") or ("none" if method == "simclr" else "block")
    heads = decoders.make_heads(encoder.stages, encoder.channels, units, stage_of, decoder,
                                cfg.get("mlp_layers", 2),
                                cfg.get("soft_coef", 1e-3) if sharing == "soft" else None,
                                cfg.get("top_decoder"))
    for m in (encoder, heads):
        if cfg.get("sync_bn") and rt.world > 1:
            runtime.sync_batchnorm(m, rt.device)   # BatchNorm over the global batch
        m.to(rt.device, rt.dtype, memory_format=rt.memory_format)
    if cfg.get("compile"):
        runtime.compile_in_place([*encoder.stages, *heads])
    optimizer = lars([*encoder.parameters(), *heads.parameters()], lr,
                     cfg.get("weight_decay", 1e-6))
    return Run(encoder, heads, units, optimizer, pieces, stage_of)


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint written by train.py, on the CPU; anything else is refused with one line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint (train.py writes RUN/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch.load raises whatever the unpickler meets in a foreign file
        raise UserError(f"{path} is not a checkpoint written by train.py "
                        f"(torch.load: {str(e).splitlines()[0][:80]})")
    if not isinstance(ckpt, dict) or not {"config", "encoder", "heads", "epoch"} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint written by train.py "
                        f"(it needs 'config', 'encoder', 'heads' and 'epoch')")
    return ckpt


def load_encoder(ckpt_path: str, device: torch.device, random_init: bool = False):
    """The frozen encoder of a checkpoint, and the checkpoint. random_init: the same encoder as
    the run began it (same seed), before any training."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt["config"]
    torch.manual_seed(cfg["seed"])
    encoder = model.build_encoder(cfg["arch"], cfg["width"], data.DATASETS[cfg["dataset"]].stem)
    if not random_init:
        encoder.load_state_dict(ckpt["encoder"])
    encoder.to(device).eval().requires_grad_(False)
    return encoder, ckpt
