"""Model-parallel LoCo: the encoder's pieces in contiguous groups, one group per process.

    torchrun --nproc_per_node 2 train.py --method loco --pipeline 2                # async
    torchrun --nproc_per_node 2 train.py --method loco --pipeline 2 --pipeline-mode sync

Local learning "is a natural fit for model parallelism" (paper, Sec. 2): a unit's gradient stops
at its input, so a process that holds a few stages needs nothing from the processes above it to
train them. Nothing, except in LoCo: the unit that straddles two processes (its lower stage here,
its upper stage and head on the next process) trains the lower stage too, so its gradient at the
boundary (one tensor, the size of the boundary activation) comes back. Each process holds only
its pieces, the heads whose unit ends on them, their optimizer state; the first also reads and
augments the data. Per step, on process p of P (pieces lo..hi-1):

    receive h from p-1 (p = 0: the batch)      forward own pieces; send h to p+1
    each unit whose head is here: its loss, its backward down to lo; gradients that continue
    below lo go to p-1 | gradients from p+1 for the units crossing hi-1|hi: sync, wait for this
    batch's; async, apply the previous batch's | LARS on own parameters

Two modes (docs/model-parallel.md):
- sync: p waits for p+1's gradient before the weight pass of its top piece, so a step computes
  exactly local_units.train_step's gradients (tests/test_pipeline.py, float64, 1e-10). SimCLR's
  one unit crosses every boundary: it runs sync only, as plain model parallelism.
- async (LoCo and GIM): p starts the next batch at once and applies the straddling unit's
  gradient when it arrives, one step late, through the graph of the batch it belongs to, with
  that batch's weights: the top piece runs its forward on a copy of its weights (LARS updates the
  originals in place meanwhile), and its graph and the copy live one step longer, the price in
  memory. That piece then takes two weight passes a step: the local units' fresh one and the
  straddling unit's late one. Only the top stage of each process but the last sees a stale
  gradient, one step old; GIM sends nothing back, so its async step is its sync step. At most
  one batch is in flight per boundary, and the late gradient of an epoch's last batch is turned
  into a weight gradient before the checkpoint, which keeps it (`pending`): resume stays exact.

Placement: the contiguous split with the smallest slowest group, by each piece's measured cost;
async prefers cuts below which the piece still learns from a fresh unit (`fresh`: LoCo's first
stage, whose only unit straddles a cut right above it, would learn from late gradients alone).
--placement sets it by hand.
"""

import itertools
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.func import functional_call

import local_units as L
import recipe
from cli import UserError
from losses import info_nce
from runtime import Runtime

MODES = ("sync", "async")
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
FORWARD, BACKWARD = 1, 2                  # message tags: activations up, gradients down


def check(cfg: dict, stages: int) -> None:
    """Refuse, with one line, a pipeline this code cannot run."""
    P, mode = cfg.get("pipeline", 1), cfg.get("pipeline_mode")
    if P == 1:
        if mode is not None or cfg.get("placement"):
            raise UserError(f"--{'pipeline-mode' if mode else 'placement'} is a pipeline's: add "
                            f"--pipeline P (P > 1), or leave it out", flag=True)
        return
    if P > stages:
        raise UserError(f"--pipeline {P}: the encoder has {stages} stages, and each process "
                        f"needs at least one", flag=True)
    if cfg.get("placement") and len(cfg["placement"].split(",")) != P:
        raise UserError(f"--placement {cfg['placement']}: one number per process of "
                        f"--pipeline {P}", flag=True)
    if cfg["method"] == "simclr" and mode == "async":
        raise UserError("--pipeline-mode async: SimCLR's one unit crosses every process, so "
                        "every gradient would be stale; use sync", flag=True)
    if cfg.get("sharing") == "soft":
        raise UserError("--sharing soft ties copies of stages that live on different processes: "
                        "not built under --pipeline", flag=True)
    if cfg.get("compile"):
        raise UserError("--compile with --pipeline is not tested: leave one out", flag=True)


def mode_of(cfg: dict) -> str:
    """sync for SimCLR, async for the local methods, unless --pipeline-mode says."""
    return cfg.get("pipeline_mode") or recipe.default_mode(cfg["method"])


# ---------------------------------------------------------------------------- placement
def crossing(units: list[L.Unit], j: int) -> list[int]:
    """The units whose gradient crosses the cut between piece j and piece j+1."""
    return [i for i, u in enumerate(units) if u.first <= j < u.last]


def cuts(units: list[L.Unit], pieces: int, mode: str) -> list[int]:
    """Where a group may end (after piece j). Async applies a late gradient to one piece only,
    so there every unit crossing the cut must start at the piece below it."""
    return [j for j in range(pieces - 1)
            if mode == "sync" or all(units[i].first == j for i in crossing(units, j))]


def fresh(units: list[L.Unit], allowed: list[int]) -> list[int]:
    """Of the cuts `allowed`, those where the piece below the cut still learns from a unit that
    ends below it, or takes no late gradient at all. Elsewhere the late gradient would be the
    piece's only one: measured (docs/model-parallel.md), LoCo with S1 alone on the first process
    lost 1.0 point at the final stage and 2.8 at S1; cut after S2 instead, 0.2."""
    late = lambda j: any(j in units[i].learns for i in crossing(units, j))
    return [j for j in allowed if not late(j) or any(j in u.learns and u.last <= j for u in units)]


def preferred(units: list[L.Unit], allowed: list[int], mode: str, P: int) -> list[int]:
    """The cuts a measured placement chooses among: every valid one (`allowed`, of `cuts`), or
    under async those of `fresh`, as long as they leave enough for P processes."""
    mine = fresh(units, allowed) if mode == "async" else allowed
    return mine if len(mine) >= P - 1 else allowed


def place(costs: list[float], P: int, allowed: list[int], first: float = 0.0) -> list[range]:
    """Contiguous groups of pieces, one per process, that minimise the largest group's cost
    (`first`: what the first process does besides, reading and augmenting the batch)."""
    best = None
    for ends in itertools.combinations(allowed, P - 1):
        bounds = [0, *(j + 1 for j in ends), len(costs)]
        groups = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        worst = max(sum(costs[j] for j in g) + (first if k == 0 else 0)
                    for k, g in enumerate(groups))
        if best is None or worst < best[0]:
            best = (worst, groups)
    if best is None:
        raise UserError(f"--pipeline {P}: no placement of {len(costs)} pieces on {P} processes "
                        f"lets every straddling unit start at a boundary (try sync)", flag=True)
    return best[1]


def by_hand(counts: str, pieces: int, allowed: list[int], mode: str, P: int) -> list[range]:
    """--placement "2,2": the number of pieces of each process, first to last."""
    try:
        n = [int(c) for c in counts.split(",")]
    except ValueError:
        n = []
    bounds = list(itertools.accumulate([0, *n]))
    example = placement(place([1.0] * pieces, P, allowed)) if len(allowed) >= P - 1 else None
    instead = f" (e.g. {example})" if example else f"; {mode} cannot cut {pieces} pieces {P} ways"
    if not n or min(n) < 1 or bounds[-1] != pieces:
        raise UserError(f"--placement {counts}: give each process's number of pieces, at least "
                        f"one each, {pieces} in all{instead}", flag=True)
    bad = [b - 1 for b in bounds[1:-1] if b - 1 not in allowed]
    if bad:
        raise UserError(f"--placement {counts}: {mode} cannot cut after piece {bad[0]} (a unit "
                        f"crossing it starts lower): "
                        + (f"try {example}, or " if example else "")
                        + "--pipeline-mode sync", flag=True)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def placement(groups: list[range]) -> str:
    """Groups as --placement writes them: "2,2"."""
    return ",".join(str(len(g)) for g in groups)


def late_only(run: recipe.Run, groups: list[range], mode: str) -> str | None:
    """One line on a stage that an async placement leaves to learn from late gradients alone
    (its only unit straddles the cut above it), what it cost where measured, and what avoids
    it; None if no stage is."""
    cut = [g.stop - 1 for g in groups[:-1]]
    stale = sorted(set(cut) - set(fresh(run.units, cut))) if mode == "async" else []
    if not stale:
        return None
    j, P = stale[0], len(groups)
    avoid = fresh(run.units, cuts(run.units, len(run.pieces), mode))
    what = (f"--placement {placement(place([1.0] * len(run.pieces), P, avoid))}"
            if len(avoid) >= P - 1 else f"--pipeline {len(avoid) + 1} (or fewer processes per "
                                        f"pipeline), or with --pipeline-mode sync")
    return (f"pipeline (async): stage {run.stage_of[j] + 1} learns only from late gradients "
            f"(its one unit straddles the cut above it); measured on CIFAR-10, S1 so placed "
            f"cost LoCo 1.0 point at the final stage (docs/model-parallel.md). A run placed "
            f"with {what} avoids it")


def piece_costs(run: recipe.Run, x: torch.Tensor, tau: float, rt: Runtime,
                repeats: int = 3) -> list[float]:
    """Seconds per step of each piece: its forward, its one weight pass, an input pass per unit
    that crosses it, and the heads of the units that end on it (the fastest of `repeats`), each
    timed with the calls a step makes (autograd.grad with retain_graph runs some convolutions'
    weight gradient four times slower, so it would misplace the pieces)."""
    costs = [float("inf")] * len(run.pieces)
    for _ in range(repeats):
        h = x
        for j, piece in enumerate(run.pieces):
            crossings = sum(u.first < j <= u.last for u in run.units)
            params = list(piece.parameters())
            with rt.autocast():
                t = time.perf_counter()
                a = h.detach().requires_grad_(crossings > 0)
                h = piece(a)
                g = torch.randn_like(h)
                for _ in range(crossings):
                    torch.autograd.backward(h, g, retain_graph=True, inputs=[a])  # as a step
                torch.autograd.backward(h, g, inputs=params)
                for u, head in zip(run.units, run.heads):
                    if u.last == j:
                        top = h.detach().requires_grad_()
                        info_nce(head(top), tau, rt.data_group).backward(
                            inputs=[*head.parameters(), top])
                rt.sync()
                costs[j] = min(costs[j], time.perf_counter() - t)
    for p in [*run.encoder.parameters(), *run.heads.parameters()]:
        p.grad = None
    return costs


# ---------------------------------------------------------------------------- the data
def steps_per_epoch(loader, rt: Runtime) -> int:
    """The loader's length; in a pipeline only the first process has a loader, and tells."""
    n = [len(loader) if loader is not None else 0]
    if rt.stages > 1:
        dist.broadcast_object_list(n, src=0)
    return n[0]


def batches(loader, epoch: int, steps: int):
    """The epoch's (x1, x2); the later processes of a pipeline step along with (None, None)."""
    return loader.epoch(epoch) if loader is not None else ((None, None) for _ in range(steps))


def seconds_per_batch(loader) -> float:
    """What reading and augmenting a batch costs the first process (in-memory datasets; 0 for
    folders, whose DataLoader workers do it beside the step)."""
    if loader is None or not hasattr(loader, "augment"):
        return 0.0
    t = time.perf_counter()
    next(iter(loader.epoch(0)))
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- messages
def send(t: torch.Tensor, dst: int, tag: int, channels_last: bool) -> list:
    """Send a tensor of any dtype and shape without waiting: a header (dtype, layout, shape),
    then the data. Images travel in the run's layout: channels_last ones as their NHWC storage,
    which is contiguous already (no copy)."""
    nhwc = t.dim() == 4 and channels_last
    data = (t.permute(0, 2, 3, 1) if nhwc else t).contiguous()
    header = torch.tensor([DTYPES.index(t.dtype), int(nhwc), t.dim(), *t.shape,
                           *[0] * (6 - t.dim())], dtype=torch.int64, device=t.device)
    return [(dist.isend(header, dst, tag=tag), header), (dist.isend(data, dst, tag=tag), data)]


def recv(src: int, tag: int, device: torch.device) -> torch.Tensor:
    header = torch.empty(9, dtype=torch.int64, device=device)
    dist.recv(header, src, tag=tag)
    dtype, nhwc, ndim, *shape = header.tolist()
    shape = shape[:ndim]
    if nhwc:
        n, c, h, w = shape
        data = torch.empty(n, h, w, c, dtype=DTYPES[dtype], device=device)
        dist.recv(data, src, tag=tag)
        return data.permute(0, 3, 1, 2)          # (n, c, h, w), channels_last
    data = torch.empty(shape, dtype=DTYPES[dtype], device=device)
    dist.recv(data, src, tag=tag)
    return data


# ---------------------------------------------------------------------------- the pipeline
class Pipeline:
    """This process's part of a pipeline of rt.stages processes: its pieces, heads, LARS."""

    def __init__(self, run: recipe.Run, rt: Runtime, groups: list[range], mode: str):
        self.run, self.rt, self.groups, self.mode = run, rt, groups, mode
        self.p, self.P = rt.stage_rank, rt.stages
        self.mine = groups[self.p]
        lo, hi = self.mine.start, self.mine.stop
        units = run.units
        self.local = [i for i, u in enumerate(units) if lo <= u.last < hi]   # heads held here
        self.above = crossing(units, hi - 1) if self.p < self.P - 1 else []  # from p+1
        self.below = crossing(units, lo - 1) if self.p > 0 else []           # to p-1
        self.late = mode == "async" and bool(self.above)   # the top piece takes late gradients
        # the pieces whose input takes a gradient: a unit continues below them
        self.crossed = {j for j in self.mine if any(u.first < j <= u.last for u in units)}
        for j, piece in enumerate(run.pieces):           # hold only this group's pieces, heads
            if j not in self.mine:
                piece.to("meta")
        for i, head in enumerate(run.heads):
            if i not in self.local:
                head.to("meta")
        own = [q for q in [*run.encoder.parameters(), *run.heads.parameters()] if not q.is_meta]
        self.optimizer = recipe.lars(own, run.optimizer.defaults["lr"],
                                     run.optimizer.defaults["weight_decay"])
        self.optimizer.load_state_dict(own_state(run, self.optimizer))   # resume: own momentum
        run.optimizer = self.optimizer
        self.prev = None                  # async: the top piece's (output, weight copy) of t-1
        self.waiting = None               # async: the receives of t-1's late gradients
        self.pending = {}                 # weight gradients drained at an epoch's end
        self.sends = []                   # at most one batch in flight per boundary
        self.stats = {"compute_s": 0.0, "idle_s": 0.0, "bytes_sent": 0, "steps": 0}

    def _wait(self, works) -> None:
        t = time.perf_counter()
        for work, _ in works:
            work.wait()
        self.stats["idle_s"] += time.perf_counter() - t

    def _recv(self, src: int, tag: int) -> torch.Tensor:
        """From process `src` of this replica (its place in the pipeline)."""
        t = time.perf_counter()
        x = recv(self.rt.peer(src), tag, self.rt.device)
        self.stats["idle_s"] += time.perf_counter() - t
        return x

    def _send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        """To process `dst` of this replica, without waiting."""
        self.sends += send(t, self.rt.peer(dst), tag, self.rt.channels_last)
        self.stats["bytes_sent"] += t.numel() * t.element_size()

    def step(self, x1: torch.Tensor | None, x2: torch.Tensor | None, tau: float
             ) -> list[torch.Tensor]:
        """One step of this process: its gradients in .grad, ready for LARS. Returns every
        unit's loss, zero for the units whose head is on another process."""
        t0, idle0 = time.perf_counter(), self.stats["idle_s"]
        run, rt, units = self.run, self.rt, self.run.units
        lo, hi = self.mine.start, self.mine.stop
        self._wait(self.sends)            # the previous batch's messages have left
        self.sends = []
        with rt.autocast():
            if self.p == 0:
                h = torch.cat([rt.prepare(x1), rt.prepare(x2)])   # (2B, 3, H, W)
            else:
                h = self._recv(self.p - 1, FORWARD)
            through = [i for i, u in enumerate(units) if u.first < hi and u.last >= lo]
            visits = {j: sum(units[i].first <= j <= units[i].last for i in through
                             if not (self.late and i in self.above)) for j in self.mine}
            held, graph, weights, losses = {}, {}, {}, [torch.zeros((), device=rt.device)] * len(units)
            keep = frozenset([hi - 1]) if self.late else frozenset()
            for j in self.mine:
                # the stop-gradient of local learning, as in local_units.train_step; at lo it
                # is also where the process below ends
                a = h.detach().requires_grad_(j in self.crossed)
                with torch.set_grad_enabled(visits[j] > 0 or j in keep):
                    if j in keep:         # async: the top piece on a copy of its weights
                        copy = {n: q.detach().clone().requires_grad_()
                                for n, q in run.pieces[j].named_parameters()}
                        weights[j] = list(copy.values())
                        h = functional_call(run.pieces[j], copy, (a,))
                    else:
                        h = run.pieces[j](a)
                graph[j] = a, h               # its input and output, until spent
                if j == hi - 1 and self.p < self.P - 1:
                    self._send(h.detach(), self.p + 1, FORWARD)
                for i in self.local:
                    if units[i].last == j:
                        losses[i] = self._unit(i, graph, held, visits, weights, keep, tau)
            if self.above and self.mode == "sync":    # this batch's gradients from p+1
                for i in self.above:
                    g = self._recv(self.p + 1, BACKWARD)
                    self._down(i, g, hi - 1, graph, held, visits)
            if self.late:
                fresh = weights[hi - 1]
                self._accumulate(run.pieces[hi - 1], fresh)
                self._apply_late()
                self.prev = (graph[hi - 1][1], fresh)
                self.waiting = [self._irecv_grad() for _ in self.above]
            for j, g in self.pending.items():  # drained at the last epoch's end
                q = dict(run.pieces[j].named_parameters())
                for n, d in g.items():
                    q[n].grad = d if q[n].grad is None else q[n].grad + d
            self.pending = {}
        self.stats["steps"] += 1
        self.stats["compute_s"] += time.perf_counter() - t0 - (self.stats["idle_s"] - idle0)
        return losses

    def _unit(self, i: int, graph, held, visits, weights, keep, tau) -> torch.Tensor:
        """Unit i's loss through its head, then down this process's pieces; on to p-1 if it
        continues below them."""
        u = self.run.units[i]
        loss, below = L.backward_unit(self.run.pieces, self.run.heads[i], u, graph, held, visits,
                                      tau, self.rt.data_group, max(u.first, self.mine.start),
                                      weights, keep)
        if below is not None:
            self._send(below, self.p - 1, BACKWARD)
        return loss

    def _down(self, i: int, g: torch.Tensor, top: int, graph, held, visits) -> None:
        """Carry the gradient of unit i from p+1 down this process's pieces; on to p-1 if it
        continues."""
        u = self.run.units[i]
        below = L.carry(self.run.pieces, u, g, top, max(u.first, self.mine.start), graph, held,
                        visits)
        if below is not None:
            self._send(below, self.p - 1, BACKWARD)

    def _irecv_grad(self):
        """Post the receive of one late gradient; its shape is the top piece's output's."""
        h = self.prev[0]
        nhwc = h.dim() == 4 and self.rt.channels_last
        header = torch.empty(9, dtype=torch.int64, device=h.device)
        buf = torch.empty(h.permute(0, 2, 3, 1).shape if nhwc else h.shape, dtype=h.dtype,
                          device=h.device)
        src = self.rt.peer(self.p + 1)
        return [(dist.irecv(header, src, tag=BACKWARD), header), (dist.irecv(buf, src,
                                                                             tag=BACKWARD), buf)]

    def _apply_late(self) -> None:
        """The late gradients of the previous batch, through its graph and weight copy."""
        if self.prev is None:
            return
        h, copy = self.prev
        g = None
        for i, works in zip(self.above, self.waiting):
            self._wait(works)
            buf = works[1][1]
            got = buf.permute(0, 3, 1, 2) if h.dim() == 4 and self.rt.channels_last else buf
            if self.mine.stop - 1 in self.run.units[i].learns:
                g = got if g is None else g + got
        if g is not None:
            torch.autograd.backward(h, g, inputs=copy)
            self._accumulate(self.run.pieces[self.mine.stop - 1], copy)
        self.prev = self.waiting = None

    @staticmethod
    def _accumulate(piece: nn.Module, copy: list[torch.Tensor]) -> None:
        """A weight copy's gradient, added to the piece's own parameters' .grad."""
        for q, c in zip(piece.parameters(), copy):
            if c.grad is not None:
                q.grad = c.grad if q.grad is None else q.grad + c.grad
                c.grad = None

    def drain(self) -> None:
        """Before a checkpoint: the last batch's late gradients, turned into weight gradients
        now and kept (`pending`) for the next step, as an uninterrupted run applies them."""
        self._wait(self.sends)
        self.sends = []
        if not self.late or self.prev is None:
            return
        piece = self.run.pieces[self.mine.stop - 1]
        before = {n: q.grad for n, q in piece.named_parameters()}
        for q in piece.parameters():
            q.grad = None
        self._apply_late()
        self.pending = {self.mine.stop - 1: {n: q.grad for n, q in piece.named_parameters()
                                             if q.grad is not None}}
        if self.rt.data_world > 1:       # replicas: averaged now, as the step would average
            for g in self.pending[self.mine.stop - 1].values():   # them; every replica then
                dist.all_reduce(g, group=self.rt.data_group)      # holds (and saves) the same
                g /= self.rt.data_world
        for n, q in piece.named_parameters():
            q.grad = before[n]


def own_state(run: recipe.Run, optimizer: torch.optim.Optimizer) -> dict:
    """The state dict of `optimizer` (over this process's parameters) holding the momentum that
    run.optimizer (over every parameter, as built and resumed) holds for them."""
    full = run.optimizer.state_dict()
    index = {id(q): k for k, q in enumerate(q for g in run.optimizer.param_groups
                                            for q in g["params"])}
    mine = optimizer.state_dict()
    order = [q for g in optimizer.param_groups for q in g["params"]]
    mine["state"] = {k: full["state"][index[id(q)]] for k, q in enumerate(order)
                     if index[id(q)] in full["state"]}
    return mine


def build(run: recipe.Run, rt: Runtime, cfg: dict, size: int, tau: float,
          first_s: float = 0.0, groups: list[range] | None = None) -> Pipeline:
    """Place the pieces (measured on the first process, told to the others; async prefers the
    cuts of `fresh`) and keep this process's. `first_s`: seconds the first process spends on a
    batch besides (augmenting it). `groups` overrides the placement (tests)."""
    mode = mode_of(cfg)
    allowed = cuts(run.units, len(run.pieces), mode)
    if groups is None and cfg.get("placement"):
        groups = by_hand(cfg["placement"], len(run.pieces), allowed, mode, rt.stages)
    plan = [groups, None]
    if groups is None and rt.stage_rank == 0:
        keep = {k: v.clone() for k, v in [*run.encoder.state_dict().items(),
                                           *run.heads.state_dict(prefix="h.").items()]}
        batch = max(1, min(32, cfg["batch_size"] // rt.data_world))
        g = torch.Generator().manual_seed(0)
        x = rt.prepare(torch.randn(2 * batch, 3, size, size, generator=g).to(rt.device))
        costs = piece_costs(run, x, tau, rt)      # per probe batch: scale to the real one
        scale = cfg["batch_size"] / rt.data_world / batch
        costs = [c * scale for c in costs]
        prefer = preferred(run.units, allowed, mode, rt.stages)
        plan = [place(costs, rt.stages, prefer, first_s), costs]
        run.encoder.load_state_dict({k: keep[k] for k in run.encoder.state_dict()})
        run.heads.load_state_dict({k[2:]: v for k, v in keep.items() if k.startswith("h.")})
    if groups is None:
        dist.broadcast_object_list(plan, src=0)
    groups, costs = plan
    if rt.rank == 0 and costs is not None:
        total = sum(costs) + first_s
        shares = [(sum(costs[j] for j in g) + (first_s if k == 0 else 0)) / total
                  for k, g in enumerate(groups)]
        print(f"pipeline ({mode}): " + " | ".join(
            f"process {k}: pieces {g.start}-{g.stop - 1} (stages "
            f"{run.stage_of[g.start] + 1}-{run.stage_of[g.stop - 1] + 1}), {100 * s:.0f}%"
            for k, (g, s) in enumerate(zip(groups, shares))), flush=True)
    note = late_only(run, groups, mode)
    if rt.rank == 0 and note:
        print(note, flush=True)
    return Pipeline(run, rt, groups, mode)


def gather(run: recipe.Run, pipe: Pipeline) -> dict | None:
    """The whole run's state on the first process, as one process would hold it (a checkpoint
    of a pipelined run loads like any other): encoder, heads, optimizer; and `pending`, the late
    weight gradients drained at the epoch's end. Replicas hold the same state: the first one's
    processes send theirs. None on every other process."""
    if pipe.rt.data_rank > 0:
        return None
    cpu = lambda d: {k: v.detach().cpu() for k, v in d.items() if not v.is_meta}
    names = {id(q): f"encoder.{n}" for n, q in run.encoder.named_parameters()}
    names.update({id(q): f"heads.{n}" for n, q in run.heads.named_parameters()})
    momentum = {names[id(q)]: pipe.optimizer.state[q]["momentum"].cpu()
                for g in pipe.optimizer.param_groups for q in g["params"]
                if "momentum" in pipe.optimizer.state[q]}
    pending = {names[id(q)]: grads[n].cpu() for j, grads in pipe.pending.items()
               for n, q in run.pieces[j].named_parameters() if n in grads}
    mine = {"encoder": cpu(run.encoder.state_dict()), "heads": cpu(run.heads.state_dict()),
            "momentum": momentum, "pending": pending}
    parts = [None] * pipe.P if pipe.rt.rank == 0 else None
    dist.gather_object(mine, parts, dst=0, group=pipe.rt.pipe_group)
    if pipe.rt.rank != 0:
        return None
    merged = {k: {n: v for part in parts for n, v in part[k].items()} for k in mine}
    order = [*(f"encoder.{n}" for n, _ in run.encoder.named_parameters()),
             *(f"heads.{n}" for n, _ in run.heads.named_parameters())]
    ndim = {**{f"encoder.{n}": q.dim() for n, q in run.encoder.named_parameters()},
            **{f"heads.{n}": q.dim() for n, q in run.heads.named_parameters()}}
    groups = [[n for n in order if ndim[n] > 1], [n for n in order if ndim[n] <= 1]]
    index = {n: k for k, n in enumerate(groups[0] + groups[1])}   # recipe.lars's numbering
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in pipe.optimizer.param_groups]
    optimizer = {"state": {index[n]: {"momentum": t} for n, t in merged["momentum"].items()},
                 "param_groups": [{**h, "params": [index[n] for n in g]}
                                  for h, g in zip(hyper, groups)]}
    return {"encoder": merged["encoder"], "heads": merged["heads"], "optimizer": optimizer,
            "units": [[u.first, u.last] for u in run.units], "stage_of": run.stage_of,
            "pipeline_pending": merged["pending"]}


def restore_pending(run: recipe.Run, pipe: Pipeline, pending: dict) -> None:
    """Resume: the late weight gradients the checkpoint kept, to this process's pieces."""
    names = {id(q): f"encoder.{n}" for n, q in run.encoder.named_parameters()}
    for j in pipe.mine:
        grads = {n: pending[names[id(q)]].to(pipe.rt.device)
                 for n, q in run.pieces[j].named_parameters() if names[id(q)] in pending}
        if grads:
            pipe.pending[j] = grads
