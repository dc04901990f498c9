"""Helpers shared by the test files: a tiny training configuration, a free port for process
groups, a start for several processes, and one short LoCo run that several tests read (trained
once per test session)."""

import multiprocessing
import os
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import train

# A run that takes seconds: synthetic shapes, ResNet-18 at 1/8 width, in float32 so that results
# are the same on every CPU (the device rule would pick bf16 on some).
TINY = ["--dataset", "synthetic", "--width", "0.125", "--subset", "256", "--batch-size", "64",
        "--lr", "2.0", "--warmup-epochs", "0.5", "--log-every", "1000", "--precision", "fp32"]


def crash_after_save(monkeypatch, error: type[BaseException] = KeyboardInterrupt) -> None:
    """train.py dies right after it writes a checkpoint (a kill between two epochs)."""
    save = train.save_checkpoint

    def save_then_crash(*args):
        save(*args)
        raise error
    monkeypatch.setattr(train, "save_checkpoint", save_then_crash)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A spawned process imports torch again (and torch._dynamo, which the first optimizer imports):
# ~2.5 s, most of a small multi-process test. The processes of `processes` are forked instead from
# one server that imported them once a session and computed nothing, so that no thread pool is
# running when it forks (a DataLoader forks its workers from a process that has computed).
multiprocessing.set_forkserver_preload(["torch", "torch._dynamo", "train", "pipeline"])


def processes(fn, args: tuple, nprocs: int) -> None:
    """mp.spawn(fn, args, nprocs), each process on one thread (two busy threads per core run ~10x
    slower), forked from the server above (spawned where there is none: Windows). Environment
    variables set here after the server started do not reach them: set them in `fn`."""
    way = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    mp.start_processes(one_thread, args=(fn, *args), nprocs=nprocs, start_method=way)


def one_thread(rank: int, fn, *args) -> None:
    torch.set_num_threads(1)
    fn(rank, *args)


def as_torchrun(rank: int, world: int, ports: list[int], runs: list[list[str]]) -> None:
    """One process of a `world`-process job of `processes`, in the environment torchrun gives
    it, running train.py on every argv in turn (a port each)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    for port, argv in zip(ports, runs):
        os.environ["MASTER_PORT"] = str(port)
        train.main(argv)


def state(run: Path) -> dict:
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny LoCo run on synthetic shapes, ~200 steps: enough to learn more than a random net."""
    run = tmp_path_factory.mktemp("loco")
    train.main([*TINY, "--subset", "2048", "--epochs", "6", "--warmup-epochs", "1",
                "--method", "loco", "--out", str(run)])
    return run


def write_fake_cifar10(root: Path, per_batch: int = 2, test: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's files in the layout torchvision downloads (data_batch_1..5, test_batch), with
    random images: 5 x per_batch training and `test` test images. Returns images and labels."""
    rng = np.random.default_rng(0)
    n = 5 * per_batch + test
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(n) % 10
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = [(f"data_batch_{i + 1}", range(i * per_batch, (i + 1) * per_batch)) for i in range(5)]
    for name, rows in files + [("test_batch", range(5 * per_batch, n))]:
        rows = list(rows)
        batch = {"data": images[rows].reshape(len(rows), -1),  # rows flattened C, H, W
                 "labels": labels[rows].tolist()}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return images, labels


def pytest_configure(config):
    # pycocotools warns of numpy 2's copy keyword on every mask it decodes (detect.py silences
    # it where it scores; the tests decode masks themselves)
    config.addinivalue_line("filterwarnings", "ignore:__array__ implementation:DeprecationWarning")
