"""What locality buys, measured: per-stage memory and FLOPs (Table 6), peak memory (Table 7), speed.

    python benchmark.py stages    # Table 6 (+ params, GFLOPs of every encoder), counted on the CPU
    python benchmark.py memory    # Table 7: peak memory of one step, simclr vs gim vs loco
    python benchmark.py speed     # CUDA: ms per step of each method and encoder
    python benchmark.py train     # CUDA: training images/s on CIFAR-10, ResNet-18, batch 512
    python benchmark.py all --out benchmark.json

Activation memory is counted, not sampled: `SavedBytes` watches every tensor autograd saves for
backward and keeps the running total of those still alive, so its peak is the activation memory of
a step on any device, the CPU included. On CUDA, `memory` also reads the allocator's peak
(torch.cuda.max_memory_allocated), which adds weights, gradients, optimizer state and workspaces.
FLOPs are multiply-accumulates, the paper's convention (plain ResNet-50 at 224 counts 4.09 G),
from torch's own FlopCounterMode. Timings are taken only on CUDA (bf16 autocast, channels_last,
as train.py runs there): CPU timings say nothing about the paper's comparison.
"""

import argparse
import json
import time

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import data
import local_units as L
import model
import train


class SavedBytes:
    """Context manager: live and peak bytes of tensors saved for backward (parameters excluded).

    A storage saved by several nodes (a ReLU output kept by the ReLU and the next conv) counts
    once; it stops counting when the last node holding it is freed.
    """

    def __init__(self):
        self.live = self.peak = 0
        self._count: dict[int, int] = {}  # storage address -> how many saved references hold it

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or isinstance(t._base, nn.Parameter):
            return t                      # weights (or views of them, like a Linear's W.T) exist
                                          # anyway: they are not activation memory
        storage = t.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if self._count.get(key, 0) == 0:
            self.live += size
            self.peak = max(self.peak, self.live)
        self._count[key] = self._count.get(key, 0) + 1
        return _Held(t, key, size, self)

    def _unpack(self, held):
        return held if isinstance(held, torch.Tensor) else held.t

    def _release(self, key: int, size: int) -> None:
        self._count[key] -= 1
        if self._count[key] == 0:
            del self._count[key]
            self.live -= size

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class _Held:
    """A saved tensor; when autograd frees it, the counter hears of it."""

    def __init__(self, t, key, size, counter):
        self.t, self.key, self.size, self.counter = t, key, size, counter

    def __del__(self):
        self.counter._release(self.key, self.size)


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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_per_call(fn, device: torch.device, calls: int, warmup: int = 3) -> float:
    """Mean wall time of fn() over `calls` calls after `warmup`, the device drained at both ends."""
    for _ in range(warmup):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t) / calls


def build(arch: str, method: str, device: torch.device, stem: str = "imagenet"):
    """Encoder, heads, units and optimizer as train.py builds them on `device`."""
    torch.manual_seed(0)
    encoder = model.build_encoder(arch, stem=stem)
    units = L.make_units(method, len(encoder.stages))
    heads = L.make_heads(method, encoder.channels, units)
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    encoder.to(device, memory_format=fmt), heads.to(device, memory_format=fmt)
    params = [*encoder.parameters(), *heads.parameters()]
    opt = train.LARS([{"params": [p for p in params if p.ndim > 1]},
                      {"params": [p for p in params if p.ndim <= 1], "lars": False,
                       "weight_decay": 0.0}], lr=0.1)
    return encoder, heads, units, opt, fmt


def views(batch: int, size: int, device: torch.device, fmt) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(2, batch, 3, size, size, device=device)
    return x[0].contiguous(memory_format=fmt), x[1].contiguous(memory_format=fmt)


def step_fn(encoder, heads, units, opt, x1, x2, tau: float = 0.1):
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=x1.device.type == "cuda")

    def step():
        with autocast:
            L.train_step(encoder, heads, units, x1, x2, tau)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def memory_table(archs: list[str], batch: int, size: int, device: torch.device) -> dict:
    """Peak memory of one training step: counted saved bytes, and on CUDA the allocator's peak."""
    out = {}
    for arch in archs:
        out[arch] = {}
        for method in L.METHODS:
            encoder, heads, units, opt, fmt = build(arch, method, device)
            x1, x2 = views(batch, size, device, fmt)
            step = step_fn(encoder, heads, units, opt, x1, x2)
            step()                      # warm-up: optimizer state, cuDNN workspaces, allocator
            sync(device)
            r = {}
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            with SavedBytes() as mem:
                step()
            sync(device)
            r["saved_MiB"] = mem.peak / 2 ** 20
            if device.type == "cuda":
                r["cuda_peak_MiB"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
                r["cuda_step_MiB"] = r["cuda_peak_MiB"] - base / 2 ** 20  # above weights & state
            out[arch][method] = r
            del encoder, heads, opt, step, x1, x2
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(f"\n{arch}, {batch} images x 2 views at {size}x{size} on {device}: peak memory of "
              f"one step, and SimCLR's over it (the memory saving ratio)")
        keys = ["saved_MiB"] + (["cuda_peak_MiB", "cuda_step_MiB"] if device.type == "cuda" else [])
        print("method  " + "  ".join(f"{k:>22}" for k in keys) + "   paper")
        for method, r in out[arch].items():
            ratios = {k: out[arch]["simclr"][k] / r[k] for k in keys}
            r.update({k.replace("_MiB", "_saving"): round(v, 2) for k, v in ratios.items()})
            paper = PAPER_SAVING.get(arch, {}).get(method, 1.0 if method == "simclr" else None)
            print(f"{method:<7} " + "  ".join(f"{r[k]:>12.0f} ({ratios[k]:.2f}x)" for k in keys)
                  + f"   {'' if paper is None else f'{paper:.2f}x'}")
    return out


SPEED_CONFIGS = [("resnet18", "cifar", 512, 32), ("resnet50", "imagenet", 128, 224),
                 ("presnet50", "imagenet", 128, 224)]   # arch, stem, batch, input size


def speed_table(device: torch.device, configs=SPEED_CONFIGS, steps: int = 20) -> dict:
    """Milliseconds per step (train_step + optimizer) on pre-made inputs, every method."""
    out = {}
    for arch, stem, batch, size in configs:
        out[arch] = {}
        for method in L.METHODS:
            encoder, heads, units, opt, fmt = build(arch, method, device, stem)
            step = step_fn(encoder, heads, units, opt, *views(batch, size, device, fmt))
            ms = 1000 * seconds_per_call(step, device, steps)
            out[arch][method] = {"ms_per_step": round(ms, 2), "images_per_s": round(batch / ms * 1e3)}
        print(f"\n{arch} ({stem} stem), batch {batch} at {size}x{size} on {device}")
        print("method   ms/step   images/s   vs SimCLR")
        for method, r in out[arch].items():
            r["vs_simclr"] = round(r["ms_per_step"] / out[arch]["simclr"]["ms_per_step"], 2)
            print(f"{method:<7} {r['ms_per_step']:>8.1f}  {r['images_per_s']:>9,}   "
                  f"{r['vs_simclr']:.2f}x")
    return out


def train_table(device: torch.device, data_dir: str, dataset: str = "cifar10", batch: int = 512,
                steps: int = 50, profile: bool = False) -> dict:
    """Training images/s as train.py runs (ResNet-18, CIFAR stem): with the real on-device
    augmentation, with pre-augmented tensors, and the augmentation alone."""
    loader = data.pretrain_loader(dataset, data_dir, batch, 0, device)
    tau = data.DATASETS[dataset].tau
    out = {}

    rate = lambda fn: batch / seconds_per_call(fn, device, steps)    # images per second

    def endless():                     # epoch after epoch, as a long run sees them
        for e in range(10 ** 9):
            yield from loader.epoch(e)

    batches = endless()
    next_views = lambda: next(batches)
    out["augment_only"] = {"images_per_s": round(rate(next_views))}
    for method in L.METHODS:
        encoder, heads, units, opt, fmt = build("resnet18", method, device, "cifar")
        fixed = [x.contiguous(memory_format=fmt) for x in next_views()]
        pre = step_fn(encoder, heads, units, opt, *fixed, tau=tau)

        def with_aug():
            x1, x2 = (x.contiguous(memory_format=fmt) for x in next_views())
            step_fn(encoder, heads, units, opt, x1, x2, tau)()

        a, p = rate(with_aug), rate(pre)
        out[method] = {"with_augmentation": round(a), "pre_augmented": round(p),
                       "kept": round(a / p, 3)}
        if profile:                     # where the time goes: the top kernels of a few steps
            with torch.profiler.profile() as prof:
                for _ in range(5):
                    with_aug()
                sync(device)
            print(f"\n{method}: top operators over 5 steps")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12))
    print(f"\nResNet-18 (CIFAR stem) on {dataset}, batch {batch}, {device}: training images/s")
    print(f"augmentation alone: {out['augment_only']['images_per_s']:,} images/s")
    print("method   with augmentation   pre-augmented   kept   vs SimCLR")
    for method in L.METHODS:
        r = out[method]
        r["vs_simclr"] = round(r["with_augmentation"] / out["simclr"]["with_augmentation"], 2)
        print(f"{method:<7} {r['with_augmentation']:>18,}  {r['pre_augmented']:>14,}  "
              f"{100 * r['kept']:>4.0f}%   {r['vs_simclr']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["stages", "memory", "speed", "train", "all"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None,
                   help="memory: images per step (default 64 on CUDA, 2 on the CPU)")
    p.add_argument("--size", type=int, default=224, help="memory: input resolution")
    p.add_argument("--data-dir", default="data", help="train: where CIFAR-10 is")
    p.add_argument("--dataset", default="cifar10", help="train: cifar10, or synthetic (no data)")
    p.add_argument("--profile", action="store_true", help="train: print the top CUDA kernels")
    p.add_argument("--out", default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    timed = args.what in ("speed", "train")
    if timed and device.type != "cuda":
        raise SystemExit(f"benchmark.py {args.what}: timings are taken on CUDA only (no GPU here)")
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
    if args.what in ("stages", "all"):
        results["stages"] = stages_table()
    if args.what in ("memory", "all"):
        batch = args.batch or (64 if device.type == "cuda" else 2)
        results["memory"] = memory_table(["resnet50", "presnet50"], batch, args.size, device)
    if args.what in ("speed", "all") and device.type == "cuda":
        results["speed"] = speed_table(device)
    if args.what in ("train", "all") and device.type == "cuda":
        results["train"] = train_table(device, args.data_dir, args.dataset, profile=args.profile)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
