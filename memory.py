"""Memory, counted: what a training step holds, on any device, the CPU included.

    with SavedBytes() as mem: step(...)     # mem.peak: activation memory (Table 7)
    with LiveBytes() as mem: step(...)      # mem.peak: every tensor, gradients and temporaries too

Local learning's memory claim (paper, Sec. 5.6) is about what a step must keep alive at once. A
device's allocator shows it on a GPU only, and mixes in weights, workspaces and caching; these
counters see every tensor as autograd or the dispatcher makes it, so the same step counts the same
on every machine. test_loco.py holds the method to them (SimCLR > LoCo > GIM; one weight pass per
piece costs at most one held output gradient); python -m tools.benchmark prints Tables 6 and 7.
"""

import weakref

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


class LiveBytes(TorchDispatchMode):
    """Context manager: live and peak bytes of every tensor the operations inside create, saved
    activations, gradients and temporaries alike (what a device's allocator would hold, on any
    device). A storage counts from the operation that makes it until its last holder frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._alive: set[int] = set()     # storage addresses counted and not yet freed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._alive:
                    self._alive.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, size)
        return out

    def _free(self, key: int, size: int) -> None:
        self._alive.discard(key)
        self.live -= size
