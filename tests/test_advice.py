"""Every message that tells the user what to do gives advice that works: for each, a test makes
the message happen, follows its advice, and asserts that what it suggests is accepted or
succeeds. `test_every_message_that_advises_is_in_this_table` reads every script's messages
(their literal text, by parsing the source) and fails on one that advises and is not here.

The rows share one tiny LoCo run (`run`) where a message is about a run.
"""

import ast
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cli
import curves
import data
import linear_eval
import local_units as L
import pipeline
import recipe
import runtime
import train
from cli import UserError
from conftest import TINY, state, write_fake_cifar10
from tools import assignments, benchmark, detect, experiments, multinode

ROOT = Path(__file__).resolve().parents[1]


def refused(call, pattern: str) -> str:
    """The one-line message `call` stops with (a UserError, or argparse's exit), checked."""
    with pytest.raises((UserError, SystemExit)) as e:
        call()
    message = str(e.value)
    assert re.search(pattern, message) or isinstance(e.value, SystemExit), message
    return message


def parses(*argv: str, world: int = 1) -> train.argparse.Namespace:
    """train.py accepts these flags, on `world` processes."""
    args = train.parse_args([*TINY, *argv])
    train.check_world(args, world)
    return args


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("advice") / "run"
    train.main([*TINY, "--epochs", "1", "--out", str(out)])
    return out


# ---------------------------------------------------------------- flags that contradict
def test_flags_that_contradict_each_other_name_a_combination_that_parses(capsys):
    table = [  # (refused flags, what the message says, the flags its advice gives)
        (["--method", "gim", "--sharing", "upper"], "use --method loco, or leave --sharing out",
         [["--method", "loco", "--sharing", "upper"], ["--method", "gim"]]),
        (["--soft-coef", "1e-2"], "add --sharing soft, or leave it out",
         [["--soft-coef", "1e-2", "--sharing", "soft"], []]),
        (["--method", "gim", "--no-top-unit"], "leave it out", [["--method", "gim"]]),
        (["--method", "simclr", "--top-decoder", "none"], "choose its decoder with --decoder",
         [["--method", "simclr", "--decoder", "none"]]),
        (["--top-decoder", "block"], "leave it out", [[]]),
        (["--method", "simclr", "--decoder", "stage"], "use none, block, block-nods or 2blocks",
         [["--method", "simclr", "--decoder", d] for d in ("none", "block", "block-nods",
                                                            "2blocks")]),
        (["--sharing", "1block", "--decoder", "full"], "use block, block-nods or 2blocks",
         [["--sharing", "1block", "--decoder", d] for d in ("block", "block-nods", "2blocks")]),
        (["--epochs", "3", "--warmup-epochs", "3"], "give fewer than 3, or leave it out",
         [["--epochs", "3", "--warmup-epochs", "2.9"], ["--epochs", "3"]]),
        (["--pipeline-mode", "sync"], "add --pipeline P \\(P > 1\\), or leave it out",
         [["--pipeline-mode", "sync", "--pipeline", "2"], []]),
        (["--placement", "2,2"], "add --pipeline P", [["--placement", "2,2", "--pipeline", "2"]]),
        (["--method", "simclr", "--pipeline", "2", "--pipeline-mode", "async"], "use sync",
         [["--method", "simclr", "--pipeline", "2", "--pipeline-mode", "sync"]]),
        (["--compile", "--pipeline", "2"], "leave one out", [["--compile"], ["--pipeline", "2"]]),
        (["--dataset", "imagefolder", "--data-dir", "/nowhere"], None,   # parses; data.py says
         [["--dataset", "synthetic"]]),
    ]
    for bad, says, follows in table:
        if says:
            refused(lambda: train.parse_args([*TINY, *bad]), says)
        for argv in follows:
            parses(*argv, world=2 if "--pipeline" in argv else 1)


def test_a_world_or_batch_that_does_not_split_names_one_that_does():
    args = train.parse_args([*TINY, "--pipeline", "2"])
    refused(lambda: train.check_world(args, 3), "start a multiple of 2 \\(torchrun "
            "--nproc_per_node 2 for one, 4 for two replicas\\)")
    assert train.check_world(args, 2) == 1 and train.check_world(args, 4) == 2
    args = train.parse_args([*TINY, "--batch-size", "63"])
    refused(lambda: train.check_world(args, 2), "use a multiple of 2")
    parses("--batch-size", "64", world=2)
    refused(lambda: data.pretrain_loader("synthetic", "data", 512, 0, torch.device("cpu"),
                                         subset=256), "lower --batch-size or raise --subset")
    data.pretrain_loader("synthetic", "data", 256, 0, torch.device("cpu"), subset=256)
    data.pretrain_loader("synthetic", "data", 512, 0, torch.device("cpu"), subset=512)


def test_a_device_that_is_absent_says_to_leave_the_flag_out():
    if torch.cuda.is_available():
        pytest.skip("this machine has the device the row asks for")
    refused(lambda: runtime.pick_device("cuda"), "leave --device out")
    assert runtime.pick_device(None).type in ("cpu", "mps")


# ---------------------------------------------------------------- placement
def test_placement_refusals_offer_a_placement_that_is_accepted():
    units = L.make_units("loco", [0, 1, 1, 2, 2, 3, 3], sharing="1block")   # 7 pieces
    allowed = pipeline.cuts(units, 7, "async")
    message = refused(lambda: pipeline.by_hand("2,2", 7, allowed, "async", 2), "e\\.g\\. ")
    example = re.search(r"e\.g\. (\d+(?:,\d+)+)", message).group(1)
    assert example != "2,2" and pipeline.by_hand(example, 7, allowed, "async", 2)
    message = refused(lambda: pipeline.by_hand("3,4", 7, allowed, "async", 2),
                      "try [\\d,]+, or --pipeline-mode sync")
    pipeline.by_hand(re.search(r"try (\d+(?:,\d+)+)", message).group(1), 7, allowed, "async", 2)
    pipeline.by_hand("3,4", 7, pipeline.cuts(units, 7, "sync"), "sync", 2)
    refused(lambda: pipeline.place([1.0] * 4, 2, []), "try sync")
    pipeline.place([1.0] * 4, 2, pipeline.cuts(L.make_units("simclr", [0, 1, 2, 3]), 4, "sync"))


def test_a_placement_that_leaves_a_stage_late_gradients_only_names_one_that_does_not():
    torch.manual_seed(0)
    run = recipe.build({"arch": "resnet18", "width": 0.125, "dataset": "cifar10",
                        "method": "loco"}, runtime.Runtime(torch.device("cpu"), False,
                                                           torch.float32, False))
    note = pipeline.late_only(run, [range(0, 1), range(1, 4)], "async")   # S1 alone
    assert "stage 1 learns only from late gradients" in note
    fix = re.search(r"--placement ([\d,]+)", note).group(1)
    assert pipeline.late_only(run, pipeline.by_hand(fix, 4, [0, 1, 2], "async", 2), "async") \
        is None
    note = pipeline.late_only(run, [range(k, k + 1) for k in range(4)], "async")   # one stage each
    assert "--pipeline 3 (or fewer processes per pipeline), or with --pipeline-mode sync" in note
    assert pipeline.late_only(run, [range(0, 2), range(2, 3), range(3, 4)], "async") is None
    assert pipeline.late_only(run, [range(k, k + 1) for k in range(4)], "sync") is None


# ---------------------------------------------------------------- runs: resume and divergence
def test_resume_refusals_and_an_existing_run_name_ways_that_work(run, tmp_path):
    refused(lambda: train.main([*TINY, "--epochs", "2", "--out", str(run)]),
            "add --resume to continue that run, or choose another --out")
    continued = train.continued(train.parse_args([*TINY, "--epochs", "2", "--resume"]),
                                {"epochs", "resume"}, state(run)["config"], run / "ckpt.pt")
    assert continued.epochs == 2
    parses("--out", str(tmp_path / "other"))
    refused(lambda: train.main([*TINY, "--out", str(tmp_path / "none"), "--resume"]),
            "leave --resume out to start")
    parses("--out", str(tmp_path / "none"))
    config = state(run)["config"]
    message = refused(lambda: train.continued(
        train.parse_args([*TINY, "--tau", "0.2", "--resume"]), {"tau", "resume"}, config,
        run / "ckpt.pt"), "leave those flags out to continue it, or start a new run in another")
    assert "--tau 0.5 (now 0.2)" in message
    train.continued(train.parse_args([*TINY, "--resume"]), {"resume"}, config, run / "ckpt.pt")
    parses("--tau", "0.2", "--out", str(tmp_path / "new"))
    refused(lambda: train.continued(train.parse_args([*TINY, "--epochs", "1", "--resume"]),
                                    {"epochs", "resume"}, {**config, "warmup_epochs": 4.0},
                                    run / "ckpt.pt"), "warms up for 4 epochs; resume it with more")
    train.continued(train.parse_args([*TINY, "--epochs", "5", "--resume"]), {"epochs", "resume"},
                    {**config, "warmup_epochs": 4.0}, run / "ckpt.pt")


def test_a_diverged_run_is_continued_at_the_lower_lr_its_message_gives(run, tmp_path,
                                                                      monkeypatch):
    """Resumed exactly, a diverged run would diverge again at the same step: the message offers
    a lower peak lr, which --resume accepts, and the run then trains on."""
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    step = train.L.train_step
    with monkeypatch.context() as m:
        m.setattr(train.L, "train_step", lambda *a: [l * math.nan for l in step(*a)])
        message = refused(lambda: train.main([*TINY, "--epochs", "2", "--out", str(copy),
                                              "--resume"]), "the same command with --resume "
                          "--lr 1\\), or start a new run in another --out with a lower --lr")
    lr = re.search(r"--resume --lr ([\d.e-]+)", message).group(1)
    train.main([*TINY, "--epochs", "2", "--out", str(copy), "--resume", "--lr", lr])
    assert state(copy)["epoch"] == 1 and state(copy)["config"]["lr"] == float(lr)
    parses("--lr", lr, "--tau", "1.0", "--out", str(tmp_path / "fresh"))
    assert "start this one again" in train.diverged(tmp_path / "never" / "ckpt.pt", 2.0)


def test_a_run_stopped_by_its_time_limit_or_an_interrupt_continues_with_resume(run, tmp_path,
                                                                               capsys):
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    train.main([*TINY, "--epochs", "3", "--out", str(copy), "--resume", "--time-limit", "1e-9"])
    said = capsys.readouterr().out
    assert "stopped after epoch 2 of 3; continue with the same command and --resume" in said
    assert "continue from it with --resume" in train.saved(copy / "ckpt.pt")  # Ctrl-C, a peer
    train.main([*TINY, "--epochs", "3", "--out", str(copy), "--resume"])   # lost, a full disk
    assert state(copy)["epoch"] == 2


# ---------------------------------------------------------------- data and files
def test_missing_or_broken_data_names_a_folder_or_a_fix_that_loads(tmp_path, monkeypatch):
    refused(lambda: data.load_images("cifar10", tmp_path / "none", "train", download=False),
            "Point --data-dir at the folder that holds cifar-10-batches-py/")
    write_fake_cifar10(tmp_path / "good")
    assert len(data.load_images("cifar10", tmp_path / "good", "test")[0]) == 2
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(b"not a pickle")
    refused(lambda: data.load_images("cifar10", tmp_path / "bad", "train"),
            "delete .*cifar-10-batches-py to download it again, or point --data-dir elsewhere")
    shutil.rmtree(bad)                   # as the message says: the download then runs again

    def download(url, root, md5=None):
        write_fake_cifar10(Path(root))
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", download)
    assert len(data.load_images("cifar10", tmp_path / "bad", "train")[0]) == 10
    stl = tmp_path / "stl" / "stl10_binary"
    stl.mkdir(parents=True)
    (stl / "test_X.bin").write_bytes(bytes(100))
    refused(lambda: data.load_images("stl10", tmp_path / "stl", "test"),
            "delete .*stl10_binary to download it again")

    def download_stl(url, root, md5=None):
        folder = Path(root) / "stl10_binary"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "test_X.bin").write_bytes(bytes(2 * 3 * 96 * 96))
        (folder / "test_y.bin").write_bytes(bytes([1, 2]))
    shutil.rmtree(stl)
    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", download_stl)
    assert len(data.load_images("stl10", tmp_path / "stl", "test")[0]) == 2


def test_an_image_folder_that_is_missing_or_unreadable_says_what_loads(tmp_path):
    from PIL import Image
    refused(lambda: data.image_folder(tmp_path / "train", None), "--data-dir must hold "
            "train/<class>/ and val/<class>/")
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "0.png")
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"\x89PNG truncated")
    folder = data.image_folder(tmp_path / "train", None)
    refused(lambda: [folder[i] for i in range(len(folder))], "delete or replace it")
    (tmp_path / "train" / "a" / "1.png").unlink()
    folder = data.image_folder(tmp_path / "train", None)
    assert [folder[i][1] for i in range(len(folder))] == [0]


def test_checkpoint_and_output_paths_name_what_is_accepted(run, tmp_path):
    refused(lambda: recipe.load_checkpoint(run / "missing.pt"), "train.py writes RUN/ckpt.pt")
    recipe.load_checkpoint(run / "ckpt.pt")
    refused(lambda: cli.check_writable(run / "ckpt.pt", "--out", is_dir=True),
            "is a file; give a directory")
    cli.check_writable(run, "--out", is_dir=True)
    refused(lambda: cli.check_writable(run, "--out"), "is a directory; give a file name")
    cli.check_writable(run / "x.json", "--out")


def test_curves_messages_name_a_run_that_draws(run, tmp_path):
    refused(lambda: curves.read_log(tmp_path), "give run directories written by train.py")
    (tmp_path / "log.csv").write_text("epoch,step,lr\n")
    refused(lambda: curves.read_log(tmp_path), "train the run for an epoch first")
    curves.read_log(run)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "config.json").write_text("{")
    refused(lambda: curves.method_of(copy), "delete it to label the curves by the folder's name")
    (copy / "config.json").unlink()
    assert curves.method_of(copy) == "run"


# ---------------------------------------------------------------- evaluation, detection
def test_linear_eval_messages_name_values_that_run(run, tmp_path, monkeypatch):
    refused(lambda: linear_eval.parse_args([str(run / "ckpt.pt"), "--subset", "5"]),
            "give at least")
    linear_eval.parse_args([str(run / "ckpt.pt"), "--subset", str(linear_eval.MIN_IMAGES)])
    linear_eval.parse_args([str(run / "ckpt.pt"), "--subset", "0"])
    assert all(data.DATASETS[d].in_memory for d in ("cifar10", "cifar100", "stl10", "synthetic"))
    paper = [str(run / "ckpt.pt"), "--protocol", "paper", "--epochs", "1", "--subset", "64"]
    refused(lambda: linear_eval.main([*paper, "--out", str(tmp_path / "a.json")]),
            "lower --batch-size or raise --subset")
    refused(lambda: linear_eval.main([*paper, "--batch-size", "32", "--lr", "1e38",
                                      "--out", str(tmp_path / "a.json")]),
            "diverged at epoch 0: lower --lr")
    linear_eval.main([*paper, "--batch-size", "32", "--out", str(tmp_path / "b.json")])
    linear_eval.main([*paper[:-1], "256", "--out", str(tmp_path / "c.json")])


def test_detect_messages_name_inputs_that_are_accepted(tmp_path):
    refused(lambda: detect.parse_args(["random"]), "")
    refused(lambda: detect.parse_args(["x.pt", "--coco-train", "a", "b"]), "")
    detect.parse_args(["x.pt", "--coco-train", "a", "b", "--coco-val", "a", "b"])
    detect.parse_args(["x.pt"])
    (tmp_path / "ann.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "0.png", "height": 8, "width": 8}], "annotations": [],
        "categories": [{"id": 1, "name": "a"}]}))
    refused(lambda: detect.coco_dataset(str(tmp_path), str(tmp_path / "ann.json")),
            "give a split whose images have annotated objects")
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    annotated = json.loads((tmp_path / "ann.json").read_text())
    annotated["annotations"] = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4],
                                 "area": 16, "iscrowd": 0,
                                 "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}]
    (tmp_path / "ann.json").write_text(json.dumps(annotated))
    assert len(detect.coco_dataset(str(tmp_path), str(tmp_path / "ann.json"))[1]) == 1
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "r.json").write_text(json.dumps({"checkpoint": "other.pt"}))
    refused(lambda: detect.refuse_overwrite(tmp_path / "out" / "r.json", "mine.pt"),
            "give another --out")
    detect.refuse_overwrite(tmp_path / "another" / "r.json", "mine.pt")


def test_a_detection_loss_that_diverges_says_lower_lr_and_a_lower_lr_trains(trained):
    from tools.detect import fine_tune, synthetic_split
    torch.manual_seed(0)
    encoder, ckpt = recipe.load_encoder(str(trained / "ckpt.pt"), torch.device("cpu"))
    info = data.DATASETS[ckpt["config"]["dataset"]]
    net = detect.detector(encoder.train().requires_grad_(True), 11, 64, True, info.mean, info.std,
                          fpn=16)
    x, t = synthetic_split(4, 0)
    state_ = {k: v.clone() for k, v in net.state_dict().items()}
    refused(lambda: fine_tune(net, list(x), t, 3, 2, 1e12, 0), "lower --lr")
    net.load_state_dict(state_)
    assert all(math.isfinite(v) for v in fine_tune(net, list(x), t, 1, 2, 0.02, 0))


# ---------------------------------------------------------------- tools
def test_tool_flags_refused_name_values_that_parse(tmp_path):
    refused(lambda: benchmark.main(["memory", "--size", "1"]), "give 32 or more")
    refused(lambda: benchmark.main(["pipeline", "--placement", "2,0"]), "e.g. 2,2")
    assert re.fullmatch(r"[1-9]\d*(,[1-9]\d*)+", "2,2")       # the benchmark's own rule
    refused(lambda: benchmark.mesh_table(8, tmp_path / "none.json"), "run python -m "
            "tools.benchmark pipeline --out .*none.json first")
    shutil.copy(benchmark.MEASURED, tmp_path / "none.json")     # what that command writes
    assert benchmark.mesh_table(8, tmp_path / "none.json")
    refused(lambda: multinode.main(["--kill-after-epoch", "1", "--", "--method", "gim"]),
            "give train.py's --epochs after --")
    refused(lambda: assignments.main(["grade", "9"]), "")
    assignments.main(["make", str(tmp_path / "new")])
    refused(lambda: assignments.main(["make", str(tmp_path / "new")]), "give a new directory")


def test_experiments_messages_name_a_way_to_get_the_file_back(tmp_path, capsys):
    plan = experiments.Plan()
    plan.other("step", ["-c", f"open({str(tmp_path / 'done.json')!r}, 'w').write('{{}}')"],
               tmp_path / "done.json", 0.01)
    assert not experiments.execute(plan, minutes=1e-9, log=tmp_path / "log.txt")
    assert "out of time; run the same command again" in capsys.readouterr().out
    assert experiments.execute(plan, minutes=None, log=tmp_path / "log.txt")
    (tmp_path / "minutes.json").write_text("{")
    refused(lambda: experiments.read_minutes(tmp_path), "fix or delete it")
    (tmp_path / "minutes.json").unlink()
    assert experiments.read_minutes(tmp_path) == {}
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"torn")
    step = experiments.Step("train run", [], ckpt, 1.0, train_epochs=2)
    refused(lambda: experiments.finished(step), "delete it to train 'train run' from the start")
    ckpt.unlink()
    assert not experiments.finished(step)


def test_a_corrupt_result_names_the_plan_that_writes_it_and_git_restores_a_committed_one():
    """The gap and width plans read cifar-cpu's committed results: the message names cifar-cpu
    (whose run redoes the step, as a corrupt result is not done), and git restores the file."""
    path = ROOT / "results" / "cifar-cpu" / "simclr_seed0" / "linear_eval_fast.json"
    good = path.read_bytes()
    try:
        path.write_text("{\"truncated")
        message = refused(lambda: experiments.read_json(path),
                          "git checkout -- results/cifar-cpu/simclr_seed0/linear_eval_fast.json"
                          ".*python -m tools.experiments cifar-cpu --out results/cifar-cpu")
        step = experiments.Step("evaluate simclr_seed0", [], path, 1.0)
        assert not experiments.finished(step)          # its plan does the step again
        subprocess.run(["git", "-C", str(ROOT), "checkout", "--", str(path)], check=True)
        assert experiments.read_json(path) and path.read_bytes() == good and message
    finally:
        path.write_bytes(good)


# ---------------------------------------------------------------- the table covers them all
# Each script's messages that advise, by a phrase of their literal text, and each covered by a
# test above; the ones whose words only look like advice are listed apart, with why.
ADVISING = {
    "cli.py": ["; give "],
    "recipe.py": ["use --method loco", "add --sharing soft", "has no such unit: leave it out",
                  "choose its decoder", "gives every head already", "with nothing above: use",
                  "a unit ends inside a stage: use", "is not shorter than --epochs",
                  "train.py writes RUN/ckpt.pt"],
    "runtime.py": ["not make whole pipelines", "leave --device out"],
    "data.py": ["Point --data-dir", "does not split evenly", "lower --batch-size",
                "delete or replace it", "not a CIFAR batch file", "whole 96x96 images",
                "must hold train/<class>/"],
    "linear_eval.py": ["give at least", "use it with cifar10", "lower --lr",
                       "lower --batch-size or raise --subset"],
    "pipeline.py": ["is a pipeline's: add", "use sync", "leave one out", "(try sync)",
                    "give each process's number", "cannot cut after piece"],
    "curves.py": ["give run directories", "train the run for an epoch first",
                  "delete it to label"],
    "train.py": ["leave those flags out", "resume it with more", "add --resume to continue",
                 "leave --resume out", "or train without data", "continue with the same command",
                 "schedule from here on"],
    "tools/benchmark.py": ["e.g. 2,2", "give 32 or more", "no measured stage times"],
    "tools/multinode.py": ["give train.py's --epochs"],
    "tools/assignments.py": ["give a new directory", "choose from"],
    "tools/experiments.py": ["run the same command again", "Run the same command again",
                             "fix or delete it", "delete it to train"],
    "tools/detect.py": ["give a split whose images", "give another --out",
                        "give both --coco-train", "lower --lr"],
}
NOT_ADVICE = {
    "is not a checkpoint written by train.py": "names the file's fault; nothing to do but not "
                                               "use it",
    "the run that wrote it had diverged": "says why a checkpoint is refused",
    "pytest could not run the tests in": "passes on pytest's own words",
    "already holds all": "says that nothing is left to do",
    "another process of this run stopped": "its advice is saved()'s, tested above",
    "holds the result of": "tested above (give another --out)",
}
ADVICE_WORDS = re.compile(r"\b(use|add|leave|give|try|lower|raise|start|choose|continue|delete|"
                          r"run|resume|fix|restore|point|train)\b", re.I)


def literal(node: ast.AST) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(literal(v) if not isinstance(v, ast.FormattedValue) else "{}"
                       for v in node.values)
    if isinstance(node, ast.BinOp):
        return literal(node.left) + literal(node.right)
    if isinstance(node, ast.IfExp):
        return literal(node.body) + " | " + literal(node.orelse)
    return "{}"


def messages(path: Path) -> list[str]:
    """The literal text of every message a script raises, refuses with, or prints as advice."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and node.args:
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            text = literal(node.args[0])
            if name in ("UserError", "refuse", "error", "MissingData", "KeyboardInterrupt") or (
                    name == "print" and text.startswith(("--", "pipeline"))):
                found.append(text)
    return found


def test_every_message_that_advises_is_in_this_table():
    scripts = [p for p in [*ROOT.glob("*.py"), *ROOT.glob("tools/*.py")]
               if not p.name.startswith("test_") and p.name != "conftest.py"]
    missing = []
    for path in scripts:
        phrases = ADVISING.get(str(path.relative_to(ROOT)), [])
        for text in messages(path):
            if ADVICE_WORDS.search(text) and not any(p in text for p in phrases) \
                    and not any(n in text for n in NOT_ADVICE):
                missing.append(f"{path.relative_to(ROOT)}: {text[:90]}")
    assert missing == []
