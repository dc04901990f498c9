"""pipeline.py: model-parallel LoCo on gloo processes, held to one process's step.

sync equals local_units.train_step's parameters after 3 steps to 1e-10 in float64 (SimCLR, GIM,
LoCo on 2 and 4 processes; PResNet-50's 6 stages on 3), and in bf16 with channels_last the
tensors that cross look the same; GIM async equals GIM sync exactly; LoCo async equals a
one-process reference, written here loss by loss, that applies the straddling unit's gradient
to the boundary stage one step late. Each matrix runs in one launch of its processes."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import local_units as L
import pipeline
import recipe
import runtime
from conftest import TINY, as_torchrun, free_port, processes
from conftest import state as saved
from cli import UserError
from losses import info_nce

ROOT = Path(__file__).resolve().parents[1]
TAU, LR, STEPS = 0.5, 0.1, 3
ARCH = {"resnet18": ("cifar10", 32), "presnet50": ("imagefolder", 64)}


def build(cfg: dict, rt: runtime.Runtime) -> recipe.Run:
    arch = cfg.get("arch", "resnet18")
    torch.manual_seed(0)
    return recipe.build({"arch": arch, "width": 0.125, "dataset": ARCH[arch][0],
                         **{k: v for k, v in cfg.items() if k not in ("groups", "mode", "arch")}},
                        rt, LR)


def batches(cfg: dict, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size = ARCH[cfg.get("arch", "resnet18")][1]
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 4, 3, size, size, generator=g).to(dtype).unbind(0)
            for _ in range(STEPS)]


def worker(rank: int, world: int, port: int, cfgs: list[dict], out: str, P: int = 0) -> None:
    """One process of world = D replicas x a pipeline of P (default: one pipeline of world),
    runtime.mesh's layout: every configuration, STEPS steps each, each replica on its slice of
    the batch as train.py gives it; rank 0 saves the whole state (pipeline.gather) of each."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    P = P or world
    try:
        data_group, pipe_group = runtime.groups(world, P)
        for k, cfg in enumerate(cfgs):
            bf16 = cfg.get("bf16", False)
            rt = runtime.Runtime(torch.device("cpu"), bf16, torch.float32 if bf16 else
                                 torch.float64, bf16, rank, world, P, data_group, pipe_group)
            run = build({**cfg, "sync_bn": True}, rt)     # BatchNorm over the replicas
            pipe = pipeline.build(run, rt, {"method": cfg["method"], "pipeline": P,
                                            "pipeline_mode": cfg["mode"]}, 0, TAU,
                                  groups=[range(a, b) for a, b in cfg["groups"]])
            for x1, x2 in batches(cfg, rt.dtype):
                b, d = x1.shape[0] // rt.data_world, rt.data_rank
                pipe.step(x1[d * b:(d + 1) * b], x2[d * b:(d + 1) * b], TAU)
                if rt.data_world > 1:
                    runtime.average_gradients(run.params, rt)
                pipe.optimizer.step()
                pipe.optimizer.zero_grad(set_to_none=True)
            pipe.drain()
            state = pipeline.gather(run, pipe)
            if rank == 0:
                torch.save(state, f"{out}/{k}.pt")
    finally:
        dist.destroy_process_group()


def launch(world: int, cfgs: list[dict], tmp_path: Path, P: int = 0) -> list[dict]:
    processes(worker, (world, free_port(), cfgs, str(tmp_path), P), world)
    return [torch.load(tmp_path / f"{k}.pt", weights_only=True) for k in range(len(cfgs))]


def one_process(cfg: dict, bf16: bool = False) -> recipe.Run:
    """The reference: local_units.train_step and LARS on one process, the same steps, on one
    thread like each process of the pipeline (bf16 sums in another order differ by percents)."""
    rt = runtime.Runtime(torch.device("cpu"), bf16, torch.float32 if bf16 else torch.float64, bf16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = build(cfg, rt)
        for x1, x2 in batches(cfg, rt.dtype):
            with rt.autocast():
                L.train_step(run.pieces, run.heads, run.units, rt.prepare(x1), rt.prepare(x2),
                             TAU)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
    finally:
        torch.set_num_threads(threads)
    return run


def assert_same(state: dict, run: recipe.Run, tol: float = 1e-10) -> None:
    for part, module in (("encoder", run.encoder), ("heads", run.heads)):
        ref = module.state_dict()
        assert state[part].keys() == ref.keys(), part
        for k, v in ref.items():
            got = state[part][k].to(v.dtype)
            assert (got - v).double().norm() <= tol * v.double().norm() + 1e-12, f"{part}.{k}"


SYNC2 = [{"method": m, "mode": "sync", "groups": [(0, 2), (2, 4)]} for m in L.METHODS]
ASYNC2 = [{"method": m, "mode": "async", "groups": [(0, 2), (2, 4)]} for m in ("gim", "loco")]


def test_two_processes_sync_equal_one_process_and_gim_async_equals_gim_sync(tmp_path):
    bf16 = {"method": "loco", "mode": "sync", "groups": [(0, 2), (2, 4)], "bf16": True}
    states = launch(2, [*SYNC2, *ASYNC2, bf16], tmp_path)
    for cfg, state in zip(SYNC2, states):
        assert_same(state, one_process(cfg))
    gim_sync, gim_async = states[1], states[3]
    for part in ("encoder", "heads"):
        assert all(torch.equal(gim_sync[part][k], v) for k, v in gim_async[part].items())
    # bf16 activations and gradients cross in channels_last: the same step as one process's
    assert_same(states[-1], one_process(bf16, bf16=True), tol=1e-3)
    # and async LoCo is the one-step-late reference below
    assert_same(states[4], one_step_late(ASYNC2[1]))


def test_four_processes_sync_equal_one_process(tmp_path):
    cfgs = [{"method": m, "mode": "sync", "groups": [(k, k + 1) for k in range(4)]}
            for m in L.METHODS]
    for cfg, state in zip(cfgs, launch(4, cfgs, tmp_path)):
        assert_same(state, one_process(cfg))


def test_two_replicas_of_a_two_process_pipeline_equal_one_process_sync_and_async(tmp_path):
    """World = 2 replicas x 2 pipeline processes, each replica on half the batch: the data
    groups gather the loss's negatives, BatchNorm over both replicas and average gradients; the
    pipe groups pass activations and gradients. Sync equals one process holding the whole
    batch; async equals async on one pipeline (GIM: its sync; LoCo: the one-step-late
    reference, which the two-process test holds to one pipeline's async)."""
    states = launch(4, [*SYNC2, *ASYNC2], tmp_path, P=2)
    for cfg, state in zip(SYNC2, states):
        assert_same(state, one_process(cfg))
    assert_same(states[3], one_process(SYNC2[1]))                # GIM async = GIM sync
    assert_same(states[4], one_step_late(ASYNC2[1]))


def test_the_batch_splits_over_replicas_only_and_a_world_must_hold_whole_pipelines():
    import train
    args = lambda *a: train.parse_args([*TINY, "--method", "loco", *a])
    assert train.check_world(args("--pipeline", "2", "--batch-size", "63"), 2) == 1
    assert train.check_world(args("--pipeline", "3", "--batch-size", "32"), 3) == 1
    assert train.check_world(args("--pipeline", "2", "--batch-size", "64"), 4) == 2
    with pytest.raises(UserError, match="63 does not split evenly over 2 data-parallel"):
        train.check_world(args("--pipeline", "2", "--batch-size", "63"), 4)
    with pytest.raises(UserError, match="63 does not split evenly over 2 data-parallel"):
        train.check_world(args("--batch-size", "63"), 2)
    with pytest.raises(UserError, match="3 processes do not make whole pipelines; start a "
                                        "multiple of 2"):
        train.check_world(args("--pipeline", "2"), 3)
    assert runtime.mesh(8, 4) == ([[0, 4], [1, 5], [2, 6], [3, 7]], [[0, 1, 2, 3], [4, 5, 6, 7]])


def test_presnet50s_six_stages_on_three_processes_sync_equal_one_process(tmp_path):
    cfgs = [{"method": m, "mode": "sync", "arch": "presnet50", "groups": [(0, 2), (2, 4), (4, 6)]}
            for m in L.METHODS]
    for cfg, state in zip(cfgs, launch(3, cfgs, tmp_path)):
        assert_same(state, one_process(cfg))


def one_step_late(cfg: dict) -> recipe.Run:
    """Async LoCo on two processes, [S1 S2 | S3 S4], written loss by loss: at every step each
    unit's loss is differentiated, attached end to end, with respect to the parameters it
    learns, at the step's weights; every gradient is applied at once except the straddling
    unit's (S2-S3) on S2, the boundary stage, which is applied at the next step."""
    rt = runtime.Runtime(torch.device("cpu"), False, torch.float64, False)
    run = build(cfg, rt)
    params = run.params
    late = {}                                    # S2's parameter -> the straddling unit's grad
    for x1, x2 in batches(cfg):
        outputs, h = [], torch.cat([x1, x2])
        for piece in run.pieces:
            h = piece(h)
            outputs.append(h)
        total = {p: torch.zeros_like(p) for p in params}
        now = {}
        for u, head in zip(run.units, run.heads):
            own = [p for j in sorted(u.learns) for p in run.pieces[j].parameters()]
            own += list(head.parameters())
            loss = info_nce(head(outputs[u.last]), TAU)
            for p, g in zip(own, torch.autograd.grad(loss, own, retain_graph=True)):
                straddling, boundary = (u.first, u.last) == (1, 2), any(
                    p is q for q in run.pieces[1].parameters())
                if straddling and boundary:
                    now[p] = g                   # S2's share of the S2-S3 unit: next step
                else:
                    total[p] += g
        for p, g in late.items():
            total[p] += g
        late = now
        for p in params:
            p.grad = total[p]
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    return run


def test_placement_balances_measured_costs_and_async_cuts_only_where_units_start():
    costs = [4.0, 1.0, 1.0, 1.0, 1.0, 4.0]
    assert pipeline.place(costs, 2, list(range(5))) == [range(0, 3), range(3, 6)]
    assert pipeline.place(costs, 3, list(range(5))) == [range(0, 1), range(1, 5), range(5, 6)]
    even = [1.0] * 6                             # the first process also augments: it holds less
    assert pipeline.place(even, 2, list(range(5))) == [range(0, 3), range(3, 6)]
    assert pipeline.place(even, 2, list(range(5)), first=2.0) == [range(0, 2), range(2, 6)]
    loco = L.make_units("loco", [0, 1, 1, 2, 2, 3, 3], sharing="1block")   # S1 | S2a S2b | ...
    assert pipeline.cuts(loco, 7, "sync") == list(range(6))
    # async: a unit crossing the cut must start just below it; S2a-S3a crosses S2b|S3a from S2a
    assert pipeline.cuts(loco, 7, "async") == [0, 1, 3, 5]
    assert pipeline.cuts(L.make_units("gim", [0, 1, 2, 3]), 4, "async") == [0, 1, 2]
    # async prefers cuts where the piece below also learns from a fresh unit: not after LoCo's
    # S1 (its one unit straddles the cut), nor, under "upper", after a stage the unit above owns
    plain = L.make_units("loco", [0, 1, 2, 3])
    assert pipeline.fresh(plain, pipeline.cuts(plain, 4, "async")) == [1, 2]
    upper = L.make_units("loco", [0, 1, 2, 3], sharing="upper")
    assert pipeline.fresh(upper, pipeline.cuts(upper, 4, "async")) == []
    assert pipeline.fresh(L.make_units("gim", [0, 1, 2, 3]), [0, 1, 2]) == [0, 1, 2]
    assert pipeline.fresh(loco, pipeline.cuts(loco, 7, "async")) == [1, 3, 5]
    assert pipeline.by_hand("2,2", 4, [0, 1, 2], "async", 2) == [range(0, 2), range(2, 4)]
    for bad, why in (("2,1", "4 in all"), ("0,4", "at least one"), ("x", "each process's")):
        with pytest.raises(UserError, match=why):
            pipeline.by_hand(bad, 4, [0, 1, 2], "async", 2)
    with pytest.raises(UserError, match="async cannot cut after piece 2"):
        pipeline.by_hand("3,4", 7, pipeline.cuts(loco, 7, "async"), "async", 2)


KILLED = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import cli, train
if os.environ["RANK"] == "1":                # killed in the second epoch (4 steps an epoch)
    add, calls = train.Log.add, []
    def dying(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGKILL)
        return add(self, *a, **k)
    train.Log.add = dying
cli.run(train.main, "train.py")
"""


def torchrun(script: str, argv: list[str], stderr) -> subprocess.Popen:
    """Two processes of `script` under torchrun, running; their stderr to a file (a pipe nobody
    reads could fill and stall them)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port",
           str(free_port()), script, *argv]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=stderr)


def test_a_killed_process_ends_the_pipeline_and_resume_continues_it_exactly(tmp_path):
    """Async LoCo on two processes. A process killed mid-epoch ends the job with one line from
    the other; the last checkpoint loads like any other; resumed with the same flags, the run
    ends bit for bit where an uninterrupted one does (the epoch's pending late gradient is in
    the checkpoint). Four steps of 32 images an epoch. The killed job runs under torchrun (its
    agent ends the peer); the uninterrupted and the resumed runs in processes that torchrun would
    start alike (conftest.as_torchrun), which start in a fraction of the time."""
    args = [*TINY, "--subset", "128", "--batch-size", "32", "--method", "loco", "--epochs", "2",
            "--pipeline", "2"]
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(repo=str(ROOT)))
    errors = open(tmp_path / "killed.err", "w")
    t = time.time()
    killed = torchrun(str(script), [*args, "--out", str(tmp_path / "resumed")], errors)
    try:                                                         # side by side with it
        processes(as_torchrun, (2, [free_port()], [[*args, "--out", str(tmp_path / "straight")]]),
                  2)
    finally:
        code = killed.wait(timeout=300)
        errors.close()
    assert code != 0 and time.time() - t < 120
    # the other process stops in its next message (the peer is gone) or at torchrun's SIGTERM,
    # whichever comes first, and says in one line what is saved
    said = [line for line in (tmp_path / "killed.err").read_text().splitlines()
            if line.startswith("train.py: ")]
    assert len(said) == 1 and "holds epoch 0" in said[0] and "--resume" in said[0], said
    ckpt = recipe.load_checkpoint(tmp_path / "resumed" / "ckpt.pt")
    assert ckpt["epoch"] == 0 and ckpt["pipeline_pending"]       # a late gradient, kept
    encoder, _ = recipe.load_encoder(str(tmp_path / "resumed" / "ckpt.pt"), torch.device("cpu"))
    processes(as_torchrun, (2, [free_port()], [[*args, "--out", str(tmp_path / "resumed"),
                                                "--resume"]]), 2)
    a, b = saved(tmp_path / "straight"), saved(tmp_path / "resumed")
    for part in ("encoder", "heads"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert (tmp_path / "straight" / "log.csv").read_text() == \
        (tmp_path / "resumed" / "log.csv").read_text()                # every unit's loss
