"""The measured results of this repository, each one command that trains, evaluates, draws and
prints its table, and that continues where it stopped when run again.

    python -m tools.experiments first-run                      # the README's first run, checked
    python -m tools.experiments cifar-cpu --data-dir data      # Table 1 on CIFAR-10, 2 CPU cores
    python -m tools.experiments gap --data-dir data --jobs 2   # what closes LoCo's gap to SimCLR
    python -m tools.experiments width --data-dir data          # the gap as the encoder widens
    python -m tools.experiments pipeline --data-dir data       # async model parallel's accuracy
    python -m tools.experiments ablations --data-dir data      # Tables 4 and 5 at a CPU scale
    python -m tools.experiments detection                      # Table 3 in miniature (no download)
    python -m tools.experiments gpu --data-dir data            # the GPU protocol (docs/gpu.md)
    python -m tools.experiments gpu-width --data-dir data      # full width, 12 and 50 epochs (GPU)
    python -m tools.experiments cifar-cpu --seeds 3            # adds a third seed, keeping the first two
    python -m tools.experiments cifar-cpu --smoke              # every step for a few iterations

A plan is a list of steps (train a run, evaluate it, draw a figure, time a benchmark); each is
a subprocess of this repository's own scripts and each knows when it is done (a checkpoint of
the last epoch, a JSON or PNG written atomically), so an interrupted plan, run again, skips what
is finished and resumes a run from its last epoch. --minutes stops a sitting cleanly: no step
starts once it has run out, and a training step given less time stops after the epoch in which
its share ends (train.py --time-limit). Results go to --out (default runs/<plan>).
"""

import fcntl
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cli
from cli import TITLES

PY = sys.executable
ROOT = cli.ROOT                          # steps run the repository's scripts from its root


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

    def train(self, run: Path, flags: list[str], epochs: int, minutes: float,
              launcher: list[str] = ()) -> None:
        """`launcher`: what starts train.py, e.g. torchrun's module and its flags."""
        self.steps.append(Step(f"train {run.name}", [*launcher, "train.py", *flags, "--epochs",
                                                     str(epochs), "--out", str(run)],
                               run / "ckpt.pt", minutes, epochs))

    def eval(self, run: Path, minutes: float, random: bool = False, extra: list[str] = ()) -> None:
        out = run / f"linear_eval_fast{'_random' if random else ''}.json"
        self.steps.append(Step(f"evaluate {run.name}{' (random init)' if random else ''}",
                               ["linear_eval.py", str(run / "ckpt.pt"), *extra, "--out", str(out)]
                               + (["--random-init"] if random else []), out, minutes))

    def other(self, name: str, args: list[str], done: Path, minutes: float) -> None:
        self.steps.append(Step(name, args, done, minutes))


def finished(step: Step) -> bool:
    """Whether a step's file holds its result: a checkpoint with all its epochs, a JSON that
    parses, a PNG that starts like one. A result that does not is done again (it is rewritten
    atomically); a checkpoint that does not load stops the plan, since training would resume
    from it."""
    if not step.done.exists():
        return False
    if step.train_epochs:
        import torch
        try:
            ckpt = torch.load(step.done, map_location="cpu", weights_only=True)
            return ckpt["epoch"] + 1 >= step.train_epochs
        except Exception as e:
            raise cli.UserError(f"{step.done} does not load ({str(e).splitlines()[0][:60]}): "
                                f"delete it to train '{step.name}' from the start")
    try:
        if step.done.suffix == ".json":
            json.loads(step.done.read_text())
        elif step.done.suffix == ".png" and step.done.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            raise ValueError("not a PNG")
    except (ValueError, UnicodeDecodeError) as e:
        print(f"{step.done} is corrupt ({str(e)[:60]}): '{step.name}' runs again")
        return False
    return True


def needs(plan: Plan, step: Step) -> list[Step]:
    """The training steps whose run `step` reads (its checkpoint or its directory)."""
    return [t for t in plan.steps if t.train_epochs and t is not step
            and (str(t.done) in step.args or str(t.done.parent) in step.args)]


def to_do(plan: Plan) -> list[Step]:
    """The steps not yet done. A training step whose checkpoint every reader has already used is
    done too: a checkout holding a run's committed evaluation (results/, checkpoints are not
    committed) adds rows or seeds beside it without training the run again."""
    todo = [s for s in plan.steps if not finished(s)]
    readers = lambda s: [t for t in plan.steps if s in needs(plan, t)]
    spent = lambda s: s.train_epochs and readers(s) and not any(t in todo for t in readers(s))
    return [s for s in todo if not spent(s)]


def claim(step: Step) -> bool:
    """Take a step for this process: a lock file beside its result, holding our pid and, once
    it starts, the pid of the step's own process. Another sitting of the same plan (a second
    terminal) leaves it alone while either lives; a lock whose processes are all gone is taken
    over."""
    lock = lock_of(step)
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if any(alive(pid) for pid in lock_pids(lock)):
                return False                     # its sitting, or its orphaned step, runs
            lock.unlink(missing_ok=True)         # left by processes that are gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def lock_of(step: Step) -> Path:
    return step.done.with_name(f".{step.done.name}.lock")


def lock_pids(lock: Path) -> list[int]:
    try:
        return [int(p) for p in lock.read_text().split()]
    except (OSError, ValueError):
        return []


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:              # another user's process: alive
        return True


def release(step: Step) -> None:
    lock_of(step).unlink(missing_ok=True)


def execute(plan: Plan, minutes: float | None, log: Path, fits: float | None = None,
            jobs: int = 1) -> bool:
    """Run the steps not yet done, in order, `jobs` at a time (each then gets cores / jobs
    threads); False if time ran out before the last. A step starts once the runs it reads are
    trained. With `fits` (minutes of a lent machine), the plan says which steps fit in it."""
    todo = to_do(plan)
    print(f"{len(plan.steps) - len(todo)} of {len(plan.steps)} steps done; to do, about "
          f"{sum(s.minutes for s in todo):.0f} min" + (f" of work on {jobs} jobs" if jobs > 1
                                                      else "") + ":")
    total = 0.0
    for s in todo:
        total += s.minutes
        late = fits is not None and total > fits
        print(f"  {s.minutes:6.1f} min  {s.name}" + (f"  (beyond the first {fits:.0f} min: a "
                                                      f"later command)" if late else ""))
    deadline = time.time() + 60 * minutes if minutes else None
    env = dict(os.environ)
    if jobs > 1 and not env.get("OMP_NUM_THREADS"):       # set but empty counts as unset
        # two busy jobs with two threads each wait on each other
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    mutex, running, ran, state = threading.Lock(), set(), set(), {"error": None, "late": False}
    children, stop = {}, threading.Event()   # the running steps' processes; set on Ctrl-C

    def pick() -> Step | None:
        """The next step this process may start, or None; state['late'] once time is short."""
        with mutex:
            for s in todo:
                if s.name in running or s.name in ran or state["error"] or finished(s):
                    continue
                if any(t in todo and not finished(t) for t in needs(plan, s)):
                    continue             # its run is still training (here or elsewhere)
                left = (deadline - time.time()) / 60 if deadline else None
                if left is not None and left < min(1.0, s.minutes):
                    state["late"] = True
                    return None
                if claim(s):
                    running.add(s.name)
                    ran.add(s.name)          # once per sitting, whatever it leaves
                    return s
            return None

    ended = []                           # threads whose work() has returned

    def work() -> None:
        try:
            steps()
        finally:
            ended.append(1)

    def steps() -> None:
        while not state["error"]:
            s = pick()
            if s is None:
                if state["late"] or not running:
                    return
                time.sleep(0.25)         # a step another job runs may unblock the next
                continue
            try:
                run_step(s, deadline, log, env, children, stop)
                if stop.is_set():
                    return
                if not s.train_epochs and not finished(s):
                    raise cli.UserError(f"step '{s.name}' ended without writing {s.done}")
            except cli.UserError as e:
                state["error"] = e
            finally:
                release(s)
                with mutex:
                    running.discard(s.name)

    threads = [threading.Thread(target=work) for _ in range(jobs)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except KeyboardInterrupt:            # Ctrl-C (to the terminal's processes, or this runner's
        with mutex:                      # alone), SIGTERM: no step starts, the running ones stop
            state["error"] = cli.UserError("interrupted")   # too, each saying what it saved,
            stop.set()                                       # and are logged
        stopped = sorted(children)
        for child in list(children.values()):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)      # train.py: as Ctrl-C
        while len(ended) < len(threads):   # not join(): a join that an interrupt has cut
            time.sleep(0.05)               # short may return at once when called again
        raise KeyboardInterrupt(
            (f"Stopped {', '.join(stopped)} (a training step keeps its last finished epoch). "
             if stopped else "") + "Run the same command again to continue.") from None
    if state["error"]:
        raise state["error"]
    if state["late"]:
        print("--minutes: out of time; run the same command again")
    left = to_do(plan)
    busy = [s.name for s in left if lock_of(s).exists()]
    if busy:
        print(f"still running in another sitting: {', '.join(busy)}")
    return not left


def run_step(s: Step, deadline: float | None, log: Path, env: dict, children: dict | None = None,
             stop: threading.Event | None = None) -> None:
    """One step as a subprocess of this repository's scripts; its output goes to its own log
    (logs/<step>.txt beside the plan's log), the plan's log.txt says when it ran. `children`:
    where the running step's process is kept (by name) for an interrupt to stop; `stop`: set
    when the plan was interrupted (the step's end is then logged as stopped, not failed)."""
    children = {} if children is None else children
    args = list(s.args)
    if s.train_epochs and s.done.exists():
        args.append("--resume")
    left = (deadline - time.time()) / 60 if deadline else None
    if s.train_epochs and left is not None:
        args += ["--time-limit", f"{max(0.1, left - 0.5):.2f}"]
    own = log.parent / "logs" / (s.name.replace(" ", "_").replace("/", "-") + ".txt")
    own.parent.mkdir(parents=True, exist_ok=True)
    stamp = lambda what: f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {what} {s.name}"
    print(stamp("start"), flush=True)
    with open(log, "a") as f:
        f.write(f"{stamp('start')}\n$ {' '.join(args)}\n")
    t = time.time()
    with open(own, "a") as f:
        f.write(f"\n$ {' '.join(args)}\n")
        f.flush()
        child = subprocess.Popen([PY, *args], stdout=f, stderr=subprocess.STDOUT, env=env,
                                 cwd=ROOT)
        children[s.name] = child
        if stop is not None and stop.is_set():   # interrupted as it started
            child.send_signal(signal.SIGTERM)
        with open(lock_of(s), "a") as lock:  # the step's own pid: a sitting that dies leaves
            lock.write(f" {child.pid}")      # its step running, and nobody starts it twice
        try:
            code = child.wait()
        finally:
            children.pop(s.name, None)
    interrupted = stop is not None and stop.is_set() and code != 0
    with open(log, "a") as f:
        end = "stopped by an interrupt, exit" if interrupted else "exit"
        f.write(f"{stamp(f'{end} {code} after {(time.time() - t) / 60:.1f} min:')}\n")
    if interrupted:
        return
    if code:
        raise cli.UserError(f"step '{s.name}' failed (exit {code}): see the end of {own}")
    record_minutes(log.parent, s.name, (time.time() - t) / 60)


def record_minutes(out: Path, name: str, minutes: float) -> None:
    """Wall time of every step, summed over sittings, in out/minutes.json (locked: several jobs
    and sittings write it)."""
    path = out / "minutes.json"
    with open(out / ".minutes.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        spent = read_minutes(out)
        spent[name] = round(spent.get(name, 0.0) + minutes, 2)
        cli.write_atomic(path, json.dumps(spent, indent=1))


def read_minutes(out: Path) -> dict:
    path = out / "minutes.json"
    if not path.exists():
        return {}
    try:
        spent = json.loads(path.read_text())
        if isinstance(spent, dict) and all(isinstance(v, (int, float)) for v in spent.values()):
            return spent
        raise ValueError("not a table of step: minutes")
    except (ValueError, UnicodeDecodeError) as e:
        raise cli.UserError(f"{path} is corrupt ({str(e)[:60]}): fix or delete it (it holds "
                            f"only the minutes each step took)")


# ---------------------------------------------------------------------------- plans
def flags(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in (f"--{k}", str(v))]


# The CPU protocol (docs/results.md): ResNet-18 at width 1/4, CIFAR stem,
# all 50,000 training images, batch 256, LARS at lr 4 with one warm-up epoch, 12 epochs;
# seeds 0, 1, ...
CPU = {"arch": "resnet18", "width": 0.25, "batch-size": 256, "lr": 4.0, "warmup-epochs": 1}
CPU_EPOCHS = 12
SMOKE = {"subset": 256, "batch-size": 64, "width": 0.125, "warmup-epochs": 0.5}  # seconds a step


def cifar_cpu(out: Path, args) -> tuple[Plan, list]:
    plan, epochs = Plan(), 1 if args.smoke else CPU_EPOCHS
    base = flags({**CPU, "dataset": args.dataset, "data-dir": args.data_dir, "log-every": 20,
                  **(SMOKE if args.smoke else {})})
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    scale = 0.02 if args.smoke else 1
    # GIM's and LoCo's rows: the paper's decoders, one conv block (the default, written out);
    # the gap plan trains the MLP-only variant
    block = lambda m: [] if m == "simclr" else BLOCK
    for seed in range(args.seeds):
        for method, minutes in (("simclr", 24), ("gim", 27), ("loco", 27)):
            run = out / f"{method}_seed{seed}"
            plan.train(run, [*base, "--method", method, *block(method), "--seed", str(seed)],
                       epochs, scale * minutes)
            plan.eval(run, scale * 2, extra=evalx)
        plan.eval(out / f"simclr_seed{seed}", scale * 2, random=True, extra=evalx)
    # the paper's Fig. 1 layout (which layout is the default), then the deciding rows of Tables 5
    # and 4 where the ablation plan's 2 epochs cannot tell rows apart: hard sharing against the
    # upper unit's gradient only, and GIM's conv decoder against none (minutes of training as
    # measured on the 2-core machine)
    for name, extra, minutes in (("loco3", ["--method", "loco", "--no-top-unit", *block("loco")],
                                  26),
                                 ("loco_upper", ["--method", "loco", "--sharing", "upper",
                                                 *block("loco")], 22),
                                 ("gim_none", ["--method", "gim", "--decoder", "none"], 18)):
        for seed in range(args.seeds):
            run = out / f"{name}_seed{seed}"
            plan.train(run, [*base, *extra, "--seed", str(seed)], epochs, scale * minutes)
            plan.eval(run, scale * 2, extra=evalx)
    figures(plan, out, [out / f"{m}_seed0" for m in ("simclr", "gim", "loco")])
    rows = [(TITLES[m], m) for m in ("simclr", "gim", "loco")] + [
        ("LoCo, no top unit (Fig. 1)", "loco3"), ("LoCo, upper-layer grad only (Table 5)",
                                                 "loco_upper"),
        ("GIM, no conv decoder (Table 4)", "gim_none"), ("untrained", "simclr")]
    return plan, [("linear top-1 (%) by stage, CIFAR-10 test set", stage_table(out, rows))]


def figures(plan: Plan, out: Path, runs: list[Path]) -> None:
    plan.other("figure: loss curves", ["curves.py", *map(str, runs), "--out",
                                       str(out / "curves.png")], out / "curves.png", 0.2)
    plan.other("figure: t-SNE", ["tsne.py", *[str(r / "ckpt.pt") for r in runs], "--out",
                                 str(out / "tsne.png")], out / "tsne.png", 0.5)


# The gap study (docs/gap.md): the CPU protocol's variants that may
# close LoCo's 3-point gap to SimCLR at the final stage, deciding rows first. Rows already
# measured by cifar-cpu (SimCLR, GIM, LoCo at 12 epochs) are read from its committed results.
# Minutes: training of one run with one thread, two runs side by side (--jobs 2).
REFERENCE = ROOT / "results" / "cifar-cpu"
LOCAL = {"decoder": "none"}              # the MLP-only variant for GIM and LoCo (Sec. 5.1's words)
GAP = [  # (hypothesis, run, flags over the CPU protocol's, epochs, seeds, minutes); in this order
    # 1. the decoders: Sec. 5.1's MLP-only heads for local methods, or only on the top stage
    (1, "loco_topnone", {"method": "loco", "decoder": "block", "top-decoder": "none"}, 12, (0, 1),
     33),
    (1, "loco_none", {"method": "loco", **LOCAL}, 12, (0, 1), 31),
    # 2. each method's own learning rate: 3-epoch probes at lr 1, 2, 4, 8 (SimCLR's lr 4 came
    # from such a sweep on 10,000 images; GIM and LoCo were probed at lr 4 only), and 16: LoCo
    # still rose at 8
    *((2, f"{m}_lr{lr:g}_e3", {"method": m, "lr": lr, **({} if m == "simclr" else LOCAL)}, 3, (0,),
       8) for m in ("loco", "gim", "simclr") for lr in (1.0, 2.0, 4.0, 8.0, 16.0)),
    # then the long runs first, so that two jobs side by side finish together; seed 1 of the
    # lr rows and the figure's least needed point, GIM at 24 epochs, last
    # 3. schedule length: every method at half and twice the protocol's 12 epochs (3 epochs: the
    # lr 4 probes above)
    *((3, f"{m}_e24", {"method": m, **({} if m == "simclr" else LOCAL)}, 24, (0,), 65)
      for m in ("simclr", "loco")),
    # 2. ... and the best of LoCo (8: 52.6 against 52.0 at 4, 51.7 at 16) and of SimCLR (8: 54.7
    # against 52.2 at 4) at the full protocol
    *((2, f"{m}_lr8", {"method": m, "lr": 8.0, **({} if m == "simclr" else LOCAL)}, 12, (0,), 31)
      for m in ("loco", "simclr")),
    # 4. the temperature: does LoCo want another tau than SimCLR's 0.5? 3-epoch probes at 0.2
    *((4, f"{m}_tau0.2_e3", {"method": m, "tau": 0.2, **({} if m == "simclr" else LOCAL)}, 3,
       (0,), 8) for m in ("loco", "simclr")),
    # ... and at the full protocol: at 3 epochs tau 0.2 lifted both by 3.2 points
    # (two seeds: LoCo +1.7, SimCLR +1.9, the gap 2.0 -> 2.3: it lifts both, closes nothing)
    *((4, f"{m}_tau0.2", {"method": m, "tau": 0.2, **({} if m == "simclr" else LOCAL)}, 12,
       seeds, 31) for seeds in ((0,), (1,)) for m in ("loco", "simclr")),
    *((3, f"{m}_e6", {"method": m, **({} if m == "simclr" else LOCAL)}, 6, (0,), 16)
      for m in ("simclr", "loco", "gim")),
    *((2, f"{m}_lr8", {"method": m, "lr": 8.0, **({} if m == "simclr" else LOCAL)}, 12, (1,), 31)
      for m in ("loco", "simclr")),
    (3, "gim_e24", {"method": "gim", **LOCAL}, 24, (0,), 65),
]


def gap(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    base = {**CPU, "dataset": args.dataset, "data-dir": args.data_dir, "log-every": 20,
            **(SMOKE if args.smoke else {})}
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    # in GAP's order
    for _, name, extra, epochs, seeds, minutes in GAP:
        for seed in [s for s in seeds if s < args.seeds]:
            run = out / f"{name}_seed{seed}"
            plan.train(run, [*flags({**base, **extra}), "--seed", str(seed)],
                       1 if args.smoke else epochs, 0.02 * minutes if args.smoke else minutes)
            plan.eval(run, 0.04 if args.smoke else 2, extra=evalx)
    ref = REFERENCE
    rows = [("SimCLR", ref / "simclr"), ("GIM (the paper's decoders)", ref / "gim"),
            ("GIM, MLP-only decoders", ref / "gim_none"),
            ("LoCo (the paper's decoders)", ref / "loco"),
            ("LoCo, MLP-only decoders on the top stage", "loco_topnone"),
            ("LoCo, MLP-only decoders", "loco_none"),
            ("LoCo, MLP-only decoders, lr 8", "loco_lr8"), ("SimCLR, lr 8", "simclr_lr8"),
            ("LoCo, MLP-only decoders, tau 0.2", "loco_tau0.2"), ("SimCLR, tau 0.2",
                                                                  "simclr_tau0.2")]
    sweep = [(f"{TITLES[m]}, lr {lr:g}, 3 epochs", f"{m}_lr{lr:g}_e3") for m in TITLES
             for lr in (1, 2, 4, 8, 16)]
    schedule = [(f"{TITLES[m]}, {e} epochs", f"{m}_e{e}") for m in TITLES for e in (6, 24)]
    tau = [("LoCo, tau 0.2, 3 epochs", "loco_tau0.2_e3"), ("SimCLR, tau 0.2, 3 epochs",
                                                         "simclr_tau0.2_e3")]
    return plan, [("12 epochs: linear top-1 (%) by stage, CIFAR-10 test set",
                   stage_table(out, rows)),
                  ("Each method's learning rate (3 epochs, seed 0)", stage_table(out, sweep)),
                  ("Schedule length (seed 0; 12 epochs: above)", stage_table(out, schedule)),
                  ("The temperature (3 epochs, seed 0; tau 0.5: lr 4 above)", stage_table(out, tau))]


# Model parallel (docs/model-parallel.md): the accuracy cost of async's one-step-late gradient.
# LoCo as the gap study trains it (MLP-only decoders), async on a pipeline of 2 processes (one
# thread each), against the same configuration on one process, which sync equals (tests).
GAP_RESULTS = ROOT / "results" / "gap"


def pipeline_plan(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    base = flags({**CPU, "dataset": args.dataset, "data-dir": args.data_dir, "log-every": 20,
                  "method": "loco", **LOCAL, "pipeline": 2, **(SMOKE if args.smoke else {})})
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master-port", "29531"]
    # placed by cost alone, stage 1 went alone on the first process: its only gradient (the
    # S1-S2 unit's) then came one step late (-1.0 point); [S1 S2 | S3 S4], where the boundary
    # stage S2 also learns from a fresh unit and S1 from fresh ones only, cost 0.2, and is what
    # train.py now places (pipeline.fresh): both placements are given by hand here
    for name, extra in (("loco_async", ["--placement", "1,3"]),
                        ("loco_async22", ["--placement", "2,2"])):
        for seed in range(args.seeds):
            run = out / f"{name}_seed{seed}"
            plan.train(run, [*base, *extra, "--seed", str(seed)], 1 if args.smoke else CPU_EPOCHS,
                       0.5 if args.smoke else 30, launcher=torchrun)
            plan.eval(run, 0.04 if args.smoke else 2, extra=evalx)
    rows = [("LoCo, one process (= sync)", GAP_RESULTS / "loco_none"),
            ("LoCo, async pipeline of 2: S1 on one, S2-S4 on the other (--placement 1,3)",
             "loco_async"),
            ("LoCo, async pipeline of 2: S1-S2 on one, S3-S4 on the other (2,2: the default)",
             "loco_async22")]
    return plan, [("linear top-1 (%) by stage, CIFAR-10 test set", stage_table(out, rows))]


# FLOPs of a step over SimCLR's, ResNet-18 x1/4, CIFAR, MLP-only decoders (counted:
# tools/benchmark.step_flops): the right panel's x, training compute in SimCLR epochs
STEP_FLOPS = {"simclr": 1.0, "gim": 0.963, "loco": 1.204}


def schedule_figure(out: Path) -> None:
    """Final-stage linear top-1 against epochs for the three methods (MLP-only decoders), the
    LoCo-SimCLR gap written at each length, and against training compute (epochs x a step's
    FLOPs over SimCLR's): out/schedule.png, from whatever is measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = {m: {3: f"{m}_lr4_e3", 6: f"{m}_e6", 12: twelve, 24: f"{m}_e24"} for m, twelve in
            (("simclr", REFERENCE / "simclr"), ("gim", REFERENCE / "gim_none"),
             ("loco", "loco_none"))}
    points = {m: {e: [r["stages"][-1]["top1"] for r in results(out, prefix)]
                  for e, prefix in by.items()} for m, by in runs.items()}
    if sum(bool(v) for by in points.values() for v in by.values()) < 4:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, scale in zip(axes, (lambda m: 1.0, lambda m: STEP_FLOPS[m])):
        for m, by in points.items():
            es = [e for e in sorted(by) if by[e]]
            means = [statistics.mean(by[e]) for e in es]
            spread = [statistics.stdev(by[e]) if len(by[e]) > 1 else 0 for e in es]
            ax.errorbar([e * scale(m) for e in es], means, yerr=spread, marker="o", capsize=3,
                        label=TITLES[m])
        ax.set_xscale("log", base=2)
        ax.set_xticks([3, 6, 12, 24], ["3", "6", "12", "24"])
        ax.set_xlim(2.5, 40)                 # room for the last gap's label
    for e in sorted(points["loco"]):
        if points["loco"][e] and points["simclr"][e]:
            s_, l_ = statistics.mean(points["simclr"][e]), statistics.mean(points["loco"][e])
            axes[0].annotate(f"gap {s_ - l_:.1f}", (e, (s_ + l_) / 2), xytext=(6, 0),
                             textcoords="offset points", fontsize=8, va="center")
    axes[0].set_xlabel("epochs")
    axes[1].set_xlabel("training compute (SimCLR epochs: epochs x step FLOPs)")
    axes[0].set_ylabel("final-stage linear top-1 (%)")
    fig.suptitle("CIFAR-10, ResNet-18 x1/4, 2 CPU cores: 12 epochs two seeds, 3, 6 and 24 one",
                 fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    cli.save_figure(fig, out / "schedule.png")
    plt.close(fig)


# The width study (docs/width.md): LoCo's gap to SimCLR as the encoder widens.
# The CPU protocol at widths 1/8, 1/4 and 1/2, the same lr (4) at every width: LARS scales each
# layer's step by that layer's own weight norm (the trust ratio), so the step a width takes
# does not change with its channel count, and the protocol's lr was chosen at 1/4. SimCLR and
# LoCo with the paper's decoders (the defaults), LoCo with MLP-only decoders beside them.
# A row's runs are reused from another plan's committed results where that run's configuration
# is exactly the one this plan would train (width 1/4: cifar-cpu, and the gap study's MLP-only
# LoCo); the rest train here, in this order (cheap widths first, then width 1/2's first seeds,
# then what adds seeds and the variant), minutes of training with one thread beside another job.
WIDTHS = (0.125, 0.25, 0.5)
WIDTH_ROWS = {"simclr": {"method": "simclr"}, "loco": {"method": "loco"},
              "loco_none": {"method": "loco", **LOCAL}}
WIDTH_ORDER = [(0.125, "simclr", 0, 12), (0.125, "loco", 0, 16), (0.125, "simclr", 1, 12),
               (0.125, "loco", 1, 16), (0.5, "simclr", 0, 150), (0.5, "loco", 0, 190),
               (0.125, "loco_none", 0, 15), (0.5, "simclr", 1, 150), (0.5, "loco", 1, 190),
               (0.5, "loco_none", 0, 180), (0.125, "loco_none", 1, 15), (0.25, "simclr", 0, 40),
               (0.25, "simclr", 1, 40), (0.25, "loco", 0, 50), (0.25, "loco", 1, 50),
               (0.25, "loco_none", 0, 50), (0.25, "loco_none", 1, 50)]
REUSABLE = (REFERENCE, GAP_RESULTS)      # committed runs a row may take
# Width 1 is shown where the gpu-width plan has measured it on a GPU (docs/gpu.md): its
# 12-epoch runs are this protocol exactly (checked flag by flag); this plan never trains it.
GPU_WIDTH_RESULTS = ROOT / "results" / "gpu-width"
SHOWN = (*WIDTHS, 1.0)


def width_run(width: float, key: str, seed: int) -> str:
    return f"{key}_w{width:g}_seed{seed}"


def same_run(config: dict, flags_: list[str]) -> bool:
    """Whether a committed run's configuration is exactly what train.py makes of these flags
    (where it ran, how it logged and how long it was given aside): the rule by which --resume
    compares a typed flag with a recorded one (train.differences), applied to every flag."""
    import train
    ours = train.parse_args(flags_)
    return not train.differences(ours, set(vars(ours)), config)


def committed(flags_: list[str], seed: int, folders=REUSABLE) -> Path | None:
    """A committed run (results/<plan>/<name>_seed<k>) of exactly this configuration, if any."""
    for folder in folders:
        for config in sorted(folder.glob(f"*_seed{seed}/config.json")):
            if (config.parent / "linear_eval_fast.json").exists() and same_run(
                    json.loads(config.read_text()), flags_):
                return config.parent
    return None


def width_runs(out: Path, args) -> tuple[Plan, dict]:
    """The plan, and (width, row) -> the run folder of each seed (here, or committed)."""
    plan, runs = Plan(), {}
    base = {**CPU, "dataset": args.dataset, "data-dir": args.data_dir, "log-every": 20,
            **(SMOKE if args.smoke else {})}
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    epochs = 1 if args.smoke else CPU_EPOCHS
    for w, key, seed, minutes in WIDTH_ORDER:
        if seed >= args.seeds:
            continue
        train_flags = [*flags({**base, "width": w, **WIDTH_ROWS[key]}), "--seed", str(seed)]
        reuse = None if args.smoke else committed([*train_flags, "--epochs", str(epochs)], seed)
        run = reuse or out / width_run(w, key, seed)
        runs.setdefault((w, key), []).append(run)
        if reuse is None:
            plan.train(run, train_flags, epochs, 0.05 if args.smoke else minutes)
            plan.eval(run, 0.04 if args.smoke else max(1.0, minutes / 20), extra=evalx)
    for key in ("simclr", "loco"):
        for seed in range(0 if args.smoke else args.seeds):
            train_flags = [*flags({**base, "width": 1.0, **WIDTH_ROWS[key]}), "--seed", str(seed),
                           "--epochs", str(epochs)]
            found = committed(train_flags, seed, (GPU_WIDTH_RESULTS,))
            if found:
                runs.setdefault((1.0, key), []).append(found)
    return plan, runs


def width(out: Path, args) -> tuple[Plan, list]:
    plan, runs = width_runs(out, args)
    names = {"simclr": "SimCLR", "loco": "LoCo", "loco_none": "LoCo, MLP-only decoders"}
    widest = [(names[k], out / width_run(0.5, k, 0).removesuffix("_seed0")) for k in WIDTH_ROWS]
    return plan, [("Final-stage linear top-1 (%) by width, CIFAR-10 test set", width_table(runs)),
                  ("Every stage at width 1/2", stage_table(out, widest))]


def width_results(runs: dict) -> dict:
    """(width, key) -> the final-stage linear top-1 of each evaluated seed."""
    found = {}
    for (w, key), paths in runs.items():
        evals = [p / "linear_eval_fast.json" for p in paths]
        found[(w, key)] = [read_json(e)["stages"][-1]["top1"] for e in evals if e.exists()]
    return found


def width_table(runs: dict) -> str:
    """A line per width: each row's final stage (mean ± sd over seeds) and LoCo's gap to
    SimCLR (paper decoders; seed for seed where both have the seed)."""
    top = width_results(runs)
    lines = ["| width | SimCLR | LoCo | LoCo, MLP-only decoders | gap (SimCLR - LoCo) | "
             "seeds |", "| --- | --- | --- | --- | --- | --- |"]
    for w in SHOWN:
        s, l = top.get((w, "simclr"), []), top.get((w, "loco"), [])
        n = min(len(s), len(l))
        gaps = [a - b for a, b in zip(s[:n], l[:n])]
        none = top.get((w, "loco_none"), [])
        lines.append(f"| {w:g}{'' if w in WIDTHS else ' (GPU)'} | {cell(s)} | {cell(l)} | "
                     f"{cell(none)} | {cell(gaps) if gaps else 'not run'} | {len(s)} / {len(l)} "
                     f"/ {len(none)} |")
    return "\n".join(lines)


def width_figure(out: Path, runs: dict) -> None:
    """Final-stage linear top-1 against width for each row, and the gap against width (bars:
    seed spread where there are two seeds): out/width.png, from whatever is measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    top = width_results(runs)
    if sum(bool(v) for v in top.values()) < 2:
        return
    mean = lambda v: statistics.mean(v) if v else None
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    fig, (ax, gx) = plt.subplots(1, 2, figsize=(9, 3.6))
    colour = {"simclr": "C0", "loco": "C1", "loco_none": "C2"}
    for key, label in (("simclr", "SimCLR"), ("loco", "LoCo (paper decoders)"),
                       ("loco_none", "LoCo, MLP-only decoders")):
        ws = [w for w in SHOWN if top.get((w, key))]
        ax.errorbar(ws, [mean(top[(w, key)]) for w in ws], yerr=[sd(top[(w, key)]) for w in ws],
                    marker="o", capsize=3, label=label, ls="--" if key == "loco_none" else "-",
                    color=colour[key])
    for key, label in (("loco", "LoCo (paper decoders)"), ("loco_none", "LoCo, MLP-only")):
        ws, gaps = [], []
        for w in SHOWN:
            s, l = top.get((w, "simclr"), []), top.get((w, key), [])
            n = min(len(s), len(l))
            if n:
                ws.append(w), gaps.append([a - b for a, b in zip(s[:n], l[:n])])
        gx.errorbar(ws, [mean(g) for g in gaps], yerr=[sd(g) for g in gaps], marker="o",
                    capsize=3, label=label, ls="--" if key == "loco_none" else "-",
                    color=colour[key])
    for a in (ax, gx):
        a.set_xscale("log", base=2)
        a.set_xticks(SHOWN, ["1/8", "1/4", "1/2", "1"])
        a.set_xlabel("encoder width (ResNet-18 channels x)")
    gx.axhline(0, color="grey", lw=0.8)
    ax.set_ylabel("final-stage linear top-1 (%)")
    gx.set_ylabel("SimCLR - LoCo (points)")
    ax.legend(fontsize=8), gx.legend(fontsize=8)
    fig.suptitle("CIFAR-10, ResNet-18, 12 epochs; widths 1/8-1/2 on 2 CPU cores, width 1 on an "
                 "H200 (bars: seed spread)", fontsize=9)
    fig.tight_layout()
    cli.save_figure(fig, out / "width.png")
    plt.close(fig)


# Tables 4 and 5 at a CPU scale: the CPU protocol for 2 epochs (half a warm-up epoch), linear
# probe on the first 10,000 training images, the full test set. A run: key -> (flags, seeds: two
# for the rows that decide the paper's claims, and for the unit layout).
# Table 5: "All entries are equipped with 1 residual convolution block + 2-layer MLP decoders."
BLOCK = ["--decoder", "block"]
ABLATIONS = {
    "simclr": (["--method", "simclr"], 1),
    "gim_none": (["--method", "gim", "--decoder", "none"], 2),
    "simclr_block": (["--method", "simclr", "--decoder", "block"], 1),
    "gim_nods": (["--method", "gim", "--decoder", "block-nods"], 1),
    "gim_block": (["--method", "gim", "--decoder", "block"], 2),
    "gim_2blocks": (["--method", "gim", "--decoder", "2blocks"], 1),
    "gim_stage": (["--method", "gim", "--decoder", "stage"], 1),
    "gim_full": (["--method", "gim", "--decoder", "full"], 1),
    "simclr_mlp4": (["--method", "simclr", "--mlp-layers", "4"], 1),
    "gim_none_mlp4": (["--method", "gim", "--decoder", "none", "--mlp-layers", "4"], 1),
    "loco": (["--method", "loco", *BLOCK], 2),
    "loco_mlp4": (["--method", "loco", "--mlp-layers", "4", *BLOCK], 1),
    "loco_upper": (["--method", "loco", "--sharing", "upper", *BLOCK], 2),
    "loco_soft1e-4": (["--method", "loco", "--sharing", "soft", "--soft-coef", "1e-4", *BLOCK], 1),
    "loco_soft1e-3": (["--method", "loco", "--sharing", "soft", "--soft-coef", "1e-3", *BLOCK], 1),
    "loco_soft1e-2": (["--method", "loco", "--sharing", "soft", "--soft-coef", "1e-2", *BLOCK], 1),
    "loco_1block": (["--method", "loco", "--sharing", "1block", *BLOCK], 1),
    "loco_notop": (["--method", "loco", "--no-top-unit", *BLOCK], 2),
}
# A table row: (the paper's name for it, the run, the paper's ImageNet top-1 in Table 4 or 5).
TABLE4 = [("SimCLR: none", "simclr", 65.7), ("GIM: none", "gim_none", 60.9),
          ("SimCLR: 1 conv block", "simclr_block", 65.6),
          ("GIM: 1 conv block w/o ds", "gim_nods", 63.6), ("GIM: 1 conv block", "gim_block", 65.1),
          ("GIM: 2 conv blocks", "gim_2blocks", 65.8), ("GIM: 1 stage", "gim_stage", 65.8),
          ("GIM: full network", "gim_full", 65.8), ("SimCLR: 4-layer MLP", "simclr_mlp4", 67.1),
          ("GIM: none, 4-layer MLP", "gim_none_mlp4", 62.3), ("LoCo: 1 conv block", "loco", 66.2),
          ("LoCo: 1 conv block, 4-layer MLP", "loco_mlp4", 67.5)]
TABLE5 = [("no sharing (GIM)", "gim_block", 65.1), ("upper layer grad only", "loco_upper", 65.3),
          ("L2 penalty 1e-4", "loco_soft1e-4", 65.5), ("L2 penalty 1e-3", "loco_soft1e-3", 66.0),
          ("L2 penalty 1e-2", "loco_soft1e-2", 65.9), ("sharing 1 block", "loco_1block", 64.8),
          # ResNet-18's stages hold two blocks each: sharing two blocks is sharing the stage
          ("sharing 2 blocks (here = 1 stage)", "loco", 65.3),
          ("sharing 1 stage (LoCo)", "loco", 66.2),
          ("LoCo without the top unit", "loco_notop", None)]


def ablations(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    base = flags({**CPU, "warmup-epochs": 0.5, "dataset": args.dataset, "data-dir": args.data_dir,
                  "log-every": 40, **(SMOKE if args.smoke else {})})
    evalx = ["--data-dir", args.data_dir, "--subset", "200" if args.smoke else "10000"]
    # minutes of training, measured on the 2-core machine: 3.1 to 4.1 for most rows, more for
    # the deeper decoders and for soft sharing's second forward
    cost = {"stage": 4.4, "full": 5.6, "soft": 4.8}
    for seed in range(max(s for _, s in ABLATIONS.values())):
        for key, (extra, seeds) in ABLATIONS.items():
            if seed < min(seeds, args.seeds):
                minutes = max([c for k, c in cost.items() if k in extra] or [4.0])
                run = out / f"{key}_seed{seed}"
                plan.train(run, [*base, *extra, "--seed", str(seed)], 1 if args.smoke else 2,
                           0.1 if args.smoke else minutes)
                plan.eval(run, 0.3, extra=evalx)
    return plan, [("Table 4, decoders: final-stage linear top-1 (%)", final_table(out, TABLE4)),
                  ("Table 5, sharing: final-stage linear top-1 (%)", final_table(out, TABLE5)),
                  ("Every run by stage (flags: experiments.ABLATIONS)",
                   stage_table(out, [(key, key) for key in ABLATIONS]))]


# Every GPU figure (docs/gpu.md): the benchmark, then CIFAR-10 at the GPU
# protocol (ResNet-18, CIFAR stem, full width, batch 512, LARS lr 2, 10 warm-up epochs, 100
# epochs), SimCLR and LoCo first (the claim), then GIM, the untrained row and the figures.
GPU = {"arch": "resnet18", "width": 1.0, "batch-size": 512, "lr": 2.0, "warmup-epochs": 10}
GPU_EPOCHS = 100


def gpu(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    bench = out / "benchmark.json"
    plan.other("benchmark: memory, speed, throughput",
               ["-m", "tools.benchmark", "all", "--data-dir", args.data_dir, "--dataset", args.dataset,
                "--out", str(bench), *(["--smoke"] if args.smoke else [])], bench, 4)
    base = flags({**GPU, "dataset": args.dataset, "data-dir": args.data_dir, "log-every": 50,
                  **(SMOKE if args.smoke else {})})
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    images = 50_000 * GPU_EPOCHS
    rate = estimated_rates(bench)
    for method in ("simclr", "loco", "gim"):
        run = out / f"{method}_seed0"
        plan.train(run, [*base, "--method", method], 1 if args.smoke else GPU_EPOCHS,
                   0.1 if args.smoke else images / rate[method] / 60 + 0.5)
        plan.eval(run, 0.1 if args.smoke else 1, extra=evalx)
    plan.eval(out / "simclr_seed0", 0.1 if args.smoke else 1, random=True, extra=evalx)
    figures(plan, out, [out / f"{m}_seed0" for m in ("simclr", "gim", "loco")])
    rows = [(TITLES[m], m) for m in ("simclr", "gim", "loco")] + [("untrained", "simclr")]
    return plan, [("linear top-1 (%) by stage, CIFAR-10 test set", stage_table(out, rows))]


# A longer schedule at full width, on a lent GPU (docs/gpu.md): the CPU protocol at width 1,
# SimCLR and LoCo with the paper's decoders, 12 epochs for seeds 0 and 1, then the benchmark
# (whose measured rate sizes the later steps' expected minutes), then 50 epochs for seed 0,
# each run with the linear probe: the rows that answer the question first.
GPU_WIDTH_RUNS = [(12, 0), (12, 1), (50, 0)]     # (epochs, seed)


def gpu_width(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    bench = out / "benchmark.json"
    base = flags({**CPU, "width": 1.0, "dataset": args.dataset, "data-dir": args.data_dir,
                  "log-every": 50, **(SMOKE if args.smoke else {})})
    evalx = ["--data-dir", args.data_dir, *(["--subset", "200"] if args.smoke else [])]
    rate = estimated_rates(bench)
    rows = []
    for epochs, seed in GPU_WIDTH_RUNS:
        if epochs == max(e for e, _ in GPU_WIDTH_RUNS) and seed == 0:
            benchmarks(plan, out, bench, args)       # after the 12-epoch pairs: they come first
        for method in ("simclr", "loco"):
            run = out / f"{method}_w1_e{epochs}_seed{seed}"
            plan.train(run, [*base, "--method", method, "--seed", str(seed)],
                       1 if args.smoke else epochs,
                       0.1 if args.smoke else 50_000 * epochs / rate[method] / 60 + 0.5)
            plan.eval(run, 0.1 if args.smoke else 0.6, extra=evalx)   # 0.5-0.6 min on the H200
            if seed == 0:
                rows.append((f"{TITLES[method]}, {epochs} epochs", f"{method}_w1_e{epochs}"))
    return plan, [("Full width (ResNet-18 x1, CIFAR protocol): linear top-1 (%) by stage, "
                   "CIFAR-10 test set", stage_table(out, rows))]


def benchmarks(plan: Plan, out: Path, bench: Path, args) -> None:
    """The benchmark's every table (memory, step speed against the FLOP ratio, throughput of the
    model alone and of the loop), then the loop at the protocol's batch 256 too."""
    plan.other("benchmark: memory, speed, throughput",
               ["-m", "tools.benchmark", "all", "--data-dir", args.data_dir, "--dataset",
                args.dataset, "--out", str(bench), *(["--smoke"] if args.smoke else [])], bench, 3)
    small = out / "benchmark_b256.json"
    plan.other("benchmark: throughput at batch 256",
               ["-m", "tools.benchmark", "train", "--batch", "256", "--data-dir", args.data_dir,
                "--dataset", args.dataset, "--out", str(small),
                *(["--smoke"] if args.smoke else [])], small, 1)


def estimated_rates(bench: Path) -> dict[str, float]:
    """Training images/s per method: measured by the benchmark step if it has run (SimCLR's loop
    with real augmentation, the others through their step-time ratio), else the measured
    rate of the gpu-width plan's loops on an H200 (results/gpu-width, full width, batch 256:
    SimCLR about 9,300 images/s on the slower of two machines, LoCo about 1.9x its time), GIM
    guessed at 1.5x."""
    rate, ratio = 9_300.0, {"simclr": 1.0, "loco": 1.9, "gim": 1.5}
    if bench.exists():
        b = json.loads(bench.read_text())
        rate = max(r["our_loop"] for r in b["train"].values() if isinstance(r, dict))
        speed = next(iter(b["speed"].values()))           # ResNet-18, CIFAR stem
        ratio = {m: speed[m]["time_vs_simclr"] for m in ratio}
    print(f"expected: SimCLR {rate:,.0f} images/s" + "".join(
        f", {m} {rate / ratio[m]:,.0f}" for m in ("gim", "loco")))
    return {m: rate / ratio[m] for m in ratio}


# The README's first run (README, A first run): its command exactly, on synthetic shapes (no
# download), then the linear probe of the trained encoder and of the same encoder untrained;
# the README prints what this table says. An accuracy check that does not belong in a timed test.
README_RUN = ["--method", "loco", "--width", "0.25", "--subset", "8192", "--epochs", "5",
              "--batch-size", "256", "--lr", "2"]


def first_run(out: Path, args) -> tuple[Plan, list]:
    plan, run = Plan(), out / "loco"
    flags_ = README_RUN[:README_RUN.index("--epochs")] + README_RUN[README_RUN.index("--epochs") + 2:]
    smoke = ["--subset", "256", "--batch-size", "64", "--width", "0.125"] if args.smoke else []
    plan.train(run, [*flags_, *smoke], 1 if args.smoke else 5, 1.3)
    for random in (False, True):
        plan.eval(run, 0.3, random=random, extra=["--subset", "200" if args.smoke else "10000"])
    return plan, [("The first run: linear top-1 (%) by stage, synthetic shapes, 10,000 images",
                   stage_table(out, [("LoCo, 5 epochs", "loco"), ("untrained", "loco")]))]


# Tables 2-3 in miniature: encoders pre-trained on synthetic shapes by the README's longer
# synthetic run (15 epochs), then Mask R-CNN fine-tuned on 1,000 and on 100 synthetic scenes (like
# COCO-10K and COCO-1K), five random splits each as in the paper, scored on the same 200
# validation scenes (detect.py).
FIRST_RUN = {"arch": "resnet18", "width": 0.25, "subset": 8192, "batch-size": 256, "lr": 2.0,
             "warmup-epochs": 1}
BUDGETS, SPLITS = (1000, 100), 5


def detection(out: Path, args) -> tuple[Plan, list]:
    plan = Plan()
    pre = flags({**FIRST_RUN, "dataset": "synthetic", **(SMOKE if args.smoke else {})})
    for method, minutes in (("simclr", 3.5), ("gim", 4.6), ("loco", 5.0)):   # measured
        local = [] if method == "simclr" else BLOCK   # trained with the decoders of that time
        plan.train(out / f"pretrain_{method}", [*pre, "--method", method, *local],
                   1 if args.smoke else 15, 0.1 if args.smoke else minutes)
        plan.eval(out / f"pretrain_{method}", 0.4, extra=["--subset", "200" if args.smoke else
                                                          "10000"])     # the encoder's quality
    ckpt = lambda m: str(out / f"pretrain_{m}" / "ckpt.pt")
    for scenes in BUDGETS:
        for split in range(SPLITS):
            for init in ("random", "simclr", "gim", "loco"):
                first = ["random", "--like", ckpt("loco")] if init == "random" else [ckpt(init)]
                extra = ["--iterations", "2", "--train-scenes", "8"] if args.smoke else [
                    "--train-scenes", str(scenes)]
                done = out / f"detect_{init}_{8 if args.smoke else scenes}_{split}.json"
                plan.other(f"detect {init} {scenes} scenes split {split}",
                           ["-m", "tools.detect", *first, *extra, "--split", str(split),
                            "--out", str(out)],
                           done, 0.2 if args.smoke else 1.1 if scenes >= 1000 else 0.65)
    return plan, [("the pre-trained encoders: linear top-1 (%) by stage, synthetic shapes",
                   stage_table(out, [(TITLES[m], f"pretrain_{m}") for m in TITLES])),
                  ("Mask R-CNN on synthetic scenes: AP, mean ± sd over splits; the paper's "
                   "Table 3 beside", detection_table(out, args.smoke))]


# Table 3 of the paper, 100-epoch pre-training: (box AP, mask AP) on COCO-10K, then on COCO-1K
PAPER_TABLE3 = {"random": (23.5, 22.0, 2.5, 2.5), "simclr": (25.6, 23.9, 11.3, 11.4),
                "gim": (22.6, 20.8, 9.7, 9.6), "loco": (26.1, 24.2, 11.7, 11.8)}


def detection_table(out: Path, smoke: bool) -> str:
    """Box and mask AP, mean ± sd over the splits run, beside the paper's COCO-10K / COCO-1K."""
    paper = ("COCO-10K", "COCO-1K")
    lines = ["| encoder | splits | " + " | ".join(
        f"{n} scenes: box AP | mask AP | paper {c}: box | mask" for n, c in zip(BUDGETS, paper))
        + " |", "|" + " --- |" * (2 + 4 * len(BUDGETS))]
    for init in ("random", "simclr", "gim", "loco"):
        cells, splits = [], []
        for b, scenes in enumerate(BUDGETS):
            found = out.glob(f"detect_{init}_{8 if smoke else scenes}_*.json")
            rs = [read_json(p) for p in sorted(found)]
            cells += [cell([r[f"{k}_AP"] for r in rs]) for k in ("bbox", "segm")]
            cells += [str(v) for v in PAPER_TABLE3[init][2 * b:2 * b + 2]]
            splits.append(str(len(rs)))
        title = "random init (all trained)" if init == "random" else TITLES[init]
        lines.append(f"| {title} | {' / '.join(splits)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- tables
def results(out: Path, prefix: str | Path, random: bool = False) -> list[dict]:
    """The evaluations of runs <prefix>_seed<k>, or of the one run <prefix>; a prefix that is a
    Path names runs of another plan's folder."""
    name = "linear_eval_fast_random.json" if random else "linear_eval_fast.json"
    if isinstance(prefix, Path):
        out, prefix = prefix.parent, prefix.name
    paths = sorted(out.glob(f"{prefix}_seed*/{name}")) or sorted(out.glob(f"{prefix}/{name}"))
    return [read_json(p) for p in paths]


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise cli.UserError(f"{path} is corrupt ({str(e)[:60]}): {rewrite(path)}")


def rewrite(path: Path) -> str:
    """How to get a result file back: the committed one, if git holds it; else by running the
    plan whose folder holds it (which may be another plan than the one reading it), which does
    the step again since its file does not parse."""
    folder = next((f for f in path.parents if f.name.removesuffix("_smoke") in PLANS), None)
    plan = folder.name.removesuffix("_smoke") if folder is not None else None
    here = RUNNING.get("out")
    if folder is None and here is not None and here.resolve() in path.resolve().parents:
        folder, plan = here, RUNNING["plan"]           # this plan's own folder, named otherwise
    ways = []
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--error-unmatch",
                              str(path.resolve())], capture_output=True).returncode == 0
    if tracked:
        ways.append(f"restore the committed one (git checkout -- {cli.portable(path)})")
    if folder is not None:
        smoke = " --smoke" if folder.name.endswith("_smoke") else ""
        ways.append(f"run its plan again to write it anew (python -m tools.experiments {plan} "
                    f"--out {cli.portable(folder)}{smoke}, without --table-only)")
    else:
        ways.append("run the plan that wrote it again")
    return ", or ".join(ways)


def cell(values: list[float | None]) -> str:
    """Mean ± sample standard deviation over seeds (one seed: the value); None (nothing to
    score) is left out and said."""
    if values and all(v is None for v in values):
        return "n/a"
    values = [v for v in values if v is not None]
    if not values:
        return "not run"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def stage_table(out: Path, rows: list[tuple[str, str]], stages: int = 4) -> str:
    """Every stage's linear top-1 and kNN, a line per row (title, run prefix <prefix>_seed<k>),
    with training minutes per seed."""
    lines = ["| method | seeds | " + " | ".join(f"stage {k + 1}" for k in range(stages))
             + " | kNN | train min/seed |", "|" + " --- |" * (stages + 4)]
    for title, prefix in rows:
        rs = results(out, prefix, random=title == "untrained")
        where = prefix.parent if isinstance(prefix, Path) else out
        spent, prefix = read_minutes(where), getattr(prefix, "name", prefix)
        tops = [cell([r["stages"][k]["top1"] for r in rs]) for k in range(stages)]
        mins = [v for k, v in spent.items()
                if k.startswith(f"train {prefix}_seed") or k == f"train {prefix}"]
        minutes = f"{statistics.mean(mins):.0f}" if mins and title != "untrained" else ""
        lines.append(f"| {title} | {len(rs)} | {' | '.join(tops)} | "
                     f"{cell([r['knn_top1'] for r in rs])} | {minutes} |")
    return "\n".join(lines)


def final_table(out: Path, rows: list[tuple[str, str, float | None]]) -> str:
    """Final-stage linear top-1 and kNN beside the paper's ImageNet top-1, a line per row."""
    lines = ["| row | seeds | linear top-1 | kNN | paper (ImageNet, ResNet-50) |",
             "| --- | --- | --- | --- | --- |"]
    for title, key, paper in rows:
        rs = results(out, key)
        lines.append(f"| {title} | {len(rs)} | {cell([r['stages'][-1]['top1'] for r in rs])} | "
                     f"{cell([r['knn_top1'] for r in rs])} | {paper or ''} |")
    return "\n".join(lines)


RUNNING = {}                             # the plan main() runs, and its --out (for rewrite)
PLANS = {"cifar-cpu": cifar_cpu, "gap": gap, "width": width, "pipeline": pipeline_plan,
         "ablations": ablations, "detection": detection, "gpu": gpu, "gpu-width": gpu_width,
         "first-run": first_run}


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__, "python -m tools.experiments")
    p.add_argument("plan", choices=list(PLANS))
    p.add_argument("--data-dir", default="data", help="holds cifar-10-batches-py/ (downloaded "
                   "there if absent)")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"])
    p.add_argument("--out", default=None, help="default: runs/<plan>")
    p.add_argument("--seeds", type=cli.positive(int), default=2, help="seeds 0 .. N-1")
    p.add_argument("--minutes", type=cli.positive(float), default=None,
                   help="stop cleanly after this many minutes (continue by running it again)")
    p.add_argument("--jobs", type=cli.positive(int), default=1,
                   help="steps run side by side, each with cores / jobs threads")
    p.add_argument("--smoke", action="store_true",
                   help="every step for a few iterations, on whatever device (a test runs it)")
    p.add_argument("--table-only", action="store_true", help="print the tables of what is done")
    args = p.parse_args(argv)
    out = cli.check_writable(args.out or f"runs/{args.plan}{'_smoke' if args.smoke else ''}",
                             "--out", is_dir=True)
    out.mkdir(parents=True, exist_ok=True)
    RUNNING.update(plan=args.plan, out=out)
    plan, _ = PLANS[args.plan](out, args)
    fits = 10 if args.plan in ("gpu", "gpu-width") else None   # minutes of one device command
    complete = True if args.table_only else execute(plan, args.minutes, out / "log.txt", fits,
                                                            args.jobs)
    tables = PLANS[args.plan](out, args)[1]          # again: now with what the steps wrote
    if args.plan == "gap":
        schedule_figure(out)                         # redrawn, like tables.md, from what is done
    if args.plan == "width":
        width_figure(out, width_runs(out, args)[1])
    text = "\n\n".join(f"{title}:\n{t}" for title, t in tables)
    cli.write_atomic(out / "tables.md", text + "\n")
    print(("(partial: run the same command again to continue)\n" if not complete else "") + text)


if __name__ == "__main__":
    cli.run(main, "python -m tools.experiments")
