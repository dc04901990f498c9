"""experiments.py: a plan skips what is done and stops cleanly when its minutes run out, and the
GPU plan's smoke mode runs every one of its steps on the CPU, so that a lent GPU's first run is
not the first run of this code."""

import json
import multiprocessing
import os
import runpy
import subprocess
import sys
import types

import pytest
import torch

from tools import experiments
from conftest import write_fake_cifar10


def touch_steps(tmp_path, n: int, seconds: float = 0.0, suffix: str = ".txt") -> experiments.Plan:
    """n steps that each sleep, then write their file (holding "{}", valid JSON)."""
    plan = experiments.Plan()
    for i in range(n):
        done = tmp_path / f"step{i}{suffix}"
        code = f"import time; time.sleep({seconds}); open({str(done)!r}, 'w').write('{{}}')"
        plan.other(f"step {i}", ["-c", code], done, seconds / 60)
    return plan


def test_a_plan_stops_when_its_minutes_run_out_and_continues_without_redoing(tmp_path, capsys):
    plan = touch_steps(tmp_path, 4, seconds=0.5)
    assert not experiments.execute(plan, minutes=0.75 / 60, log=tmp_path / "log.txt")
    done = sorted(p.name for p in tmp_path.glob("step*.txt"))
    assert 1 <= len(done) < 4 and "out of time" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.glob("step*.txt")}
    assert experiments.execute(plan, minutes=None, log=tmp_path / "log.txt")
    assert len(list(tmp_path.glob("step*.txt"))) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())   # finished work kept


def test_a_failing_step_names_the_step_and_the_log(tmp_path):
    plan = experiments.Plan()
    plan.other("broken step", ["-c", "raise SystemExit(3)"], tmp_path / "never", 0.1)
    try:
        experiments.execute(plan, None, tmp_path / "log.txt")
    except experiments.cli.UserError as e:
        assert "broken step" in str(e) and "broken_step.txt" in str(e)
    else:
        raise AssertionError("a failing step passed")


class Forked:
    """subprocess.Popen([python, *args]) as a plan's step uses it, the process forked from the
    session's server (conftest.processes), which has imported torch, instead of a new
    interpreter importing it again (~2.5 s a step, most of a smoke step). For the GPU plan, whose
    steps, files and tables are what its test checks; the other tests here start real ones."""

    def __init__(self, argv, stdout, stderr, env, cwd):
        self.process = multiprocessing.get_context("forkserver").Process(
            target=run_script, args=(argv[1:], stdout.name, env, str(cwd)))
        self.process.start()
        self.pid = self.process.pid

    def wait(self) -> int:
        self.process.join()
        return self.process.exitcode


def run_script(args: list[str], log: str, env: dict, cwd: str) -> None:
    """`python *args` in this process: its directory, environment, threads and output."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS") or os.cpu_count()))
    out = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1), os.dup2(out, 2)
    if args[0] == "-m":
        sys.argv = args[1:]
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = args
        runpy.run_path(args[0], run_name="__main__")


@pytest.mark.slow
def test_the_gpu_plan_runs_every_step_in_smoke_mode(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(experiments, "subprocess", types.SimpleNamespace(
        Popen=Forked, STDOUT=subprocess.STDOUT))
    write_fake_cifar10(tmp_path / "data", per_batch=60, test=200)
    out = tmp_path / "gpu"
    args = ["gpu", "--smoke", "--data-dir", str(tmp_path / "data"), "--out", str(out),
            "--jobs", "2"]
    experiments.main(args)
    printed = capsys.readouterr().out
    assert "expected: SimCLR" in printed and "benchmark" in printed
    for name in ("benchmark.json", "curves.png", "tsne.png", "tables.md", "minutes.json"):
        assert (out / name).exists(), name
    for method in ("simclr", "gim", "loco"):
        assert (out / f"{method}_seed0" / "linear_eval_fast.json").exists()
    assert "| SimCLR | 1 |" in (out / "tables.md").read_text()
    experiments.main(args)                               # again: nothing left to do
    assert "steps done; to do, about 0 min" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_width_plan_runs_every_step_in_smoke_mode(tmp_path, capsys, monkeypatch):
    """The one plan a lent GPU runs for issue 37 (docs/gpu.md), every step for a few iterations
    on the CPU: both benchmarks, SimCLR and LoCo at 12 epochs (two seeds) and 50 (one)."""
    monkeypatch.setattr(experiments, "subprocess", types.SimpleNamespace(
        Popen=Forked, STDOUT=subprocess.STDOUT))
    out = tmp_path / "gpu-width"
    experiments.main(["gpu-width", "--smoke", "--dataset", "synthetic", "--out", str(out),
                      "--jobs", "2"])
    assert "expected: SimCLR" in capsys.readouterr().out
    for name in ("benchmark.json", "benchmark_b256.json", "tables.md"):
        assert (out / name).exists(), name
    for epochs, seed in experiments.GPU_WIDTH_RUNS:
        for method in ("simclr", "loco"):
            run = out / f"{method}_w1_e{epochs}_seed{seed}"
            assert (run / "linear_eval_fast.json").exists(), run
            assert json.loads((run / "config.json").read_text())["decoder"] == (
                "none" if method == "simclr" else "block")         # the paper's decoders
    assert "| LoCo, 50 epochs | 1 |" in (out / "tables.md").read_text()


def test_the_width_plan_reuses_exactly_the_committed_runs_of_its_protocol():
    """Width 1/4 comes from cifar-cpu (a config that recorded precision "auto") and width 1
    from the GPU plan (one that recorded the rule's choice, bf16 and channels_last): both are
    the protocol as train.py resolves it (precision "auto" asks for the rule's choice, as on
    --resume); one flag changed is another run."""
    base = experiments.flags({**experiments.CPU, "dataset": "cifar10", "data-dir": "data"})
    config = lambda path: json.loads((experiments.ROOT / path / "config.json").read_text())
    quarter = [*base, "--width", "0.25", "--method", "loco", "--seed", "0", "--epochs", "12"]
    full = [*base, "--width", "1.0", "--method", "loco", "--seed", "0", "--epochs", "12"]
    gpu = config("results/gpu-width/loco_w1_e12_seed0")
    assert (gpu["precision"], gpu["memory_format"]) == ("bf16", "channels_last")
    assert experiments.same_run(config("results/cifar-cpu/loco_seed0"), quarter)
    assert experiments.same_run(gpu, full)
    assert not experiments.same_run(gpu, quarter)
    assert not experiments.same_run(gpu, [*full, "--lr", "2"])
    assert not experiments.same_run({**gpu, "decoder": "none"}, full)


def test_a_run_whose_evaluation_is_kept_is_not_trained_again(tmp_path):
    """A checkout holds a run's committed evaluation but not its checkpoint: adding a row beside
    it must not retrain it (here the training step would fail if it ran)."""
    plan = experiments.Plan()
    run = tmp_path / "loco_seed0"
    plan.train(run, ["--no-such-flag"], epochs=1, minutes=0.1)
    plan.eval(run, 0.1)
    run.mkdir()
    (run / "linear_eval_fast.json").write_text("{}")
    assert experiments.to_do(plan) == []
    assert experiments.execute(plan, None, tmp_path / "log.txt")
    (run / "linear_eval_fast.json").unlink()             # its evaluation missing: train it
    assert [s.name for s in experiments.to_do(plan)] == ["train loco_seed0", "evaluate loco_seed0"]


def test_two_jobs_run_steps_side_by_side_and_a_reader_waits_for_its_run(tmp_path):
    """Two 'training' steps start together on two jobs; the step that reads the first run
    starts only once that run's checkpoint is complete."""
    plan = experiments.Plan()
    for name in ("a", "b"):
        run = tmp_path / name
        code = (f"import torch, pathlib; pathlib.Path({str(run)!r}).mkdir(exist_ok=True); "
                f"torch.save({{'epoch': 0}}, {str(run / 'ckpt.pt')!r})")   # importing torch: ~1 s
        plan.steps.append(experiments.Step(f"train {name}", ["-c", code, str(run / "x")],
                                           run / "ckpt.pt", 0.03, train_epochs=1))
    reader = tmp_path / "read.txt"
    check = (f"import pathlib; assert pathlib.Path({str(tmp_path / 'a' / 'ckpt.pt')!r}).exists(); "
             f"pathlib.Path({str(reader)!r}).write_text('ok')")
    plan.other("read a", ["-c", check, str(tmp_path / "a" / "ckpt.pt")], reader, 0.01)
    assert experiments.execute(plan, None, tmp_path / "log.txt", jobs=2)
    log = (tmp_path / "log.txt").read_text()
    starts = [line for line in log.splitlines() if " start train " in line]
    first_exit = min(log.index("] exit 0 after"), log.index("start read a"))
    assert len(starts) == 2 and log.index(starts[1]) < first_exit   # both ran before either ended
    assert reader.read_text() == "ok"
    assert [p.name for p in tmp_path.rglob(".*.lock")] == [".minutes.lock"]  # claims released


def test_a_corrupt_result_is_done_again_and_a_step_claimed_elsewhere_is_left_alone(tmp_path,
                                                                                capsys):
    plan = touch_steps(tmp_path, 2, suffix=".json")
    (tmp_path / "step0.json").write_text('{"top1": ')       # a JSON result, torn
    lock = tmp_path / ".step1.json.lock"                    # another sitting runs step 1
    lock.write_text(str(os.getppid()))
    assert not experiments.execute(plan, None, tmp_path / "log.txt")
    out = capsys.readouterr().out
    assert "step0.json is corrupt" in out and "still running in another sitting: step 1" in out
    assert (tmp_path / "step0.json").read_text() == "{}" and not (tmp_path / "step1.json").exists()
    lock.write_text("999999999")                           # its process is gone: taken over
    assert experiments.execute(plan, None, tmp_path / "log.txt")
    assert (tmp_path / "step1.json").exists()


def test_a_step_that_ends_without_its_result_stops_the_plan_instead_of_running_again(tmp_path):
    plan = experiments.Plan()
    plan.other("forgetful step", ["-c", "pass"], tmp_path / "never.json", 0.01)
    with pytest.raises(experiments.cli.UserError, match="ended without writing .*never.json"):
        experiments.execute(plan, None, tmp_path / "log.txt")


def test_the_per_unit_gradients_of_tools_gradients_sum_to_the_steps():
    """tools/gradients.py reads each unit's pull on a stage alone: summed over the units, the
    gradients are the step's own (float64), so the cosines it prints are of the real parts."""
    import torch

    import local_units
    import recipe
    import runtime
    from tools import gradients
    torch.manual_seed(0)
    rt = runtime.Runtime(torch.device("cpu"), False, torch.float64, False)
    run = recipe.build({"method": "loco", "arch": "resnet18", "width": 0.125,
                        "dataset": "cifar10"}, rt)
    x1, x2 = torch.randn(2, 4, 3, 32, 32, dtype=torch.float64).unbind(0)
    per_unit = gradients.unit_gradients(run, torch.cat([x1, x2]), 0.5)
    local_units.train_step(run.pieces, run.heads, run.units, x1, x2, 0.5)
    for j, piece in enumerate(run.pieces):
        step = torch.cat([p.grad.flatten() for p in piece.parameters() if p.dim() > 1])
        summed = sum(g for (i, k), g in per_unit.items() if k == j)
        assert (summed - step).norm() <= 1e-10 * step.norm(), j
    assert sorted({i for i, _ in per_unit}) == [0, 1, 2, 3]


def test_the_schedule_figure_draws_what_is_measured_and_waits_for_enough(tmp_path):
    import json

    def result(run: str, top1: float) -> None:
        (tmp_path / run).mkdir()
        (tmp_path / run / "linear_eval_fast.json").write_text(json.dumps(
            {"stages": [{"top1": top1}], "knn_top1": top1}))
    result("loco_none_seed0", 60.0)
    experiments.schedule_figure(tmp_path)       # the committed 12-epoch rows and one more: few
    assert not (tmp_path / "schedule.png").exists()
    result("simclr_e6_seed0", 55.0), result("loco_e6_seed0", 53.0)
    experiments.schedule_figure(tmp_path)
    assert (tmp_path / "schedule.png").read_bytes()[:4] == b"\x89PNG"


RUNNER = """
import sys
sys.path.insert(0, {repo!r})
import cli
from tools import experiments
from pathlib import Path
plan = experiments.Plan()
plan.other("long step", ["-c", "import time; open({started!r}, 'w'); time.sleep(60)"],
           Path({done!r}), 1.0)
cli.run(lambda: experiments.execute(plan, None, Path({log!r})), "python -m tools.experiments")
"""


def test_an_interrupt_to_the_runner_alone_stops_its_running_step_and_says_so(tmp_path):
    """SIGINT to the runner's process only (not the terminal's group): the running step must
    not run on as an orphan whose end nobody logs. It is stopped, logged as stopped, and the
    runner's one line says which step it stopped."""
    import signal
    import time
    started = tmp_path / "started"
    script = tmp_path / "runner.py"
    script.write_text(RUNNER.format(repo=str(experiments.ROOT), started=str(started),
                                    done=str(tmp_path / "never"), log=str(tmp_path / "log.txt")))
    runner = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    while not started.exists():
        time.sleep(0.05)
    child = int((tmp_path / ".never.lock").read_text().split()[-1])
    runner.send_signal(signal.SIGINT)
    _, err = runner.communicate(timeout=30)
    assert runner.returncode == 130
    assert "Stopped long step" in err and "Run the same command again" in err
    assert not os.path.exists(f"/proc/{child}") or "zombie" in open(f"/proc/{child}/status").read()
    assert "stopped by an interrupt" in (tmp_path / "log.txt").read_text()
