"""The measured results of this repository, each one command that trains, evaluates, draws and
prints its table, and that continues where it stopped when run again.

    python experiments.py cifar-cpu --data-dir data       # Table 1 on CIFAR-10, 2 CPU cores
    python experiments.py ablations --data-dir data       # Tables 4 and 5 at a CPU scale
    python experiments.py gpu --data-dir data             # every GPU figure (README, GPU)
    python experiments.py cifar-cpu --seeds 3             # a third seed in a later sitting
    python experiments.py cifar-cpu --smoke               # every step for a few iterations

A plan is a list of steps (train a run, evaluate it, draw a figure, time a benchmark); each is
a subprocess of this repository's own scripts and each knows when it is done (a checkpoint of
the last epoch, a JSON or PNG written atomically), so an interrupted plan, run again, skips what
is finished and resumes a run from its last epoch. --minutes stops a sitting cleanly: no step
starts once it has run out, and a training step given less time stops after the epoch in which
its share ends (train.py --time-limit). Results go to --out (default runs/<plan>).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cli
from local_units import TITLES

PY = sys.executable


@dataclass
class Step:
    name: str
    args: list[str]                      # a script of this repository and its arguments
    done: Path                           # the file whose existence means the step is done
    minutes: float                       # expected duration, for the plan printed at the start
    train_epochs: int = 0                # a training step: done when its checkpoint has these


@dataclass
class Plan:
    steps: list[Step] = field(default_factory=list)

    def train(self, run: Path, flags: list[str], epochs: int, minutes: float) -> None:
        self.steps.append(Step(f"train {run.name}", ["train.py", *flags, "--epochs", str(epochs),
                                                     "--out", str(run)],
                               run / "ckpt.pt", minutes, epochs))

    def eval(self, run: Path, minutes: float, random: bool = False, extra: list[str] = ()) -> None:
        out = run / f"linear_eval_fast{'_random' if random else ''}.json"
        self.steps.append(Step(f"evaluate {run.name}{' (random init)' if random else ''}",
                               ["linear_eval.py", str(run / "ckpt.pt"), *extra, "--out", str(out)]
                               + (["--random-init"] if random else []), out, minutes))

    def other(self, name: str, args: list[str], done: Path, minutes: float) -> None:
        self.steps.append(Step(name, args, done, minutes))


def finished(step: Step) -> bool:
    if not step.done.exists():
        return False
    if not step.train_epochs:
        return True
    import torch
    ckpt = torch.load(step.done, map_location="cpu", weights_only=True)
    return ckpt["epoch"] + 1 >= step.train_epochs


def execute(plan: Plan, minutes: float | None, log: Path) -> bool:
    """Run the steps not yet done, in order; False if time ran out before the last."""
    todo = [s for s in plan.steps if not finished(s)]
    print(f"{len(plan.steps) - len(todo)} of {len(plan.steps)} steps done; to do, about "
          f"{sum(s.minutes for s in todo):.0f} min:")
    for s in todo:
        print(f"  {s.minutes:6.1f} min  {s.name}")
    deadline = time.time() + 60 * minutes if minutes else None
    for s in todo:
        if finished(s):                  # done by an earlier step of this sitting
            continue
        left = (deadline - time.time()) / 60 if deadline else None
        if left is not None and left < min(1.0, s.minutes):
            print(f"--minutes: out of time before '{s.name}'; run the same command again")
            return False
        args = list(s.args)
        if s.train_epochs and s.done.exists():
            args.append("--resume")
        if s.train_epochs and left is not None:
            args += ["--time-limit", f"{max(0.1, left - 0.5):.2f}"]
        print(f"[{time.strftime('%H:%M:%S')}] {s.name}", flush=True)
        t = time.time()
        with open(log, "a") as f:
            f.write(f"\n$ {' '.join(args)}\n")
            f.flush()
            code = subprocess.run([PY, *args], stdout=f, stderr=subprocess.STDOUT,
                                  cwd=Path(__file__).parent).returncode
        if code:
            raise cli.UserError(f"step '{s.name}' failed (exit {code}): see the end of {log}")
        record_minutes(log.parent, s.name, (time.time() - t) / 60)
    return all(finished(s) for s in plan.steps)


def record_minutes(out: Path, name: str, minutes: float) -> None:
    """Wall time of every step, summed over sittings, in out/minutes.json."""
    path = out / "minutes.json"
    spent = json.loads(path.read_text()) if path.exists() else {}
    spent[name] = round(spent.get(name, 0.0) + minutes, 2)
    cli.write_atomic(path, json.dumps(spent, indent=1))


# ---------------------------------------------------------------------------- plans
# The CPU protocol (README, Results): ResNet-18 at width 1/4, CIFAR stem, all 50,000 training
# images, batch 256, LARS at lr 4 with one warm-up epoch, 12 epochs; seeds 0, 1, ...
CPU = {"arch": "resnet18", "width": "0.25", "batch-size": "256", "lr": "4.0",
       "warmup-epochs": "1"}
CPU_EPOCHS = 12


def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", v)]


def cifar_cpu(out: Path, data_dir: str, seeds: int, smoke: bool) -> Plan:
    plan, epochs = Plan(), 1 if smoke else CPU_EPOCHS
    base = flags({**CPU, "dataset": "cifar10", "data-dir": data_dir, "log-every": "20"})
    if smoke:
        base += ["--subset", "512", "--batch-size", "128"]
    evalx = ["--subset", "500"] if smoke else []
    for seed in range(seeds):
        for method, minutes in (("simclr", 24), ("gim", 27), ("loco", 27)):
            run = out / f"{method}_seed{seed}"
            plan.train(run, [*base, "--method", method, "--seed", str(seed)], epochs,
                       0.5 if smoke else minutes)
            plan.eval(run, 0.3 if smoke else 2, extra=evalx)
        plan.eval(out / f"simclr_seed{seed}", 0.3 if smoke else 2, random=True, extra=evalx)
    for seed in range(seeds):            # the paper's Fig. 1 layout (issue: which is default)
        run = out / f"loco3_seed{seed}"
        plan.train(run, [*base, "--method", "loco", "--no-top-unit", "--seed", str(seed)],
                   epochs, 0.5 if smoke else 26)
        plan.eval(run, 0.3 if smoke else 2, extra=evalx)
    runs = [str(out / f"{m}_seed0") for m in ("simclr", "gim", "loco")]
    plan.other("figure: loss curves", ["curves.py", *runs, "--out", str(out / "curves.png")],
               out / "curves.png", 0.2)
    plan.other("figure: t-SNE", ["tsne.py", *[f"{r}/ckpt.pt" for r in runs], "--out",
                                 str(out / "tsne.png")], out / "tsne.png", 0.5)
    return plan


def table(out: Path, rows: list[tuple[str, str]], stages: int = 4) -> str:
    """Mean ± standard deviation over seeds of every stage's linear top-1 and of kNN, a line per
    row (title, run-name prefix: the runs <prefix>_seed<k>), with training minutes per seed."""
    spent = json.loads((out / "minutes.json").read_text()) if (out / "minutes.json").exists() else {}
    cell = lambda vs: (f"{statistics.mean(vs):.1f} ± {statistics.stdev(vs):.1f}" if len(vs) > 1
                       else f"{vs[0]:.1f}" if vs else "not run")
    lines = ["| method | seeds | " + " | ".join(f"stage {k + 1}" for k in range(stages))
             + " | kNN | train min/seed |", "|" + " --- |" * (stages + 4)]
    for title, prefix in rows:
        name = "linear_eval_fast_random.json" if title == "untrained" else "linear_eval_fast.json"
        rs = [json.loads(p.read_text()) for p in sorted(out.glob(f"{prefix}_seed*/{name}"))]
        tops = [cell([r["stages"][k]["top1"] for r in rs]) for k in range(stages)]
        mins = [v for k, v in spent.items() if k.startswith(f"train {prefix}_seed")]
        minutes = f"{statistics.mean(mins):.0f}" if mins and title != "untrained" else ""
        lines.append(f"| {title} | {len(rs)} | {' | '.join(tops)} | "
                     f"{cell([r['knn_top1'] for r in rs])} | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__, "experiments.py")
    p.add_argument("plan", choices=["cifar-cpu", "ablations", "gpu"])
    p.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ (downloaded "
                   "there if absent)")
    p.add_argument("--out", default=None, help="default: runs/<plan>")
    p.add_argument("--seeds", type=cli.positive(int), default=2, help="seeds 0 .. N-1")
    p.add_argument("--minutes", type=cli.positive(float), default=None,
                   help="stop cleanly after this many minutes (continue by running it again)")
    p.add_argument("--smoke", action="store_true", help="every step for a few iterations")
    p.add_argument("--table-only", action="store_true", help="print the table of what is done")
    args = p.parse_args(argv)
    out = cli.check_writable(args.out or f"runs/{args.plan}{'_smoke' if args.smoke else ''}",
                             "--out", is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    plan = {"cifar-cpu": cifar_cpu}[args.plan](out, args.data_dir, args.seeds, args.smoke)
    complete = True if args.table_only else execute(plan, args.minutes, out / "log.txt")
    text = table(out, [(TITLES[m], m) for m in ("simclr", "gim", "loco")]
                 + [("LoCo, no top unit (Fig. 1)", "loco3"), ("untrained", "simclr")])
    cli.write_atomic(out / "table.md", text + "\n")
    print(("" if complete else "(partial) ") + f"linear top-1 (%) by stage, CIFAR-10 test set:\n"
          + text)


if __name__ == "__main__":
    cli.run(main, "experiments.py")
