"""Activations and target-logit gradients of several layers in one forward and one backward pass.

Which tensor is "the output of a layer": exactly what the named module returns, **before** any
activation that follows it in the parent. A forward hook keeps that tensor and hands a clone to the
rest of the network, so an in-place activation after the layer (``nn.ReLU(inplace=True)`` after a
``Conv2d``) modifies the clone, never the kept tensor. For a post-activation output, name the
activation module itself (e.g. ``features.1`` for the ReLU after ``features.0``).

Layout: every array returned is channels-last ``(N, H, W, C)`` on the CPU, float32 unless a
``dtype`` is asked for (the cast is done on the device, before the copy).
Gradients are of the target class **logit** (pre-softmax) with respect to the layer output.

Numerics: exact float32 by default on every device. PyTorch leaves cuDNN's TF32 mode on for
convolutions, which changes gradients on CUDA by several per cent (docs/numerics.md); ``extract``
turns TF32 off for convolutions and matmuls while the model runs (``allow_tf32=True`` keeps it on)
and restores the previous settings after. ``autocast`` runs the forward pass in half precision.
On the CPU the numbers also depend on torch's thread count (:func:`use_torch_threads`).
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from sacv.method.models import resolve_layers

logger = logging.getLogger(__name__)  # sacv.method.activations


def channels_last(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C) by permuting axes (never a reshape)."""
    if tensor.dim() != 4:
        raise ValueError(f"expected a 4-D (N, C, H, W) tensor, got shape {tuple(tensor.shape)}")
    return tensor.permute(0, 2, 3, 1)


@contextmanager
def capture_layers(module: nn.Module, layer_names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Forward hooks on the named layers, removed on exit even when the body raises.

    Yields a dict filled during the forward pass: layer name -> the layer's output tensor
    (N, C, H, W), part of the autograd graph (so ``torch.autograd.grad`` can target it).
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []

    def make_hook(name: str):
        def hook(_module, _inputs, output):
            if not isinstance(output, torch.Tensor) or output.dim() != 4:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise ValueError(
                    f"layer {name!r} outputs {shape}, not a (N, C, H, W) feature map; "
                    "choose a convolutional layer (see `sacv layers MODEL`)"
                )
            if name in captured:
                raise ValueError(
                    f"layer {name!r} ran twice in one forward pass (a shared module); "
                    "a spatial concept vector needs a layer with a single output"
                )
            if torch.is_grad_enabled() and not output.requires_grad:
                output.requires_grad_(True)  # frozen weights: still differentiate w.r.t. this output
            captured[name] = output
            return output.clone()  # the rest of the network may modify this copy in place

        return hook

    for name, sub in resolve_layers(module, list(layer_names)).items():
        handles.append(sub.register_forward_hook(make_hook(name)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


_MODULE_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.Lock] = weakref.WeakKeyDictionary()
_MODULE_LOCKS_LOCK = threading.Lock()


def _lock_of(module: nn.Module) -> threading.Lock:
    """The lock of ``module``: tasks in threads of one process share a cached model, and two
    passes at once would each see the other's hooks fire (and TF32 is process-wide state)."""
    with _MODULE_LOCKS_LOCK:
        return _MODULE_LOCKS.setdefault(module, threading.Lock())


@contextmanager
def tf32_mode(allow_tf32: bool) -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls may use TF32 only if ``allow_tf32``; the previous
    process-wide settings are restored on exit, also when the body raises."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def use_torch_threads(threads: int | None) -> None:
    """Run torch's CPU work on ``threads`` intra-op threads from here on (None: leave it). Set in the
    thread that computes: OpenMP keeps the count per thread, threads started later take torch's
    process-wide value. oneDNN's 1×1 convolutions (forward and backward) split their sums by thread,
    so the CPU numbers depend on this count (docs/deploy.md); process-wide, never restored."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def input_memory_format(device: torch.device) -> torch.memory_format:
    """The layout the model's input batch is given in: channels-last on the CPU, where oneDNN's
    convolutions are faster on it (``raw_images_per_s`` of ``benchmarks/extract_throughput.py``);
    NCHW elsewhere (channels-last is not measured on CUDA). The layout changes float rounding only."""
    return torch.channels_last if device.type == "cpu" else torch.contiguous_format


@dataclass
class Extraction:
    """Per-layer activations/gradients (N, H, W, C) (float32, or ``extract``'s ``dtype``), logits (N, K)
    float32, targets (N,) int64."""

    activations: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor] | None
    logits: torch.Tensor
    targets: torch.Tensor


def resolve_targets(target: int | Sequence[int] | torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    """``None`` -> each image's predicted class; an int -> that class for all; a sequence -> per image."""
    n, n_classes = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    targets = torch.as_tensor(target, dtype=torch.long, device=logits.device)
    if targets.dim() == 0:
        targets = targets.expand(n)
    if targets.shape != (n,):
        raise ValueError(f"got {targets.numel()} targets for {n} images; give one class per image")
    if (targets < 0).any() or (targets >= n_classes).any():
        raise ValueError(f"target classes must lie in [0, {n_classes}); got {targets.tolist()}")
    return targets


def _check_finite(name: str, tensor: torch.Tensor, what: str, source: torch.Tensor) -> None:
    """Raise if ``tensor`` (``source`` cast to the output dtype) holds NaN/inf, saying whether the
    model produced them or the cast overflowed."""
    if torch.isfinite(source).all():
        raise ValueError(
            f"{what} of layer {name!r} overflow {tensor.dtype} (largest magnitude {source.abs().max().item():.3g}); "
            "set extract.dtype: float32 in the config"
        )
    if not torch.isfinite(tensor).all():
        bad = (~torch.isfinite(tensor)).sum().item()
        raise ValueError(
            f"{what} of layer {name!r} contain {bad} NaN/inf values; check the input images and "
            "the weights (a half-precision overflow is a common cause)"
        )


def extract(
    module: nn.Module,
    images: torch.Tensor,
    layers: Sequence[str],
    target: int | Sequence[int] | torch.Tensor | None = None,
    with_gradients: bool = True,
    autocast: torch.dtype | None = None,
    allow_tf32: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Extraction:
    """Run ``module`` (put in eval mode) on ``images`` (N, 3, H, W) once.

    Returns activations of every layer in ``layers`` and, if ``with_gradients``, the gradient of
    the target logit of each image (see :func:`resolve_targets`) with respect to those activations.
    Images in a batch are independent in eval mode, so the gradient of the summed target logits
    gives every image its own gradient. ``autocast`` (e.g. ``torch.bfloat16``) runs the forward pass
    in that precision; activations and gradients are returned in ``dtype`` whatever it is (float32
    by default; cast on the device, rounding to nearest even, so a half-precision store copies half
    the bytes; a value that overflows ``dtype`` raises ``ValueError``), logits in float32.
    ``allow_tf32`` lets CUDA use TF32 (see the module docstring); off by default.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got {tuple(images.shape)}")
    with _lock_of(module):  # hooks live on the module: one pass at a time through a module threads share
        module.eval()
        device = next(module.parameters()).device
        images = images.to(device, non_blocking=True).contiguous(memory_format=input_memory_format(device))
        precision = torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)
        with tf32_mode(allow_tf32), torch.set_grad_enabled(with_gradients), capture_layers(module, layers) as captured:
            with precision:
                logits = module(images).float()  # (N, K)
            targets = resolve_targets(target, logits.detach())
            outputs = [captured[name] for name in layers]
            grads = None
            if with_gradients:
                selected = logits.gather(1, targets[:, None]).sum()
                grads = torch.autograd.grad(selected, outputs, allow_unused=True)
    if grads is not None:
        for name, grad in zip(layers, grads):
            if grad is None:
                raise ValueError(
                    f"the logit does not depend on layer {name!r}; choose a layer on the path to the output"
                )
    # Layout, dtype and the finiteness check on the device (one synchronisation), then one copy each.
    sources = {("activations", name): out.detach() for name, out in zip(layers, outputs)}
    if grads is not None:
        sources |= {("gradients", name): g.detach() for name, g in zip(layers, grads)}
    on_device = {key: channels_last(tensor).to(dtype).contiguous() for key, tensor in sources.items()}
    # Finite iff the largest magnitude is (amax propagates NaN): a reduction, far cheaper on the CPU
    # than an elementwise isfinite over float16.
    finite = torch.stack([torch.isfinite(t.abs().amax()) for t in on_device.values()]).cpu()
    for ((what, name), tensor), ok in zip(on_device.items(), finite.tolist()):
        if not ok:
            _check_finite(name, tensor, what, sources[what, name])
    activations = {name: on_device["activations", name].cpu() for name in layers}  # (N, H, W, C)
    gradients = {name: on_device["gradients", name].cpu() for name in layers} if grads is not None else None
    return Extraction(activations, gradients, logits.detach().float().cpu(), targets.cpu())


def halving_on_oom(forward: Callable[[torch.Tensor, object], Extraction], inputs: torch.Tensor, targets) -> Extraction:
    """``forward(inputs, targets)``; a CUDA out-of-memory error splits the batch in halves, each run
    the same way (down to one image: then the error stands), and the halves are joined. ``targets``:
    per image (a tensor, split alongside), or one class or None for all. Logged once per split."""
    try:
        return forward(inputs, targets)
    except torch.cuda.OutOfMemoryError:
        if len(inputs) == 1:
            raise
    half = len(inputs) // 2
    logger.warning(
        "out of device memory on a batch of %d images: retrying as %d + %d", len(inputs), half, len(inputs) - half
    )
    if inputs.is_cuda:
        torch.cuda.empty_cache()
    per_image = isinstance(targets, torch.Tensor) and targets.dim() > 0
    parts = [
        halving_on_oom(forward, inputs[part], targets[part] if per_image else targets)
        for part in (slice(0, half), slice(half, None))
    ]
    return Extraction(
        {layer: torch.cat([p.activations[layer] for p in parts]) for layer in parts[0].activations},
        None
        if parts[0].gradients is None
        else {layer: torch.cat([p.gradients[layer] for p in parts]) for layer in parts[0].gradients},
        torch.cat([p.logits for p in parts]),
        torch.cat([p.targets for p in parts]),
    )
