"""The executable specification of the method: gradient reach, reference equality, forward once,
InfoNCE, staged encoders, memory, and one process against two.

    python -m pytest -q test_loco.py
"""

import copy
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import local_units as L
import model
from benchmark import SavedBytes
from conftest import free_port
from losses import info_nce

TAU = 0.5


def tiny(arch: str, stem: str = "cifar") -> model.StagedEncoder:
    return model.build_encoder(arch, width=0.125, stem=stem)


def setup(arch: str, method: str, seed: int = 0, stem: str = "cifar"):
    torch.manual_seed(seed)
    encoder = tiny(arch, stem)
    units = L.make_units(method, len(encoder.stages))
    return encoder, L.make_heads(method, encoder.channels, units), units


def views(n: int = 4, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, size, size, generator=g).unbind(0)


def grads(modules) -> list[torch.Tensor | None]:
    return [p.grad for m in modules for p in m.parameters()]


def reaches(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# 1. Gradient reach --------------------------------------------------------------------------------

@pytest.mark.parametrize("method", L.METHODS)
def test_each_unit_loss_reaches_exactly_its_stages_and_head(method):
    encoder, heads, units = setup("resnet18", method)
    x1, x2 = views()
    for i, u in enumerate(units):
        encoder.zero_grad(set_to_none=True), heads.zero_grad(set_to_none=True)
        L.train_step(encoder, [heads[i]], [u], x1, x2, TAU)
        reached = [k for k, s in enumerate(encoder.stages) if reaches(s)]
        assert reached == list(range(u.first, u.last + 1)), (method, i)
        assert [j for j, h in enumerate(heads) if reaches(h)] == [i]


def test_lower_stage_would_be_reached_without_the_cut():
    """Control: the check above can see leakage. Attached end to end, LoCo's unit 2 (stages 2, 3)
    would send gradient into stages 0 and 1."""
    encoder, heads, units = setup("resnet18", "loco")
    x1, x2 = views()
    h = torch.cat([x1, x2])
    for stage in encoder.stages[:units[2].last + 1]:
        h = stage(h)
    info_nce(heads[2](h), TAU).backward()
    assert reaches(encoder.stages[0]) and reaches(encoder.stages[1])


def test_loco_shares_every_stage_but_the_first_between_two_units():
    units = L.make_units("loco", 4)
    shared = [sum(u.first <= k <= u.last for u in units) for k in range(4)]
    assert shared == [1, 2, 2, 2]
    assert L.make_units("gim", 4) == [L.Unit(k, k) for k in range(4)]
    assert L.make_units("simclr", 4) == [L.Unit(0, 3)]


# 2. Reference equality ----------------------------------------------------------------------------

def reference_grads(encoder, heads, units, x1, x2):
    """Independent reference: one fully attached forward; each unit's loss differentiated alone
    with respect to its own parameters (its stages and its head), and the results summed."""
    outputs, h = [], torch.cat([x1, x2])
    for stage in encoder.stages:
        h = stage(h)
        outputs.append(h)
    total = {p: torch.zeros_like(p) for p in [*encoder.parameters(), *heads.parameters()]}
    for u, head in zip(units, heads):
        own = [p for s in encoder.stages[u.first:u.last + 1] for p in s.parameters()]
        own += list(head.parameters())
        loss = info_nce(head(outputs[u.last]), TAU)
        for p, g in zip(own, torch.autograd.grad(loss, own, retain_graph=True)):
            total[p] += g
    return [total[p] for p in [*encoder.parameters(), *heads.parameters()]]


@pytest.mark.parametrize("arch,stem,size", [("resnet18", "cifar", 32), ("resnet50", "imagenet", 64),
                                            ("presnet50", "imagenet", 64)])
@pytest.mark.parametrize("method", L.METHODS)
def test_memory_efficient_step_equals_loss_by_loss_reference(method, arch, stem, size):
    if arch not in model.ENCODERS:
        pytest.skip(f"{arch} not built yet")
    encoder, heads, units = setup(arch, method, stem=stem)
    encoder, heads = encoder.double(), heads.double()  # float64: differences are bugs, not rounding
    ref_encoder, ref_heads = copy.deepcopy(encoder), copy.deepcopy(heads)
    x1, x2 = (x.double() for x in views(size=size))
    L.train_step(encoder, heads, units, x1, x2, TAU)
    expected = reference_grads(ref_encoder, ref_heads, units, x1, x2)
    got = grads([encoder, heads])
    assert all(g is not None for g in got)
    for g, r in zip(got, expected):
        assert (g - r).norm() <= 1e-5 * r.norm() + 1e-12


# 3. Forward once ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", L.METHODS)
def test_every_stage_and_head_runs_forward_once_per_step(method):
    encoder, heads, units = setup("resnet18", method)
    calls = [0] * (len(encoder.stages) + len(heads))
    for i, m in enumerate([*encoder.stages, *heads]):
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    L.train_step(encoder, heads, units, *views(), TAU)
    assert calls == [1] * len(calls)


# 4. InfoNCE ---------------------------------------------------------------------------------------

def naive_info_nce(z: torch.Tensor, tau: float) -> torch.Tensor:
    z = torch.nn.functional.normalize(z, dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = [torch.dot(z[i], z[j]) / tau for j in range(n2) if j != i]
        total = total - (torch.dot(z[i], z[pos]) / tau - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


def test_info_nce_equals_a_per_anchor_loop():
    z = torch.randn(10, 7, dtype=torch.float64)
    torch.testing.assert_close(info_nce(z, 0.3), naive_info_nce(z, 0.3))


def test_info_nce_of_identical_embeddings_is_log_of_2n_minus_1():
    z = torch.ones(12, 5)
    assert info_nce(z, 0.1).item() == pytest.approx(math.log(11), rel=1e-6)


def test_info_nce_is_low_when_positives_align_and_negatives_do_not():
    z = torch.eye(6).repeat(2, 1)         # each image's two views identical, images orthogonal
    mispaired = torch.cat([z[:6], z[6:].roll(1, 0)])   # second views shifted to other images
    assert info_nce(z, 0.1) < 1e-3 and info_nce(mispaired, 0.1) > 5


# 5. Staged encoders -------------------------------------------------------------------------------

NATIVE_SHAPES = {  # arch, stem -> per-stage (H, W) at the native input size
    ("resnet18", "cifar"): [32, 16, 8, 4],
    ("resnet18", "imagenet"): [56, 28, 14, 7],
    ("resnet50", "imagenet"): [56, 28, 14, 7],
    ("presnet50", "imagenet"): [56, 36, 24, 16, 12, 8],
    ("shufflenet_v2_50", "imagenet"): [56, 28, 14, 7],
}


@pytest.mark.parametrize("arch,stem", list(NATIVE_SHAPES))
def test_stages_chain_to_the_full_forward_with_the_expected_shapes(arch, stem):
    if arch not in model.ENCODERS:
        pytest.skip(f"{arch} not built yet")
    torch.manual_seed(0)
    encoder = tiny(arch, stem).eval()
    x = torch.randn(2, 3, encoder.input_size, encoder.input_size)
    h, shapes = x, []
    with torch.no_grad():
        for stage in encoder.stages:
            h = stage(h)
            shapes.append(tuple(h.shape[1:]))
        assert torch.equal(h, encoder(x))
    assert shapes == [(c, s, s) for c, s in zip(encoder.channels, NATIVE_SHAPES[arch, stem])]


@pytest.mark.parametrize("arch,gmacs", [("resnet50", 4.09), ("presnet50", 4.16),
                                        ("shufflenet_v2_50", 2.3)])
def test_encoders_cost_their_published_flops_at_224(arch, gmacs):
    """ResNet-50 as torchvision counts it; PResNet-50 as the paper's Table 6 (4.16 G); ShuffleNet
    v2-50 as its paper (2.3 G). A dropped group or a misplaced stride moves these by far more."""
    from torch.utils.flop_counter import FlopCounterMode
    encoder = model.build_encoder(arch).eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        encoder(torch.randn(1, 3, 224, 224))
    assert flops.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.01)


def test_full_width_resnet50_has_the_published_size():
    encoder = model.resnet50()
    assert encoder.channels == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in encoder.parameters()) == 23_508_032  # torchvision's, minus fc


# 6. Memory, counted -------------------------------------------------------------------------------

def peak_saved_bytes(method: str) -> int:
    encoder, heads, units = setup("resnet50", method, stem="imagenet")
    with SavedBytes() as mem:
        L.train_step(encoder, heads, units, *views(n=2, size=64), TAU)
    assert mem.live == 0                  # every saved tensor was freed by the end of the step
    return mem.peak


def test_peak_activation_memory_orders_simclr_above_loco_above_gim():
    simclr, loco, gim = (peak_saved_bytes(m) for m in ("simclr", "loco", "gim"))
    assert simclr > loco > gim, (simclr, loco, gim)


# 7. Distributed: two processes equal one ----------------------------------------------------------

def distributed_step(rank: int, world: int, port: int, method: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        encoder, heads, units = setup("resnet18", method)
        # Eval-mode BatchNorm normalises each sample alone, so per-process batch statistics do
        # not enter: what is compared is the loss's gather and the gradient averaging.
        encoder.eval(), heads.eval()
        x1, x2 = views(n=8)
        b = len(x1) // world
        rows = slice(rank * b, (rank + 1) * b)
        losses = L.train_step(encoder, heads, units, x1[rows], x2[rows], TAU)
        flat = torch.cat([g.flatten() for g in grads([encoder, heads])] + [torch.stack(losses)])
        dist.all_reduce(flat)
        if rank == 0:
            out["result"] = flat / world  # averaged gradients, then the averaged losses
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["simclr", "loco"])
def test_two_processes_with_half_a_batch_each_equal_one_process_with_all(method):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(distributed_step, args=(2, free_port(), method, out), nprocs=2)
        two = out["result"]
    one = {}
    distributed_step(0, 1, free_port(), method, one)
    torch.testing.assert_close(two, one["result"], rtol=1e-4, atol=1e-6)
