"""train.py and recipe.py: tiny runs lower every loss, resume is bit-exact, two processes equal one,
LARS and the schedule against references, and clear errors for bad input."""

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import decoders
import local_units
import recipe
import runtime
import train
from conftest import TINY, as_torchrun, crash_after_save, free_port, processes, state
from cli import UserError


def log_losses(run: Path) -> torch.Tensor:
    with open(run / "log.csv") as f:
        rows = [r for r in f.read().splitlines()[1:]]
    return torch.tensor([[float(v) for v in r.split(",")[3:]] for r in rows])  # (steps, units)


@pytest.mark.parametrize("method", local_units.METHODS)
def test_a_tiny_run_of_each_method_lowers_every_units_loss(method, tmp_path):
    train.main([*TINY, "--method", method, "--epochs", "6", "--out", str(tmp_path)])
    losses = log_losses(tmp_path)                     # 24 steps of 4 units (1 for simclr)
    assert losses.shape == (24, 1 if method == "simclr" else 4)
    first, last = losses[:4].mean(0), losses[-4:].mean(0)
    assert (last < first - 0.05).all(), (first, last)


def test_resuming_after_epoch_one_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """Also past a torn last line of the log: a crash while log.csv was being appended leaves
    half a line; resume drops it (and every line after the checkpoint's step), rewriting the log
    atomically, and ends as an uninterrupted run does, log and all."""
    args = [*TINY, "--method", "loco", "--epochs", "2"]
    train.main([*args, "--out", str(tmp_path / "straight")])

    crash_after_save(monkeypatch)                    # dies right after the epoch-0 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, "--out", str(tmp_path / "resumed")])
    monkeypatch.undo()
    assert state(tmp_path / "resumed")["epoch"] == 0
    with open(tmp_path / "resumed" / "log.csv", "a") as f:
        f.write("1,4,0.5,4.61")                      # torn: a crash in the middle of a row
    train.main([*args, "--out", str(tmp_path / "resumed"), "--resume"])

    a, b = state(tmp_path / "straight"), state(tmp_path / "resumed")
    for part in ("encoder", "heads"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part
    assert (tmp_path / "resumed" / "log.csv").read_text() == \
        (tmp_path / "straight" / "log.csv").read_text()


def test_checkpoint_keys_carry_no_wrapper_prefix(tmp_path):
    train.main([*TINY, "--method", "gim", "--epochs", "1", "--out", str(tmp_path)])
    ckpt = state(tmp_path)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["encoder"])
    assert set(ckpt["encoder"]) == set(train.model.resnet18(0.125, "cifar").state_dict())
    assert ckpt["config"]["method"] == "gim" and ckpt["units"] == [[k, k] for k in range(4)]


@pytest.mark.slow
def test_a_compiled_loco_step_leaves_the_gradients_of_an_eager_one():
    """Guards --compile: LoCo's backward passes through a shared stage (an input pass that keeps
    the graph, then the weight pass) once came out wrong under inductor."""
    torch.manual_seed(0)
    cpu = runtime.Runtime(torch.device("cpu"), False, torch.float32, False)
    run = recipe.build({"method": "loco", "arch": "resnet18", "width": 0.125,
                        "dataset": "cifar10"}, cpu)
    eager = copy.deepcopy(run)
    runtime.compile_in_place(list(run.encoder.stages[1:3]))   # two shared stages, the same code
                                                               # at two shapes: where it went wrong
    x1, x2 = torch.randn(2, 8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for r in (run, eager):
        local_units.train_step(r.pieces, r.heads, r.units, x1, x2, 0.5)
    for p, q in zip(run.encoder.parameters(), eager.encoder.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm()


def test_lars_equals_a_per_parameter_reference():
    torch.manual_seed(0)
    ps = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)]
    ref = [p.detach().clone() for p in ps]
    opt = recipe.LARS([{"params": ps[:1]}, {"params": ps[1:], "lars": False, "weight_decay": 0.0}],
                     lr=0.5, weight_decay=1e-2)
    bufs = [torch.zeros_like(r) for r in ref]
    for _ in range(3):
        grads = [torch.randn_like(r) for r in ref]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for i, (r, g) in enumerate(zip(ref, grads)):   # SimCLR's LARS, one tensor at a time
            if i == 0:
                g = g + 1e-2 * r
                g = g * 1e-3 * r.norm() / g.norm()
            bufs[i] = 0.9 * bufs[i] + 0.5 * g
            r -= bufs[i]
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r)


def test_learning_rate_warms_up_linearly_then_decays_by_cosine_per_step():
    lrs = [recipe.lr_at(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3


def test_a_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(UserError, match="multiple of 3"):
        train.main([*TINY, "--out", str(tmp_path)])


# Every combination that -h offers runs at least one step -------------------------------------------

ARCHS = {"resnet18": ("cifar10", 32), "resnet50": ("imagefolder", 64),
         "presnet50": ("imagefolder", 64), "shufflenet_v2_50": ("imagefolder", 64)}


def configurations():
    """Every --sharing, every --decoder (on GIM, whose every head has one), and the rest."""
    yield from ({"method": "loco", "sharing": s} for s in local_units.SHARING)
    yield from ({"method": "gim", "decoder": d} for d in decoders.DECODERS)
    yield from ({"method": "simclr", "decoder": d} for d in ("block", "2blocks"))
    yield {"method": "loco", "decoder": "none", "top_decoder": "block", "top_unit": False,
           "mlp_layers": 4}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_sharing_and_decoder_trains_a_step_on_every_arch(arch):
    """One step (forward, local backward, LARS) of each configuration, in float32 and, for LoCo,
    under bf16 autocast with channels_last (what the device rule picks on a CPU with bf16)."""
    dataset, size = ARCHS[arch]
    x1, x2 = torch.randn(2, 4, 3, size, size, generator=torch.Generator().manual_seed(0))
    fp32 = runtime.Runtime(torch.device("cpu"), False, torch.float32, False)
    bf16 = runtime.Runtime(torch.device("cpu"), True, torch.float32, True)
    for cfg, rt in [(c, fp32) for c in configurations()] + [({"method": "loco"}, bf16)]:
        torch.manual_seed(0)
        run = recipe.build({"arch": arch, "width": 0.125, "dataset": dataset, **cfg}, rt, 0.1)
        with rt.autocast():
            losses = local_units.train_step(run.pieces, run.heads, run.units, rt.prepare(x1),
                                            rt.prepare(x2), 0.5)
        run.optimizer.step()
        assert len(losses) == len(run.units) and torch.isfinite(torch.stack(losses)).all(), cfg
        assert recipe.bad_tensor(run.encoder.state_dict()) is None, cfg


def test_two_processes_train_in_every_precision_and_equal_one_process_in_float64(tmp_path):
    """The precisions the device rule can pick (pinned: auto differs by machine) x global
    BatchNorm on and off, each one step on two processes (gloo), as torchrun starts them. bf16
    with global BatchNorm once crashed at the first step: its statistics are now float32 whatever
    the autocast. And two LoCo epochs on two processes of 32 images against one process of 64:
    with global BatchNorm everything in a step is the same computation, so in float64 the weights
    agree to rounding (measured: 4e-13; in float32, BatchNorm's sums leave ~1e-5)."""
    runs = [[*TINY, "--subset", "64", "--epochs", "1", "--precision", p, sync,
             "--out", str(tmp_path / f"{p}{sync}")]
            for p in ("bf16", "fp32", "auto") for sync in ("--sync-bn", "--no-sync-bn")]
    exact = [*TINY, "--method", "loco", "--epochs", "2", "--subset", "128", "--sync-bn",
             "--precision", "fp64"]
    runs.append([*exact, "--out", str(tmp_path / "two")])
    processes(as_torchrun, (2, [free_port() for _ in runs], runs), 2)
    for argv in runs:
        ckpt = state(Path(argv[-1]))
        assert ckpt["epoch"] + 1 == int(argv[argv.index("--epochs") + 1])
        assert recipe.bad_tensor(ckpt["encoder"]) is None
        assert torch.isfinite(log_losses(Path(argv[-1]))).all()
    train.main([*exact, "--out", str(tmp_path / "one")])
    one, two = state(tmp_path / "one"), state(tmp_path / "two")
    for part in ("encoder", "heads"):
        for k, v in one[part].items():
            assert (two[part][k] - v).double().norm() <= 1e-10 * v.double().norm(), f"{part}.{k}"
    torch.testing.assert_close(log_losses(tmp_path / "two"), log_losses(tmp_path / "one"))


def test_global_batchnorm_under_bf16_autocast_matches_batchnorm_in_float32_statistics():
    """One process in a process group of one: GlobalBatchNorm must give what BatchNorm gives,
    in the input's dtype, with running statistics accumulated in float32."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        conv, bn = torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)
        glob = runtime.sync_batchnorm(torch.nn.Sequential(copy.deepcopy(bn)), torch.device("cpu"))
        x = torch.randn(16, 3, 12, 12) * 3 + 1
        with torch.autocast("cpu", torch.bfloat16):
            h = conv(x)
            y, z = bn(h), glob(h)
        assert h.dtype == y.dtype == z.dtype == torch.bfloat16
        torch.testing.assert_close(z.float(), y.float(), rtol=0.02, atol=0.02)
        for a, b in (("running_mean", "running_mean"), ("running_var", "running_var")):
            assert getattr(glob[0], a).dtype == torch.float32
            torch.testing.assert_close(getattr(glob[0], a), getattr(bn, b), rtol=1e-3, atol=1e-4)
    finally:
        dist.destroy_process_group()


FAILING_RANK = """
import os, sys
sys.path.insert(0, {repo!r})
import cli, train
if os.environ["RANK"] == "1":                # a user error that only this process meets
    add, calls = train.Log.add, []
    def failing(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise cli.UserError("rank 1 met a bad file")
        return add(self, *a, **k)
    train.Log.add = failing
cli.run(train.main, "train.py")
"""


def test_a_process_that_fails_ends_the_whole_job_at_once_with_one_line_each(tmp_path):
    """Rank 1 stops at its second step; rank 0, in the next collective, must not wait for gloo's
    30-minute timeout: it says that another process stopped, and both exit."""
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK.format(repo=str(Path(__file__).parents[1])))
    t = time.time()
    job = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master-port", str(free_port()), str(script), *TINY, "--epochs", "2",
                          "--out", str(tmp_path / "run")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                         text=True, timeout=300)
    assert job.returncode != 0 and time.time() - t < 120
    assert "train.py: error: rank 1 met a bad file" in job.stderr
    assert "train.py: error: rank 0: another process of this run stopped" in job.stderr
    assert "No checkpoint was written yet" in job.stderr
    assert "[rank0]: Traceback" not in job.stderr and "[rank1]: Traceback" not in job.stderr


def test_checkpoints_of_both_earlier_default_decoders_resume_as_what_they_are(tmp_path):
    """GIM's and LoCo's default decoder was the paper's conv block, recorded as no decoder at
    all; then MLP-only for a while, recorded as "none". Both load, evaluate and resume as what
    they trained: the same command continues each with its own heads; typing the other decoder
    is refused, naming both."""
    run = tmp_path / "run"
    train.main([*TINY, "--method", "loco", "--epochs", "1", "--out", str(run)])
    ckpt = state(run)
    assert ckpt["config"]["decoder"] == "block"      # today's default, recorded as it is
    ckpt["config"]["decoder"] = None                 # as the first default recorded it
    torch.save(ckpt, run / "ckpt.pt")
    train.main([*TINY, "--method", "loco", "--epochs", "2", "--out", str(run), "--resume"])
    assert state(run)["epoch"] == 1
    mlp = tmp_path / "mlp"
    train.main([*TINY, "--method", "loco", "--decoder", "none", "--epochs", "1", "--out", str(mlp)])
    with pytest.raises(UserError, match="--decoder none \\(now block\\)"):
        train.main([*TINY, "--method", "loco", "--decoder", "block", "--epochs", "2",
                    "--out", str(mlp), "--resume"])
    train.main([*TINY, "--method", "loco", "--epochs", "2", "--out", str(mlp), "--resume"])
    assert state(mlp)["epoch"] == 1 and state(mlp)["config"]["decoder"] == "none"
    assert not any(".convs." in k for k in state(mlp)["heads"])        # MLP-only heads still
    encoder, _ = recipe.load_encoder(str(mlp / "ckpt.pt"), torch.device("cpu"))
    assert encoder(torch.randn(2, 3, 32, 32)).shape[0] == 2             # evaluates
