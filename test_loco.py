"""The executable specification of the method: gradient reach, unit tables, reference equality,
one weight pass per piece, forward once, decoders, InfoNCE, staged encoders, memory, and one
process against two. Every variant of Tables 4 and 5 is held to the same checks.

    python -m pytest -q test_loco.py
"""

import copy
import math

import pytest
import torch
import torch.distributed as dist

import local_units as L
import model
import recipe
import runtime
from memory import LiveBytes, SavedBytes
from conftest import free_port, processes
from losses import info_nce
from torch.utils.flop_counter import FlopCounterMode

TAU = 0.5
# Each way this code can train, as recipe.build's configuration (train.py's flags).
VARIANTS = {
    "simclr": {"method": "simclr"},
    "gim": {"method": "gim"},
    "loco": {"method": "loco"},
    "loco, three units": {"method": "loco", "top_unit": False},
    "loco, upper grad only": {"method": "loco", "sharing": "upper"},
    "loco, upper, three units": {"method": "loco", "sharing": "upper", "top_unit": False},
    "loco, sharing 1 block": {"method": "loco", "sharing": "1block"},
    "loco, sharing 1 block, three units": {"method": "loco", "sharing": "1block", "top_unit": False},
    "loco, sharing 2 blocks": {"method": "loco", "sharing": "2blocks"},
    "loco, soft sharing": {"method": "loco", "sharing": "soft", "soft_coef": 1e-2},
    "simclr, 1 conv block, 4-layer MLP": {"method": "simclr", "decoder": "block", "mlp_layers": 4},
    "gim, MLP-only decoders": {"method": "gim", "decoder": "none"},
    "gim, 2 conv blocks": {"method": "gim", "decoder": "2blocks"},
    "gim, block without downsampling": {"method": "gim", "decoder": "block-nods"},
    "gim, one stage": {"method": "gim", "decoder": "stage"},
    "gim, full network": {"method": "gim", "decoder": "full"},
    "loco, MLP-only decoders": {"method": "loco", "decoder": "none"},
    "loco, MLP-only decoders on the top stage": {"method": "loco", "top_decoder": "none"},
    "gim, MLP-only decoder on the top stage": {"method": "gim", "top_decoder": "none"},
}


def setup(cfg: dict, arch: str = "resnet18", stem: str = "cifar", seed: int = 0,
          dtype: torch.dtype = torch.float32) -> recipe.Run:
    """A tiny encoder (1/8 width) with the units and heads of `cfg`, on the CPU."""
    torch.manual_seed(seed)
    rt = runtime.Runtime(torch.device("cpu"), bf16=False, dtype=dtype, channels_last=False)
    dataset = "cifar10" if stem == "cifar" else "imagefolder"
    return recipe.build({"arch": arch, "width": 0.125, "dataset": dataset, **cfg}, rt)


def views(n: int = 4, size: int = 32, seed: int = 1, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, n, 3, size, size, generator=g).to(dtype).unbind(0)


def step(run: recipe.Run, x1, x2, units=None, heads=None) -> list[torch.Tensor]:
    return L.train_step(run.pieces, run.heads if heads is None else heads,
                        run.units if units is None else units, x1, x2, TAU)


def grads(modules) -> list[torch.Tensor | None]:
    return [p.grad for m in modules for p in m.parameters()]


def reaches(module) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


# 1. Gradient reach --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_each_unit_loss_reaches_exactly_the_pieces_it_learns_and_its_head(variant):
    run = setup(VARIANTS[variant])
    x1, x2 = views()
    for i, u in enumerate(run.units):
        run.encoder.zero_grad(set_to_none=True), run.heads.zero_grad(set_to_none=True)
        step(run, x1, x2, [u], run.heads[i:i + 1])
        reached = [j for j, piece in enumerate(run.pieces) if reaches(piece)]
        assert reached == sorted(u.learns), (variant, i)
        assert [j for j, h in enumerate(run.heads) if reaches(h)] == [i]


def test_lower_stage_would_be_reached_without_the_cut():
    """Control: the check above can see leakage. Attached end to end, LoCo's unit 2 (stages 2, 3)
    would send gradient into stages 0 and 1."""
    run = setup(VARIANTS["loco"])
    x1, x2 = views()
    h = torch.cat([x1, x2])
    for stage in run.encoder.stages[:run.units[2].last + 1]:
        h = stage(h)
    info_nce(run.heads[2](h), TAU).backward()
    assert reaches(run.encoder.stages[0]) and reaches(run.encoder.stages[1])


def test_upper_grad_only_still_carries_the_lower_units_gradient_through_the_shared_stage():
    """Table 5's "upper layer grad only": unit 0 (stages 1-2) no longer trains stage 2's weights,
    but its gradient still crosses stage 2 to reach stage 1, as much as under hard sharing."""
    x1, x2 = views()
    upper, hard = setup(VARIANTS["loco, upper grad only"]), setup(VARIANTS["loco"])
    for run in (upper, hard):
        step(run, x1, x2, run.units[:1], run.heads[:1])
    assert not reaches(upper.encoder.stages[1]) and reaches(hard.encoder.stages[1])
    for p, q in zip(upper.encoder.stages[0].parameters(), hard.encoder.stages[0].parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)


# 2. Unit tables -----------------------------------------------------------------------------------

def table(units: list[L.Unit]) -> list[tuple]:
    return [(u.first, u.last, sorted(u.learns)) for u in units]


def test_loco_shares_every_stage_but_the_first_and_without_the_top_unit_the_top_stage_too():
    assert table(L.make_units("loco", [0, 1, 2, 3])) == [
        (0, 1, [0, 1]), (1, 2, [1, 2]), (2, 3, [2, 3]), (3, 3, [3])]
    assert table(L.make_units("loco", [0, 1, 2, 3], top_unit=False)) == [   # the paper's Fig. 1
        (0, 1, [0, 1]), (1, 2, [1, 2]), (2, 3, [2, 3])]
    assert L.make_units("gim", [0, 1, 2, 3]) == [L.Unit(k, k) for k in range(4)]
    assert L.make_units("simclr", [0, 1, 2, 3]) == [L.Unit(0, 3)]


def test_upper_grad_only_gives_each_shared_stage_to_the_unit_above():
    assert table(L.make_units("loco", [0, 1, 2, 3], sharing="upper")) == [
        (0, 1, [0]), (1, 2, [1]), (2, 3, [2]), (3, 3, [3])]
    assert table(L.make_units("loco", [0, 1, 2, 3], top_unit=False, sharing="upper")) == [
        (0, 1, [0]), (1, 2, [1]), (2, 3, [2, 3])]      # nobody above stage 4: its unit keeps it


def test_sharing_blocks_cuts_each_stage_after_its_first_blocks_and_shares_only_those():
    run = setup(VARIANTS["loco, sharing 1 block"], arch="resnet50", stem="imagenet")
    assert run.stage_of == [0, 1, 1, 2, 2, 3, 3]
    assert [len(p) for p in run.pieces] == [4, 1, 3, 1, 5, 1, 2]   # stem + 3 blocks; 4, 6, 3 blocks
    assert table(run.units) == [(0, 1, [0, 1]), (1, 3, [1, 2, 3]), (3, 5, [3, 4, 5]), (5, 6, [5, 6])]
    two = setup({"method": "loco", "sharing": "2blocks"}, arch="resnet50", stem="imagenet")
    assert [len(p) for p in two.pieces] == [4, 2, 2, 2, 4, 2, 1]
    # ResNet-18's stages hold two blocks: "2blocks" shares whole stages there, Table 5's LoCo row
    # (the ablation table reports it so)
    r18, loco = setup({"method": "loco", "sharing": "2blocks"}), setup({"method": "loco"})
    assert r18.stage_of == loco.stage_of == [0, 1, 2, 3] and r18.units == loco.units
    # the chained pieces compute the encoder
    x = torch.randn(2, 3, 64, 64)
    run.encoder.eval()
    h = x
    for piece in run.pieces:
        h = piece(h)
    torch.testing.assert_close(h, run.encoder(x))


def test_soft_sharing_gives_each_lower_unit_its_own_copy_of_the_stage_above():
    run = setup(VARIANTS["loco, soft sharing"])
    assert table(run.units) == [(0, 0, [0]), (1, 1, [1]), (2, 2, [2]), (3, 3, [3])]
    assert [h.tied_to for h in run.heads] == [1, 2, 3, None]
    for head in run.heads[:3]:                   # initialised identical, but its own weights
        stage = run.encoder.stages[head.tied_to]
        assert all(torch.equal(p, q) and p is not q
                   for p, q in zip(stage.parameters(), head.tied.parameters()))
    three = setup({**VARIANTS["loco, soft sharing"], "top_unit": False})
    assert [h.tied_to for h in three.heads] == [1, 2, None]   # stage 4 belongs to unit 3 alone


def test_tie_adds_the_gradient_of_the_weighted_squared_difference_to_both_copies():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    a.weight.grad = torch.ones(2, 3)
    L.tie(a, b, 0.1)
    wa, wb = a.weight.detach().clone().requires_grad_(), b.weight.detach().clone().requires_grad_()
    (0.1 * (wa - wb).pow(2).sum()).backward()
    torch.testing.assert_close(a.weight.grad, 1 + wa.grad)
    torch.testing.assert_close(b.weight.grad, wb.grad)
    torch.testing.assert_close(b.bias.grad, -a.bias.grad)


# 3. Reference equality ----------------------------------------------------------------------------

def reference_grads(run: recipe.Run, x1, x2) -> list[torch.Tensor]:
    """Independent reference: one fully attached forward through the pieces; each unit's loss
    differentiated alone with respect to the parameters it learns (its pieces' and its head's),
    the results summed; plus, under soft sharing, the gradient of each tie's penalty."""
    outputs, h = [], torch.cat([x1, x2])
    for piece in run.pieces:
        h = piece(h)
        outputs.append(h)
    total = {p: torch.zeros_like(p) for p in run.params}
    for u, head in zip(run.units, run.heads):
        own = [p for j in sorted(u.learns) for p in run.pieces[j].parameters()]
        own += list(head.parameters())
        loss = info_nce(head(outputs[u.last]), TAU)
        for p, g in zip(own, torch.autograd.grad(loss, own, retain_graph=True)):
            total[p] += g
    for head in run.heads:
        if head.tied is not None:
            pairs = list(zip(run.pieces[head.tied_to].parameters(), head.tied.parameters()))
            penalty = head.tie_coef * sum((p - q).pow(2).sum() for p, q in pairs)
            flat = [t for pair in pairs for t in pair]
            for p, g in zip(flat, torch.autograd.grad(penalty, flat)):
                total[p] += g
    return [total[p] for p in run.params]


ENCODERS = [("resnet18", "cifar", 32), ("resnet50", "imagenet", 64), ("presnet50", "imagenet", 64)]
CASES = ([(m, *e) for e in ENCODERS for m in L.METHODS]
         + [(v, *ENCODERS[0]) for v in VARIANTS if v not in L.METHODS]
         + [("loco, sharing 2 blocks", *ENCODERS[1]), ("loco, upper grad only", *ENCODERS[2])])


@pytest.mark.parametrize("variant,arch,stem,size", CASES)
def test_memory_efficient_step_equals_loss_by_loss_reference(variant, arch, stem, size):
    run = setup(VARIANTS[variant], arch, stem, dtype=torch.float64)  # differences are bugs
    with torch.no_grad():                # soft sharing: copies that have drifted from their stage
        for head in run.heads:
            if head.tied is not None:
                for q in head.tied.parameters():
                    q.add_(0.01 * torch.randn_like(q))
    ref = copy.deepcopy(run)
    x1, x2 = views(size=size, dtype=torch.float64)
    step(run, x1, x2)
    expected = reference_grads(ref, x1, x2)
    got = grads([run.encoder, run.heads])
    assert all(g is not None for g in got)
    for g, r in zip(got, expected):
        assert (g - r).norm() <= 1e-10 * r.norm() + 1e-14


# 4. One weight pass per piece ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["simclr", "gim", "loco", "loco, three units",
                                     "loco, upper grad only", "loco, sharing 1 block"])
def test_every_piece_computes_its_weight_gradient_once_and_its_input_gradient_per_crossing(variant):
    """LoCo at SimCLR's compute: a shared piece's weight gradient comes from one backward pass
    over the summed output gradients of its units, and its input gradient is computed once for
    each unit that continues below it, and never where none does."""
    run = setup(VARIANTS[variant])
    weight_passes = {p: 0 for p in run.encoder.parameters()}
    input_passes = [0] * len(run.pieces)
    for p in weight_passes:
        p.register_hook(lambda g, p=p: weight_passes.__setitem__(p, weight_passes[p] + 1))
    for j, piece in enumerate(run.pieces):
        def count(module, args, j=j):
            if args[0].requires_grad:
                args[0].register_hook(lambda g: input_passes.__setitem__(j, input_passes[j] + 1))
        piece.register_forward_pre_hook(count)
    step(run, *views())
    assert set(weight_passes.values()) == {1}
    assert input_passes == [sum(u.first < j <= u.last for u in run.units)
                            for j in range(len(run.pieces))]


def parts_flops(run: recipe.Run, x1, x2) -> int:
    """What a step should cost, measured part by part: each piece's forward; its weight pass
    (gradient with respect to its parameters) once; one input pass (with respect to its input)
    per unit that crosses it, merged into the weight pass where a single unit both trains the piece
    and crosses it, as plain backpropagation does; each head's forward and backward with its loss."""
    count = lambda: FlopCounterMode(display=False)
    total, h = 0, torch.cat([x1, x2])
    for j, piece in enumerate(run.pieces):
        a = h.detach().requires_grad_(j > 0)
        with count() as f:
            h = piece(a)
        total += f.get_total_flops()
        g, params = torch.randn_like(h), list(piece.parameters())
        visiting = [u for u in run.units if u.first <= j <= u.last]
        crossing = sum(u.first < j for u in visiting)
        merged = len(visiting) == 1 and crossing == 1
        with count() as f:
            torch.autograd.grad(h, params + ([a] if merged else []), g, retain_graph=True)
        total += f.get_total_flops()
        for _ in range(0 if merged else crossing):
            with count() as f:
                torch.autograd.grad(h, [a], g, retain_graph=True)
            total += f.get_total_flops()
        for u, head in zip(run.units, run.heads):
            if u.last == j:
                top = h.detach().requires_grad_()
                with count() as f:
                    info_nce(head(top), TAU).backward(inputs=[*head.parameters(), top])
                total += f.get_total_flops()
    return total


@pytest.mark.parametrize("variant", ["simclr", "gim", "loco", "loco, three units",
                                     "loco, sharing 1 block"])
def test_a_step_costs_exactly_its_forward_one_weight_pass_per_piece_and_its_crossings(variant):
    """The same claim in arithmetic, counted: nothing is computed twice. (SimCLR's step costs
    exactly end-to-end backpropagation.)"""
    run = setup(VARIANTS[variant])
    x1, x2 = views()
    with FlopCounterMode(display=False) as f:
        step(run, x1, x2)
    assert f.get_total_flops() == parts_flops(copy.deepcopy(run), x1, x2)


# 5. Forward once, decoders ------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["simclr", "gim", "loco", "loco, sharing 1 block",
                                     "loco, soft sharing"])
def test_every_piece_and_head_runs_forward_once_per_step(variant):
    run = setup(VARIANTS[variant])
    modules = [*run.pieces, *run.heads]
    calls = [0] * len(modules)
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    step(run, *views())
    assert calls == [1] * len(calls)


def test_the_paper_decoders_are_the_default_one_strided_block_on_every_local_head():
    """Sec. 5.4/5.5: GIM's and LoCo's every head is one residual conv block with downsampling,
    then the 2-layer MLP; SimCLR's is the MLP alone. A default that drifted would train a variant."""
    for method in ("gim", "loco"):
        run = setup({"method": method})
        for head, unit in zip(run.heads, run.units):
            c = run.encoder.channels[run.stage_of[unit.last]]
            assert isinstance(head.convs, model.Bottleneck)
            assert head.convs.eval()(torch.randn(2, c, 8, 8)).shape == (2, c, 4, 4)   # stride 2
            assert sum(isinstance(m, torch.nn.Linear) for m in head.mlp) == 2
    assert isinstance(setup({"method": "simclr"}).heads[0].convs, torch.nn.Identity)


def test_decoders_have_the_depth_table_4_describes():
    run = setup({"method": "gim", "decoder": "block"})
    size = lambda m: sum(p.numel() for p in m.parameters())
    convs = lambda kind: setup({"method": "gim", "decoder": kind}).heads
    stages = run.encoder.stages
    assert [size(h.convs) for h in convs("none")] == [0] * 4
    assert size(convs("2blocks")[1].convs) == (size(convs("block")[1].convs)      # stride 2, then
                                                + size(convs("block-nods")[1].convs))  # stride 1
    assert [size(h.convs) for h in convs("stage")] == [size(s) for s in stages[1:]] + [0]
    assert [size(h.convs) for h in convs("full")] == [sum(size(s) for s in stages[k + 1:])
                                                      for k in range(4)]
    x = torch.randn(4, run.encoder.channels[1], 16, 16)
    assert convs("block")[1].convs(x).shape[-1] == 8 and convs("block-nods")[1].convs(x).shape[-1] == 16
    assert sum(isinstance(m, torch.nn.Linear) for m in setup(
        {"method": "simclr", "mlp_layers": 4}).heads[0].mlp) == 4
    deep = convs("stage")[0].convs          # own weights, not the encoder's stage
    assert all(p is not q for p, q in zip(deep.parameters(), stages[1].parameters()))


BLOCK = {"decoder": "block"}


@pytest.mark.parametrize("cfg,blocks", [
    ({"method": "loco", **BLOCK, "top_decoder": "none"}, [True, True, False, False]),  # S2 S3 S4 S4
    ({"method": "loco", **BLOCK, "top_decoder": "none", "top_unit": False}, [True, True, False]),
    ({"method": "gim", **BLOCK, "top_decoder": "none"}, [True, True, True, False]),    # S1..S4
    ({"method": "loco", "decoder": "none", "top_decoder": "block"}, [False, False, True, True]),
    ({"method": "loco", **BLOCK, "sharing": "soft", "top_decoder": "none"}, [True, True, False,
                                                                             False]),
])
def test_top_decoder_changes_the_heads_that_read_the_top_stage_and_no_other(cfg, blocks):
    """--top-decoder: the heads whose features come from the top stage (soft sharing: from their
    copy of it) get their own decoder; every other head keeps --decoder's."""
    run = setup(cfg)
    assert [isinstance(h.convs, model.Bottleneck) for h in run.heads] == blocks
    assert all(isinstance(h.convs, torch.nn.Identity) for h, b in zip(run.heads, blocks) if not b)


# 6. InfoNCE ---------------------------------------------------------------------------------------

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


# 7. Staged encoders -------------------------------------------------------------------------------

NATIVE_SHAPES = {  # arch, stem -> per-stage (H, W) at the native input size
    ("resnet18", "cifar"): [32, 16, 8, 4],
    ("resnet18", "imagenet"): [56, 28, 14, 7],
    ("resnet50", "imagenet"): [56, 28, 14, 7],
    ("presnet50", "imagenet"): [56, 36, 24, 16, 12, 8],
    ("shufflenet_v2_50", "imagenet"): [56, 28, 14, 7],
}


@pytest.mark.parametrize("arch,stem", list(NATIVE_SHAPES))
def test_stages_chain_to_the_full_forward_with_the_expected_shapes(arch, stem):
    torch.manual_seed(0)
    encoder = model.build_encoder(arch, width=0.125, stem=stem).eval()
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
    encoder = model.build_encoder(arch).eval()
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        encoder(torch.randn(1, 3, 224, 224))
    assert flops.get_total_flops() / 2e9 == pytest.approx(gmacs, rel=0.01)


def test_full_width_resnet50_has_the_published_size():
    encoder = model.resnet50()
    assert encoder.channels == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in encoder.parameters()) == 23_508_032  # torchvision's, minus fc


# 8. Memory, counted -------------------------------------------------------------------------------

def peak_saved_bytes(method: str) -> int:
    run = setup(VARIANTS[method], "resnet50", "imagenet")
    with SavedBytes() as mem:
        step(run, *views(n=2, size=64))
    assert mem.live == 0                  # every saved tensor was freed by the end of the step
    return mem.peak


def test_peak_activation_memory_orders_simclr_above_loco_above_gim():
    simclr, loco, gim = (peak_saved_bytes(m) for m in ("simclr", "loco", "gim"))
    assert simclr > loco > gim, (simclr, loco, gim)


def two_pass_step(run: recipe.Run, x1, x2) -> None:
    """The paper's step (Sec. 4.1), the independent baseline for memory: each unit backpropagates
    through all its stages at once, so a shared stage runs its whole backward twice, weights
    included, and nothing waits for the unit above."""
    visits = [sum(u.first <= j <= u.last for u in run.units) for j in range(len(run.pieces))]
    inputs, outputs, h = {}, {}, torch.cat([x1, x2])
    for j, piece in enumerate(run.pieces):
        inputs[j] = h.detach().requires_grad_(j > 0)
        h = outputs[j] = piece(inputs[j])
        for u, head in zip(run.units, run.heads):
            if u.last == j:
                top = h.detach().requires_grad_()
                info_nce(head(top), TAU).backward(inputs=[*head.parameters(), top])
                g = top.grad
                for i in range(u.last, u.first - 1, -1):
                    visits[i] -= 1
                    below = [inputs[i]] if i > u.first else []
                    torch.autograd.backward(outputs[i], g, retain_graph=visits[i] > 0,
                                            inputs=[*run.pieces[i].parameters(), *below])
                    if not visits[i]:
                        del inputs[i], outputs[i]
                    if below:
                        g, below[0].grad = below[0].grad, None


@pytest.mark.parametrize("variant", ["loco", "loco, three units"])
def test_one_weight_pass_costs_no_more_memory_than_the_held_output_gradient(variant):
    """The price of summing a shared stage's output gradients: one is held until the unit above
    delivers its own. All the memory of a step (activations, gradients, temporaries) may grow over
    the paper's two-pass step by at most the largest such held gradient, one piece's output."""
    run = setup(VARIANTS[variant], "resnet50", "imagenet", dtype=torch.float64)
    x, baseline = views(n=2, size=64, dtype=torch.float64), copy.deepcopy(run)
    with LiveBytes() as fused:
        step(run, *x)
    with LiveBytes() as two_pass:
        two_pass_step(baseline, *x)
    for g, r in zip(grads([run.encoder]), grads([baseline.encoder])):
        assert (g - r).norm() <= 1e-10 * r.norm()          # the same step, computed two ways
    with torch.no_grad():
        h, held = torch.cat(x), []
        for j, piece in enumerate(run.pieces):
            h = piece(h)
            if sum(u.first <= j <= u.last for u in run.units) > 1:
                held.append(h.nbytes)
    assert two_pass.peak > 0 and fused.peak <= two_pass.peak + max(held), (fused.peak,
                                                                           two_pass.peak, held)


# 9. Distributed: two processes equal one ----------------------------------------------------------

def distributed_step(rank: int, world: int, port: int, methods: list[str], out: str) -> None:
    """One process of `world`, with its share of each method's batch: rank 0 saves the averaged
    gradients, then the averaged losses, of each method to out/<method>.pt."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for method in methods:
            run = setup(VARIANTS[method])
            # Eval-mode BatchNorm normalises each sample alone, so per-process batch statistics
            # do not enter: what is compared is the loss's gather and the gradient averaging.
            run.encoder.eval(), run.heads.eval()
            x1, x2 = views(n=8)
            b = len(x1) // world
            rows = slice(rank * b, (rank + 1) * b)
            losses = step(run, x1[rows], x2[rows])
            flat = torch.cat([g.flatten() for g in grads([run.encoder, run.heads])]
                             + [torch.stack(losses)])
            dist.all_reduce(flat)
            if rank == 0:
                torch.save(flat / world, f"{out}/{method}.pt")
    finally:
        dist.destroy_process_group()


DISTRIBUTED = ["simclr", "loco"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every method of DISTRIBUTED on two processes, in one launch."""
    out = tmp_path_factory.mktemp("distributed")
    processes(distributed_step, (2, free_port(), DISTRIBUTED, str(out)), 2)   # as mp.spawn
    return {m: torch.load(out / f"{m}.pt", weights_only=True) for m in DISTRIBUTED}


@pytest.mark.parametrize("method", DISTRIBUTED)
def test_two_processes_with_half_a_batch_each_equal_one_process_with_all(method, two_processes,
                                                                         tmp_path):
    distributed_step(0, 1, free_port(), [method], str(tmp_path))
    one = torch.load(tmp_path / f"{method}.pt", weights_only=True)
    torch.testing.assert_close(two_processes[method], one, rtol=1e-4, atol=1e-6)
