"""Analytic receptive fields: the box of input pixels that one position of a layer can see.

Walks the convolutions, poolings and explicit paddings that run, in forward order, before the layer's
output is produced, and composes them per axis (``start``: input coordinate of the first pixel seen
by position 0, ``jump``: input pixels per output step, ``size``: pixels seen by one position):

    start' = start - pad_before * jump;  size' = size + (k_eff - 1) * jump;  jump' = jump * stride

Covers chain networks: sequential stacks, residual and inverted-residual blocks (a skip path sees a
subset of the main path), TensorFlow-style "same" padding (EfficientNet). Operations on 1x1 inputs
(squeeze-and-excitation context) are skipped: they carry global, not spatial, context. Networks with
parallel branches of different kernels (Inception) are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from sacv.models import resolve_layers


@dataclass(frozen=True)
class ReceptiveField:
    """Per-axis (rows, cols) composition; boxes are half-open ``(top, left, bottom, right)``."""

    start: tuple[int, int]
    jump: tuple[int, int]
    size: tuple[int, int]
    input_size: tuple[int, int]

    def box(self, i: int, j: int, clip: bool = True) -> tuple[int, int, int, int]:
        top = self.start[0] + i * self.jump[0]
        left = self.start[1] + j * self.jump[1]
        bottom, right = top + self.size[0], left + self.size[1]
        if clip:
            h, w = self.input_size
            top, left, bottom, right = max(top, 0), max(left, 0), min(bottom, h), min(right, w)
        return top, left, bottom, right


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _tf_same_pad_before(size: int, kernel: int, stride: int, dilation: int) -> int:
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2


def _operation(module: nn.Module, in_hw: tuple[int, int]):
    """(kernel, stride, dilation, pad_before) per axis for a spatial op, or None if not spatial."""
    if isinstance(module, nn.Conv2d):
        k, s, d = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
        if "DynamicSamePadding" in type(module).__name__:
            pad = tuple(_tf_same_pad_before(in_hw[a], k[a], s[a], d[a]) for a in (0, 1))
        elif module.padding == "same":
            pad = tuple(d[a] * (k[a] - 1) // 2 for a in (0, 1))
        elif module.padding == "valid":
            pad = (0, 0)
        else:
            pad = _pair(module.padding)
        return k, s, d, pad
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        dilation = getattr(module, "dilation", 1)
        stride = module.stride if module.stride is not None else module.kernel_size
        return _pair(module.kernel_size), _pair(stride), _pair(dilation), _pair(module.padding)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        left, _right, top, _bottom = module.padding  # (left, right, top, bottom)
        return (1, 1), (1, 1), (1, 1), (top, left)
    return None


def receptive_field(module: nn.Module, layer: str, input_size: tuple[int, int]) -> ReceptiveField:
    """Receptive field of every position of ``layer`` for an input of ``input_size`` (H, W)."""
    target = resolve_layers(module, [layer])[layer]
    trace: list[tuple[nn.Module, tuple[int, int]]] = []
    done = {"flag": False}
    handles = []

    def record(sub, inputs, _output):
        if not done["flag"] and inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4:
            trace.append((sub, tuple(inputs[0].shape[-2:])))

    def finish(_sub, _inputs, _output):
        done["flag"] = True

    for sub in module.modules():
        if _operation(sub, (1, 1)) is not None:
            handles.append(sub.register_forward_hook(record))
    handles.append(target.register_forward_hook(finish))  # after `record`: the layer itself counts
    try:
        was_training = module.training
        module.eval()
        device = next(module.parameters()).device
        with torch.no_grad():
            module(torch.zeros(1, 3, *input_size, device=device))
        module.train(was_training)
    finally:
        for handle in handles:
            handle.remove()

    start, jump, size = [0, 0], [1, 1], [1, 1]
    for sub, in_hw in trace:
        if in_hw == (1, 1):
            continue  # global context (squeeze-and-excitation), not a spatial neighbourhood
        kernel, stride, dilation, pad = _operation(sub, in_hw)
        for a in (0, 1):
            k_eff = dilation[a] * (kernel[a] - 1) + 1
            start[a] -= pad[a] * jump[a]
            size[a] += (k_eff - 1) * jump[a]
            jump[a] *= stride[a]
    return ReceptiveField(tuple(start), tuple(jump), tuple(size), tuple(input_size))
