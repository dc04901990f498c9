"""Data: datasets as uint8 tensors, and the loaders that turn them into two views per image.

    DATASETS[name] -> DatasetInfo    per-dataset choices: view size, crop scale, blur, mean/std, tau
    load_images(name, data_dir, split, download=True, limit=0) -> uint8 images (N, 3, H, W),
        labels (N,); limit > 0: the first `limit` only
        split "pretrain": what contrastive training sees (STL-10: unlabeled + train, label -1 for
        unlabeled); "train", "test": labelled, for linear evaluation
    (the `synthetic` images come from shapes.py: ten shape classes drawn in-process, no download)
    InMemoryLoader(images, global_batch, augment, seed, rank=0, world_size=1)
        len(loader) steps per epoch; .epoch(e) yields (x1, x2), each (B // world_size, 3, S, S)
    FolderLoader(root, info, ...)    ImageNet-style folders: DataLoader workers, torchvision's views
    pretrain_loader(name, data_dir, global_batch, seed, device, ...)   whichever loader name needs
    eval_batches(name, data_dir, split, batch_size, device, limit=0)   (uint8 images, labels)

Datasets that fit in memory live as one uint8 tensor on the device, and augment.py draws their
views there, batched (why: its docstring). Every rank draws the augmentation of the whole global
batch from a generator seeded by (seed, epoch, step) and keeps its own rows, so N processes see
exactly the views one process would (tests/test_data.py checks it).
"""

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from augment import SimCLRAugment, blur_kernel, standardize
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


_drawn: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _synthetic(n: int, seed: int, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` (0: all n) synthetic images of a split, drawn once per process and kept
    (50,000 take 1.5 s on one core, the first 256 0.2 s: a test suite trains and evaluates many
    tiny runs, some in processes of their own). Read-only: callers slice, never write."""
    limit = min(limit or n, n)
    kept = _drawn.get((n, seed))
    if kept is None or len(kept[0]) < limit:
        kept = _drawn[(n, seed)] = make_synthetic(n, seed, DATASETS["synthetic"].size, first=limit)
    return kept[0][:limit], kept[1][:limit]


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
        from torchvision.datasets.utils import download_and_extract_archive   # (*) below
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


def load_images(name: str, data_dir: str | Path, split: str, download: bool = True,
                limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, H, W) and int64 labels (N,) of an in-memory dataset, the first `limit`
    only if limit > 0; see module doc."""
    if split not in ("pretrain", "train", "test"):
        raise ValueError(f"split must be pretrain, train or test, not {split!r}")
    if name == "synthetic":
        return _synthetic(*SYNTHETIC_SPLITS[split], limit)
    x, y = _read(name, data_dir, split, download)
    return (x[:limit], y[:limit]) if limit else (x, y)


def _read(name: str, data_dir: str | Path, split: str, download: bool
          ) -> tuple[torch.Tensor, torch.Tensor]:
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


# ---------------------------------------------------------------------------- loaders
def _generator(device: torch.device, *keys: int) -> torch.Generator:
    """A generator seeded by the tuple keys, e.g. (seed, epoch, step): the same numbers on every
    rank and after a resume. SeedSequence mixes the keys, so (1, 2) and (2, 1) differ. CUDA draws
    on the device; other devices draw on the CPU, whose streams every torch build supports."""
    seed = int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])
    return torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(seed)


def local_batch(global_batch: int, world_size: int) -> int:
    """Each data-parallel process's share of the batch (a pipeline's replicas: each replica's)."""
    if global_batch % world_size:
        raise UserError(f"--batch-size {global_batch} does not split evenly over {world_size} "
                        f"data-parallel processes: use a multiple of {world_size}", flag=True)
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


# (*) torchvision is imported where a download or an image folder needs it: it takes about a
# second to import, which every CIFAR-10 or synthetic run (and every test's process) would pay
def image_folder(root: Path, transform):
    from torchvision.datasets import ImageFolder
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
        from torchvision.transforms import v2
        views = v2.Compose([
            v2.ToImage(), v2.RandomResizedCrop(info.size, scale=info.crop_scale, antialias=True),
            v2.RandomHorizontalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel(info.size), (0.1, 2.0))],
                           p=0.5 * info.blur)])
        folder = image_folder(Path(root) / "train", _TwoViews(views))
        whole(subset, len(folder), root)
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
    images = load_images(name, data_dir, "pretrain", limit=subset)[0].to(device)  # (N, 3, S, S)
    whole(subset, len(images), name)
    return InMemoryLoader(images, global_batch, SimCLRAugment.for_dataset(info), seed, rank,
                          world_size)


def whole(subset: int, n: int, what) -> None:
    """Say so when --subset asks for more images than there are (training uses all n)."""
    if subset > n:
        print(f"--subset {subset}: {what} holds {n} training images; training on all of them",
              flush=True)


def eval_batches(name: str, data_dir: str | Path, split: str, batch_size: int,
                 device: torch.device, workers: int = 8, limit: int = 0
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled, un-augmented (uint8 (B, 3, S, S), labels (B,)) batches on device, for linear
    evaluation through standardize, of the first `limit` images if limit > 0 (in memory: folders
    are read in full). Folders (root/val for "test"): resize to 8/7 S, centre crop."""
    info = DATASETS[name]
    if info.in_memory:
        x, y = load_images(name, data_dir, split, limit=limit)
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        return
    from torchvision.transforms import v2
    t = v2.Compose([v2.ToImage(), v2.Resize(info.size * 8 // 7, antialias=True),
                    v2.CenterCrop(info.size)])
    folder = image_folder(Path(data_dir) / ("val" if split == "test" else "train"), t)
    pin = device.type == "cuda"
    for x, y in DataLoader(folder, batch_size, num_workers=workers, pin_memory=pin):
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
