"""Local units: the one file where SimCLR, GIM and LoCo differ.

The encoder is a chain of stages S1..SK (ResNet-50: conv1+res2, res3, res4, res5). A *unit* is a run
of adjacent stages with a decoder (head) on its top stage and an InfoNCE loss of its own. A unit's
loss trains its head and its stages and nothing below them: its gradient stops at the unit's input.
The three methods differ only in their units (`make_units`); which losses reach which stage:

    stage   SimCLR (1 unit)   GIM (K units)   LoCo (K units)
    S4      L1                L4              L3  L4        L_k's head sits on:
    S3      L1                L3              L2  L3          SimCLR: S4
    S2      L1                L2              L1  L2          GIM:    S_k
    S1      L1                L1              L1              LoCo:   S_k+1 (k < K), S_K (k = K)

In LoCo, unit k is stages k and k+1, so every stage but the first learns from two losses: its own
unit's, and the unit below's, which through the shared stage carries feedback from above (Sec. 4.1).
The top stage has a unit of its own too, the loss on the full encoder (the paper's Fig. 2).

How one step runs (`train_step`), and why it saves memory:
- Each stage's forward runs once. Its input is cut from the graph below (`detach`), so each stage's
  graph stands alone and can be freed by itself.
- As soon as a unit's top stage has run, its loss is computed and backpropagated: through the head,
  then stage by stage down to the unit's first stage, carrying the gradient across each cut by hand,
  and no further. A stage's graph is freed by the last unit that passes through it. So LoCo holds
  at most two stages' graphs and one head's at a time, GIM one stage's, SimCLR all of them.
- The price, as in the paper: the backward of a shared stage runs twice, once per unit.

Decoders (Sec. 5.1, 5.4): SimCLR's head is global average pooling and a 2-layer MLP to 128-d. A local
head (GIM, LoCo) first adds one residual bottleneck block with stride 2 (Table 4: "1 conv block"),
to widen the receptive field of low stages. Choice: the block keeps the channel count and uses a
bottleneck width of C/4, as in ResNet-50, whatever the encoder.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

from losses import info_nce
from model import Bottleneck

METHODS = ("simclr", "gim", "loco")


@dataclass(frozen=True)
class Unit:
    first: int  # lowest stage the unit's loss trains (0-based)
    last: int   # stage the unit's head sits on


def make_units(method: str, num_stages: int) -> list[Unit]:
    """The units of a method, ordered by the stage their head sits on."""
    K = num_stages
    if method == "simclr":
        return [Unit(0, K - 1)]
    if method == "gim":
        return [Unit(k, k) for k in range(K)]
    if method == "loco":
        return [Unit(k, k + 1) for k in range(K - 1)] + [Unit(K - 1, K - 1)]
    raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")


class Head(nn.Module):
    """Decoder: [bottleneck block, stride 2] -> global average pool -> Linear-BN-ReLU-Linear -> z."""

    def __init__(self, channels: int, local: bool, dim: int = 128):
        super().__init__()
        self.block = (Bottleneck(channels, max(1, channels // 4), channels, stride=2) if local
                      else nn.Identity())
        self.mlp = nn.Sequential(nn.Linear(channels, channels, bias=False),  # BN follows
                                 nn.BatchNorm1d(channels),
                                 nn.ReLU(inplace=True), nn.Linear(channels, dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.block(h)                 # (2B, C, H, W) -> (2B, C, H/2, W/2), local heads only
        return self.mlp(h.mean((2, 3)))   # (2B, C) -> (2B, dim)


def make_heads(method: str, channels: list[int], units: list[Unit]) -> nn.ModuleList:
    """One head per unit, on the output channels of the unit's top stage."""
    return nn.ModuleList(Head(channels[u.last], local=method != "simclr") for u in units)


def train_step(encoder: nn.Module, heads: nn.ModuleList, units: list[Unit],
               x1: torch.Tensor, x2: torch.Tensor, tau: float) -> list[torch.Tensor]:
    """Forward and backward of one step on two views (B, 3, H, W) each; returns every unit's loss.

    Gradients accumulate in the parameters' .grad. Zeroing them, averaging them across processes
    and the optimizer step belong to the caller.
    """
    assert [u.last for u in units] == sorted(u.last for u in units), "units out of order"
    h = torch.cat([x1, x2])               # (2B, 3, H, W): both views in one pass, one BatchNorm batch
    graph = {}                            # stage k -> (its input, its output), until spent
    losses = []
    for k, stage in enumerate(encoder.stages[:units[-1].last + 1]):
        # The cut at every stage input: no gradient flows back across it by itself. A unit's
        # gradient crosses it only where backward_unit carries it, so each stage's graph is separate.
        a = h.detach().requires_grad_(k > 0)
        with torch.set_grad_enabled(any(u.first <= k <= u.last for u in units)):
            h = stage(a)                  # the stage's one forward in this step
        graph[k] = (a, h)
        for i, u in enumerate(units):
            if u.last == k:               # the unit's loss exists now: backpropagate it at once
                losses.append(backward_unit(encoder, heads[i], units, i, graph, tau))
    return losses


def backward_unit(encoder: nn.Module, head: nn.Module, units: list[Unit], i: int,
                  graph: dict, tau: float) -> torch.Tensor:
    """Loss of unit i, backpropagated through its head and its stages, top to bottom."""
    u = units[i]
    # The head gets a cut of its own too, so that its graph is freed by its own backward.
    top = graph[u.last][1].detach().requires_grad_()
    loss = info_nce(head(top), tau)
    loss.backward(inputs=[*head.parameters(), top])
    grad, top = top.grad, None            # d loss / d (output of the unit's top stage)
    # Down the unit's own stages and no further: below u.first this unit's gradient stops.
    for j in range(u.last, u.first - 1, -1):
        a, h = graph[j]
        below = [a] if j > u.first else []  # d loss / d (stage j's input), only to carry it down
        later = any(v.first <= j <= v.last for v in units[i + 1:])
        params = [p for p in encoder.stages[j].parameters() if p.requires_grad]
        torch.autograd.backward(h, grad, inputs=params + below,
                                retain_graph=later)   # keep stage j's graph for a later unit
        grad, a.grad = a.grad, None       # carry the gradient across the cut; drop the old one
        if not later:
            del graph[j]                  # no unit needs stage j's graph again
    return loss.detach()
