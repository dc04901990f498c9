"""Decoders (heads): what sits between a unit's top stage and its InfoNCE loss (paper, Table 4).

Every head ends in global average pooling and an MLP to a 128-d projection z (SimCLR's 2-layer
MLP, or 4 layers). Before the pooling, `kind` adds convolution, to widen the receptive field of
low stages (Sec. 4.2):

    none        nothing: SimCLR's head (its default)
    block       one residual bottleneck block with stride 2: the paper's local decoder, the
                default for GIM and LoCo (`default`); C channels in and out, bottleneck width C/4
                whatever the encoder
    block-nods  the same block with stride 1 (Table 4's "w/o ds")
    2blocks     a stride-2 block, then a stride-1 block
    stage       a fresh copy of the encoder's next stage (own weights, new initialisation): as deep
                as the next residual stage; nothing on the top stage, which has no next
    full        fresh copies of every stage above: as deep as the rest of the encoder

`top_kind` gives the heads on the top stage a decoder of their own (train.py --top-decoder):
the conv block is there to widen the receptive field of *lower* stages (Sec. 4.2), and on the top
stage Table 4 finds it does nothing for SimCLR.

Soft sharing (Table 5, local_units.py) puts one more thing first: the unit's own copy of the
stage above its top one (`tied`, initialised identical to the encoder's, tied to it by an L2
penalty of coefficient `tie_coef` in the step). The encoder evaluated afterwards is the chain of
the upper units' copies, i.e. the encoder's own stages; the tied copies are decoder parts.
"""

import copy

import torch
import torch.nn as nn

import model

DECODERS = ("none", "block", "block-nods", "2blocks", "stage", "full")


def default(method: str) -> str:
    """The paper's decoder of a method. GIM and LoCo: one residual conv block with downsampling
    before the 2-layer MLP. Sec. 5.4 decides it after Table 4's study: "To reduce the overhead we
    introduce in the decoder, we decide to add one residual convolution block only and keep the
    MLP depth to 2, as was done the original SimCLR", and Sec. 5.5 uses it everywhere: "All
    entries are equipped with 1 residual convolution block + 2-layer MLP decoders" (Table 5's
    LoCo row, 66.2, is Table 4's "Ours"). Sec. 5.1's "2-layer MLPs with global average pooling
    are used ... unless otherwise specified in ablation studies" reads otherwise; we follow the
    section that studies the question and decides it. SimCLR keeps its 2-layer MLP head: on the
    top stage the block does not help it (Table 4: 65.6 against 65.7)."""
    return "none" if method == "simclr" else "block"


def mlp(channels: int, layers: int, dim: int = 128) -> nn.Sequential:
    """(layers - 1) x [Linear-BN-ReLU] at the feature width, then Linear to dim (SimCLR: 2)."""
    hidden = [m for _ in range(layers - 1) for m in (nn.Linear(channels, channels, bias=False),
                                                       nn.BatchNorm1d(channels), nn.ReLU(True))]
    return nn.Sequential(*hidden, nn.Linear(channels, dim))  # no bias where BatchNorm follows


class Head(nn.Module):
    """[tied copy of a stage] -> [conv decoder] -> global average pool -> MLP -> z."""

    def __init__(self, convs: nn.Module, channels: int, mlp_layers: int = 2,
                 tied: nn.Module | None = None, tied_to: int | None = None, tie_coef: float = 0.0):
        super().__init__()
        self.tied, self.tied_to, self.tie_coef = tied, tied_to, tie_coef
        self.convs = convs
        self.mlp = mlp(channels, mlp_layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.tied is not None:
            h = self.tied(h)              # soft sharing: this unit's own copy of the stage above
        h = self.convs(h)                 # (2B, C, H, W) -> (2B, C', H', W')
        return self.mlp(h.mean((2, 3)))   # (2B, C') -> (2B, 128)


def convs(kind: str, stages: nn.ModuleList, c: int, k: int) -> tuple[nn.Module, int]:
    """The conv part of a decoder reading c channels of stage k, and the channels it ends with."""
    block = lambda stride: model.Bottleneck(c, max(1, c // 4), c, stride=stride)
    fresh = lambda ss: model.init_weights(copy.deepcopy(nn.Sequential(*ss)))
    parts = {"none": lambda: nn.Identity(), "block": lambda: block(2),
             "block-nods": lambda: block(1), "2blocks": lambda: nn.Sequential(block(2), block(1)),
             "stage": lambda: fresh(stages[k + 1:k + 2]), "full": lambda: fresh(stages[k + 1:])}
    if kind not in parts:
        raise ValueError(f"unknown decoder {kind!r}: choose one of {', '.join(DECODERS)}")
    if kind in ("stage", "full") and k + 1 < len(stages):
        return parts[kind](), model.out_channels(stages[-1 if kind == "full" else k + 1])
    return (nn.Identity(), c) if kind in ("stage", "full") else (parts[kind](), c)


def make_heads(stages: nn.ModuleList, pieces: list[nn.Module], stage_of: list[int], units: list,
               kind: str = "block", mlp_layers: int = 2, soft_coef: float | None = None,
               top_kind: str | None = None) -> nn.ModuleList:
    """One head per unit, on the output of its top piece (of stage stage_of[u.last]), built for
    that piece's channels. A head that reads the top stage gets `top_kind` if given (say "none":
    SimCLR's head, on the stage whose receptive field needs no widening), every other head `kind`.
    With soft_coef, a unit whose head sits below a stage that another unit starts with gets its
    own copy of that stage first (soft sharing)."""
    heads = []
    firsts = {stage_of[u.first] for u in units}
    kind_at = lambda k: top_kind if top_kind is not None and k == len(stages) - 1 else kind
    for u in units:
        k = stage_of[u.last]
        if soft_coef is not None and k + 1 in firsts:
            # soft sharing: instead of sharing stage k+1 with the unit above, this unit runs
            # its own copy of it, initialised identical and tied to it by the penalty
            c = model.out_channels(stages[k + 1])
            head = Head(*convs(kind_at(k + 1), stages, c, k + 1), mlp_layers,
                        copy.deepcopy(stages[k + 1]), k + 1, soft_coef)
        else:
            c = model.out_channels(pieces[u.last])
            head = Head(*convs(kind_at(k), stages, c, k), mlp_layers)
        heads.append(head)
    return nn.ModuleList(heads)
