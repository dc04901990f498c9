"""Local units: the one file where SimCLR, GIM and LoCo differ.

The encoder is a chain of stages S1..SK (ResNet-50: conv1+res2, res3, res4, res5). A *unit* is a run
of adjacent stages with a decoder (head) on its top stage and an InfoNCE loss of its own. A unit's
loss trains its head and its stages and nothing below them: its gradient stops at the unit's input.
The methods differ only in their units (`make_units`); which losses reach which stage:

    stage   SimCLR (1 unit)   GIM (K units)   LoCo (K units)
    S4      L1                L4              L3  L4        L_k's head sits on:
    S3      L1                L3              L2  L3          SimCLR: S4
    S2      L1                L2              L1  L2          GIM:    S_k
    S1      L1                L1              L1              LoCo:   S_k+1 (k < K), S_K (k = K)

In LoCo, unit k is stages k and k+1, so every stage but the first learns from two losses: its own
unit's, and the unit below's, which through the shared stage carries feedback from above (Sec. 4.1).
`top_unit` adds the last row's unit L4 of the top stage alone; without it (the paper's Fig. 1,
three units on ResNet-50) the top stage learns from L3 only. Table 5's other ways to share:
"upper" (a shared stage's weights take only the upper unit's gradient; the lower unit's gradient
still crosses it), "1block"/"2blocks" (a unit reaches only the first blocks of the stage above:
the encoder is cut into finer *pieces*), and "soft" (each unit owns a copy of the stage above, in
its decoder, tied to the shared stage by an L2 penalty: decoders.py).

One step (`train_step`) runs each piece's forward once, its input cut from the graph below
(`detach`), so each piece's graph stands alone. As soon as a unit's head has run, its loss is
backpropagated through the head and carried down the unit's pieces by hand. Weight gradients are
linear in the output gradient, so a piece shared by two units needs one weight pass only, with the
two units' output gradients summed: the first unit's part is held until the second delivers its
own. An input-gradient pass runs only where a unit continues below the piece. So a LoCo step costs
the forward, one weight pass per piece and one input pass per crossing, and holds at most two
stages' graphs, one head's, and one held output gradient per shared stage (docs/speed-memory.md).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from losses import info_nce

METHODS = ("simclr", "gim", "loco")
SHARING = ("stage", "upper", "1block", "2blocks", "soft")     # Table 5's, for LoCo


@dataclass(frozen=True)
class Unit:
    first: int                          # lowest piece the unit's loss reaches (0-based)
    last: int                           # piece the unit's head sits on
    learns: frozenset = field(default=None)   # pieces whose weights take its gradient: all but
                                               # the ones another unit owns under "upper"

    def __post_init__(self):
        if self.learns is None:
            object.__setattr__(self, "learns", frozenset(range(self.first, self.last + 1)))


def make_pieces(stages: nn.ModuleList, sharing: str = "stage") -> tuple[list[nn.Module], list[int]]:
    """The pieces a step runs, and the stage of each: the stages themselves, or under "1block" /
    "2blocks" every stage above the first cut after its first one or two blocks."""
    n = {"1block": 1, "2blocks": 2}.get(sharing, 0)
    pieces, stage_of = [], []
    for k, stage in enumerate(stages):
        cut = [stage[:n], stage[n:]] if n and k > 0 and len(stage) > n else [stage]
        pieces += cut
        stage_of += [k] * len(cut)
    return pieces, stage_of


def make_units(method: str, stage_of: list[int], top_unit: bool = True,
               sharing: str = "stage") -> list[Unit]:
    """The units of a method on pieces whose stages are `stage_of`, ordered by their head's piece."""
    K = stage_of[-1] + 1
    first = [stage_of.index(k) for k in range(K)]         # first and last piece of each stage
    last = [len(stage_of) - 1 - stage_of[::-1].index(k) for k in range(K)]
    if method == "simclr":
        return [Unit(0, last[-1])]
    if method == "gim":
        return [Unit(first[k], last[k]) for k in range(K)]
    if method != "loco":
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    units = []
    for k in range(K - 1):
        shared = k + 1 < K - 1 or top_unit              # is stage k+1 also a unit's lowest?
        top = {"soft": last[k], "1block": first[k + 1], "2blocks": first[k + 1]}.get(sharing)
        units.append(Unit(first[k], top if shared and top is not None else last[k + 1]))
    units += [Unit(first[K - 1], last[K - 1])] if top_unit else []
    if sharing == "upper":                              # each piece learns from its upper unit only
        owner = {j: max((u for u in units if u.first <= j <= u.last), key=lambda u: u.first)
                 for j in range(len(stage_of))}
        units = [Unit(u.first, u.last, frozenset(j for j in u.learns if owner[j] == u))
                 for u in units]
    return units


def train_step(pieces: list[nn.Module], heads: nn.ModuleList, units: list[Unit],
               x1: torch.Tensor, x2: torch.Tensor, tau: float, group=None) -> list[torch.Tensor]:
    """Forward and backward of one step on two views (B, 3, H, W) each; returns every unit's loss.

    Gradients accumulate in the parameters' .grad. Zeroing them, averaging them across processes
    and the optimizer step belong to the caller. `group`: the processes whose views are negatives
    (losses.py; None: all of them).
    """
    assert [u.last for u in units] == sorted(u.last for u in units), "units out of order"
    visits = {j: sum(u.first <= j <= u.last for u in units) for j in range(len(pieces))}
    held = {}                             # piece j -> summed output gradient of its learning units
    graph = {}                            # piece j -> (its input, its output), until spent
    h, losses = torch.cat([x1, x2]), []   # (2B, 3, H, W): both views in one pass, one BatchNorm batch
    for j, piece in enumerate(pieces[:units[-1].last + 1]):
        # THE STOP-GRADIENT of local learning, at every piece's input: no loss from above reaches
        # the pieces below by itself. A unit's gradient is carried across by hand only where that
        # unit continues below (backward_unit, `cross`); at u.first it stops for good.
        a = h.detach().requires_grad_(any(u.first < j <= u.last for u in units))
        with torch.set_grad_enabled(visits[j] > 0):
            h = piece(a)                  # the piece's one forward in this step
        graph[j] = (a, h)
        for u, head in zip(units, heads):
            if u.last == j:               # the unit's loss exists now: backpropagate it at once
                losses.append(backward_unit(pieces, head, u, graph, held, visits, tau, group)[0])
    for head in filter(lambda head: head.tied is not None, heads):
        tie(pieces[head.tied_to], head.tied, head.tie_coef)   # soft sharing: copy to its stage
    return losses


def backward_unit(pieces, head, u: Unit, graph: dict, held: dict, visits: dict, tau: float,
                  group=None, bottom: int | None = None, weights: dict | None = None,
                  keep: frozenset = frozenset()) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unit u's loss, through its head, then down its pieces, top to bottom (carry). Returns the
    loss, detached, and where a pipeline stops the unit at its process's lowest piece `bottom`,
    the gradient that continues below it (pipeline.py: weights, keep)."""
    top = graph[u.last][1].detach().requires_grad_()    # the head's own cut: its graph is its own
    loss = info_nce(head(top), tau, group)
    loss.backward(inputs=[*head.parameters(), top])
    below = carry(pieces, u, top.grad, u.last, u.first if bottom is None else bottom, graph,
                  held, visits, weights, keep)        # top.grad: d loss_u / d (output of u.last)
    return loss.detach(), below


def carry(pieces, u: Unit, g: torch.Tensor, top: int, bottom: int, graph: dict, held: dict,
          visits: dict, weights: dict | None = None, keep: frozenset = frozenset()):
    """Unit u's gradient g at the output of piece `top`, down to piece `bottom`. Returns u's
    gradient at bottom's input where u continues below bottom (a pipeline sends it to the process
    below: pipeline.py), else None. `weights` and `keep`: pipeline.py's boundary piece, whose
    weights are a copy and whose graph a late gradient still needs."""
    for j in range(top, bottom - 1, -1):
        a, h = graph[j]
        if j in u.learns:                 # u's gradient joins the others' for piece j's weights
            held[j] = g if j not in held else held[j] + g
        visits[j] -= 1
        last = visits[j] == 0             # every unit through piece j has delivered its part
        cross = j > u.first               # u continues below j: it needs d loss_u / d (j's input)
        alone = last and held.get(j) is g  # j's weights learn from u alone: one pass does both
        params = (weights or {}).get(j) or [p for p in pieces[j].parameters() if p.requires_grad]
        if cross and not alone:           # input only: u's gradient, to carry it to piece j-1
            torch.autograd.backward(h, g, inputs=[a], retain_graph=True)
        if last and j in held:            # the one weight pass of piece j, summed gradients
            torch.autograd.backward(h, held.pop(j), retain_graph=j in keep,
                                    inputs=params + ([a] if cross and alone else []))
        if last and j not in keep:
            del graph[j]                  # no unit needs piece j's graph again
        if cross:
            g, a.grad = a.grad, None      # carry u's gradient across the cut, and only u's
        # Below u.first this unit's gradient stops: the loop ends, and nothing carries it further.
    return g if bottom > u.first else None


@torch.no_grad()
def tie(stage: nn.Module, copy: nn.Module, coef: float) -> None:
    """Gradient of coef * |w_stage - w_copy|^2 on both: +-2 coef (w_stage - w_copy)."""
    for p, q in zip(stage.parameters(), copy.parameters()):
        d = 2 * coef * (p - q)
        p.grad = d if p.grad is None else p.grad.add_(d)
        q.grad = -d if q.grad is None else q.grad.sub_(d)
