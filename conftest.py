"""Helpers shared by the test files: a tiny training configuration, a free port for process
groups, and one short LoCo run that several tests read (trained once per test session)."""

import socket
from pathlib import Path

import pytest
import torch

import train

# A run that takes seconds: synthetic shapes, ResNet-18 at 1/8 width, in float32 so that results
# are the same on every CPU (the device rule would pick bf16 on some).
TINY = ["--dataset", "synthetic", "--width", "0.125", "--subset", "256", "--batch-size", "64",
        "--lr", "2.0", "--warmup-epochs", "0.5", "--log-every", "1000", "--precision", "fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(run: Path) -> dict:
    return torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """A tiny LoCo run on synthetic shapes, ~200 steps: enough to learn more than a random net."""
    run = tmp_path_factory.mktemp("loco")
    train.main([*TINY, "--subset", "2048", "--epochs", "6", "--warmup-epochs", "1",
                "--method", "loco", "--out", str(run)])
    return run
