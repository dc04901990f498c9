"""What locality buys, measured: per-stage memory and FLOPs (paper Table 6), peak memory (Table 7).

Activation memory is counted, not sampled: `SavedBytes` watches every tensor autograd saves for
backward and keeps the running total of those still alive, so its peak is the activation memory of
a step on any device, CPU included. FLOPs are multiply-accumulates, the paper's convention (plain
ResNet-50 at 224 counts 4.1 G), from torch's own FlopCounterMode.

    python benchmark.py stages            # Table 6 for resnet50 and presnet50 at 224, on the CPU
"""

import argparse
import json

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import model


class SavedBytes:
    """Context manager: live and peak bytes of tensors saved for backward (parameters excluded).

    A storage saved by several nodes (a ReLU output kept by the ReLU and the next conv) counts
    once; it stops counting when the last node holding it is freed.
    """

    def __init__(self):
        self.live = self.peak = 0
        self._count: dict[int, int] = {}  # storage address -> how many saved references hold it

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t                      # weights (or views of them, like a Linear's W.T) exist
                                          # anyway: they are not activation memory
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if self._count.get(key, 0) == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self._count[key] = self._count.get(key, 0) + 1
        return _Held(t, key, size, self)

    def _unpack(self, held):
        return held if isinstance(held, torch.Tensor) else held.t

    def _release(self, key: int, size: int) -> None:
        self._count[key] -= 1
        if self._count[key] == 0:
            del self._count[key]
            self.live -= size

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor; when autograd frees it, the counter hears of it."""

    def __init__(self, t, key, size, counter):
        self.t, self.key, self.size, self.counter = t, key, size, counter

    def __del__(self):
        self.counter._release(self.key, self.size)


def stage_profile(encoder: model.StagedEncoder, x: torch.Tensor) -> list[dict]:
    """Per stage: multiply-accumulates and bytes saved for backward, for one forward of x."""
    rows = []
    for stage in encoder.stages:
        with FlopCounterMode(display=False) as flops, SavedBytes() as mem:
            y = stage(x)
        rows.append({"macs": flops.get_total_flops() // 2, "saved_bytes": mem.peak})
        x = y.detach()
        del y                             # frees this stage's graph before the next is built
    return rows
