"""Shared fixtures: seeded tiny networks and the real pretrained model (loaded once)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> in-place ReLU -> conv -> ReLU -> global average -> linear; 5 classes."""

    def __init__(self, channels: int = 6, n_classes: int = 5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(channels, n_classes)

    def forward(self, x):
        x = self.pool(self.features(x)).flatten(1)
        return self.fc(self.dropout(x))


def tiny_net() -> nn.Module:
    """Importable factory for the `module:callable` model spec."""
    torch.manual_seed(0)
    return TinyNet()


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="session")
def lite0():
    from sacv.method.models import load_model

    return load_model("efficientnet_lite0")


@pytest.fixture(scope="session")
def prefect():
    """One temporary Prefect API for every flow test in the session."""
    from flows.process import configure_process

    configure_process()  # embedded-mode defaults, before the harness starts its API
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """An S3-compatible server (moto) on a free loopback port for the session, with dummy
    credentials in this process's environment; stopped (SIGTERM, then SIGKILL) at teardown."""
    import os

    from tests.servers import S3_ENV, start_s3, stop

    saved = {key: os.environ.get(key) for key in S3_ENV}
    os.environ.update(S3_ENV)
    server = start_s3(tmp_path_factory.mktemp("s3") / "moto.log")
    try:
        yield server
    finally:
        stop(server.process)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
