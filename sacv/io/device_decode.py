"""JPEG decoding on the extraction device (``extract.decoder: torchvision``): nvjpeg on CUDA.

Reading, hashing and the header checks stay on the CPU (:func:`read_for_device`, in the decode
threads); the pixels of a batch of plain JPEGs are decoded in one ``torchvision.io.decode_jpeg``
call on the device and resized, cropped and normalised there (:func:`decode_batch`). Anything
else — PNG and other formats, CMYK or EXIF-rotated JPEGs, or a JPEG without its end marker (maybe
truncated) — goes through the PIL path of :mod:`sacv.io.images`, so every reject reason stays the same.
The preprocessed pixels differ from PIL's by at most two 8-bit levels on the CPU (libjpeg, another
resize kernel); nvjpeg's IDCT differs a little more (docs/numerics.md): the decoder is part of the
numeric mode. torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec; the
warning is silenced here. torchvision is imported by the functions that decode, not with this module
(the PIL decoder never needs it; importing it costs seconds).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from PIL import Image

from sacv.io.images import ImageRejected, decode_image, image_id, opened_image, read_bytes
from sacv.method.models import Preprocessing

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class EncodedJpeg:
    """A plain JPEG's bytes whose header passed the checks, to be decoded on the device."""

    data: torch.Tensor  # (n_bytes,) uint8


def read_for_device(path: str, max_pixels: int, min_size: int) -> tuple[str, EncodedJpeg | Image.Image]:
    """Read and hash ``path``; returns (image_id, the JPEG's bytes) for a plain RGB/grey JPEG with
    no EXIF rotation and an end marker, else (image_id, the image decoded by PIL). Raises
    ``ImageRejected`` like :func:`sacv.io.images.load_image`."""
    data = read_bytes(path)
    with opened_image(data, max_pixels, min_size) as img:
        plain = (
            img.format == "JPEG"
            and img.mode in ("RGB", "L")
            and img.getexif().get(_EXIF_ORIENTATION, 1) == 1
            and data.rstrip(b"\0").endswith(b"\xff\xd9")
        )
    if plain:
        return image_id(data), EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return image_id(data), decode_image(data, max_pixels=max_pixels, min_size=min_size)


def preprocess_tensor(preprocessing: Preprocessing, image: torch.Tensor) -> torch.Tensor:
    """:meth:`Preprocessing.__call__` on a decoded (3, h, w) uint8 tensor, on its device: the same
    sizes (shorter side to ``resize``, centre crop), with ``preprocessing.interpolation`` and
    antialiasing, rounded to uint8 after the resize as PIL does; returns (3, S, S) float32, normalised."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    if preprocessing.resize:
        h, w = image.shape[1:]
        scale = preprocessing.resize / min(w, h)
        image = F.resize(
            image,
            [max(1, round(h * scale)), max(1, round(w * scale))],
            interpolation=InterpolationMode(preprocessing.interpolation),
            antialias=True,
        )
    if preprocessing.crop:
        h, w = image.shape[1:]
        if w < preprocessing.crop or h < preprocessing.crop:
            image = F.resize(
                image,
                [max(h, preprocessing.crop), max(w, preprocessing.crop)],
                interpolation=InterpolationMode(preprocessing.interpolation),
                antialias=True,
            )
            h, w = image.shape[1:]
        top, left = (h - preprocessing.crop) // 2, (w - preprocessing.crop) // 2
        image = image[:, top : top + preprocessing.crop, left : left + preprocessing.crop]
    mean = torch.tensor(preprocessing.mean, device=image.device).view(3, 1, 1)
    std = torch.tensor(preprocessing.std, device=image.device).view(3, 1, 1)
    return (image.float() / 255.0 - mean) / std


def decode_batch(
    encoded: list[EncodedJpeg], preprocessing: Preprocessing, device: torch.device
) -> list[torch.Tensor | ImageRejected]:
    """Decode ``encoded`` on ``device`` in one call (nvjpeg on CUDA) and preprocess each; a file the
    decoder refuses is found by decoding one at a time and becomes an ``ImageRejected``."""
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            images = decode_jpeg([e.data for e in encoded], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            images = []
            for e in encoded:
                try:
                    images.append(decode_jpeg(e.data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as err:
                    images.append(
                        ImageRejected("decode", f"corrupt image (decode_jpeg: {str(err).splitlines()[0][:120]})")
                    )
    return [image if isinstance(image, ImageRejected) else preprocess_tensor(preprocessing, image) for image in images]
