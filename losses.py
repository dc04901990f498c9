"""InfoNCE over the 2N views of a batch: the paper's Eq. (1), in SimCLR's form (NT-Xent).

A batch of N images gives 2N views, whose projections arrive as one matrix z (2N, D): rows 0..N-1
are the first views, rows N..2N-1 the second views of the same images. Anchor i's positive is the
other view of its image; the other 2N-2 views are its negatives:

    loss_i = -log( exp(s(i, pos(i)) / tau) / sum_{j != i} exp(s(i, j) / tau) ),   s = cosine similarity

and the loss is the mean over all 2N anchors.

Across processes (torch.distributed), each process holds a slice of the global batch. Its anchors
are its own views, but its negatives are the views of every process, gathered by `gather`, whose
backward sums the gradients that every process's loss sends to a view and hands each process the
part for its own views. After the caller averages parameter gradients over processes (train.py),
N processes holding a slice each compute exactly the loss and gradients of one process holding the
whole batch (test_loco.py checks this with two processes). A gather without that backward (the
common `all_gather` under no_grad) silently drops the gradient through other processes' negatives.
"""

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world(group=None) -> tuple[int, int]:
    """(rank, size) in the process group (None: all processes); (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


class Gather(torch.autograd.Function):
    """All-gather along dim 0, with a backward that returns every process's gradient for our rows."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, group) -> torch.Tensor:
        rank, size = world(group)
        out = z.new_empty((size * z.shape[0], *z.shape[1:]))
        dist.all_gather_single(out, z.contiguous(), group=group)
        ctx.rows, ctx.group = slice(rank * z.shape[0], (rank + 1) * z.shape[0]), group
        return out                          # (size * n, D), process r's rows at r*n..(r+1)*n-1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # what every process's loss sends to each row
        return grad[ctx.rows], None


def gather(z: torch.Tensor, group=None) -> torch.Tensor:
    return Gather.apply(z, group) if world(group)[1] > 1 else z


def info_nce(z: torch.Tensor, tau: float, group=None) -> torch.Tensor:
    """Mean InfoNCE over this process's 2n views z (2n, D) = [view 1 of n images; view 2 of them];
    the negatives are the views of every process in `group` (None: all processes)."""
    n2 = z.shape[0]
    assert n2 % 2 == 0, "z must hold two views of every image"
    rank, _ = world(group)
    # Similarities in float32 even under bf16 autocast: logits up to 1/tau = 10 leave bf16 with
    # about two significant digits, too coarse for a softmax over thousands of negatives.
    with torch.autocast(z.device.type, enabled=False):
        z = F.normalize(z.to(torch.promote_types(z.dtype, torch.float32)), dim=1)
        everyone = gather(z, group)                           # (world * 2n, D)
        logits = z @ everyone.T / tau                         # (2n, world * 2n)
        # Labels from the batch actually received, never from a nominal batch size.
        i = torch.arange(n2, device=z.device)
        own = rank * n2 + i                                   # column of each anchor itself
        positive = rank * n2 + (i + n2 // 2) % n2             # column of the other view
        logits = logits.scatter(1, own[:, None], -math.inf)   # a view is no negative of itself
        return F.cross_entropy(logits, positive)
