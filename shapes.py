"""Synthetic shapes: a labelled image dataset the code draws itself, so nothing is downloaded.

Ten shape classes (disk, square, triangle, ...), each drawn with a random position, size, small
rotation, colour and a background gradient, none of them tied to the class: only the shape tells
the classes apart. A linear probe on an untrained encoder scores about 20% on them; contrastive
training lifts it far above (docs/results.md). data.py serves them
as the dataset `synthetic`.
"""

import math

import torch


def _plus(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.minimum(torch.maximum(u.abs() - 0.3, v.abs() - 0.9),
                         torch.maximum(v.abs() - 0.3, u.abs() - 0.9))


# Each shape as a signed distance (negative inside) in object coordinates, object radius 1.
SHAPES = {
    "disk": lambda u, v: torch.hypot(u, v) - 1,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) - 0.8,
    "triangle": lambda u, v: torch.maximum(v - 0.5, 0.866 * u.abs() - 0.5 * v - 0.5),
    "diamond": lambda u, v: (u.abs() + v.abs() - 1) * 0.7071,
    "ring": lambda u, v: (torch.hypot(u, v) - 0.7).abs() - 0.3,
    "plus": _plus,
    "cross": lambda u, v: _plus((u + v) * 0.7071, (u - v) * 0.7071),
    "frame": lambda u, v: (torch.maximum(u.abs(), v.abs()) - 0.65).abs() - 0.2,
    "half-disk": lambda u, v: torch.maximum(torch.hypot(u, v - 0.4) - 1, v - 0.4),
    "hourglass": lambda u, v: torch.maximum(u.abs() - 0.8 * v.abs(), v.abs() - 0.9),
}


def float32(draw):
    """Draw in float32 whatever the caller's autocast: linear_eval reads its images inside its
    bf16 autocast, and a matmul there in bf16 moved 15% of the pixels (by up to 128) of images
    that training had drawn in float32; the process then kept the changed ones (data._drawn)."""
    def drawn(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return draw(*args, **kwargs)
    drawn.__doc__, drawn.__name__ = draw.__doc__, draw.__name__
    return drawn


@float32
def make_synthetic(n: int, seed: int, size: int = 32, first: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (uint8 (n, 3, size, size)) of one of 10 shapes each, with labels (n,), balanced.

    Position, size, rotation (small, so that plus and cross stay apart), object colour and the
    background's two-colour gradient are random per image and independent of the class, so only
    the shape tells the classes apart. Deterministic: the same (n, seed, size), the same tensors.
    first: only images 0..first-1 of those n, drawn alone (a run on a subset of a few hundred need
    not draw 50,000): the same pixels, as every image's noise is still drawn from the one stream.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randperm(n, generator=g) % len(SHAPES)  # random order, counts differ by <= 1
    p = torch.rand(n, 14, generator=g)
    # Colours are tinted greys: a random lightness plus a random tint of up to +-0.15 per channel.
    # Fully random colours make colour the easiest way to tell two images apart, and short
    # contrastive runs then learn colour, not shape (a probe after 200 steps: no better than an
    # untrained encoder); with tints they learn shape (35% vs 21% at the same budget).
    tint = lambda grey, rgb: (grey + 0.3 * rgb - 0.15).clamp(0, 1)
    fg, bg = tint(p[:, 5:6], p[:, 6:9]), tint(p[:, 9:10], p[:, 10:13])
    bg2 = (bg + 0.4 * p[:, 13:14] - 0.2).clamp(0, 1)             # the gradient's other end
    # Keep the object visible: where the background's brightness is within 0.25 of the object's,
    # shift it to 0.25 below a bright object or 0.25 above a dark one.
    luma = torch.tensor([0.299, 0.587, 0.114])
    fg_l, bg_l = fg @ luma, bg @ luma
    target = torch.where(fg_l > 0.5, fg_l - 0.25, fg_l + 0.25)
    push = torch.where((bg_l - fg_l).abs() < 0.25, target - bg_l, 0.0)[:, None]
    p = torch.cat([p[:, :5], fg, (bg + push).clamp(0, 1), (bg2 + push).clamp(0, 1)], 1)
    first = n if first is None else min(first, n)
    images = torch.empty(first, 3, size, size, dtype=torch.uint8)
    for k, shape in enumerate(SHAPES.values()):
        # one shape at a time, in chunks small enough to stay in the CPU's cache (10x faster)
        for idx in (labels == k).nonzero().squeeze(1).split(256):
            noise = 0.03 * torch.randn(len(idx), 1, size, size, generator=g)  # sensor noise
            keep = idx < first
            if keep.any():
                images[idx[keep]] = _draw(shape, p[idx[keep]], size, noise[keep])
    return images, labels[:first]


def _draw(shape, p: torch.Tensor, size: int, noise: torch.Tensor) -> torch.Tensor:
    """Images (m, 3, size, size) uint8 of one shape; p (m, 14): centre x, y, radius, rotation,
    background gradient direction, object colour (3), background colours at the two ends (3 + 3);
    noise (m, 1, size, size), added to every channel (nothing is flat)."""
    t = (torch.arange(size) + 0.5) / size * 2 - 1      # pixel centres in [-1, 1]
    ys, xs = torch.meshgrid(t, t, indexing="ij")       # (size, size)
    cx, cy = p[:, 0, None, None] * 0.8 - 0.4, p[:, 1, None, None] * 0.8 - 0.4  # (m, 1, 1)
    r = 0.3 + 0.3 * p[:, 2, None, None]               # radius: 30-60% of half the image
    a = (p[:, 3, None, None] - 0.5) * 0.6              # rotation, +-17 degrees
    u = (a.cos() * (xs - cx) + a.sin() * (ys - cy)) / r  # (m, size, size) object coordinates
    v = (a.cos() * (ys - cy) - a.sin() * (xs - cx)) / r
    # signed distance in pixels -> coverage, with a 1-pixel ramp: anti-aliased edges
    alpha = (0.5 - shape(u, v) * r * (size / 2)).clamp_(0, 1)
    d = p[:, 4, None, None] * 2 * math.pi               # background gradient direction
    ramp = (xs * d.cos() + ys * d.sin()).mul_(0.35).add_(0.5).clamp_(0, 1)
    x = torch.lerp(p[:, 8:11, None, None], p[:, 11:14, None, None], ramp[:, None])  # (m, 3, S, S)
    x = x.lerp_(p[:, 5:8, None, None], alpha[:, None])
    x += noise
    return x.mul_(255).round_().clamp_(0, 255).to(torch.uint8)


@float32
def make_scenes(n: int, seed: int, size: int = 64, cells: int = 2
                ) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """n scenes (uint8 (n, 3, size, size)) of 2 shapes or more (up to 5 and the number of cells)
    each, for instance segmentation, and per scene its objects: boxes (k, 4) as x1, y1, x2, y2 px,
    labels (k,) 1..10 (0 is torchvision's background), masks (k, size, size) uint8.

    The scene is a grid of cells x cells; each object sits in a cell of its own (so none hides
    another and every mask is whole), at a random offset, with a radius of 20-40% of the cell: at
    32 px a cell, objects 6-13 px in radius, the size of the objects in the 32 px training images.
    Colours and the background gradient follow make_synthetic's rules. Deterministic from
    (n, seed, size, cells)."""
    g = torch.Generator().manual_seed(seed)
    cell = size / cells
    t = (torch.arange(size) + 0.5) / size * 2 - 1          # pixel centres in [-1, 1]
    ys, xs = torch.meshgrid(t, t, indexing="ij")
    shapes = list(SHAPES.values())
    tint = lambda grey, rgb: (grey + 0.3 * rgb - 0.15).clamp(0, 1)
    images, targets = torch.empty(n, 3, size, size, dtype=torch.uint8), []
    for i in range(n):
        k = int(torch.randint(2, min(5, cells * cells) + 1, (), generator=g))
        where = torch.randperm(cells * cells, generator=g)[:k]
        labels = torch.randint(0, len(shapes), (k,), generator=g)
        p = torch.rand(k + 1, 8, generator=g)               # row k: the background
        bg = tint(p[k, 0:1], p[k, 1:4])
        d = p[k, 4] * 2 * math.pi
        ramp = (xs * d.cos() + ys * d.sin()).mul(0.35).add(0.5).clamp(0, 1)
        x = torch.lerp(bg.view(3, 1, 1), (bg + 0.4 * p[k, 5] - 0.2).clamp(0, 1).view(3, 1, 1), ramp)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for j in range(k):
            r = (0.2 + 0.2 * p[j, 0]) * cell                  # radius in px
            row, col = divmod(int(where[j]), cells)
            cx = (col + 0.5) * cell + (p[j, 1] - 0.5) * (cell - 2 * r)   # centre in px, in the cell
            cy = (row + 0.5) * cell + (p[j, 2] - 0.5) * (cell - 2 * r)
            a = (p[j, 3] - 0.5) * 0.6                         # rotation, +-17 degrees
            px, py = (xs + 1) * size / 2 - cx, (ys + 1) * size / 2 - cy
            u = (a.cos() * px + a.sin() * py) / r
            v = (a.cos() * py - a.sin() * px) / r
            alpha = (0.5 - shapes[labels[j]](u, v) * r).clamp(0, 1)      # 1-pixel edge ramp
            fg = tint(p[j, 4:5], p[j, 5:8])
            if abs(float(fg @ torch.tensor([0.299, 0.587, 0.114]))
                   - float(x.mean((1, 2)) @ torch.tensor([0.299, 0.587, 0.114]))) < 0.25:
                fg = (fg + 0.5).remainder(1.0)                # keep it visible on its background
            x = torch.lerp(x, fg.view(3, 1, 1), alpha)
            masks[j] = alpha >= 0.5
        x = x + 0.03 * torch.randn(1, size, size, generator=g)
        images[i] = x.mul(255).round().clamp(0, 255).to(torch.uint8)
        keep = masks.flatten(1).any(1).bool()
        masks, labels = masks[keep], labels[keep]
        cols, rows = masks.any(1), masks.any(2)               # (k, size): which x, which y hold it
        first = lambda m: m.int().argmax(1).float()
        last = lambda m: (size - m.flip(1).int().argmax(1)).float()
        boxes = torch.stack([first(cols), first(rows), last(cols), last(rows)], 1)
        targets.append({"boxes": boxes, "labels": labels + 1, "masks": masks})
    return images, targets
