"""Tiny importable models for tests (model specs `tests.models:<factory>`)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from sacv.method.models import LoadedModel, Preprocessing

SMALL = Preprocessing(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


class SmallNet(nn.Module):
    """conv(3->8) -> ReLU -> conv(8->8, stride 2) -> ReLU -> mean -> linear(8->4)."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU()
        )
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        if self.delay:
            time.sleep(self.delay)
        return self.fc(self.features(x).mean(dim=(2, 3)))


def small(seed: int = 0, delay: float | None = None) -> LoadedModel:
    """The tiny classifier; ``delay`` (default: ``SACV_TEST_DELAY`` or 0) seconds of sleep per batch."""
    torch.manual_seed(seed)
    delay = float(os.environ.get("SACV_TEST_DELAY", "0")) if delay is None else delay
    names = ["cat", "dog", "zebra", "horse"]
    return LoadedModel("tests.models:small", SmallNet(delay), SMALL, names)


def pointwise() -> LoadedModel:
    """The tiny classifier with a 1×1 convolution (8 -> 8) as ``features.2``: on the CPU, oneDNN sums
    it in an order that depends on torch's thread count. ``SACV_TEST_DELAY`` as for :func:`small`.
    Each load appends a line with this process's ``CUDA_VISIBLE_DEVICES`` to
    ``$SACV_TEST_LOADS/<pid>.txt`` when that folder is set."""
    loads = os.environ.get("SACV_TEST_LOADS")
    if loads:
        with open(os.path.join(loads, f"{os.getpid()}.txt"), "a") as record:
            record.write(os.environ.get("CUDA_VISIBLE_DEVICES", "") + "\n")
    torch.manual_seed(0)
    net = SmallNet(float(os.environ.get("SACV_TEST_DELAY", "0")))
    net.features[2] = nn.Conv2d(8, 8, 1)
    return LoadedModel("tests.models:pointwise", net, SMALL, ["cat", "dog", "zebra", "horse"])


def small_other() -> LoadedModel:
    return small(seed=1)


def small_slow() -> LoadedModel:
    """Sleeps SACV_TEST_DELAY seconds per batch, so a run can be killed between shards."""
    return small(delay=float(os.environ.get("SACV_TEST_DELAY", "0.5")))


def bare_small() -> nn.Module:
    """The tiny classifier as a bare ``nn.Module``: preprocessing and class names come from the config."""
    torch.manual_seed(0)
    return SmallNet()
