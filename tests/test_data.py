"""data.py: every batched augmentation against torchvision's functional op, per-image randomness,
world-size invariance of the loaders, and the datasets read from their files."""

import urllib.error

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

import augment
import data
import shapes
from conftest import write_fake_cifar10
from cli import UserError


def test_color_jitter_matches_torchvision_in_each_images_own_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 12, 12, generator=g)
    x[:, :, :4] = (x[:, :, :4] * 4).round() / 4  # channel ties and grey pixels: hue's edge cases
    aug = augment.SimCLRAugment(12, (0.08, 1.0), False, (0, 0, 0), (1, 1, 1))
    p = aug.sample_params(16, g)
    assert len({tuple(o) for o in p["order"].tolist()}) > 1  # the batch mixes orders
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    expected = []
    for img, factors, order in zip(x, p["factors"].tolist(), p["order"].tolist()):
        for op in order:
            img = ops[op](img, factors[op])
        expected.append(img)
    torch.testing.assert_close(augment.color_jitter(x, p["factors"], p["order"]),
                               torch.stack(expected), atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(augment.grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


def test_crop_and_flip_match_torchvision_resized_crop_then_hflip():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(64, 3, 32, 32, generator=g)
    p = augment.SimCLRAugment(32, (0.08, 1.0), False, (0, 0, 0), (1, 1, 1)).sample_params(64, g)
    expected = []
    for img, (top, left, h, w), flip in zip(x, p["box"].int().tolist(), p["flip"].tolist()):
        img = TF.resized_crop(img, top, left, h, w, [32, 32], antialias=False)
        expected.append(TF.horizontal_flip(img) if flip else img)
    torch.testing.assert_close(augment.resized_crop_flip(x, p["box"], p["flip"], 32),
                               torch.stack(expected), atol=1e-5, rtol=0)
    whole = torch.tensor([[0.0, 0.0, 32.0, 32.0]])  # the whole image, unflipped: the image itself
    torch.testing.assert_close(augment.resized_crop_flip(x[:1], whole, torch.tensor([False]), 32),
                               x[:1], atol=1e-6, rtol=0)


def test_gaussian_blur_matches_torchvision_with_a_sigma_per_image():
    g = torch.Generator().manual_seed(2)
    x, sigma = torch.rand(5, 3, 20, 20, generator=g), 0.1 + 1.9 * torch.rand(5, generator=g)
    expected = torch.stack([TF.gaussian_blur(img, [9, 9], [s, s])
                            for img, s in zip(x, sigma.tolist())])
    torch.testing.assert_close(augment.gaussian_blur(x, sigma, 9), expected, atol=1e-5, rtol=0)


def test_crop_boxes_lie_inside_the_image_with_area_and_aspect_in_range():
    aug = augment.SimCLRAugment(32, (0.2, 1.0), False, (0, 0, 0), (1, 1, 1))
    top, left, h, w = aug.sample_params(4096, torch.Generator().manual_seed(3))["box"].unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 32).all()
    area = h * w / 32 ** 2
    # rounding h and w to whole pixels moves area and aspect a little outside the nominal range
    assert area.min() > 0.2 * 0.8 and area.max() <= 1.0
    assert (w / h).min() > 3 / 4 * 0.8 and (w / h).max() < 4 / 3 * 1.25
    assert area.mean() > 0.45  # not stuck at the minimum (uniform area would give ~0.55)
    assert (top == 0).float().mean() < 0.5  # positions vary too


def test_augment_draws_independent_params_per_image():
    aug = augment.SimCLRAugment.for_dataset(data.DATASETS["synthetic"])
    x = shapes.make_synthetic(1, 0)[0].expand(256, -1, -1, -1)  # one image, 256 times
    p = aug.sample_params(256, torch.Generator().manual_seed(4))
    assert len(set(map(tuple, p["box"].tolist()))) > 128
    assert len(set(map(tuple, p["order"].tolist()))) == 24  # all permutations of the 4 jitter ops
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
        assert abs(p[key].float().mean().item() - rate) < 0.1, key
    views = aug.apply(x, p).flatten(1)
    assert torch.cdist(views, views).add(torch.eye(256) * 1e9).min() > 0  # no two views alike


def test_augment_is_reproducible_from_the_generator_seed():
    aug = augment.SimCLRAugment.for_dataset(data.DATASETS["stl10"])  # blur on: every op in play
    x = torch.randint(0, 256, (8, 3, 96, 96), dtype=torch.uint8,
                      generator=torch.Generator().manual_seed(0))
    a, b, c = (aug(x, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def _views(loader: data.InMemoryLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader.epoch(epoch))


def test_two_ranks_slices_concatenated_equal_the_one_rank_batch():
    images = shapes.make_synthetic(100, 0)[0]
    aug = augment.SimCLRAugment.for_dataset(data.DATASETS["synthetic"])
    one = _views(data.InMemoryLoader(images, 32, aug, seed=7), epoch=3)
    ranks = [_views(data.InMemoryLoader(images, 32, aug, seed=7, rank=r, world_size=2), epoch=3)
             for r in range(2)]
    assert len(one) == len(ranks[0]) == 100 // 32  # the last incomplete global batch is dropped
    for step, (x1, x2) in enumerate(one):
        assert x1.shape == (32, 3, 32, 32) and ranks[0][step][0].shape == (16, 3, 32, 32)
        assert torch.equal(x1, torch.cat([ranks[0][step][0], ranks[1][step][0]]))
        assert torch.equal(x2, torch.cat([ranks[0][step][1], ranks[1][step][1]]))
    again = _views(data.InMemoryLoader(images, 32, aug, seed=7), epoch=3)  # a resumed run
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, again))
    other = _views(data.InMemoryLoader(images, 32, aug, seed=7), epoch=4)
    assert not torch.equal(one[0][0], other[0][0])


class _TagAugment:
    """Stand-in augmentation that keeps each image's id (its pixel value) readable."""

    def sample_params(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {"view": torch.arange(n) // (n // 2)}  # 0 for view 1's rows, 1 for view 2's

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return images[:, 0, 0, 0].float() + 1000 * params["view"]


def test_loader_shows_every_image_at_most_once_per_epoch_and_pairs_the_views():
    images = torch.arange(70).view(70, 1, 1, 1).expand(70, 3, 2, 2).to(torch.uint8).contiguous()
    loader = data.InMemoryLoader(images, 16, _TagAugment(), seed=0, rank=1, world_size=2)
    seen = []
    for x1, x2 in loader.epoch(0):
        assert torch.equal(x2, x1 + 1000)  # view 2 of the same images, in the same order
        seen += x1.long().tolist()
    assert len(seen) == len(set(seen)) == 4 * 8  # 4 global batches of 16, half of each on rank 1


def test_batch_not_divisible_by_world_size_raises_and_says_what_to_do():
    aug = augment.SimCLRAugment.for_dataset(data.DATASETS["synthetic"])
    with pytest.raises(UserError, match="multiple of 3"):
        data.InMemoryLoader(torch.zeros(64, 3, 32, 32, dtype=torch.uint8), 32, aug, 0, 0, 3)


def test_synthetic_data_is_deterministic_from_the_seed_and_balanced():
    x, y = shapes.make_synthetic(300, seed=3)
    x2, y2 = shapes.make_synthetic(300, seed=3)
    x3, _ = shapes.make_synthetic(300, seed=4)
    assert x.shape == (300, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, x3)
    assert torch.bincount(y).tolist() == [30] * 10
    assert len(set(y[:20].tolist())) > 3  # shuffled, not sorted by class
    with torch.autocast("cpu", torch.bfloat16):      # as linear_eval reads them: the same pixels
        assert torch.equal(shapes.make_synthetic(300, seed=3)[0], x)
    with torch.autocast("cpu", torch.bfloat16):
        inside = shapes.make_scenes(4, seed=1)
    outside = shapes.make_scenes(4, seed=1)
    assert torch.equal(inside[0], outside[0]) and all(
        torch.equal(a["masks"], b["masks"]) for a, b in zip(inside[1], outside[1]))


def test_the_first_synthetic_images_drawn_alone_are_those_of_the_whole_split():
    """A run on --subset 256 draws only its 256 images: the same pixels and labels as the first
    256 of the 50,000 (every image's noise still comes from the one stream, in the same order)."""
    x, y = shapes.make_synthetic(3000, seed=2)
    for first in (1, 256, 2999):
        xf, yf = shapes.make_synthetic(3000, seed=2, first=first)
        assert torch.equal(xf, x[:first]) and torch.equal(yf, y[:first]), first
    data._drawn.clear()                                  # the split's first 300, then all of it
    xf, yf = data.load_images("synthetic", "", "test", limit=300)
    x, y = data.load_images("synthetic", "", "test")
    assert len(x) == 10_000 and torch.equal(xf, x[:300]) and torch.equal(yf, y[:300])


def test_synthetic_colour_is_not_tied_to_class_and_the_stats_table_is_current():
    x, y = shapes.make_synthetic(5000, seed=0)
    x = x.float() / 255
    colour = x.mean((2, 3))  # (n, 3) mean colour per image
    per_class = torch.stack([colour[y == k].mean(0) for k in range(10)])
    assert (per_class - colour.mean(0)).abs().max() < 0.05  # colour alone cannot tell the class
    info = data.DATASETS["synthetic"]
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.tensor(info.mean), atol=0.01, rtol=0)
    torch.testing.assert_close(x.transpose(0, 1).flatten(1).std(1), torch.tensor(info.std),
                               atol=0.01, rtol=0)


def test_cifar10_layout_loads_from_the_pickles_without_checksums(tmp_path):
    images, labels = write_fake_cifar10(tmp_path)
    x, y = data.load_images("cifar10", tmp_path, "pretrain", download=False)
    assert x.dtype == torch.uint8 and torch.equal(x, torch.from_numpy(images[:10]))
    assert y.tolist() == labels[:10].tolist()
    x, y = data.load_images("cifar10", tmp_path, "test", download=False)
    assert torch.equal(x, torch.from_numpy(images[10:])) and y.tolist() == labels[10:].tolist()


def test_stl10_binaries_load_transposed_with_unlabeled_first_and_labels_from_zero(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 3, 96, 96), dtype=np.uint8)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for part, rows in (("unlabeled", [0, 1]), ("train", [2, 3]), ("test", [4])):
        images[rows].transpose(0, 1, 3, 2).tofile(folder / f"{part}_X.bin")  # column-major on disk
        if part != "unlabeled":
            np.array([r + 1 for r in rows], np.uint8).tofile(folder / f"{part}_y.bin")  # 1-based
    x, y = data.load_images("stl10", tmp_path, "pretrain", download=False)
    assert torch.equal(x, torch.from_numpy(images[:4])) and y.tolist() == [-1, -1, 2, 3]
    x, y = data.load_images("stl10", tmp_path, "test", download=False)
    assert torch.equal(x, torch.from_numpy(images[4:])) and y.tolist() == [4]


def test_missing_data_that_cannot_be_downloaded_names_data_dir(tmp_path, monkeypatch):
    """data.py names --data-dir, which every script that reads data has; train.py adds its own
    way out (--dataset synthetic), which linear_eval.py, reading the checkpoint's, has not."""
    tried = []

    def offline(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.utils.download_and_extract_archive", offline)
    with pytest.raises(UserError, match="--data-dir") as e:
        data.load_images("cifar10", tmp_path, "train")
    assert tried and "cifar-10" in tried[0] and "synthetic" not in str(e.value)
    with pytest.raises(UserError, match="--data-dir"):
        data.load_images("stl10", tmp_path, "pretrain", download=False)
    assert len(tried) == 1  # download=False does not try


def test_imagefolder_loader_gives_two_normalised_views_and_eval_gives_uint8_centre_crops(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    cpu = torch.device("cpu")
    loader = data.pretrain_loader("imagefolder", tmp_path, 4, seed=0, device=cpu, workers=0)
    assert len(loader) == 1  # 6 images, batches of 4: the incomplete one is dropped
    (x1, x2), = list(loader.epoch(0))
    assert x1.shape == x2.shape == (4, 3, 224, 224) and x1.dtype == torch.float32
    assert x1.min() < -1 and x1.max() < 3 and not torch.equal(x1, x2)  # normalised, 2 views
    (x, y), = list(data.eval_batches("imagefolder", tmp_path, "test", 8, cpu, workers=0))
    assert x.shape == (6, 3, 224, 224) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
