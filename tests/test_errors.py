"""Bad input and interrupts, at every entry point: one line that names the flag or file at fault,
exit code 2 (a flag) or 1 (a file, the data), and nothing written or changed on disk. A bug in the
code still shows its traceback. The NaN guards and resume refusal too (a torn log line:
test_train.py's resume test).

Every case runs its script in this process (no interpreter start-up per case); the one tiny run
that several cases need is trained once (`run_dir`).
"""

import gc
import json
import math
import re
import urllib.error
from pathlib import Path

import pytest
import torch

import cli
import curves
import data
import linear_eval
import recipe
import train
import tsne
from conftest import TINY, crash_after_save, state
from tools import assignments, benchmark, detect, experiments

SCRIPTS = {"train.py": train, "linear_eval.py": linear_eval, "tsne.py": tsne,
           "curves.py": curves, "python -m tools.benchmark": benchmark, "python -m tools.detect": detect,
           "python -m tools.experiments": experiments, "python -m tools.assignments": assignments}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished one-epoch LoCo run (synthetic shapes), and beside it files that are not runs."""
    root = tmp_path_factory.mktemp("errors")
    train.main([*TINY, "--method", "loco", "--epochs", "1", "--out", str(root / "run")])
    (root / "notes.txt").write_text("not a checkpoint\n")
    (root / "empty_run").mkdir()
    (root / "header_only").mkdir()
    (root / "header_only" / "log.csv").write_text("epoch,step,lr,loss_s1\n")
    cifar = root / "bad_cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(b"\x80\x04 truncated")
    ckpt = state(root / "run")                  # checkpoints of a run that diverged
    first = next(iter(ckpt["encoder"]))
    for name, value in (("nan", math.nan), ("huge", 1e37)):
        bad = {**ckpt, "encoder": {**ckpt["encoder"], first: ckpt["encoder"][first] * 0 + value}}
        torch.save(bad, root / f"{name}.pt")
    (root / "bad_config").mkdir()                # a log beside a config.json that is not one
    (root / "bad_config" / "log.csv").write_text((root / "run" / "log.csv").read_text())
    (root / "bad_config" / "config.json").write_text("{\"method\": ")
    (root / "foreign").mkdir()                   # somebody else's checkpoint
    torch.save({"state_dict": {}}, root / "foreign" / "ckpt.pt")
    (root / "empty.json").write_text("{}")
    (root / "noimages.json").write_text(json.dumps(
        {"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    (root / "noannotations.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "a.png", "height": 8, "width": 8}], "annotations": [],
         "categories": [{"id": 1, "name": "a"}]}))
    (root / "det").mkdir()                       # a result of another checkpoint
    (root / "det" / "detect_loco_8_0.json").write_text(json.dumps({"checkpoint": "other.pt"}))
    for plan, bad in (("badminutes", "minutes.json"), ("badresult",
                                                       "simclr_seed0/linear_eval_fast.json")):
        (root / plan / bad).parent.mkdir(parents=True, exist_ok=True)
        (root / plan / bad).write_text("{\"truncated")
    return root


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# (script, arguments with {root} for run_dir, words the one line must hold, exit code)
CASES = [
    ("train.py", ["--batch-size", "0"], "--batch-size.*0 is not above 0", 2),
    ("train.py", ["--lr", "0"], "--lr.*0 is not above 0", 2),
    ("train.py", ["--lr", "nan"], "--lr.*nan is not above 0", 2),
    ("train.py", ["--tau", "0"], "--tau.*above 0", 2),
    ("train.py", ["--width", "0"], "--width.*above 0", 2),
    ("train.py", ["--epochs", "0"], "--epochs.*above 0", 2),
    ("train.py", ["--subset", "-1"], "--subset.*0 or more", 2),
    ("train.py", ["--warmup-epochs", "-1"], "--warmup-epochs.*0 or more", 2),
    ("train.py", ["--weight-decay=-1e-6"], "--weight-decay.*0 or more", 2),
    ("train.py", ["--log-every", "0"], "--log-every.*above 0", 2),
    ("train.py", ["--epochs", "two"], "--epochs.*'two' is not an integer", 2),
    ("train.py", ["--method", "byol"], "--method.*invalid choice: 'byol'", 2),
    ("train.py", ["--arch", "vgg"], "--arch.*invalid choice: 'vgg'", 2),
    ("train.py", ["--method", "gim", "--sharing", "upper"], "--sharing upper.*--method loco", 2),
    ("train.py", ["--soft-coef", "1e-2"], "--soft-coef.*add --sharing soft", 2),
    ("train.py", ["--method", "gim", "--no-top-unit"], "--no-top-unit.*gim has no such unit", 2),
    ("train.py", ["--method", "simclr", "--decoder", "full"], "--decoder full.*SimCLR's head", 2),
    ("train.py", ["--method", "simclr", "--top-decoder", "none"], "--top-decoder: SimCLR", 2),
    ("train.py", ["--top-decoder", "block"], "--top-decoder block is what --decoder gives", 2),
    ("train.py", ["--sharing", "1block", "--decoder", "stage"], "--sharing 1block a unit ends", 2),
    ("train.py", ["--lr", "1e45"], "--lr 1e\\+45 \\(peak\\): above 100", 2),
    ("train.py", ["--width", "1e-6"], "--width 1e-06: .*needs a width above", 2),
    ("train.py", ["--pipeline", "2"], "--pipeline 2: 1 process does not make whole pipelines", 2),
    ("train.py", ["--pipeline", "5"], "--pipeline 5: the encoder has 4 stages", 2),
    ("train.py", ["--pipeline-mode", "sync"], "--pipeline-mode .*add --pipeline P", 2),
    ("train.py", ["--placement", "2,2"], "--placement is a pipeline's", 2),
    ("train.py", ["--pipeline", "2", "--placement", "1,1,2"], "one number per process", 2),
    ("train.py", ["--method", "simclr", "--pipeline", "2", "--pipeline-mode", "async"],
     "async: SimCLR's one unit crosses every process", 2),
    ("train.py", ["--sharing", "soft", "--pipeline", "2"], "--sharing soft .*not built", 2),
    ("train.py", ["--dataset", "imagefolder", "--data-dir", "{root}/nowhere"],
     "nowhere/train not found.*or train without data: --dataset synthetic", 1),
    ("train.py", ["--device", "cuda"], "--device cuda: no cuda device", 2),
    ("train.py", ["--device", "gpu7"], "--device gpu7: not a device", 2),
    ("train.py", ["--batch-size", "512", "--out", "{root}/new"], "fewer than one batch of "
     "--batch-size 512", 2),
    ("train.py", ["--out", "{root}/run"], "run/ckpt.pt exists: add --resume", 2),
    ("train.py", ["--out", "{root}/new", "--resume"], "--resume: no checkpoint", 2),
    ("train.py", ["--out", "{root}/run", "--resume", "--tau", "0.2"], "--tau 0.5 \\(now 0.2\\)", 2),
    ("train.py", ["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs 3 is not shorter "
     "than --epochs 3", 2),
    ("train.py", ["--out", "{root}/run", "--resume", "--method", "gim"], "--method loco", 2),
    ("train.py", ["--out", "{root}/notes.txt/run"], "--out .*notes.txt is not a writable", 2),
    ("train.py", ["--out", "{root}/notes.txt"], "--out .*is a file", 2),
    ("train.py", ["--dataset", "cifar10", "--data-dir", "{root}/nowhere", "--out", "{root}/new"],
     "cifar10: .*not found.*--data-dir.*or train without data: --dataset synthetic", 1),
    ("train.py", ["--out", "{root}/foreign", "--resume"], "foreign/ckpt.pt is not a checkpoint "
     "written by train.py", 1),
    ("train.py", ["--dataset", "cifar10", "--data-dir", "{root}/bad_cifar", "--out",
                  "{root}/new"], "data_batch_1 is not a CIFAR batch file", 1),
    ("linear_eval.py", ["{root}/missing.pt"], "missing.pt: no such checkpoint", 1),
    ("linear_eval.py", ["{root}/notes.txt"], "notes.txt is not a checkpoint written by train", 1),
    ("linear_eval.py", ["{root}/run/log.csv"], "log.csv is not a checkpoint written by train", 1),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--subset", "-5"], "--subset.*0 or more", 2),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--lr", "0"], "--lr.*above 0", 2),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--out", "{root}/notes.txt/x.json"],
     "--out .*not a writable directory", 2),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--data-dir", "{root}/nowhere", "--subset", "300",
                        "--out", "{root}/out/le.json"], None, 0),
    ("linear_eval.py", ["{root}/nan.pt"], "nan.pt: encoder.*NaN or infinite.*cannot be used", 1),
    ("linear_eval.py", ["{root}/huge.pt"], "huge.pt: encoder.*1e\\+37, beyond 1e\\+06", 1),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--subset", "5"], "--subset 5:.*at least 20", 2),
    ("linear_eval.py", ["{root}/run/ckpt.pt", "--subset", "100", "--out", "{root}/out/k.json"],
     None, 0),                                     # fewer images than kNN's k: all of them vote
    ("tsne.py", ["{root}/missing.pt"], "missing.pt: no such checkpoint", 1),
    ("tsne.py", ["{root}/nan.pt"], "nan.pt: encoder.*NaN or infinite", 1),
    ("tsne.py", ["{root}/notes.txt"], "notes.txt is not a checkpoint", 1),
    ("tsne.py", ["{root}/run/ckpt.pt", "--out", "{root}/run"], "--out .*is a directory", 2),
    ("curves.py", ["{root}/empty_run"], "empty_run/log.csv: no such file", 1),
    ("curves.py", ["{root}/header_only"], "log.csv holds no logged step", 1),
    ("curves.py", ["{root}/bad_config"], "config.json is not the configuration train.py writes",
     1),
    ("curves.py", ["{root}/run", "--out", "{root}/nowhere/deeper/c.png"], None, 0),
    ("curves.py", ["{root}/run", "--out", "{root}/notes.txt/c.png"], "not a writable", 2),
    ("python -m tools.benchmark", ["speed", "--steps", "0"], "--steps.*above 0", 2),
    ("python -m tools.benchmark", ["fast"], "invalid choice: 'fast'", 2),
    ("python -m tools.benchmark", ["pipeline", "--placement", "2,0"], "--placement: '2,0'", 2),
    ("python -m tools.benchmark", ["train", "--data-dir", "{root}/nowhere"], "cifar10: .*not found", 1),
    ("python -m tools.detect", ["{root}/missing.pt"], "missing.pt: no such checkpoint", 1),
    ("python -m tools.detect", ["{root}/notes.txt"], "notes.txt is not a checkpoint written by train", 1),
    ("python -m tools.detect", ["random"], "'random' needs --like CKPT", 2),
    ("python -m tools.detect", ["{root}/run/ckpt.pt", "--train-scenes", "0"], "--train-scenes.*above 0", 2),
    ("python -m tools.detect", ["{root}/run/ckpt.pt", "--coco-train", "{root}", "{root}/empty.json",
                   "--coco-val", "{root}", "{root}/empty.json"],
     "empty.json is not a COCO annotation file: no list of images, annotations, categories", 1),
    ("python -m tools.detect", ["{root}/run/ckpt.pt", "--coco-train", "{root}", "{root}/noimages.json",
                   "--coco-val", "{root}", "{root}/noimages.json"], "noimages.json holds 0 images", 1),
    ("python -m tools.detect", ["{root}/run/ckpt.pt", "--coco-train", "{root}",
                         "{root}/noannotations.json", "--coco-val", "{root}",
                         "{root}/noannotations.json"], "noannotations.json holds no annotations", 1),
    ("python -m tools.detect", ["{root}/run/ckpt.pt", "--train-scenes", "8", "--iterations", "1", "--out",
                   "{root}/det"], "detect_loco_8_0.json holds the result of other.pt", 2),
    ("python -m tools.experiments", ["cifar-cpu", "--table-only", "--out", "{root}/badminutes"],
     "badminutes/minutes.json is corrupt.*fix or delete it", 1),
    ("python -m tools.experiments", ["cifar-cpu", "--table-only", "--out", "{root}/badresult"],
     "linear_eval_fast.json is corrupt.*run its plan again .*experiments cifar-cpu --out .*"
     "badresult, without --table-only", 1),
    ("python -m tools.experiments", ["cifar-cpu", "--seeds", "0"], "--seeds.*above 0", 2),
    ("python -m tools.experiments", ["cifar-cpu", "--table-only", "--out", "{root}/notes.txt/x"],
     "--out .*not a writable directory", 2),
    ("python -m tools.assignments", ["make", "{root}/run"], "run is not empty: give a new directory", 2),
    ("python -m tools.assignments", ["grade", "9"], "choose from \\[1, 2, 3, 4, 5\\]", 2),
]


@pytest.mark.parametrize("script,args,expected,code", CASES,
                         ids=[f"{c[0]} {' '.join(c[1])}" for c in CASES])
def test_bad_input_gets_one_line_naming_the_flag_or_file_and_changes_nothing(
        script, args, expected, code, run_dir, capsys, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    argv = [a.format(root=run_dir) for a in args]
    if script == "train.py":
        argv = [*TINY, *argv] if "--out" in args else [*TINY, *argv, "--out", f"{run_dir}/new"]
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exit_:
        cli.run(lambda: SCRIPTS[script].main(argv), script)
        raise SystemExit(0)
    err = capsys.readouterr().err.strip()
    if expected is None:                 # a path that works: the control cases
        assert exit_.value.code == 0, err
        return
    assert exit_.value.code == code, err
    assert len(err.splitlines()) == 1 and err.startswith(f"{script}: error: "), err
    assert re.search(expected, err), err
    assert snapshot(run_dir) == before            # nothing written, nothing changed


def test_a_bug_in_the_code_still_shows_its_traceback(monkeypatch):
    def broken(*a, **k):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(train, "parse_args", broken)
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: train.main([]), "train.py")


def test_weights_blown_up_by_an_update_are_never_saved_as_the_last_good_epoch(tmp_path, monkeypatch,
                                                                             capsys):
    """The losses of epoch 1 are finite (each computed before its update); the epoch's last
    update leaves an infinite weight. The checkpoint keeps epoch 0, and the message says so."""
    args = [*TINY, "--method", "loco", "--out", str(tmp_path)]
    train.main([*args, "--epochs", "1"])
    good = (tmp_path / "ckpt.pt").read_bytes()
    step, calls = recipe.LARS.step, []

    def blow_up(self):
        step(self)
        calls.append(1)
        if len(calls) == 4:               # the last update of the epoch's four steps
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(math.inf)
    monkeypatch.setattr(recipe.LARS, "step", blow_up)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main([*args, "--epochs", "2", "--resume"]), "train.py")
    err = capsys.readouterr().err
    assert e.value.code == 1 and "weights went wrong in epoch 1" in err and "NaN or inf" in err
    assert "holds epoch 0" in err and "--resume" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_a_nan_in_the_first_epoch_does_not_offer_a_checkpoint_that_was_never_written(
        tmp_path, monkeypatch, capsys):
    step = train.L.train_step
    monkeypatch.setattr(train.L, "train_step", lambda *a: [l * math.nan for l in step(*a)])
    with pytest.raises(SystemExit):
        cli.run(lambda: train.main([*TINY, "--epochs", "1", "--out", str(tmp_path)]), "train.py")
    err = capsys.readouterr().err
    assert "NaN or infinite" in err and "No checkpoint was written yet" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    args = [*TINY, "--method", "loco", "--out", str(tmp_path)]
    train.main([*args, "--epochs", "1"])
    good = (tmp_path / "ckpt.pt").read_bytes()
    step = train.L.train_step
    monkeypatch.setattr(train.L, "train_step", lambda *a: [l * math.nan for l in step(*a)])
    with pytest.raises(cli.UserError, match="NaN.*last good"):
        train.main([*args, "--epochs", "2", "--resume"])
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_ctrl_c_ends_with_one_line_saying_what_was_saved_and_how_to_continue(
        tmp_path, monkeypatch, capsys):
    args = [*TINY, "--epochs", "2", "--out", str(tmp_path)]
    crash_after_save(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main(args), "train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and len(err.splitlines()) == 1
    assert "holds epoch 0" in err and "--resume" in err


def test_resume_compares_what_flags_mean_and_may_change_only_where_and_how_a_run_reports(
        tmp_path, capsys):
    """A flag typed at its default is the same run as the flag left out, and a flag left out
    takes the run's value; a typed flag that changes what the run computes is refused, naming
    the run's value; paths, logging, --epochs and --lr may change (the last two, said)."""
    run = str(tmp_path / "run")
    train.main([*TINY, "--epochs", "1", "--out", run])
    train.main([*TINY, "--epochs", "2", "--out", run, "--resume", "--log-every", "3",
                "--workers", "0", "--tau", "0.5", "--decoder", "block", "--sharing", "stage"])
    assert "--epochs 1 -> 2: the schedule from here on ends" in capsys.readouterr().out
    assert state(tmp_path / "run")["epoch"] == 1
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["tau"] == 0.5 and recorded["decoder"] == "block"   # resolved, not null
    assert recorded["precision"] == "fp32" and recorded["warmup_epochs"] == 0.5
    for flag, value in [("--tau", "0.2"), ("--warmup-epochs", "0.25"), ("--weight-decay", "0"),
                        ("--no-sync-bn", None), ("--seed", "1"),
                        ("--precision", "bf16"), ("--decoder", "none")]:
        extra = [flag] + ([value] if value else [])
        with pytest.raises(cli.UserError, match=flag.replace("--no-", "--") + ".*now"):
            train.main([*TINY, "--epochs", "3", "--out", run, "--resume", *extra])
    # the fault hunt's case: a pipeline's mode left to its default (async), typed on resume
    config = {**recorded, "pipeline": 2, "pipeline_mode": None, "placement": "2,2"}
    args = train.parse_args([*TINY, "--pipeline", "2", "--pipeline-mode", "async", "--resume"])
    assert train.continued(args, train.typed([*TINY, "--pipeline", "2", "--pipeline-mode",
                                              "async", "--resume"]), config,
                           tmp_path).pipeline_mode == "async"
    args = train.parse_args([*TINY, "--pipeline", "2", "--resume"])
    assert train.continued(args, {"pipeline", "resume"}, config, tmp_path).placement == "2,2"
    with pytest.raises(cli.UserError, match="--placement 2,2 \\(now 1,3\\)"):
        args = train.parse_args([*TINY, "--pipeline", "2", "--placement", "1,3", "--resume"])
        train.continued(args, {"pipeline", "placement", "resume"}, config, tmp_path)


def test_a_disk_that_fills_while_a_checkpoint_is_written_keeps_the_last_good_one(tmp_path,
                                                                                capsys):
    """The temporary checkpoint is /dev/full, a device every write to fails with ENOSPC."""
    args = [*TINY, "--out", str(tmp_path)]
    train.main([*args, "--epochs", "1"])
    good = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt.tmp").symlink_to("/dev/full")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main([*args, "--epochs", "2", "--resume"]), "train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert "ckpt.pt: writing epoch 1 failed (No space left on device)" in err, err
    assert "holds epoch 0" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()


# The workers' queue-feeder thread complains when the error tears the loader down under pytest's
# captured file descriptors; run as a script, the only output is the one line.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_corrupt_image_read_by_a_dataloader_worker_is_named_in_one_line(tmp_path, capsys):
    from PIL import Image
    for split in ("train", "val"):
        folder = tmp_path / "images" / split / "a"
        folder.mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 90, 30)).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "a" / "4.png").write_bytes(b"\x89PNG\r\n truncated")
    argv = [*TINY, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "images"),
            "--subset", "0", "--batch-size", "5", "--epochs", "1", "--workers", "2",
            "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main(argv), "train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and len(err.splitlines()) == 1, err
    assert re.search(r"train/a/4.png is not a readable image .*in a DataLoader worker", err), err
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    gc.collect()                         # the loader's threads end here, inside the filter


def test_ctrl_c_before_the_loop_says_that_nothing_was_written(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "pretrain_loader", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.run(lambda: train.main([*TINY, "--out", str(tmp_path / "run")]), "train.py")
    err = capsys.readouterr().err.strip()
    assert e.value.code == 130 and "No checkpoint was written yet" in err, err


def test_grading_a_folder_without_the_assignments_tests_is_refused(tmp_path):
    with pytest.raises(cli.UserError, match="holds none of assignment 1's tests"):
        assignments.grade([1], where=tmp_path)


def test_a_test_file_that_does_not_import_scores_zero_with_its_error(tmp_path, capsys):
    """A student's syntax error fails the assignment and says why; a conftest that does not
    import stops pytest before any test: one line, not "holds none of the tests"."""
    (tmp_path / "test_loco.py").write_text("def test_info_nce(:\n")
    assert assignments.grade([1], where=tmp_path) == {1: (0, 1)}
    assert "SyntaxError" in capsys.readouterr().out
    (tmp_path / "conftest.py").write_text("import no_such_module_here\n")
    with pytest.raises(cli.UserError, match="pytest could not run the tests in .*no_such_module"):
        assignments.grade([1], where=tmp_path)
