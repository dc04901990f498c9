"""SimCLR's augmentations, batched on the device: two random views of every image.

    SimCLRAugment(size, crop_scale, blur, mean, std)     or SimCLRAugment.for_dataset(info)
        .sample_params(n, generator) -> dict of (n, ...) tensors, on the generator's device
        .apply(images_uint8, params) -> float (n, 3, size, size), normalised
    standardize(images, mean, std) -> float               no augmentation: input for features

The views are half of what contrastive learning learns from (SimCLR's ablations: crop and colour
matter most), and the same for the three methods, so they live apart from the method and from the
datasets (data.py), in one place a reader can check against torchvision.

Why on the device: a ResNet-18 step on a batch of 512 CIFAR images takes ~25 ms on an H100, less
than CPU workers need to augment 1024 views one image at a time. So the batch is augmented where
it lives, with independent random parameters for every image (torchvision's transforms draw one
set per call, i.e. per batch). The hot path has no per-image Python loop and no host-device sync
(no .item(), no boolean-mask indexing): the randomness is one torch.rand on the device, crop +
flip is two batched matrix products per image (separable bilinear resizing), and per-image
choices are torch.where selections. Every op computes what torchvision's functional op computes
on float images; tests/test_data.py compares them.
"""

import math

import torch
import torch.nn.functional as F


def resized_crop_flip(x: torch.Tensor, box: torch.Tensor, flip: torch.Tensor,
                      size: int) -> torch.Tensor:
    """Crop box (n, 4) = (top, left, height, width) px of x (n, C, H, W) to size x size, mirror
    where flip (n,) is set. As torchvision's resized_crop (bilinear, no antialias) + hflip.

    Bilinear resizing is separable: out = Ry @ x @ Rx^T, with per-image matrices Ry (size, H) and
    Rx (size, W). Output pixel i samples the box at its centre's position, (i + 1/2) * h/size - 1/2,
    clamped to the box's first and last pixel centres as cropping before resizing does, and the
    matrix row puts the tent weight max(0, 1 - |position - pixel|) on the two pixels around it.
    Two batched matrix products for the whole batch, cheaper on a CPU than a grid_sample."""
    n, _, H, W = x.shape
    top, left, h, w = (v.to(x.dtype).view(n, 1) for v in box.unbind(1))
    centres = (torch.arange(size, device=x.device, dtype=x.dtype) + 0.5) / size   # (size,)
    ys = top + (centres * h - 0.5).clamp(min=0).minimum(h - 1)                     # (n, size)
    xs = left + (centres * w - 0.5).clamp(min=0).minimum(w - 1)
    xs = torch.where(flip.view(n, 1), xs.flip(1), xs)                              # mirrored
    tent = lambda pos, length: (1 - (pos[:, :, None] - torch.arange(
        length, device=x.device, dtype=x.dtype)).abs()).clamp(min=0)
    ry, rx = tent(ys, H), tent(xs, W)                            # (n, size, H), (n, size, W)
    return torch.einsum("nsh,nchw,ntw->ncst", ry, x, rx)         # (n, C, size, size)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) -> (n, 1, H, W) luma, with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def hue_shift(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of x (n, 3, H, W) in [0, 1] by hue (n,) turns: RGB -> HSV -> RGB."""
    r, g, b = x.unbind(1)
    v = x.amax(1)                                 # value
    chroma = v - x.amin(1)                        # = value * saturation
    c = torch.where(chroma == 0, 1.0, chroma)     # grey pixels: any hue will do, avoid 0/0
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2 + (b - r) / c, 4 + (r - g) / c))
    h = (h + 6 * hue.view(-1, 1, 1)).remainder(6)  # hue in sixths of a turn, shifted
    # HSV -> RGB without branches: channel = v - chroma * clamp(min(k, 4 - k), 0, 1),
    # k = (m + h) mod 6 with m = 5, 3, 1 for red, green, blue
    return torch.stack([v - chroma * torch.minimum(k, 4 - k).clamp(0, 1)
                        for k in ((h + m).remainder(6) for m in (5, 3, 1))], 1)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on x (n, 3, H, W) in [0, 1], every image with its own factors
    (n, 4) = (brightness, contrast, saturation, hue) and op order (n, 4), a permutation of 0..3.

    Brightness, contrast and saturation are all blends f*x + (1-f)*target, with targets black, the
    mean grey level and the grey image, so one slot of the order is one expression for every
    image, x*f + grey*(1-f if saturation) + mean grey*(1-f if contrast), with f = 1 where the slot
    does not apply. Hue, the costly op, runs once for the whole batch: each image takes the blends
    ordered before its hue shift, then the shift, then the blends after it."""
    hue_slot = order.argmax(1, keepdim=True)                 # (n, 1): where op 3 (hue) sits
    per_image = lambda v: v.view(-1, 1, 1, 1)

    def blends(x: torch.Tensor, slots: range, applies: torch.Tensor) -> torch.Tensor:
        for k in slots:
            op = order[:, k]
            f = torch.where(applies[:, k], factors.gather(1, order[:, k:k + 1]).squeeze(1), 1.0)
            grey = grayscale(x)                              # (n, 1, H, W)
            saturation = (op == 2) * (1 - f)
            contrast = (op == 1) * (1 - f) * grey.mean((1, 2, 3))
            x = (x * per_image(f) + grey * per_image(saturation) + per_image(contrast)).clamp(0, 1)
        return x

    slot = torch.arange(4, device=order.device)
    x = blends(x, range(0, 3), slot < hue_slot)              # the blends before the hue shift
    x = hue_shift(x, factors[:, 3])
    return blends(x, range(1, 4), slot > hue_slot)           # and those after it


def blur_kernel(size: int) -> int:
    return int(0.1 * size) // 2 * 2 + 1  # ~10% of the image (SimCLR), odd so it has a centre


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur x (n, C, H, W) with a Gaussian of std sigma (n,) px per image, reflect padding as in
    torchvision. Separable: one grouped conv per axis, a group for every (image, channel)."""
    n, c, H, W = x.shape
    half = kernel_size // 2
    t = torch.linspace(-half, half, kernel_size, device=x.device)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, K)
    y = F.pad(x.reshape(1, n * c, H, W), [half] * 4, mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, kernel_size, 1), groups=n * c)  # vertical
    y = F.conv2d(y, k.view(n * c, 1, 1, kernel_size), groups=n * c)  # horizontal
    return y.view(n, c, H, W)


_STATS: dict = {}  # (mean, std, device) -> tensors: made once, as each is a host-to-device copy


def standardize(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Images (n, 3, H, W), uint8 or float in [0, 1] -> float, per channel (x - mean) / std."""
    key = (tuple(mean), tuple(std), x.device)
    if key not in _STATS:
        _STATS[key] = (torch.tensor(mean, device=x.device).view(3, 1, 1),
                       torch.tensor(std, device=x.device).view(3, 1, 1))
    m, s = _STATS[key]
    return ((x.float() / 255 if x.dtype == torch.uint8 else x) - m) / s


class SimCLRAugment:
    """SimCLR's view distribution: random resized crop (area in crop_scale, aspect 3/4..4/3),
    flip p=0.5, colour jitter (0.4, 0.4, 0.4, 0.1) p=0.8 in random order (SimCLR's colour
    strength 0.5, its CIFAR setting), grayscale p=0.2, blur p=0.5 with sigma U(0.1, 2) and a
    kernel 10% of the image (if blur), then normalisation.

    Inputs are size x size (in-memory datasets are stored at their training size), so crops are
    never downscaled and bilinear sampling needs no antialiasing. Parameters are drawn apart from
    their application so a loader can draw them for the global batch and apply one rank's rows.
    """

    def __init__(self, size: int, crop_scale: tuple[float, float], blur: bool,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        self.size, self.crop_scale, self.blur = size, crop_scale, blur
        self.mean, self.std = mean, std
        self.kernel = blur_kernel(size)

    @classmethod
    def for_dataset(cls, info) -> "SimCLRAugment":
        """The views of a dataset (data.DatasetInfo: size, crop scale, blur, mean and std)."""
        return cls(info.size, info.crop_scale, info.blur, info.mean, info.std)

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        # Every random number of the batch in one kernel, then each transform's own columns.
        u = torch.rand(n, 35, generator=generator, device=generator.device)
        names, widths = zip(("area", 10), ("aspect", 10), ("top", 1), ("left", 1), ("flip", 1),
                            ("jitter", 1), ("factors", 4), ("order", 4), ("gray", 1), ("blur", 1),
                            ("sigma", 1))
        r = {k: c.squeeze(1) if c.shape[1] == 1 else c for k, c in zip(names, u.split(widths, 1))}
        S = self.size
        # torchvision's RandomResizedCrop.get_params: 10 tries of (area, log aspect), take the
        # first box that fits; if none does, the whole image (aspect already in range: square).
        area = S * S * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * r["area"])
        aspect = torch.exp(math.log(3 / 4) + math.log(16 / 9) * r["aspect"])
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # (n, 10) each
        fits = (w >= 1) & (w <= S) & (h >= 1) & (h <= S)
        first = fits.int().argmax(1, keepdim=True)  # index of the first True (0 if none)
        ok = fits.any(1)
        w = torch.where(ok, w.gather(1, first).squeeze(1), S)
        h = torch.where(ok, h.gather(1, first).squeeze(1), S)
        top = torch.minimum((r["top"] * (S - h + 1)).floor(), S - h)  # randint(0, S-h+1)
        left = torch.minimum((r["left"] * (S - w + 1)).floor(), S - w)
        f = r["factors"]                  # brightness, contrast, saturation in [0.6, 1.4], hue
        factors = torch.cat([0.6 + 0.8 * f[:, :3], 0.2 * f[:, 3:] - 0.1], 1)   # in [-0.1, 0.1]
        return {"box": torch.stack([top, left, h, w], 1), "flip": r["flip"] < 0.5,
                "jitter": r["jitter"] < 0.8, "factors": factors,
                "order": r["order"].argsort(1),  # a uniformly random permutation per image
                "gray": r["gray"] < 0.2,
                "blur": (r["blur"] < 0.5) & self.blur, "sigma": 0.1 + 1.9 * r["sigma"]}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        if images.shape[-2:] != (self.size, self.size):
            raise ValueError(f"expected {self.size}x{self.size} images, got {tuple(images.shape)}")
        p = {k: v.to(images.device, non_blocking=True) for k, v in params.items()}  # often no-op
        per_image = lambda m: m.view(-1, 1, 1, 1)  # (n,) mask -> broadcasts over (n, 3, H, W)
        x = images.float() / 255                                            # (n, 3, S, S)
        x = resized_crop_flip(x, p["box"], p["flip"], self.size)
        x = torch.where(per_image(p["jitter"]), color_jitter(x, p["factors"], p["order"]), x)
        x = torch.where(per_image(p["gray"]), grayscale(x).expand_as(x), x)
        if self.blur:
            x = torch.where(per_image(p["blur"]), gaussian_blur(x, p["sigma"], self.kernel), x)
        return standardize(x, self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.sample_params(len(images), generator))
