"""A multi-node job tried on one machine: N torchrun agents joined by a c10d rendezvous, as N
machines would start them (docs/multi-node.md), each running train.py's processes.

    python -m tools.multinode                          # 2 agents x 2 processes: 2 replicas of a
                                                       # 2-process LoCo pipeline, once
    python -m tools.multinode --repeat 20              # the stress run: does every job end cleanly?
    python -m tools.multinode --kill-after-epoch 1     # a process killed: does the job end, saved?
    python -m tools.multinode --nodes 2 --nproc 1 -- --method simclr   # flags after -- go to train.py

Each try starts the agents side by side on 127.0.0.1 (the rendezvous endpoint every node names),
waits for all of them, and reports each agent's exit code, the seconds the job took, and whether
the run's checkpoint loads with every epoch. "Clean": every agent exits 0 within --timeout and
the checkpoint holds the last epoch; with --kill-after-epoch, every agent exits non-zero within
the timeout, each surviving process says why in one line, and the checkpoint still loads.
Logs: --out/try<k>/agent<n>.txt.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cli

TINY = ["--dataset", "synthetic", "--width", "0.125", "--subset", "256", "--batch-size", "64",
        "--lr", "2", "--log-every", "1000", "--precision", "fp32", "--epochs", "2",
        "--method", "loco", "--pipeline", "2"]


def agents(nodes: int, nproc: int, port: int, job: str, flags: list[str], out: Path,
           logs: Path) -> list[subprocess.Popen]:
    """The agents of one job, as each node would start its own (here all on this machine)."""
    started = []
    for n in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}",
               f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={job}", "train.py", *flags,
               "--out", str(out)]
        log = open(logs / f"agent{n}.txt", "w")
        started.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=cli.ROOT,
                                        env={**os.environ, "OMP_NUM_THREADS": "1"},
                                        start_new_session=True))
    return started


def workers(agent: subprocess.Popen) -> list[int]:
    """The train.py processes an agent started (its children)."""
    try:
        kids = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    except OSError:
        return []
    return [int(k) for k in kids]


def last_epoch(ckpt: Path) -> int | None:
    if not ckpt.exists():
        return None
    import recipe
    try:
        return recipe.load_checkpoint(ckpt)["epoch"]
    except cli.UserError:
        return None


def one_try(k: int, args, flags: list[str], epochs: int) -> dict:
    folder = Path(args.out) / f"try{k}"
    folder.mkdir(parents=True, exist_ok=True)
    run = folder / "run"
    t = time.time()
    jobs = agents(args.nodes, args.nproc, args.port + k % 100, f"multinode{os.getpid()}_{k}",
                  flags, run, folder)
    killed = None
    try:
        if args.kill_after_epoch is not None:    # SIGKILL one process of the last agent
            while killed is None and all(j.poll() is None for j in jobs):
                epoch = last_epoch(run / "ckpt.pt") if (run / "ckpt.pt").exists() else None
                if epoch is not None and epoch + 1 >= args.kill_after_epoch and workers(jobs[-1]):
                    killed = workers(jobs[-1])[-1]
                    os.kill(killed, signal.SIGKILL)
                time.sleep(0.2)
        codes = [j.wait(timeout=max(1.0, args.timeout - (time.time() - t))) for j in jobs]
    except subprocess.TimeoutExpired:
        for j in jobs:                           # the agent and every process it started
            if j.poll() is None:
                os.killpg(j.pid, signal.SIGKILL)
        codes = [j.wait() for j in jobs]
        return {"try": k, "clean": False, "seconds": time.time() - t, "codes": codes,
                "why": f"still running after {args.timeout:g} s"}
    seconds = time.time() - t
    epoch = last_epoch(run / "ckpt.pt")
    said = [line for n in range(args.nodes) for line in
            (folder / f"agent{n}.txt").read_text(errors="replace").splitlines()
            if line.startswith("train.py: ")]
    if killed is None:
        clean = all(c == 0 for c in codes) and epoch == epochs - 1
        why = "" if clean else f"exit codes {codes}, checkpoint epoch {epoch}"
    else:
        survivors = args.nodes * args.nproc - 1
        clean = all(c != 0 for c in codes) and epoch is not None and len(said) == survivors
        why = "" if clean else f"exit codes {codes}, checkpoint epoch {epoch}, lines {said}"
    return {"try": k, "clean": clean, "seconds": seconds, "codes": codes, "why": why,
            "said": said}


def main(argv: list[str] | None = None) -> list[dict]:
    p = cli.parser(__doc__, "python -m tools.multinode")
    p.add_argument("--nodes", type=cli.positive(int), default=2, help="torchrun agents")
    p.add_argument("--nproc", type=cli.positive(int), default=2, help="processes per agent")
    p.add_argument("--repeat", type=cli.positive(int), default=1, help="tries, one after another")
    p.add_argument("--timeout", type=cli.positive(float), default=180.0,
                   help="seconds a try may take before it counts as hung")
    p.add_argument("--kill-after-epoch", type=cli.positive(int), default=None,
                   help="SIGKILL one process of the last agent once this many epochs are saved")
    p.add_argument("--port", type=cli.positive(int), default=29650, help="rendezvous port")
    p.add_argument("--out", default="runs/multinode", help="logs and runs of every try")
    p.add_argument("train_flags", nargs="*", help="train.py's flags (after --); default: a "
                   "tiny LoCo run, 2 epochs, --pipeline 2")
    args = p.parse_args(argv)
    flags = args.train_flags or TINY
    if args.kill_after_epoch is not None and "--epochs" not in flags:
        raise cli.UserError("--kill-after-epoch: give train.py's --epochs after --", flag=True)
    epochs = int(flags[flags.index("--epochs") + 1]) if "--epochs" in flags else 100
    cli.check_writable(args.out, "--out", is_dir=True)
    print(f"{args.nodes} agents x {args.nproc} processes, c10d rendezvous on 127.0.0.1: "
          f"train.py {' '.join(flags)}", flush=True)
    tries = []
    for k in range(args.repeat):
        r = one_try(k, args, flags, epochs)
        tries.append(r)
        print(f"try {k + 1}: {'clean' if r['clean'] else 'NOT CLEAN'}, {r['seconds']:.1f} s, "
              f"agents exit {r['codes']}" + (f" ({r['why']})" if r["why"] else ""), flush=True)
    clean = sum(r["clean"] for r in tries)
    seconds = [r["seconds"] for r in tries]
    print(f"{clean} of {len(tries)} ended cleanly; {min(seconds):.1f}-{max(seconds):.1f} s a "
          f"try (mean {sum(seconds) / len(seconds):.1f})")
    return tries


if __name__ == "__main__":
    cli.run(main, "python -m tools.multinode")
