"""Data: datasets as uint8 tensors, and SimCLR's augmentations run batched on the device.

    DATASETS[name] -> DatasetInfo    per-dataset choices: view size, crop scale, blur, mean/std, tau
    load_images(name, data_dir, split, download=True) -> uint8 images (N, 3, H, W), labels (N,)
        split "pretrain": what contrastive training sees (STL-10: unlabeled + train, label -1 for
        unlabeled); "train", "test": labelled, for linear evaluation
    (the `synthetic` images come from shapes.py: ten shape classes drawn in-process, no download)
    SimCLRAugment(size, crop_scale, blur, mean, std)
        .sample_params(n, generator) -> dict of (n, ...) tensors, on the generator's device
        .apply(images_uint8, params) -> float (n, 3, size, size), normalised
    InMemoryLoader(images, global_batch, augment, seed, rank=0, world_size=1)
        len(loader) steps per epoch; .epoch(e) yields (x1, x2), each (B // world_size, 3, S, S)
    pretrain_loader(name, data_dir, global_batch, seed, device, ...)   whichever loader name needs
    standardize(images, mean, std) -> float                no augmentation: input for features
    eval_batches(name, data_dir, split, batch_size, device)   (uint8 images, labels), any dataset

Why on the device: a ResNet-18 step on a batch of 512 CIFAR images takes ~25 ms on an H100, less
than CPU workers need to augment 1024 views one image at a time. So datasets that fit in memory
live as one uint8 tensor on the device and are augmented there, batched, with independent random
parameters for every image (torchvision's transforms draw one set per call, i.e. per batch). The
hot path has no per-image Python loop and no host-device sync (no .item(), no boolean-mask
indexing): the randomness is one torch.rand on the device, crop + flip is one grid_sample with a
per-image affine matrix, and per-image choices are torch.where selections. Every op computes what
torchvision's functional op computes on float images; test_train.py compares them.
"""

import functools
import math
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision.datasets import ImageFolder
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

from cli import UserError
from shapes import make_synthetic


@dataclass(frozen=True)
class DatasetInfo:
    size: int                            # training views are size x size pixels
    crop_scale: tuple[float, float]      # random resized crop: range of the box's area fraction
    blur: bool                           # Gaussian blur, p=0.5 (SimCLR uses it from 96 px up)
    mean: tuple[float, float, float]     # per-channel statistics for normalisation
    std: tuple[float, float, float]
    tau: float                           # default temperature of the contrastive loss
    num_classes: int
    in_memory: bool = True               # False: JPEGs decoded by DataLoader workers

    @property
    def stem(self) -> str:
        """The encoder stem these images need: small images keep their resolution (model.py)."""
        return "cifar" if self.size <= 64 else "imagenet"


DATASETS = {
    # SimCLR's CIFAR-10 setting (paper, App. B.9): ImageNet's crops, no blur (at 32 px it mostly
    # erases the image), tau 0.5.
    "cifar10": DatasetInfo(32, (0.08, 1.0), False, (0.4914, 0.4822, 0.4465),
                           (0.2470, 0.2435, 0.2616), 0.5, 10),
    "cifar100": DatasetInfo(32, (0.08, 1.0), False, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762), 0.5, 100),
    # STL-10 holds 96 px ImageNet photos: blur on, as for ImageNet. tau follows the training
    # regime more than the images: STL is trained here like CIFAR (ResNet-18, batch <= 1024, a few
    # hundred epochs of 105k images), SimCLR's CIFAR regime; 0.1 goes with batch 4096 + LARS.
    # mean/std: those usually quoted, from the labelled train split.
    "stl10": DatasetInfo(96, (0.08, 1.0), True, (0.4467, 0.4398, 0.4066),
                         (0.2603, 0.2566, 0.2713), 0.5, 10),
    # ImageNet layout (data_dir/train/<class>/*.JPEG, data_dir/val/...): the paper's setting.
    "imagefolder": DatasetInfo(224, (0.08, 1.0), True, (0.485, 0.456, 0.406),
                               (0.229, 0.224, 0.225), 0.1, 1000, in_memory=False),
    # Shapes fill 9-36% of the image: crops below 40% of the area would often miss the object.
    # mean/std measured on the 50,000 training images.
    "synthetic": DatasetInfo(32, (0.4, 1.0), False, (0.5008, 0.5006, 0.5008),
                             (0.2586, 0.2567, 0.2591), 0.5, 10),
}
SYNTHETIC_SPLITS = {"pretrain": (50_000, 0), "train": (50_000, 0), "test": (10_000, 1)}  # (n, seed)


@functools.lru_cache(maxsize=2)
def _synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic images drawn once per process (1.5 s for 50,000 on one core): a test suite
    trains and evaluates many tiny runs. Read-only: callers slice, never write."""
    return make_synthetic(n, seed, DATASETS["synthetic"].size)


# ---------------------------------------------------------------------------- datasets on disk
# name -> (folder under data_dir, archive URL, md5 of the archive)
_DOWNLOADS = {
    "cifar10": ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
    "stl10": ("stl10_binary", "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz",
              "91f7769df0f17e558f3565bffb0c7dfb"),
}


class MissingData(UserError):
    """A dataset that is not where --data-dir says (train.py adds its no-download way out)."""


def _folder(name: str, data_dir: str | Path, download: bool) -> Path:
    """The dataset's folder, downloaded only if absent. A folder that exists is read as is, without
    checksums: our offline copies are re-encoded, so their md5 sums differ from the originals."""
    folder, url, md5 = _DOWNLOADS[name]
    root = Path(data_dir) / folder
    why = "download=False"
    if not root.is_dir() and download:
        try:
            download_and_extract_archive(url, str(data_dir), md5=md5)
        except (OSError, RuntimeError) as e:  # offline: URLError, an OSError; bad md5: RuntimeError
            why = f"download failed: {e}"
    if not root.is_dir():
        raise MissingData(f"{name}: {root} not found ({why}). Point --data-dir at the folder "
                          f"that holds {folder}/")
    return root


def _read_cifar(root: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = [], []
    for f in files:
        try:
            with open(root / f, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")  # the originals are Python 2 pickles
            x.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))  # rows are C, H, W
            y.append(np.asarray(d[label_key], np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{root / f} is not a CIFAR batch file ({type(e).__name__}): delete "
                            f"{root} to download it again, or point --data-dir elsewhere")
    return torch.from_numpy(np.concatenate(x)), torch.from_numpy(np.concatenate(y))


def _read_stl(root: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    raw = np.fromfile(root / f"{part}_X.bin", np.uint8)
    if raw.size % (3 * 96 * 96):
        raise UserError(f"{root / f'{part}_X.bin'} is not whole 96x96 images (truncated?): delete "
                        f"{root} to download it again")
    x = raw.reshape(-1, 3, 96, 96)
    x = np.ascontiguousarray(x.transpose(0, 1, 3, 2))  # stored column-major (MATLAB order)
    y = (np.fromfile(root / f"{part}_y.bin", np.uint8).astype(np.int64) - 1 if part != "unlabeled"
         else np.full(len(x), -1, np.int64))  # labels on disk are 1..10
    return torch.from_numpy(x), torch.from_numpy(y)


def load_images(name: str, data_dir: str | Path, split: str,
                download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int64 labels (N,) of an in-memory dataset; see module doc."""
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"split must be pretrain, train or test, not {split!r}")
    if name == "synthetic":
        return _synthetic(*SYNTHETIC_SPLITS[split])
    if name not in _DOWNLOADS:
        raise ValueError(f"{name!r} is not held in memory; use pretrain_loader / eval_batches")
    root = _folder(name, data_dir, download)
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split != "test" else ["test_batch"]
        return _read_cifar(root, files, "labels")
    if name == "cifar100":
        return _read_cifar(root, ["test" if split == "test" else "train"], "fine_labels")
    if split != "pretrain":
        return _read_stl(root, split)
    parts = [_read_stl(root, "unlabeled"), _read_stl(root, "train")]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------- batched augmentations
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


def _blur_kernel(size: int) -> int:
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
        self.kernel = _blur_kernel(size)

    @classmethod
    def for_dataset(cls, info: DatasetInfo) -> "SimCLRAugment":
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


# ---------------------------------------------------------------------------- loaders
def _generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded by the tuple keys, e.g. (seed, epoch, step): the same numbers on every
    rank and after a resume. SeedSequence mixes the keys, so (1, 2) and (2, 1) differ. CUDA draws
    on the device; other devices draw on the CPU, whose streams every torch build supports."""
    seed = int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])
    return torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(seed)


def local_batch(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise UserError(f"--batch-size {global_batch} does not split evenly over {world_size} "
                         f"processes: use a multiple of {world_size}", flag=True)
    return global_batch // world_size


class InMemoryLoader:
    """Two augmented views of every image, global_batch images per step across all ranks.

    World-size invariance: the epoch's order comes from a generator seeded by (seed, epoch), the
    parameters of both views of the whole global batch from one seeded by (seed, epoch, step), and
    rank r takes rows [r*b, (r+1)*b), b = global_batch // world_size. So 1 process and 4 processes
    see the same global batches with the same augmentations, and resuming at an epoch boundary
    replays an uninterrupted run. The last incomplete global batch is dropped.
    """

    def __init__(self, images: torch.Tensor, global_batch: int, augment: SimCLRAugment,
                 seed: int, rank: int = 0, world_size: int = 1):
        self.b = local_batch(global_batch, world_size)
        if len(images) < global_batch:
            raise UserError(f"{len(images)} images, fewer than one batch of --batch-size "
                            f"{global_batch}: lower --batch-size or raise --subset", flag=True)
        self.images, self.augment, self.seed = images, augment, seed  # images: uint8 (N, 3, S, S)
        self.B, self.rank, self.device = global_batch, rank, images.device
        self.gen_device = _generator(self.device, 0).device
        mine = torch.arange(rank * self.b, (rank + 1) * self.b, device=self.gen_device)
        self.rows = torch.cat([mine, mine + global_batch])  # this rank's rows of view 1 and view 2

    def __len__(self) -> int:
        return len(self.images) // self.B

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = _generator(self.device, self.seed, e)
        order = torch.randperm(len(self.images), generator=g, device=self.gen_device)
        order = order.to(self.device)
        for step in range(len(self)):
            start = step * self.B + self.rank * self.b
            x = self.images[order[start:start + self.b]]                    # (b, 3, S, S) uint8
            g = _generator(self.device, self.seed, e, step)
            params = self.augment.sample_params(2 * self.B, g)  # both views of the global batch
            params = {k: v[self.rows] for k, v in params.items()}           # (2b, ...): this rank's
            yield self.augment.apply(torch.cat([x, x]), params).chunk(2)    # both views in one pass


def read_image(path: str):
    """ImageFolder's loader, with a file that PIL cannot read named in one line (its error in a
    DataLoader worker would otherwise reach the user as the worker's traceback)."""
    from PIL import Image
    try:
        with open(path, "rb") as f, Image.open(f) as im:
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:   # PIL's errors for truncated/unknown files
        raise UserError(f"{path} is not a readable image ({type(e).__name__}): delete or "
                        f"replace it")


def image_folder(root: Path, transform) -> ImageFolder:
    if not root.is_dir():
        raise MissingData(f"{root} not found: --data-dir must hold train/<class>/ and "
                          f"val/<class>/ image folders (ImageNet's layout)")
    return ImageFolder(str(root), transform=transform, loader=read_image)


class _TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


class FolderLoader:
    """ImageNet-style folders (root/train/<class>/*.JPEG), too big for memory: DataLoader workers
    decode and augment each image with torchvision's transforms and hand over uint8 views (a
    quarter of float32's bytes to copy), normalised on the device. A DistributedSampler gives each
    rank its share. Not world-size invariant: which worker draws an augmentation depends on it."""

    def __init__(self, root: str | Path, info: DatasetInfo, global_batch: int, seed: int,
                 device: torch.device, rank: int = 0, world_size: int = 1, workers: int = 8,
                 subset: int = 0):
        views = v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(info.size, scale=info.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(_blur_kernel(info.size), (0.1, 2.0))],
                           p=0.5 * info.blur)])
        folder = image_folder(Path(root) / "train", _TwoViews(views))
        if subset:  # files are sorted by class: take every k-th so that all classes stay
            folder = Subset(folder, range(0, len(folder), max(1, len(folder) // subset))[:subset])
        # shuffles with (seed, epoch); given rank and size it needs no process group
        self.sampler = DistributedSampler(folder, world_size, rank, shuffle=True, seed=seed,
                                          drop_last=True)
        self.loader = DataLoader(folder, local_batch(global_batch, world_size),
                                 sampler=self.sampler, num_workers=workers, drop_last=True,
                                 pin_memory=device.type == "cuda",
                                 generator=_generator(torch.device("cpu"), seed, rank))
        self.stats, self.device = (info.mean, info.std), device

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(e)
        batches = iter(self.loader)
        try:
            for (x1, x2), _ in batches:
                yield (standardize(x1.to(self.device, non_blocking=True), *self.stats),
                       standardize(x2.to(self.device, non_blocking=True), *self.stats))
        finally:
            del batches                  # its workers stop now, not whenever an error is freed


def pretrain_loader(name: str, data_dir: str | Path, global_batch: int, seed: int,
                    device: torch.device, rank: int = 0, world_size: int = 1, workers: int = 8,
                    subset: int = 0) -> InMemoryLoader | FolderLoader:
    """The training loader dataset `name` needs; both have len() and .epoch(e) -> (x1, x2).
    subset > 0: `subset` images only, the first ones (folders: spread over the classes)."""
    info = DATASETS[name]
    if not info.in_memory:
        return FolderLoader(data_dir, info, global_batch, seed, device, rank, world_size, workers,
                            subset)
    images = load_images(name, data_dir, "pretrain")[0]
    images = (images[:subset] if subset else images).to(device)  # (N, 3, S, S) uint8
    return InMemoryLoader(images, global_batch, SimCLRAugment.for_dataset(info), seed, rank,
                          world_size)


def eval_batches(name: str, data_dir: str | Path, split: str, batch_size: int,
                 device: torch.device, workers: int = 8
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled, un-augmented (uint8 (B, 3, S, S), labels (B,)) batches on device, for linear
    evaluation through standardize. Folders (root/val for "test"): resize to 8/7 S, centre crop."""
    info = DATASETS[name]
    if info.in_memory:
        x, y = load_images(name, data_dir, split)
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        return
    t = v2.Compose([v2.ToImage(), v2.Resize(info.size * 8 // 7, antialias=True),
                    v2.CenterCrop(info.size)])
    folder = image_folder(Path(data_dir) / ("val" if split == "test" else "train"), t)
    pin = device.type == "cuda"
    for x, y in DataLoader(folder, batch_size, num_workers=workers, pin_memory=pin):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
