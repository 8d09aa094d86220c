"""Analytic receptive fields: the box of input pixels that one position of a layer can see.

A forward pass on a zero image of the requested size tracks, per tensor, the field of its positions
per axis (``start``: input coordinate of the first pixel seen by position 0, ``jump``: input pixels
per output step, ``size``: pixels seen by one position). Every torch function call is intercepted
(a ``TorchFunctionMode``), so functional ops (``F.pad``, ``+``, ``torch.cat``) count as well as modules.

- ``conv2d`` (any padding, including ``"same"``, stride and dilation), ``max_pool2d``, ``avg_pool2d``
  and ``pad`` compose the field of their input::

      start' = start - pad_before * jump;  size' = size + (dilation * (kernel - 1)) * jump;
      jump' = jump * stride

- Any other op whose output keeps the spatial size of its inputs (activations, normalisation,
  ``+``, ``*``, ``torch.cat`` along channels) takes the union box of its inputs' fields: the field
  of a residual block is that of its longer path, and parallel branches (Inception, dilated pyramids)
  are covered. The inputs must step by the same jump.
- An op reducing a map to 1x1 (global pooling) yields global context: later ops on it are not
  spatial, and a squeeze-and-excitation gate multiplied onto a map keeps the map's field. A layer
  whose output is global context sees the whole input.

Not supported (a ValueError names the op): ops that resample or shift the grid (upsampling,
transposed convolutions, ``roll``, cropping by slicing), and layers reached through non-spatial
reshapes (transformer tokens).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from sacv.method.models import resolve_layers


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


_GLOBAL = object()  # field marker of a tensor reduced over space: it sees the whole input
_MAX_POOL = ("input", "kernel_size", "stride", "padding", "dilation")
_ARGS = {  # positional parameter names of the ops that compose a field
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation"),
    "max_pool2d": _MAX_POOL,
    "max_pool2d_with_indices": _MAX_POOL,
    "avg_pool2d": ("input", "kernel_size", "stride", "padding"),
    "pad": ("input", "pad"),
}
_RESAMPLING = {"conv_transpose2d", "interpolate", "grid_sample", "roll", "flip"}  # refused even at equal size


class _Stop(Exception):
    """Raised by the target layer's hook: the rest of the forward pass is not needed."""


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _tensors(obj) -> Iterator[torch.Tensor]:
    """The tensors in ``obj``, looking into lists, tuples and dicts (``torch.cat`` inputs, tuple outputs)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _geometry(name: str, params: dict) -> tuple[tuple[int, int], ...]:
    """(kernel, stride, dilation, pad_before) per axis of a conv, pooling or pad call."""
    if name == "pad":
        pad = params["pad"]  # (left, right, top, bottom): last axis first
        return (1, 1), (1, 1), (1, 1), (pad[2] if len(pad) >= 4 else 0, pad[0])
    if name == "conv2d":
        kernel = tuple(params["weight"].shape[-2:])
        stride = _pair(params.get("stride", 1))
    else:
        kernel = _pair(params["kernel_size"])
        stride = _pair(params["stride"]) if params.get("stride") else kernel  # None or [] = kernel
    dilation = _pair(params.get("dilation", 1))
    padding = params.get("padding", 0)
    if padding == "same":
        padding = tuple(dilation[a] * (kernel[a] - 1) // 2 for a in (0, 1))
    elif padding == "valid":
        padding = 0
    return kernel, stride, dilation, _pair(padding)


def _compose(field: ReceptiveField, name: str, params: dict) -> ReceptiveField:
    kernel, stride, dilation, pad = _geometry(name, params)
    start, jump, size = field.start, field.jump, field.size
    return ReceptiveField(
        tuple(start[a] - pad[a] * jump[a] for a in (0, 1)),
        tuple(jump[a] * stride[a] for a in (0, 1)),
        tuple(size[a] + dilation[a] * (kernel[a] - 1) * jump[a] for a in (0, 1)),
        field.input_size,
    )


def _union(name: str, fields: list[ReceptiveField]) -> ReceptiveField:
    jumps = {f.jump for f in fields}
    if len(jumps) > 1:
        raise ValueError(
            f"{name!r} combines maps whose positions step {sorted(jumps)} input pixels apart; "
            "their receptive fields have no common grid. Choose a layer before the combination."
        )
    start = tuple(min(f.start[a] for f in fields) for a in (0, 1))
    end = tuple(max(f.start[a] + f.size[a] for f in fields) for a in (0, 1))
    return ReceptiveField(start, fields[0].jump, (end[0] - start[0], end[1] - start[1]), fields[0].input_size)


class _FieldTracker(TorchFunctionMode):
    """Attaches a field (or ``_GLOBAL``) to every tensor of 4+ dims (..., H, W) computed from the input."""

    def __init__(self):
        super().__init__()
        self.fields = WeakTensorKeyDictionary()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sources = [(t, self.fields[t]) for t in _tensors((args, kwargs)) if t in self.fields]
        result = func(*args, **kwargs)
        if sources:
            name = getattr(func, "__name__", repr(func))
            for out in _tensors(result):
                if out.dim() >= 4:
                    self.fields[out] = self._propagate(name, args, kwargs, sources, out)
        return result

    def _propagate(self, name: str, args: tuple, kwargs: dict, sources: list, out: torch.Tensor):
        if name in _ARGS:
            params = {**dict(zip(_ARGS[name], args)), **kwargs}
            field = self.fields.get(params["input"])
            if field is not None and field is not _GLOBAL:
                return _compose(field, name, params)
            return _GLOBAL
        spatial = [(t, f) for t, f in sources if f is not _GLOBAL]
        if not spatial:
            return _GLOBAL
        out_hw = tuple(out.shape[-2:])
        in_hw = {tuple(t.shape[-2:]) for t, _ in spatial}
        if in_hw == {out_hw} and name not in _RESAMPLING:
            return _union(name, [f for _, f in spatial])
        if out_hw == (1, 1) and name not in _RESAMPLING:
            return _GLOBAL
        raise ValueError(
            f"{name!r} maps spatial size {sorted(in_hw)} to {out_hw} in a way receptive fields do not "
            "follow (only conv2d, max/avg pooling, pad and size-preserving ops do); choose a layer before it."
        )


def receptive_field(module: nn.Module, layer: str, input_size: tuple[int, int]) -> ReceptiveField:
    """Receptive field of every position of ``layer`` (its first call; first 4-D output of a tuple)
    for an input of ``input_size`` (H, W). Runs ``module`` in eval mode up to ``layer``."""
    target = resolve_layers(module, [layer])[layer]
    hw = (int(input_size[0]), int(input_size[1]))
    tracker = _FieldTracker()
    found = {}

    def capture(_sub, _inputs, output):
        out = next((t for t in _tensors(output) if t.dim() >= 4), None)
        found["field"] = tracker.fields.get(out) if out is not None else None
        raise _Stop

    handle = target.register_forward_hook(capture)
    modes = {sub: sub.training for sub in module.modules()}
    param = next(module.parameters())
    x = torch.zeros(1, 3, *hw, device=param.device, dtype=param.dtype)
    try:
        module.eval()
        with torch.no_grad(), tracker:
            tracker.fields[x] = ReceptiveField((0, 0), (1, 1), (1, 1), hw)
            module(x)
    except _Stop:
        pass
    finally:
        handle.remove()
        for sub, training in modes.items():
            sub.training = training
    field = found.get("field")
    if field is None:
        raise ValueError(
            f"layer {layer!r} has no (N, C, H, W) output computed from the input in the forward pass; "
            "choose a convolutional layer (`sacv layers MODEL` lists them)."
        )
    if field is _GLOBAL:
        return ReceptiveField((0, 0), hw, hw, hw)
    return field
