"""Staged encoders: the networks LoCo cuts into local units.

LoCo (and GIM) split an encoder at its downsampling stages. In ResNet-50 those are
conv1+res2, res3, res4, res5 (paper, Sec. 4). Every encoder here is a `StagedEncoder`:

    stages    nn.ModuleList, stage k maps the output of stage k-1 to its own output
    channels  output channels of each stage (the decoders are built from these)

and `forward` does nothing but chain the stages, so `encoder(x)` and the stage-by-stage loop
in local_units.py compute the same function. This file holds no loss and no detach: where the
gradient stops is decided in local_units.py alone.

Encoders (`ENCODERS`): resnet18, resnet50, presnet50 (the paper's six-stage Progressive
ResNet-50, Sec. 5.6) and shufflenet_v2_50 (the paper's other backbone, Tables 1-2).

`width` scales every channel count, so tests and laptop runs can build tiny versions of the same
architecture. `stem="cifar"` swaps the ImageNet stem (stride-2 conv + max-pool, for 224x224)
for a 3x3 stride-1 conv without pooling, the usual choice for 32x32 inputs: the ImageNet stem
would shrink a CIFAR image to 8x8 before the first residual block.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def scaled(channels: int, width: float, multiple: int = 1) -> int:
    """`channels * width`, rounded to a multiple of `multiple` (grouped convs need it). A width
    that leaves a layer no channel is refused: rounding it up would quietly build another net."""
    n = int(round(channels * width / multiple))
    if n < 1 and channels > 0:            # (0: a width the spec leaves unused, basic blocks)
        raise ValueError(f"width {width:g} leaves a layer of {channels} channels (in groups of "
                         f"{multiple}) with none; it needs a width above "
                         f"{0.5 * multiple / channels:.3g}")
    return n * multiple


def out_channels(module: nn.Module) -> int:
    """The output channels of a stage, of a run of its blocks (a piece, local_units.py), or of
    one layer: read off its last block or layer that sets them."""
    layers = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    for m in reversed(layers):
        if isinstance(m, (BasicBlock, Bottleneck, ShuffleBlock)):
            return m.c_out
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m.num_features
        if isinstance(m, nn.Conv2d):
            return m.out_channels
        if isinstance(m, nn.Sequential) and len(m):
            return out_channels(m)
    raise ValueError(f"no layer in {type(module).__name__} sets its output channels")


def conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1,
            relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34, and the early stages of PResNet-50).

    `resize` (PResNet-50) stands where the stride would: before the first 3x3 and the projection.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, resize: nn.Module | None = None):
        super().__init__()
        self.c_out = c_out
        down = [] if resize is None else [resize]
        self.body = nn.Sequential(*down, conv_bn(c_in, c_out, 3, stride),
                                  conv_bn(c_out, c_out, 3, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out and not down
                         else nn.Sequential(*down, *conv_bn(c_in, c_out, 1, stride, relu=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand, and a shortcut (ResNet-50).

    `groups` splits the first two convolutions into groups, `out_groups` the last one (PResNet-50,
    paper Table 8). `resize` (PResNet-50) stands where the stride would: after the first 1x1,
    before the 3x3, and before the projection shortcut.
    """

    def __init__(self, c_in: int, mid: int, c_out: int, stride: int = 1, groups: int = 1,
                 out_groups: int = 1, resize: nn.Module | None = None):
        super().__init__()
        self.c_out = c_out
        down = [] if resize is None else [resize]
        self.body = nn.Sequential(conv_bn(c_in, mid, 1, groups=groups), *down,
                                  conv_bn(mid, mid, 3, stride, groups=groups),
                                  conv_bn(mid, c_out, 1, groups=out_groups, relu=False))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out and not down
                         else nn.Sequential(*down, *conv_bn(c_in, c_out, 1, stride, relu=False)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def init_weights(module: nn.Module) -> nn.Module:
    """He initialisation of every conv (fan-out, as torchvision's ResNet), BatchNorm to identity."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_parameters()
    return module


class StagedEncoder(nn.Module):
    """An encoder as a list of stages; `forward` only chains them."""

    def __init__(self, stages: list[nn.Module], channels: list[int], input_size: int):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)  # output channels of each stage
        self.input_size = input_size    # native input resolution (224 or 32)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def stem(kind: str, c_out: int, kernel: int = 7) -> nn.Sequential:
    """conv1 (+ max-pool); ResNets use a 7x7 conv1, ShuffleNet v2 a 3x3 one."""
    if kind == "imagenet":  # (3, 224, 224) -> (c_out, 56, 56)
        return nn.Sequential(conv_bn(3, c_out, kernel, 2), nn.MaxPool2d(3, 2, 1))
    if kind == "cifar":     # (3, 32, 32) -> (c_out, 32, 32)
        return conv_bn(3, c_out, 3)
    raise ValueError(f"unknown stem {kind!r}: choose 'imagenet' or 'cifar'")


def resnet(block: str, depths: list[int], width: float = 1.0, stem_kind: str = "imagenet"
           ) -> StagedEncoder:
    """ResNet with four stages: stem+res2, res3, res4, res5 (strides 1, 2, 2, 2 after the stem)."""
    c_stem = scaled(64, width)
    stages, channels, c_in = [], [], c_stem
    for i, depth in enumerate(depths):
        base = scaled(64 * 2 ** i, width)
        blocks = []
        for j in range(depth):
            stride = 2 if i > 0 and j == 0 else 1
            if block == "basic":
                blocks.append(BasicBlock(c_in, base, stride))
                c_in = base
            else:
                blocks.append(Bottleneck(c_in, base, 4 * base, stride))
                c_in = 4 * base
        if i == 0:
            blocks.insert(0, stem(stem_kind, c_stem))
        stages.append(nn.Sequential(*blocks))
        channels.append(c_in)
    return StagedEncoder(stages, channels, 224 if stem_kind == "imagenet" else 32)


def resnet18(width: float = 1.0, stem: str = "imagenet") -> StagedEncoder:
    return resnet("basic", [2, 2, 2, 2], width, stem)


def resnet50(width: float = 1.0, stem: str = "imagenet") -> StagedEncoder:
    return resnet("bottleneck", [3, 4, 6, 3], width, stem)


class Resize(nn.Module):
    """Bilinear resize by a fixed ratio: PResNet-50 downsamples with this, not with strided convs.

    The ratio (e.g. 36/56) is applied to the incoming size and rounded, so a 224x224 input gives
    exactly Table 8's 56 -> 36 -> 24 -> 16 -> 12 -> 8 and other input sizes still work.
    """

    def __init__(self, size: int, from_size: int):
        super().__init__()
        self.size, self.from_size = size, from_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = (max(1, round(n * self.size / self.from_size)) for n in x.shape[-2:])
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"ratio={self.size}/{self.from_size}"


# res2..res7 of PResNet-50 (paper, Table 8): feature size at a 224 input, block, mid channels,
# out channels, groups, and groups of the last 1x1 in blocks 2-3 (block 1's is always dense).
# Basic blocks have no mid width: both their 3x3 convs have `out` channels. Table 8 prints
# 2 and 16 in that last column for res5 and res6; we use 1 (dense), see `progressive_resnet`.
PRESNET50 = [(56, "basic", 0, 56, 1, 1), (36, "basic", 0, 96, 1, 1),
             (24, "bottleneck", 144, 576, 1, 1), (16, "bottleneck", 256, 1024, 2, 1),
             (12, "bottleneck", 512, 2048, 16, 1), (8, "bottleneck", 1024, 4096, 128, 128)]


def progressive_resnet(spec: list[tuple], width: float = 1.0, stem_kind: str = "imagenet"
                       ) -> StagedEncoder:
    """Progressive ResNet-50 (paper, Sec. 5.6, Tables 6 and 8): six stages of three blocks each.

    Built so that every stage costs 13-20% of the FLOPs and of the activation memory (Table 6),
    so no local unit dominates peak memory. conv1 is 7x7/32 stride 2 + max-pool, as in ResNet.
    Table 8 read literally gives 3.79 GMACs at 224, not the 4.16 G of Table 6, and puts res6 at
    15% of the FLOPs instead of 20.45%. Two choices make all six stage shares match Table 6 to
    0.03 points (4.14 GMACs, convs only; plain ResNet-50 counts 4.09 G this way, 4.14 G there):
    - The downsampling "bilinear interpolation instead of strided convolution" sits exactly where
      ResNet-50 has its stride: in the first block of res3..res7, after the first 1x1 (before
      the 3x3) and before the projection shortcut. The ratios 36/56, 24/36, 16/24, 12/16, 8/12
      apply to the incoming size (`Resize`), so other input sizes work too.
    - res5 and res6 keep the last 1x1 of every block dense (Table 8 shows blocks 2-3 grouped,
      which is 0.35 GMACs less); res7 groups it in blocks 2-3 as Table 8 shows.
    Other choices: shortcuts are identity, or 1x1 conv + BN where the channel count changes;
    under `width` the group counts stay fixed and channels round to multiples of them; the cifar
    stem (3x3 stride-1 conv1, no max-pool) gives sizes 32, 21, 14, 9, 7, 5 on 32x32 inputs.
    """
    c_in = scaled(32, width)
    stages, channels, prev_size = [], [], spec[0][0]
    for i, (size, block, mid, out, groups, rest_out_groups) in enumerate(spec):
        mid, out = scaled(mid, width, groups), scaled(out, width, groups)
        blocks = [stem(stem_kind, c_in)] if i == 0 else []
        for j in range(3):
            resize = Resize(size, prev_size) if i > 0 and j == 0 else None
            if block == "basic":
                blocks.append(BasicBlock(c_in, out, resize=resize))
            else:
                blocks.append(Bottleneck(c_in, mid, out, groups=groups, resize=resize,
                                         out_groups=1 if j == 0 else rest_out_groups))
            c_in = out
        stages.append(nn.Sequential(*blocks))  # (B, out, size, size) for a 224 input
        channels.append(out)
        prev_size = size
    return StagedEncoder(stages, channels, 224 if stem_kind == "imagenet" else 32)


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """Interleave the channels of `groups` groups, so the next split mixes both branches."""
    b, c, h, w = x.shape  # (B, g * C/g, H, W) -> (B, C/g, g, H, W) -> (B, C, H, W)
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNet v2 unit (Ma et al. 2018, Fig. 3c, 3d): two branches, concat, channel shuffle.

    Basic unit (same channels, stride 1): split the channels in half; one half passes untouched,
    the other goes through 1x1, 3x3 depthwise, 1x1. Other units (stride 2 or a channel change)
    send the whole input through both branches, the left one being 3x3 depthwise + 1x1, so each
    branch gives half the output channels. No ReLU after a depthwise conv, as in the paper.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.c_out, half = c_out, c_out // 2
        self.split = stride == 1 and c_in == c_out
        c_right = half if self.split else c_in
        self.left = (nn.Identity() if self.split else
                     nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, relu=False),
                                   conv_bn(c_in, half, 1)))
        self.right = nn.Sequential(conv_bn(c_right, half, 1),
                                   conv_bn(half, half, 3, stride, groups=half, relu=False),
                                   conv_bn(half, half, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x.chunk(2, dim=1) if self.split else (x, x)  # (B, c_in/2, H, W) each, or x twice
        return channel_shuffle(torch.cat([self.left(a), self.right(b)], dim=1))  # (B, c_out, ..)


def shufflenet_v2(depths: list[int], widths: list[int], width: float = 1.0,
                  stem_kind: str = "imagenet") -> StagedEncoder:
    """ShuffleNet v2-50 (Ma et al. 2018, Table 6 and appendix table), the encoder of LoCo Table 1.

    conv1 3x3/64 stride 2 and max-pool, then conv2_x..conv5_x of 3, 4, 6, 3 units with 244, 488,
    976, 1952 channels, then conv6 (1x1, 2048): 1 + 16 * 3 + 1 = 50 layers. Plain units, as in
    the paper's 50-layer model: residual paths and SE belong to its 164-layer one. Stages are cut
    at the downsampling points like ResNet-50's: conv1+conv2_x, conv3_x, conv4_x, conv5_x+conv6.
    conv2_x runs at the max-pool's 56x56, so its first unit has stride 1 and, since the channels
    change (64 -> 244), takes the two-branch form. Channels round to even numbers for the split.
    """
    c_in = scaled(64, width)
    stages, channels = [], []
    for i, (depth, c) in enumerate(zip(depths, widths)):
        c = scaled(c, width, 2)
        blocks = [stem(stem_kind, c_in, kernel=3)] if i == 0 else []
        for j in range(depth):
            blocks.append(ShuffleBlock(c_in, c, stride=2 if i > 0 and j == 0 else 1))
            c_in = c
        if i == len(depths) - 1:  # conv6 mixes the two branches' features before pooling
            c_in = scaled(2048, width)
            blocks.append(conv_bn(c, c_in, 1))
        stages.append(nn.Sequential(*blocks))  # (B, c_in, 56 / 2**i, 56 / 2**i) for a 224 input
        channels.append(c_in)
    return StagedEncoder(stages, channels, 224 if stem_kind == "imagenet" else 32)


def presnet50(width: float = 1.0, stem: str = "imagenet") -> StagedEncoder:
    return progressive_resnet(PRESNET50, width, stem)


def shufflenet_v2_50(width: float = 1.0, stem: str = "imagenet") -> StagedEncoder:
    return shufflenet_v2([3, 4, 6, 3], [244, 488, 976, 1952], width, stem)


ENCODERS = {"resnet18": resnet18, "resnet50": resnet50, "presnet50": presnet50,
            "shufflenet_v2_50": shufflenet_v2_50}
STAGES = {"resnet18": 4, "resnet50": 4, "presnet50": 6, "shufflenet_v2_50": 4}   # len(.stages)


def build_encoder(arch: str, width: float = 1.0, stem: str = "imagenet") -> StagedEncoder:
    if arch not in ENCODERS:
        raise ValueError(f"unknown arch {arch!r}: choose one of {', '.join(ENCODERS)}")
    return ENCODERS[arch](width=width, stem=stem)
