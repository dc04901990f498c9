"""Where a run computes: the device, the number format and the memory layout, by one rule.

    rt = runtime.setup(device=None, precision="auto", memory_format="auto")
    rt.device, rt.rank, rt.world           # one process, or one of torchrun's
    with rt.autocast(): ...                # bf16 autocast where the rule chose it, else nothing
    rt.prepare(x)                          # a batch in the run's dtype and memory format

The rule, measured (docs/speed-memory.md): channels_last on CUDA and on the CPU (ResNet-18 x0.25 on a
2-core AMD EPYC: +19% to +34% in float32); bf16 autocast on CUDA and on CPUs that compute bf16
natively (AVX512_BF16 or AMX: 1.6x to 1.9x over float32 channels_last there). On a CPU without it, oneDNN emulates
bf16 and the same step runs 2x (AVX-512) to 10x (AVX2) slower than float32, so such CPUs get
float32. MPS gets float32 in the default layout: not measured here, so the safe choice. Flags
override the rule: --precision fp32|bf16 (or fp64, to check exactness), --memory-format contiguous|channels_last.

One process, or torchrun: torchrun sets RANK, WORLD_SIZE and LOCAL_RANK, and `setup` then joins
the process group (NCCL on CUDA, gloo elsewhere). With --pipeline P the world is D replicas of a
P-process pipeline (`mesh`): the data dimension and the pipe dimension, as torch's DeviceMesh
names them. What truly differs on CUDA stays here: the GPU of this process, cuDNN's autotuner
and TF32 matmuls.
"""

import contextlib
import os
import platform
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from cli import UserError

PRECISIONS = ("auto", "fp32", "bf16", "fp64")  # fp64: for checking exactness, not for training
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool                   # bf16 autocast around forward and backward
    dtype: torch.dtype           # of weights and inputs: float32, or float64 to check exactness
    channels_last: bool          # activations and weights in NHWC
    rank: int = 0                # this process, among all of the run's
    world: int = 1
    stages: int = 1              # processes of the pipeline (pipeline.py): each holds stages
    data_group: object = None    # the data-parallel group: None, all processes; in a pipeline,
                                 # the processes of this position in every replica (`mesh`)
    pipe_group: object = None    # in a pipeline: the processes of this replica

    @property
    def data_world(self) -> int:
        """Processes that split the batch: the loss's negatives, BatchNorm, gradient averaging."""
        return self.world // self.stages

    @property
    def data_rank(self) -> int:
        return self.rank // self.stages

    @property
    def stage_rank(self) -> int:
        """This process's place in the pipeline (0: reads the data, holds the first stages)."""
        return self.rank % self.stages

    def peer(self, stage_rank: int) -> int:
        """The global rank of this replica's process at another place in the pipeline."""
        return self.rank - self.stage_rank + stage_rank

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.bf16)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A batch of inputs in the run's dtype and memory format."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

    def sync(self) -> None:
        """Wait for queued device work: timings must not stop the clock early."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()

    def __str__(self) -> str:
        where = f"{self.world} process(es)"
        if self.stages > 1:
            where = f"a pipeline of {self.stages} processes" + (
                f" x {self.data_world} replicas" if self.data_world > 1 else "")
        return (f"{where} on {self.device}, "
                f"{'bf16 autocast' if self.bf16 else str(self.dtype).removeprefix('torch.')}, "
                f"{'channels_last' if self.channels_last else 'contiguous'}")


def device_name(device: torch.device) -> str:
    """What computes: the GPU's name, or the CPU's model name and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores" if device.type == "cpu" else f"{device.type}: {model}"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware, not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        caps = torch.cpu.get_capabilities()
        return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
    return False


def pick_device(name: str | None = None, local_rank: int = 0, world: int = 1) -> torch.device:
    """--device if given; else this process's GPU, else MPS (one process only), else the CPU."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise UserError(f"--device {name}: not a device (cpu, cuda, cuda:1, mps)", flag=True)
        available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
        if device.type in available and not available[device.type]():
            raise UserError(f"--device {name}: no {device.type} device here; leave --device "
                            f"out to use what this machine has", flag=True)
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if torch.backends.mps.is_available() and world == 1:
        return torch.device("mps")
    return torch.device("cpu")


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return tuple(int(os.environ.get(k, d)) for k, d in
                 (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def replicas(world: int, pipeline: int) -> int:
    """How many copies of a P-process pipeline `world` processes hold (D of world = D x P); 1
    without a pipeline means the world is data parallel alone. Refuses a world that does not
    split."""
    if world % pipeline:
        raise UserError(f"--pipeline {pipeline}: {world} process"
                        f"{' does' if world == 1 else 'es do'} not make whole pipelines; "
                        f"start a multiple of {pipeline} (torchrun --nproc_per_node {pipeline} "
                        f"for one, {2 * pipeline} for two replicas)", flag=True)
    return world // pipeline


def mesh(world: int, pipeline: int) -> tuple[list[list[int]], list[list[int]]]:
    """World = D replicas x P pipeline processes, rank = d * P + p (a replica's processes are
    neighbours, as torchrun numbers the processes of one machine). Returns the data groups (one
    per place p in the pipeline: the p-th process of every replica, which hold the same stages
    and split the batch D ways) and the pipe groups (one per replica: its P processes, which pass
    activations up and gradients down)."""
    D = replicas(world, pipeline)
    data = [[d * pipeline + p for d in range(D)] for p in range(pipeline)]
    pipe = [[d * pipeline + p for p in range(pipeline)] for d in range(D)]
    return data, pipe


def setup(device: str | None = None, precision: str = "auto", memory_format: str = "auto",
          distributed: bool = False, pipeline: int = 1) -> Runtime:
    """The runtime of this process. distributed=True joins torchrun's process group if any;
    pipeline=P: the processes are D replicas of a pipeline of P groups of stages (pipeline.py)."""
    rank, world, local = torchrun_env() if distributed else (0, 1, 0)
    replicas(world, pipeline)
    dev = pick_device(device, local, world)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune each convolution once
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    bf16 = native_bf16(dev) if precision == "auto" else precision == "bf16"
    nhwc = dev.type in ("cuda", "cpu") if memory_format == "auto" else memory_format == "channels_last"
    dtype = torch.float64 if precision == "fp64" else torch.float32
    # A pipeline's processes hold different stages: the loss's negatives, BatchNorm and the
    # gradients sync only with the processes of the other replicas that hold the same stages.
    data_group, pipe_group = groups(world, pipeline) if pipeline > 1 else (None, None)
    return Runtime(dev, bf16, dtype, nhwc, rank, world, pipeline, data_group, pipe_group)


def groups(world: int, pipeline: int) -> tuple[object, object]:
    """This process's data group and pipe group of `mesh` (every process creates all of them,
    as torch.distributed requires, and keeps its own)."""
    data, pipe = mesh(world, pipeline)
    return (dist.new_subgroups_by_enumeration(data)[0],
            dist.new_subgroups_by_enumeration(pipe)[0])


class AllReduce(torch.autograd.Function):
    """Sum over a group's processes; its backward sums the gradients, as every process's loss
    uses the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group=None) -> torch.Tensor:
        x, ctx.group = x.clone(), group
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with statistics over every process's batch, where nn.SyncBatchNorm cannot run (it
    needs CUDA). Its all-reduce carries gradient back, so N processes normalise and differentiate
    exactly as one process holding all N batches. Same parameters and buffers as BatchNorm.
    `group`: the data-parallel processes (None: all)."""

    group = None

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # Statistics in float32 (float64 when checking exactness) whatever the autocast: a bf16
        # sum over a global batch keeps three digits, and the running averages are float32.
        # The output returns in the input's dtype, as BatchNorm's own kernel does under autocast.
        with torch.autocast(x.device.type, enabled=False):
            h = x.to(torch.promote_types(x.dtype, self.weight.dtype))
            dims, shape = [0, *range(2, h.dim())], [1, -1] + [1] * (h.dim() - 2)
            n = h.numel() // h.shape[1] * dist.get_world_size(self.group)
            mean = AllReduce.apply(h.sum(dims), self.group) / n        # (C,), over all processes
            # Two passes: E[x^2] - E[x]^2 in float32 loses enough digits to move gradients by 1e-2.
            var = AllReduce.apply((h - mean.view(shape)).pow(2).sum(dims), self.group) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype),
                                       self.momentum)
                self.num_batches_tracked += 1
            scale = self.weight * torch.rsqrt(var + self.eps)
            y = h * scale.view(shape) + (self.bias - mean * scale).view(shape)
        return y.to(x.dtype)


def sync_batchnorm(module: nn.Module, device: torch.device, group=None) -> nn.Module:
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum)
            bn.load_state_dict(child.state_dict())
            bn.group = group
            setattr(module, name, bn)
        else:
            sync_batchnorm(child, device, group)
    return module


def average_gradients(params: list[nn.Parameter], rt: Runtime) -> None:
    """Average every gradient over the data-parallel processes, once per step: LoCo
    backpropagates several losses per step, so DDP's per-backward hooks would reduce too early or
    twice. One flat all-reduce."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat, group=rt.data_group)
    flat /= rt.data_world
    for g, f in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(f.view_as(g))


def compile_in_place(modules: list[nn.Module]) -> None:
    """torch.compile each stage and head in place (no "_orig_mod." prefix in state_dict keys).

    LoCo backpropagates twice through a shared stage, the first time with retain_graph=True, and
    two settings make that correct: no donated buffers (they refuse retain_graph), and static
    shapes: with automatic dynamic shapes, inductor (torch 2.14, CPU) gave wrong weight gradients
    on the second backward through a stage compiled after a same-code stage of another shape.
    tests/test_train.py compares a compiled LoCo step with an eager one."""
    import torch._functorch.config
    torch._functorch.config.donated_buffer = False
    for m in modules:
        m.compile(dynamic=False)


def provenance(rt: "Runtime | None" = None) -> dict:
    """What produced a result: the code's git commit (and whether it had local changes), torch,
    and the machine. Stored in every checkpoint and evaluation JSON."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True,
                                    timeout=10).stdout.strip()
    try:
        commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--", "*.py"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    out = {"commit": commit or "unknown", "uncommitted_changes": dirty, "torch": str(torch.__version__)}
    if rt is not None:
        out.update(device=device_name(rt.device), runtime=str(rt))
    return out


def peer_lost(e: BaseException) -> bool:
    """Whether an error raised in a collective means another process of the run has gone: gloo
    reports "Connection closed/reset by peer" as a RuntimeError, NCCL raises DistError. The
    process that failed prints its own line; the others stop with this one."""
    return isinstance(e, dist.DistError) or "gloo" in str(e) or "by peer" in str(e)


def finish() -> None:
    """The end of a run that succeeded, on every process together. Without the barrier a process
    that is done (rank 1 after the last step) exits 0 while another still works (rank 0 writing
    the last checkpoint); if that one then fails, torchrun's agent of the first, its workers
    done, waits in its exit barrier for an agent that never comes (300 s, then an error): a
    finished multi-node job that hangs. After the barrier either every process has succeeded or
    the barrier fails on the survivors, which stop at once (train.main)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group after a failure of this process (the others learn it from their
    next message)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
