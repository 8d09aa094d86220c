"""A stand-in for EfficientNet-Lite0 that computes ~25× less: the CPU proxy of a fast GPU.

On a GPU the model is cheap next to decoding, writing and the flow's own overheads; on the 2-core
CPU machine Lite0 is the bottleneck and hides them. This model has Lite0's preprocessing (224 px
crop, 1 000 classes) and the same output shapes at ``_blocks.8`` (112, 14, 14) and ``_blocks.12``
(192, 7, 7), so the flow decodes, stores and writes the same bytes per image, but its compute is a
16 px patch embedding and two 1×1 convolutions (random weights, seeded). Use it with
``benchmarks/extract_throughput.py --model fast_proxy:lite0_shapes`` (the script folder is on sys.path).
"""

from __future__ import annotations

import torch
from torch import nn

from sacv.method.models import LoadedModel, Preprocessing, imagenet_class_names

LITE0 = Preprocessing(resize=256, crop=224, mean=(0.498,) * 3, std=(0.502,) * 3)


class Lite0Shapes(nn.Module):
    """(B, 3, 224, 224) -> logits (B, 1000); ``_blocks.8`` gives (B, 112, 14, 14), ``_blocks.12`` (B, 192, 7, 7)."""

    def __init__(self):
        super().__init__()
        self._stem = nn.Sequential(nn.Conv2d(3, 112, 16, stride=16), nn.ReLU6())  # (B, 112, 14, 14)
        blocks = [nn.Identity() for _ in range(13)]
        # Lite0's blocks end in a linear projection (no activation), so these end in a convolution.
        blocks[8] = nn.Conv2d(112, 112, 1)  # (B, 112, 14, 14)
        blocks[9] = nn.ReLU6()
        blocks[11] = nn.Conv2d(112, 192, 2, stride=2)  # (B, 192, 7, 7)
        blocks[12] = nn.Conv2d(192, 192, 1)  # (B, 192, 7, 7)
        self._blocks = nn.Sequential(*blocks)
        self._fc = nn.Linear(192, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fc(nn.functional.relu6(self._blocks(self._stem(x))).mean(dim=(2, 3)))


def lite0_shapes() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel("fast_proxy:lite0_shapes", Lite0Shapes(), LITE0, imagenet_class_names())
