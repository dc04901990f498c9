"""experiments.py: a plan skips what is done and stops cleanly when its minutes run out, and the
GPU plan's smoke mode runs every one of its steps on the CPU, so that a lent GPU's first run is
not the first run of this code."""

import experiments
from conftest import write_fake_cifar10


def touch_steps(tmp_path, n: int, seconds: float = 0.0) -> experiments.Plan:
    """n steps that each sleep, then write their file."""
    plan = experiments.Plan()
    for i in range(n):
        done = tmp_path / f"step{i}.txt"
        code = f"import time; time.sleep({seconds}); open({str(done)!r}, 'w').write('x')"
        plan.other(f"step {i}", ["-c", code], done, seconds / 60)
    return plan


def test_a_plan_stops_when_its_minutes_run_out_and_continues_without_redoing(tmp_path, capsys):
    plan = touch_steps(tmp_path, 4, seconds=1.0)
    assert not experiments.execute(plan, minutes=1.5 / 60, log=tmp_path / "log.txt")
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


def test_the_gpu_plan_runs_every_step_in_smoke_mode(tmp_path, capsys):
    write_fake_cifar10(tmp_path / "data", per_batch=60, test=200)
    out = tmp_path / "gpu"
    args = ["gpu", "--smoke", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
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
