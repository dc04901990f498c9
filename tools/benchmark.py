"""What locality buys, measured: per-stage memory and FLOPs (Table 6), peak memory (Table 7), speed.

    python -m tools.benchmark stages    # Table 6 (+ params, GFLOPs of every encoder), counted on the CPU
    python -m tools.benchmark memory    # Table 7: peak memory of one step, simclr vs gim vs loco
    python -m tools.benchmark speed     # time per step of each method over SimCLR's, and from FLOPs
    python -m tools.benchmark train     # images/s: the step alone, our loop, the usual pipeline
    python -m tools.benchmark pipeline  # model parallel: images/s on 2 processes, by mode (quiet)
    python -m tools.benchmark mesh      # projection: 8 devices as D replicas x P pipeline processes
    python -m tools.benchmark all --out benchmark.json

Activation memory is counted, not sampled: `SavedBytes` watches every tensor autograd saves for
backward and keeps the running total of those still alive, so its peak is the activation memory of
a step on any device, the CPU included. On CUDA, `memory` also reads the allocator's peak
(torch.cuda.max_memory_allocated), which adds weights, gradients, optimizer state and workspaces.
FLOPs are multiply-accumulates, the paper's convention (plain ResNet-50 at 224 counts 4.09 G),
from torch's own FlopCounterMode. Timings run on any device, in the number format and memory layout
train.py would use there (runtime.py; --precision and --memory-format override), and print the
device: a CPU timing is a CPU figure, never a GPU one.
"""

import argparse
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import cli
import data
import local_units as L
import model
import recipe
import runtime
from memory import SavedBytes


def stage_profile(encoder: model.StagedEncoder, x: torch.Tensor) -> list[dict]:
    """Per stage: multiply-accumulates and bytes saved for backward, for one forward of x."""
    rows = []
    for stage in encoder.stages:
        with FlopCounterMode(display=False) as flops, SavedBytes() as mem:
            y = stage(x)
        rows.append({"macs": flops.get_total_flops() // 2, "saved_bytes": mem.peak})
        x = y.detach()
        del y                             # frees this stage's graph before the next is built
    return rows


# The paper's Table 6 (per-stage % of memory and of FLOPs, total GFLOPs) and Table 7 / Sec. 5.6
# (memory saving ratio against SimCLR).
PAPER_TABLE6 = {
    "resnet50": ([43.64, 29.09, 21.82, 5.45], [19.39, 25.09, 35.80, 19.73], 4.14),
    "presnet50": ([15.46, 10.96, 19.48, 17.31, 19.48, 17.31],
                  [13.50, 14.63, 14.77, 16.62, 20.45, 20.04], 4.16),
}
PAPER_SAVING = {"resnet50": {"gim": 1.81, "loco": 1.28}, "presnet50": {"gim": 4.56, "loco": 2.76}}


def percent(values: list[float]) -> list[float]:
    return [round(100 * v / sum(values), 2) for v in values]


def stages_table() -> dict:
    """Parameters, GFLOPs and each stage's share of memory and FLOPs, for every encoder at its
    native resolution."""
    out = {}
    for arch, stem in [("resnet18", "cifar"), *((a, "imagenet") for a in model.ENCODERS)]:
        torch.manual_seed(0)
        encoder = model.build_encoder(arch, stem=stem)
        size = encoder.input_size
        rows = stage_profile(encoder, torch.randn(2, 3, size, size))  # train mode, as in training
        arch = arch + ("_cifar" if stem == "cifar" else "")
        out[arch] = {"params_M": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2),
                     "gflops": round(sum(r["macs"] for r in rows) / 2 / 1e9, 3),  # per image
                     "memory_pct": percent([r["saved_bytes"] for r in rows]),
                     "flops_pct": percent([r["macs"] for r in rows])}
        print(f"\n{arch}: {out[arch]['params_M']} M parameters, {out[arch]['gflops']} GFLOPs at "
              f"{size}x{size}" + (f" (paper: {PAPER_TABLE6[arch][2]} G)" if arch in PAPER_TABLE6
                                  else ""))
        print("stage  memory %    (paper)   FLOPs %    (paper)")
        paper = PAPER_TABLE6.get(arch, ([None] * 6, [None] * 6, None))
        for k, (m, f) in enumerate(zip(out[arch]["memory_pct"], out[arch]["flops_pct"])):
            pm, pf = paper[0][k], paper[1][k]
            print(f"{k + 1:>5}  {m:>8.1f}  {'' if pm is None else f'({pm:.1f})':>9}  {f:>8.1f}  "
                  f"{'' if pf is None else f'({pf:.1f})':>9}")
    return out


def seconds_per_call(fn, rt: runtime.Runtime, calls: int, warmup: int = 2) -> float:
    """Median wall time of one fn() over `calls` calls after `warmup`, the device drained each time:
    the median, not the mean, so that a stray pause of a shared machine does not count."""
    times = []
    for i in range(warmup + calls):
        t = time.perf_counter()
        fn()
        rt.sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times[warmup:])


def build(arch: str, method: str, rt: runtime.Runtime, stem: str = "imagenet",
          width: float = 1.0, decoder: str | None = None) -> recipe.Run:
    """The run train.py builds for this method and encoder, on rt (seeded: same weights). The
    memory and speed tables keep the decoders they were measured with: one conv block for GIM
    and LoCo (Tables 4-5's, this repository's default then); `decoder` overrides."""
    torch.manual_seed(0)
    dataset = "cifar10" if stem == "cifar" else "imagefolder"
    decoder = decoder or ("none" if method == "simclr" else "block")
    return recipe.build({"method": method, "arch": arch, "width": width, "dataset": dataset,
                         "decoder": decoder}, rt, lr=0.1)


def step(run: recipe.Run, x1: torch.Tensor, x2: torch.Tensor, tau: float,
         rt: runtime.Runtime) -> list[torch.Tensor]:
    """One step of train.py's loop on one process: the method's forward and local backward,
    then LARS."""
    with rt.autocast():
        losses = L.train_step(run.pieces, run.heads, run.units, rt.prepare(x1), rt.prepare(x2),
                              tau)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return losses


def views(batch: int, size: int, rt: runtime.Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, batch, 3, size, size, device=rt.device)
    return x[0], x[1]


def memory_table(archs: list[str], batch: int, size: int, rt: runtime.Runtime,
                 width: float = 1.0) -> dict:
    """Peak memory of one training step: counted saved bytes, and on CUDA the allocator's peak."""
    out = {}
    cuda = rt.device.type == "cuda"
    for arch in archs:
        out[arch] = {}
        for method in L.METHODS:
            run = build(arch, method, rt, width=width)
            x1, x2 = views(batch, size, rt)
            step(run, x1, x2, 0.1, rt)   # warm-up: optimizer state, cuDNN workspaces, allocator
            rt.sync()
            r = {}
            if cuda:
                torch.cuda.reset_peak_memory_stats(rt.device)
                base = torch.cuda.memory_allocated(rt.device)
            with SavedBytes() as mem:
                step(run, x1, x2, 0.1, rt)
            rt.sync()
            r["saved_MiB"] = mem.peak / 2 ** 20
            if cuda:
                r["cuda_peak_MiB"] = torch.cuda.max_memory_allocated(rt.device) / 2 ** 20
                r["cuda_step_MiB"] = r["cuda_peak_MiB"] - base / 2 ** 20  # above weights & state
            out[arch][method] = r
            del run, x1, x2
            if cuda:
                torch.cuda.empty_cache()
        print(f"\n{arch}, {batch} images x 2 views at {size}x{size}, {rt}: peak memory of one "
              f"step, and SimCLR's over it (the memory saving ratio)")
        keys = ["saved_MiB"] + (["cuda_peak_MiB", "cuda_step_MiB"] if cuda else [])
        print("method  " + "  ".join(f"{k:>22}" for k in keys) + "   paper")
        for method, r in out[arch].items():
            ratios = {k: out[arch]["simclr"][k] / r[k] for k in keys}
            r.update({k.replace("_MiB", "_saving"): round(v, 2) for k, v in ratios.items()})
            paper = PAPER_SAVING.get(arch, {}).get(method, 1.0 if method == "simclr" else None)
            print(f"{method:<7} " + "  ".join(f"{r[k]:>12.0f} ({ratios[k]:.2f}x)" for k in keys)
                  + f"   {'' if paper is None else f'{paper:.2f}x'}")
    return out


def step_flops(run: recipe.Run, x1: torch.Tensor, x2: torch.Tensor) -> int:
    """Multiply-accumulates of one train_step, backward included, as FlopCounterMode counts the
    convolutions and matrix products actually run (an input gradient that is not asked for is not
    computed, and not counted)."""
    with FlopCounterMode(display=False) as flops:
        L.train_step(run.pieces, run.heads, run.units, x1, x2, 0.1)
    run.optimizer.zero_grad(set_to_none=True)
    return flops.get_total_flops() // 2


# arch, stem, width, batch, input size: CUDA at the paper's scale, CPUs at one that fits them
SPEED_CONFIGS = {"cuda": [("resnet18", "cifar", 1.0, 512, 32), ("resnet50", "imagenet", 1.0, 128, 224),
                          ("presnet50", "imagenet", 1.0, 128, 224)],
                 "cpu": [("resnet18", "cifar", 0.25, 128, 32), ("resnet50", "imagenet", 1.0, 4, 224)]}


def speed_table(rt: runtime.Runtime, steps: int = 10, configs=None) -> dict:
    """Time per step (train_step + LARS) on pre-made inputs, every method, and each method's step
    time over SimCLR's next to the same ratio from counted FLOPs: if only arithmetic separates the
    methods, the two ratios agree."""
    configs = configs or SPEED_CONFIGS["cuda" if rt.device.type == "cuda" else "cpu"]
    out = {}
    for arch, stem, width, batch, size in configs:
        key = f"{arch}_x{width}_{stem}" if width != 1 else f"{arch}_{stem}"
        out[key] = {}
        for method in L.METHODS:
            run = build(arch, method, rt, stem, width)
            x1, x2 = views(batch, size, rt)
            s = seconds_per_call(lambda: step(run, x1, x2, 0.1, rt), rt, steps)
            cpu = runtime.Runtime(torch.device("cpu"), False, torch.float32, False)
            macs = step_flops(build(arch, method, cpu, stem, width), *views(2, size, cpu)) * batch // 2
            out[key][method] = {"ms_per_step": round(1000 * s, 2), "images_per_s": round(batch / s),
                                "gmacs_per_step": round(macs / 1e9, 2)}
        print(f"\n{arch} x{width} ({stem} stem), batch {batch} x 2 views at {size}x{size}, {rt}")
        print("method   ms/step   images/s   GMACs/step   time vs SimCLR   FLOPs vs SimCLR")
        ref = out[key]["simclr"]
        for method, r in out[key].items():
            r["time_vs_simclr"] = round(r["ms_per_step"] / ref["ms_per_step"], 3)
            r["flops_vs_simclr"] = round(r["gmacs_per_step"] / ref["gmacs_per_step"], 3)
            print(f"{method:<7} {r['ms_per_step']:>8.1f}  {r['images_per_s']:>9,}  "
                  f"{r['gmacs_per_step']:>11.2f}   {r['time_vs_simclr']:>14.2f}x  "
                  f"{r['flops_vs_simclr']:>15.2f}x")
    return out


# ---------------------------------------------------------------------------- model parallel
# The pipeline table (docs/model-parallel.md): (encoder, stem, width, batch, size) on 2 processes
PIPELINE_CONFIGS = [("resnet18", "cifar", 0.25, 256, 32), ("presnet50", "imagenet", 1.0, 8, 224)]
PROJECTED = [("resnet50", "imagenet", 1.0, 8, 224)]    # per-stage times and the projection only
SETTINGS = [  # (name, processes, threads each, mode)
    ("1 process x 1 thread", 1, 1, None), ("1 process x 2 threads", 1, 2, None),
    ("data parallel 2 x 1 thread", 2, 1, "data"), ("pipeline 2 x 1 sync", 2, 1, "sync"),
    ("pipeline 2 x 1 async", 2, 1, "async")]


def pipeline_worker(cfg: dict, out: str) -> None:
    """One process of a timed run (under torchrun, or alone): `steps` steps on pre-made views
    after 2 of warm-up; the first process writes images/s and every process's compute, idle,
    bytes sent per step, and the peak of its counted memory, to `out`."""
    import torch.distributed as dist
    import pipeline
    P = cfg["processes"] if cfg["mode"] in ("sync", "async") else 1
    rt = runtime.setup(None, cfg.get("precision", "auto"), "auto", distributed=True, pipeline=P)
    torch.set_num_threads(cfg["threads"])
    run = build(cfg["arch"], cfg["method"], rt, cfg["stem"], cfg["width"], "none")
    batch = cfg["batch"] // rt.data_world
    x1, x2 = views(batch, cfg["size"], rt)
    pipe = None
    if P > 1:
        pipe = pipeline.build(run, rt, {"method": cfg["method"], "pipeline": P,
                                        "pipeline_mode": cfg["mode"], "batch_size": cfg["batch"]},
                              cfg["size"], 0.1, groups=[range(a, b) for a, b in cfg["groups"]])

    def one() -> None:
        if pipe:
            pipe.step(x1, x2, 0.1)
        else:
            with rt.autocast():
                L.train_step(run.pieces, run.heads, run.units, rt.prepare(x1), rt.prepare(x2),
                             0.1, rt.data_group)
            if rt.data_world > 1:
                runtime.average_gradients(run.params, rt)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        one()
    if pipe:
        pipe.stats.update(compute_s=0.0, idle_s=0.0, bytes_sent=0, steps=0)
    if rt.world > 1:
        dist.barrier()
    times = []                           # per step on this process: in a pipeline's steady
    for _ in range(cfg["steps"]):        # state, every process's period is the pipeline's
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    if rt.world > 1:
        dist.barrier()
    seconds = statistics.median(times)   # the median: a stray pause of the machine does not count
    with SavedBytes() as mem:            # two more steps, counted: async's held graph included
        one(), one()
    own = [q for q in run.params if not q.is_meta]
    mine = {"compute_ms": 1000 * (pipe.stats["compute_s"] / pipe.stats["steps"]) if pipe else
            1000 * seconds, "idle_ms": 1000 * pipe.stats["idle_s"] / pipe.stats["steps"] if pipe
            else 0.0, "kB_sent": pipe.stats["bytes_sent"] / pipe.stats["steps"] / 1e3 if pipe
            else 0.0, "params_MiB": sum(q.numel() * q.element_size() for q in own) / 2 ** 20,
            "activations_MiB": mem.peak / 2 ** 20,
            "pieces": [pipe.mine.start, pipe.mine.stop] if pipe else None}
    every = [None] * rt.world if rt.rank == 0 else None
    if rt.world > 1:
        dist.gather_object(mine, every, dst=0)
    else:
        every = [mine]
    if rt.rank == 0:
        cli.write_atomic(out, json.dumps({"images_per_s": cfg["batch"] / seconds,
                                          "processes": every}))
    runtime.shutdown()


def stage_seconds(arch: str, stem: str, width: float, batch: int, size: int, method: str,
                  rt: runtime.Runtime) -> list[float]:
    """Each stage's step time (forward, its passes, its heads) on one thread: the projection's
    input."""
    import pipeline
    torch.set_num_threads(1)
    run = build(arch, method, rt, stem, width, "none")
    x = rt.prepare(torch.cat(views(batch, size, rt)))
    costs = pipeline.piece_costs(run, x, 0.1, rt, repeats=3)
    return [sum(c for c, k in zip(costs, run.stage_of) if k == s) for s in range(run.stage_of[-1] + 1)]


def projection(stages: list[float], devices: int) -> dict:
    """Speed-up over one device of the best contiguous placement of stages on `devices`, per
    mode, from per-stage times (a projection: transfers and the straddling unit's own wait are
    left out). Local (async LoCo, GIM): a step takes the slowest group's time. SimCLR, sync:
    every stage waits for the ones above, so groups run one after another: no speed-up."""
    import pipeline
    groups = pipeline.place(stages, devices, list(range(len(stages) - 1)))
    slowest = max(sum(stages[j] for j in g) for g in groups)
    return {"groups": [[g.start + 1, g.stop] for g in groups],
            "local_speedup": round(sum(stages) / slowest, 2),
            "bubble": round(1 - sum(stages) / (devices * slowest), 2)}


MEASURED = cli.ROOT / "results" / "pipeline" / "benchmark.json"   # `pipeline`'s stage times


def mesh_table(devices: int, measured: Path = MEASURED) -> dict:
    """A projection for `devices` devices as D replicas x P pipeline processes (docs/multi-node.md),
    from the per-stage step times `pipeline` measured (one thread, its batch) and the parameters
    of each stage (counted): per layout, the compute speed-up over one device (each replica's
    share of the batch costs 1/D of the measured times; the slowest pipeline group sets the
    step, placed as train.py places async; transfers, all-reduce time and the straddling
    unit's wait left out) and what each
    device holds: the parameters of its stages and heads, whose gradients it all-reduces with
    the D-1 others every step (MiB, float32). A projection, not a measurement."""
    import pipeline
    if not measured.exists():
        raise cli.UserError(f"{measured}: no measured stage times; run python -m tools.benchmark "
                            f"pipeline --out {cli.portable(measured)} first")
    timed = json.loads(measured.read_text())["pipeline"]
    out = {}
    for key, by_method in timed.items():
        arch, width, stem = re.match(r"(\w+?)_x([\d.]+)_(\w+)_b\d+", key).groups()
        for method, entry in by_method.items():
            stage_ms = entry["stage_ms"]
            torch.manual_seed(0)
            run = build(arch, method, runtime.Runtime(torch.device("cpu"), False, torch.float32,
                                                      False), stem, float(width), "none")
            mib = lambda g: 4 * sum(q.numel() for j in g for q in run.pieces[j].parameters()) \
                + 4 * sum(q.numel() for u, h in zip(run.units, run.heads) if u.last in g
                          for q in h.parameters())
            rows = []
            for P in [p for p in range(1, len(stage_ms) + 1) if devices % p == 0]:
                D = devices // P             # placed as train.py places async (pipeline.py)
                allowed = pipeline.cuts(run.units, len(stage_ms), "async")
                groups = pipeline.place(stage_ms, P, pipeline.preferred(run.units, allowed,
                                                                        "async", P))
                slowest = max(sum(stage_ms[j] for j in g) for g in groups)
                rows.append({"D": D, "P": P, "groups": [[g.start + 1, g.stop] for g in groups],
                             "speedup": round(D * sum(stage_ms) / slowest, 2),
                             "allreduce_mib": [round(mib(g) / 2**20, 1) if D > 1 else 0.0
                                               for g in groups]})
            out[f"{key} {method}"] = rows
            print(f"\n{key}, {method} (stage ms {stage_ms}):")
            for r in rows:
                print(f"  {r['D']} x {r['P']}: stages {r['groups']}, {r['speedup']:.2f}x, "
                      f"all-reduce per device {r['allreduce_mib']} MiB/step")
    return out


def pipeline_table(steps: int, configs=None, methods=("loco", "gim"), projected=(),
                   placement: str | None = None) -> dict:
    """images/s of each setting of SETTINGS on this machine's 2 cores, each in its own
    processes, and async with `placement` (train.py's --placement) where the encoder has that
    many stages; then the projection for K devices from per-stage times (only that for the
    encoders of `projected`)."""
    import subprocess
    import sys
    import tempfile

    import pipeline
    out = {}
    timed = PIPELINE_CONFIGS if configs is None else configs
    for (arch, stem, width, batch, size), time_it in [*((c, True) for c in timed),
                                                      *((c, False) for c in projected)]:
        key = f"{arch}_x{width}_{stem}_b{batch}"
        out[key] = {}
        for method in methods:
            cpu = runtime.Runtime(torch.device("cpu"), runtime.native_bf16(torch.device("cpu")),
                                  torch.float32, True)
            stages = stage_seconds(arch, stem, width, batch, size, method, cpu)
            entry = out[key][method] = {
                "stage_ms": [round(1000 * s, 1) for s in stages],
                "projection": {k: projection(stages, k) for k in range(2, len(stages) + 1)}}
            print(f"\n{arch} x{width} ({stem}), batch {batch} at {size}x{size}, {method}:"
                  + ("" if time_it else " projection only"))
            if time_it:
                entry["settings"] = rows = {}
                units = L.make_units(method, list(range(len(stages))))   # placed as train.py
                allowed = {m: pipeline.cuts(units, len(stages), m) for m in ("sync", "async")}
                placed = {m: pipeline.place(stages, 2, pipeline.preferred(units, a, m, 2))
                          for m, a in allowed.items()}
                settings = [(*setting, placed["async" if setting[3] == "async" else "sync"])
                            for setting in SETTINGS]
                if placement and sum(map(int, placement.split(","))) == len(stages):
                    settings.append((f"pipeline 2 x 1 async, {placement}", 2, 1, "async",
                                     pipeline.by_hand(placement, len(stages), allowed["async"],
                                                      "async", 2)))
                for name, procs, threads, mode, groups in settings:
                    cfg = {"arch": arch, "stem": stem, "width": width, "batch": batch,
                           "size": size, "method": method, "processes": procs,
                           "threads": threads, "mode": mode, "steps": steps,
                           "groups": [[g.start, g.stop] for g in groups]}
                    with tempfile.TemporaryDirectory() as tmp:
                        result = Path(tmp) / "r.json"
                        launcher = ([sys.executable, "-m", "torch.distributed.run",
                                     f"--nproc_per_node={procs}", "--master-port",
                                     str(free_port())] if procs > 1 else [sys.executable])
                        job = subprocess.run([*launcher, "-m", "tools.benchmark",
                                              "pipeline-worker", "--config", json.dumps(cfg),
                                              "--out", str(result)], cwd=cli.ROOT,
                                             capture_output=True, text=True,
                                             env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                        if job.returncode:
                            raise RuntimeError(f"{name} ({arch}, {method}) failed:\n"
                                               f"{job.stderr[-3000:]}")
                        rows[name] = json.loads(result.read_text())
                base = rows[SETTINGS[0][0]]["images_per_s"]
                for r in rows.values():
                    r["vs_1_thread"] = round(r["images_per_s"] / base, 2)
                print("setting                        images/s   vs 1 thread   per process: "
                      "compute / idle ms per step, kB sent, params MiB, activations MiB")
                for name, r in rows.items():
                    per = "; ".join(f"{p['compute_ms']:.0f}/{p['idle_ms']:.0f}, "
                                    f"{p['kB_sent']:.0f}, {p['params_MiB']:.2f}, "
                                    f"{p['activations_MiB']:.1f}" for p in r["processes"])
                    rate = r["images_per_s"]
                    print(f"{name:<30} {rate:>8.{0 if rate >= 100 else 2}f}   "
                          f"{r['vs_1_thread']:>10.2f}x   {per}")
            print("stage ms (1 thread): " + ", ".join(map(str, entry["stage_ms"])))
            for k, pr in entry["projection"].items():
                print(f"projection, {k} devices: stages {pr['groups']}, local speed-up "
                      f"{pr['local_speedup']}x, bubble {pr['bubble']}")
    return out


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TorchvisionViews(torch.utils.data.Dataset):
    """The usual SimCLR pipeline, for comparison: PIL images, torchvision's transforms applied one
    image at a time in DataLoader workers (as SimCLR's and most contrastive codebases' loaders)."""

    def __init__(self, images: torch.Tensor, info: data.DatasetInfo):
        import torchvision.transforms as T
        self.images = images.permute(0, 2, 3, 1).numpy()          # (N, H, W, 3) uint8 for PIL
        self.t = T.Compose([
            T.RandomResizedCrop(info.size, scale=info.crop_scale), T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(0.2),
            T.ToTensor(), T.Normalize(info.mean, info.std)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        image = Image.fromarray(self.images[i])
        return self.t(image), self.t(image)


def train_table(rt: runtime.Runtime, data_dir: str, dataset: str = "cifar10",
                batch: int | None = None, steps: int = 10, workers: int = 2, width: float = 0.0,
                settings: tuple = (("fp32", "contiguous"), ("fp32", "channels_last"),
                                   ("auto", "auto"))) -> dict:
    """Training images/s of SimCLR, ResNet-18 with the CIFAR stem (x0.25 off CUDA), per number
    format: the step alone on pre-made views; our loop (on-device batched augmentation, as
    train.py runs); and the usual pipeline (torchvision per image in DataLoader workers), all
    three feeding the same model and step. fp32 contiguous is what this repository did on a CPU
    before the device rule; "auto" is the rule (runtime.py), skipped where it repeats a row."""
    cuda = rt.device.type == "cuda"
    batch = batch or (512 if cuda else 256)
    width = width or (1.0 if cuda else 0.25)
    info = data.DATASETS[dataset]
    loader = data.pretrain_loader(dataset, data_dir, batch, 0, rt.device)
    usual = torch.utils.data.DataLoader(
        TorchvisionViews(loader.images.cpu(), info), batch, shuffle=True, drop_last=True,
        num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda)

    def endless(batches):                 # epoch after epoch, as a long run sees them
        for e in range(10 ** 9):
            yield from batches(e)

    aug = endless(loader.epoch)
    augment_s = seconds_per_call(lambda: next(aug), rt, steps)
    out = {"augment_only_images_per_s": round(batch / augment_s)}
    for precision, fmt in settings:
        srt = runtime.setup(str(rt.device), precision, fmt)
        if str(srt).split(", ", 1)[1] in out:
            continue
        run = build("resnet18", "simclr", srt, "cifar", width)
        tau = info.tau
        fixed = next(aug)
        ours = endless(loader.epoch)
        theirs = endless(lambda e: ((a.to(srt.device, non_blocking=True),
                                     b.to(srt.device, non_blocking=True)) for a, b in usual))
        rates = {name: batch / seconds_per_call(lambda: step(run, *views_of(), tau, srt), srt,
                                                     steps)
                 for name, views_of in (("model_only", lambda: fixed), ("our_loop", lambda: next(ours)),
                                        ("usual_pipeline", lambda: next(theirs)))}
        r = {k: round(v) for k, v in rates.items()}
        r["loop_vs_model"] = round(rates["our_loop"] / rates["model_only"], 3)
        r["loop_vs_usual"] = round(rates["our_loop"] / rates["usual_pipeline"], 3)
        out[str(srt).split(", ", 1)[1]] = r
    print(f"\nSimCLR, ResNet-18 x{width} (CIFAR stem), {dataset}, batch {batch}, on {rt.device}; "
          f"usual pipeline: torchvision per PIL image, {workers} DataLoader workers")
    print(f"augmentation alone (ours): {out['augment_only_images_per_s']:,} images/s")
    print("setting                      model only   our loop   usual pipeline   loop/model   loop/usual")
    for name, r in out.items():
        if isinstance(r, dict):
            print(f"{name:<28} {r['model_only']:>10,}  {r['our_loop']:>9,}  {r['usual_pipeline']:>15,}"
                  f"   {r['loop_vs_model']:>9.2f}   {r['loop_vs_usual']:>9.2f}")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__, "python -m tools.benchmark")
    p.add_argument("what", choices=["stages", "memory", "speed", "train", "pipeline", "mesh", "all",
                                    "pipeline-worker"])
    p.add_argument("--config", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", default=None, help="default: cuda, else mps, else cpu")
    p.add_argument("--precision", default="auto", choices=runtime.PRECISIONS)
    p.add_argument("--memory-format", default="auto", choices=runtime.MEMORY_FORMATS)
    p.add_argument("--batch", type=cli.positive(int), default=None,
                   help="memory: images per step (default 64 on CUDA, 2 elsewhere); "
                        "train: (default 512 on CUDA, 256 elsewhere)")
    p.add_argument("--size", type=cli.positive(int), default=224, help="memory: input resolution")
    p.add_argument("--steps", type=cli.positive(int), default=10,
                   help="speed, train: timed steps per figure")
    p.add_argument("--data-dir", default="data", help="train: where CIFAR-10 is")
    p.add_argument("--dataset", default="cifar10", choices=["cifar10", "synthetic"],
                   help="train: cifar10, or synthetic (no data)")
    p.add_argument("--workers", type=cli.at_least_zero(int), default=2,
                   help="train: DataLoader workers of the usual pipeline")
    p.add_argument("--archs", default="resnet18,presnet50,resnet50",
                   help="pipeline: the encoders of PIPELINE_CONFIGS (timed) and PROJECTED "
                   "(projection only)")
    p.add_argument("--devices", type=cli.positive(int), default=8,
                   help="mesh: devices of the projection (D replicas x P pipeline processes)")
    p.add_argument("--placement", default=None,
                   help="pipeline: also time async with this placement (stages per process, as "
                   "train.py's --placement, e.g. 2,2) on the encoders with that many stages")
    p.add_argument("--smoke", action="store_true", help="every table at a toy size, one step "
                   "each: checks that the code runs, measures nothing")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    if args.placement and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)+", args.placement):
        p.error(f"argument --placement: {args.placement!r}: give each process's number of "
                f"stages, e.g. 2,2")
    if args.size < 32:
        p.error(f"argument --size: {args.size}: the ImageNet encoders downsample 32x, so a "
                f"smaller image leaves their top stages a single pixel; give 32 or more (Table 7 "
                f"is at 224)")
    if args.what == "pipeline-worker":   # one process of the pipeline table's runs
        return pipeline_worker(json.loads(args.config), args.out)
    if args.out:
        cli.check_writable(args.out, "--out")
    rt = runtime.setup(args.device, args.precision, args.memory_format)
    results = runtime.provenance(rt)
    print(f"{results['device']} | {rt} | torch {torch.__version__}")
    smoke = {"size": 64, "batch": 1, "steps": 1, "configs": [("resnet18", "cifar", 0.125, 8, 32)],
             "train_batch": 32, "width": 0.125} if args.smoke else {}
    if args.what in ("stages", "all") and not args.smoke:
        results["stages"] = stages_table()
    if args.what in ("memory", "all"):
        batch = smoke.get("batch") or args.batch or (64 if rt.device.type == "cuda" else 2)
        results["memory"] = memory_table(["resnet50", "presnet50"], batch,
                                         smoke.get("size", args.size), rt, smoke.get("width", 1.0))
    if args.what in ("speed", "all"):
        results["speed"] = speed_table(rt, smoke.get("steps", args.steps), smoke.get("configs"))
    if args.what in ("train", "all"):
        results["train"] = train_table(rt, args.data_dir, args.dataset,
                                       smoke.get("train_batch") or (args.batch if args.what ==
                                                                    "train" else None),
                                       smoke.get("steps", args.steps), args.workers,
                                       smoke.get("width", 0.0))
    if args.what == "mesh":
        results["mesh"] = mesh_table(args.devices)
    if args.what == "pipeline":
        configs = smoke.get("configs") or [c for c in PIPELINE_CONFIGS
                                           if c[0] in args.archs.split(",")]
        results["pipeline"] = pipeline_table(
            smoke.get("steps", args.steps), configs,
            projected=[] if args.smoke else [c for c in PROJECTED if c[0] in args.archs.split(",")],
            placement=args.placement)
    if args.out:
        cli.write_atomic(args.out, json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    cli.run(main, "python -m tools.benchmark")
