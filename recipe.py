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


# LARS moves a weight tensor by lr x eta (1e-3) of its norm per step, momentum 0.9 multiplies
# that by up to 10: at lr 100 a step can move every weight by its own norm. The paper's is 4.8.
MAX_LR = 100.0
SOFT_COEF = 1e-3                         # soft sharing's default penalty (Table 5's best, 1e-3)


def base_lr(cfg: dict) -> float:
    """--lr, or the paper's rule: 0.3 x batch / 256 (4.8 at batch 4096)."""
    return cfg["lr"] if cfg.get("lr") is not None else 0.3 * cfg.get("batch_size", 256) / 256


def default_warmup(epochs: int) -> float:
    """Warm-up epochs: the paper's 10 (Sec. 5.1: "linear warm-up is used for the first 10
    epochs", of 100 to 800), but never more than a tenth of the run, so that a short run reaches
    its peak learning rate early and spends the rest decaying from it."""
    return min(10.0, epochs / 10)


def resolved(cfg: dict) -> dict:
    """A configuration (train.py's flags) with every default made what the run uses: the
    decoder, the soft-sharing coefficient, the peak lr, the temperature, the warm-up, the
    pipeline's mode. config.json and checkpoints record it so; --resume compares it, so that a
    flag typed at its default is the same run as the flag left out."""
    cfg = dict(cfg)
    method = cfg["method"]
    cfg["decoder"] = cfg.get("decoder") or decoders.default(method)
    soft = cfg.get("sharing", "stage") == "soft"
    cfg["soft_coef"] = (cfg.get("soft_coef") or SOFT_COEF) if soft else None
    cfg["lr"] = base_lr(cfg)
    if cfg.get("tau") is None:
        cfg["tau"] = data.DATASETS[cfg["dataset"]].tau
    if cfg.get("warmup_epochs") is None:
        cfg["warmup_epochs"] = default_warmup(cfg["epochs"])
    if cfg.get("pipeline", 1) > 1 and not cfg.get("pipeline_mode"):
        cfg["pipeline_mode"] = default_mode(method)
    return cfg


def default_mode(method: str) -> str:
    """A pipeline's mode (pipeline.py): SimCLR's one unit crosses every process, so only sync
    computes it exactly; the local methods run async, without waiting (docs/model-parallel.md)."""
    return "sync" if method == "simclr" else "async"


def check(cfg: dict) -> None:
    """Refuse, before any work, a configuration whose flags contradict each other or do nothing:
    every combination that train.py's -h offers either runs or is refused here with one line."""
    method, sharing, decoder = cfg["method"], cfg.get("sharing", "stage"), cfg.get("decoder")

    def refuse(message: str):
        raise UserError(message, flag=True)

    if method != "loco" and sharing != "stage":
        refuse(f"--sharing {sharing}: sharing strategies are LoCo's (Table 5); use --method "
               f"loco, or leave --sharing out")
    if cfg.get("soft_coef") is not None and sharing != "soft":
        refuse("--soft-coef sets soft sharing's penalty: add --sharing soft, or leave it out")
    if method != "loco" and not cfg.get("top_unit", True):
        refuse(f"--no-top-unit removes LoCo's unit of the top stage alone; {method} has no such "
               f"unit: leave it out")
    if method == "simclr" and cfg.get("top_decoder"):
        refuse("--top-decoder: SimCLR's one head is on the top stage; choose its decoder with "
               "--decoder")
    decoder = decoder or decoders.default(method)
    if cfg.get("top_decoder") and cfg["top_decoder"] == decoder:
        refuse(f"--top-decoder {cfg['top_decoder']} is what --decoder gives every head already: "
               f"leave it out")
    if decoder in ("stage", "full") and method == "simclr":
        refuse(f"--decoder {decoder} copies the stages above a head's stage; SimCLR's head is on "
               f"the top stage, with nothing above: use none, block, block-nods or 2blocks")
    if decoder in ("stage", "full") and sharing in ("1block", "2blocks"):
        refuse(f"--decoder {decoder} copies whole stages above a head's stage; under --sharing "
               f"{sharing} a unit ends inside a stage: use block, block-nods or 2blocks")
    warmup, epochs = cfg.get("warmup_epochs"), cfg.get("epochs")
    if warmup is not None and epochs is not None and warmup >= epochs:
        refuse(f"--warmup-epochs {warmup:g} is not shorter than --epochs {epochs}: the learning "
               f"rate would still be climbing when the run ends, never reaching --lr nor "
               f"decaying; give fewer than {epochs}, or leave it out (a tenth of --epochs, at "
               f"most the paper's 10)")
    lr = base_lr(cfg)
    if lr > MAX_LR:
        refuse(f"--lr {lr:g} (peak): above {MAX_LR:g}, LARS moves weights by more than their own norm "
               f"per step and training cannot converge (the paper's is 4.8 at batch 4096)")


def build(cfg: dict, rt: Runtime, lr: float = 0.0) -> Run:
    """Encoder, decoders, units and LARS of a configuration (train.py's flags as a dict), on rt's
    device in rt's dtype and memory format. The caller seeds torch first: same seed, same weights."""
    check(cfg)
    method, sharing = cfg["method"], cfg.get("sharing", "stage")
    try:
        encoder = model.build_encoder(cfg["arch"], cfg["width"],
                                      data.DATASETS[cfg["dataset"]].stem)
    except ValueError as e:              # a width that leaves a layer no channel
        raise UserError(f"--width {cfg['width']:g}: {e}", flag=True) from None
    pieces, stage_of = L.make_pieces(encoder.stages, sharing)
    units = L.make_units(method, stage_of, cfg.get("top_unit", True), sharing)
    decoder = cfg.get("decoder") or decoders.default(method)   # Sec. 5.4: a conv block + MLP
    heads = decoders.make_heads(encoder.stages, pieces, stage_of, units, decoder,
                                cfg.get("mlp_layers", 2),
                                (cfg.get("soft_coef") or SOFT_COEF) if sharing == "soft" else None,
                                cfg.get("top_decoder"))
    for m in (encoder, heads):
        if cfg.get("sync_bn") and rt.data_world > 1:
            runtime.sync_batchnorm(m, rt.device, rt.data_group)  # BatchNorm over the global batch
        m.to(rt.device, rt.dtype, memory_format=rt.memory_format)
    if cfg.get("compile"):
        runtime.compile_in_place([*encoder.stages, *heads])
    optimizer = lars([*encoder.parameters(), *heads.parameters()], lr,
                     cfg.get("weight_decay", 1e-6))
    return Run(encoder, heads, units, optimizer, pieces, stage_of)


# No trained network's tensor reaches this magnitude: the largest in our CIFAR-10 runs (a
# BatchNorm running variance) is about 40 (docs/troubleshooting.md). A weight of 1e37 is finite
# and still a blown-up run, and a few more steps overflow float32.
WEIGHT_LIMIT = 1e6


def bad_tensor(state: dict) -> str | None:
    """The first tensor of a state dict that is NaN, infinite or beyond WEIGHT_LIMIT, named and
    said why; None if all are sound."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and t.numel() and not t.is_meta:
            if not torch.isfinite(t).all():
                return f"{name} holds NaN or infinite values"
            biggest = t.abs().max().item()
            if biggest > WEIGHT_LIMIT:
                return (f"{name} holds {biggest:.3g}, beyond {WEIGHT_LIMIT:g} (no trained "
                        f"network's weights reach it)")
    return None


# Flags added after runs were recorded, with the value those runs had: no --top-decoder, one
# process (no pipeline, so no mode and no placement)
BEFORE_FLAGS = {"top_decoder": None, "pipeline": 1, "pipeline_mode": None, "placement": None}


def upgraded(cfg: dict) -> dict:
    """A configuration as a checkpoint or config.json recorded it, in today's terms and resolved
    (`resolved`): older ones recorded flags as typed (no decoder meant the paper's, one conv
    block for GIM and LoCo; runs that trained MLP-only decoders recorded "none" and stay so; no
    lr, tau or pipeline mode meant the rule's), and lack the flags added since."""
    return resolved({**BEFORE_FLAGS, **cfg})


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
    ckpt["config"] = upgraded(ckpt["config"])
    for part in ("encoder", "heads"):
        bad = bad_tensor(ckpt[part])
        if bad:
            raise UserError(f"{path}: {part}.{bad}; this checkpoint cannot be used (the run "
                            f"that wrote it had diverged)")
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
