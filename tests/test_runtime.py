"""runtime.py: the device rule, and the GPU's settings (bf16 autocast, channels_last) exercised on
the CPU, so that the first run on a GPU is not the first run of that code."""

import pytest
import torch

import augment
import data
import local_units as L
import recipe
import runtime
import shapes
import train
from conftest import TINY, state
from cli import UserError


def test_auto_picks_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    for caps, bf16 in [({"avx512_bf16": True}, True), ({"amx_bf16": True}, True),
                       ({"avx512_f": True, "avx2": True}, False), ({}, False)]:
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        rt = runtime.setup("cpu")
        assert (rt.bf16, rt.channels_last, rt.dtype) == (bf16, True, torch.float32), caps
    rt = runtime.setup("cpu", precision="bf16", memory_format="contiguous")  # flags win
    assert rt.bf16 and not rt.channels_last
    rt = runtime.setup("cpu", precision="fp64")
    assert not rt.bf16 and rt.dtype == torch.float64
    assert rt.prepare(torch.zeros(2, 3, 4, 4)).dtype == torch.float64


def test_asking_for_a_device_this_machine_lacks_names_the_flag():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="--device cuda"):
        runtime.setup("cuda")


def one_step(encoder, heads, units, views, bf16: bool):
    """Losses and per-module gradients of one train_step: float32 contiguous, or bf16 autocast
    with channels_last (the GPU's settings)."""
    fmt = torch.channels_last if bf16 else torch.contiguous_format
    encoder.to(memory_format=fmt), heads.to(memory_format=fmt)
    encoder.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
    x1, x2 = (v.contiguous(memory_format=fmt) for v in views)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        losses = torch.stack(L.train_step(encoder.stages, heads, units, x1, x2, 0.5))
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in [*encoder.stages, *heads]]
    return losses.float(), grads


@pytest.mark.parametrize("method", ["simclr", "loco"])
def test_a_bf16_channels_last_step_gives_the_fp32_losses_and_gradients(method, trained):
    """bf16 keeps 8 significant bits (relative rounding 2^-9); through some twenty layers forward
    and back a step's gradients move by 3-14% (measured on an AMD EPYC and an AMX Xeon). A unit's
    gradient lost or sent to the wrong stage moves a stage's gradient by 50% or more, so 25%
    separates the two. The encoder is a trained one: at initialisation every image maps to nearly
    the same z, the loss's gradient is a small difference of large terms, and bf16 resolves only
    half of it. So are the heads: SimCLR's is the trained LoCo run's top head (its conv block,
    pooling and MLP: SimCLR with Table 4's "1 conv block" decoder); with an untrained head its
    lowest stage moved by 33% on the AMX Xeon."""
    torch.manual_seed(0)
    cpu = runtime.Runtime(torch.device("cpu"), False, torch.float32, False)
    run = recipe.build({"method": method, "arch": "resnet18", "width": 0.125,
                        "dataset": "synthetic", "decoder": "block"}, cpu)
    encoder, heads, units = run.encoder, run.heads, run.units
    encoder.load_state_dict(state(trained)["encoder"])
    trained_heads = state(trained)["heads"]           # LoCo's four, the last on the top stage
    if method == "loco":
        heads.load_state_dict(trained_heads)
    else:
        heads[0].load_state_dict({k[2:]: v for k, v in trained_heads.items() if k[:2] == "3."})
    aug = augment.SimCLRAugment.for_dataset(data.DATASETS["synthetic"])
    images = shapes.make_synthetic(32, seed=5)[0]
    views = aug(torch.cat([images, images]), torch.Generator().manual_seed(0)).chunk(2)
    l32, g32 = one_step(encoder, heads, units, views, bf16=False)
    l16, g16 = one_step(encoder, heads, units, views, bf16=True)
    assert ((l16 - l32).abs() / l32).max() < 1e-2, (l16, l32)
    errors = [((a - b).norm() / b.norm()).item() for a, b in zip(g16, g32)]
    stages = len(encoder.stages)         # the heads' MLPs on trained features: up to 23% here
    assert max(errors[:stages]) < 0.25 and max(errors[stages:]) < 0.4, errors


def test_a_short_bf16_channels_last_run_lowers_every_units_loss(tmp_path):
    train.main([*TINY, "--method", "loco", "--epochs", "6", "--precision", "bf16",
                "--memory-format", "channels_last", "--out", str(tmp_path)])
    with open(tmp_path / "log.csv") as f:
        rows = [[float(v) for v in line.split(",")[3:]] for line in f.read().splitlines()[1:]]
    losses = torch.tensor(rows)                       # (24 steps, 4 units)
    assert (losses[-4:].mean(0) < losses[:4].mean(0) - 0.05).all(), losses
