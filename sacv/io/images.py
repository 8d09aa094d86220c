"""Robust image input: read bytes from any fsspec URL, hash, decode to 8-bit RGB.

Every bad input raises `ImageRejected` with a stage ("list", "read" or "decode") and a short reason,
so callers can record it in rejects.parquet instead of silently dropping it.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sacv.io import storage

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS
DEFAULT_MIN_SIZE = 8
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class ImageRejected(ValueError):
    """An input that cannot be used as an image; `stage` is "list", "read" or "decode"."""

    def __init__(self, stage: str, reason: str):
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason

    def __reduce__(self):
        return (type(self), (self.stage, self.reason))


def read_bytes(path: str) -> bytes:
    """Read all bytes of a local path or fsspec URL; reject missing, unreadable or empty files."""
    try:
        with open(path, "rb") if storage.is_local_path(path) else storage.open_url(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageRejected("read", "file not found") from None
    except IsADirectoryError:
        raise ImageRejected("read", "is a directory") from None
    except OSError as e:
        raise ImageRejected("read", f"cannot read file ({e})") from None
    if not data:
        raise ImageRejected("read", "zero-byte file")
    return data


def image_id(data: bytes) -> str:
    """Stable content id: first 16 hex chars of the sha256 of the bytes."""
    return hashlib.sha256(data).hexdigest()[:16]


def _check_size(width: int, height: int, max_pixels: int, min_size: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected("decode", f"too large: {width * height} pixels > limit {max_pixels}")
    if width < min_size or height < min_size:
        raise ImageRejected("decode", f"too small: {width}x{height} pixels < minimum {min_size}x{min_size}")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; alpha is composited over white."""
    mode = img.mode
    if mode == "F" or mode.startswith("I"):
        a = np.nan_to_num(np.asarray(img, dtype=np.float64))
        if mode == "F":
            lo, hi = float(a.min()), float(a.max())
            a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        else:  # "I;16*" and "I" (16-bit data as decoded by PIL)
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def _decode_error_reason(e: Exception) -> str:
    msg = str(e)
    if "truncated" in msg or "broken data stream" in msg or isinstance(e, EOFError):
        return "truncated image"
    return f"corrupt image ({type(e).__name__}: {msg})"


@contextmanager
def opened_image(data: bytes, max_pixels: int, min_size: int) -> Iterator[Image.Image]:
    """The image's header opened and size-checked; every failure, in the header or in the body's
    work on the pixels, becomes ImageRejected(stage="decode")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                _check_size(*img.size, max_pixels, min_size)
                yield img
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("decode", "not an image (cannot identify image file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageRejected("decode", f"too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
        raise ImageRejected("decode", _decode_error_reason(e)) from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE) -> Image.Image:
    """Decode bytes to a fully loaded 8-bit RGB image with EXIF orientation applied.

    The pixel limit is checked on the header size before any pixel data is decoded.
    Raises ImageRejected(stage="decode") for non-images, truncated or corrupt data,
    decompression bombs, and images outside the size limits.
    """
    with opened_image(data, max_pixels, min_size) as img:
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE) -> None:
    """Check the header only (no pixel data decoded): an image PIL can identify, within the size
    limits. Raises ImageRejected(stage="decode"); truncated or corrupt pixel data is found later,
    by :func:`decode_image`."""
    with opened_image(data, max_pixels, min_size):
        pass


def check_supported(path: str) -> None:
    """Reject (stage "list") a file whose suffix is not a supported image type."""
    if not path.lower().endswith(IMAGE_EXTENSIONS):
        suffix = path.rsplit("/", 1)[-1].rpartition(".")[2] if "." in path.rsplit("/", 1)[-1] else ""
        kind = f"'.{suffix.lower()}'" if suffix else "without a suffix"
        raise ImageRejected("list", f"unsupported file type {kind}; supported: {', '.join(IMAGE_EXTENSIONS)}")


def load_image(
    path: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE
) -> tuple[str, Image.Image]:
    """Read, hash and decode one image; returns (image_id, rgb image)."""
    data = read_bytes(path)
    return image_id(data), decode_image(data, max_pixels=max_pixels, min_size=min_size)


def list_images(root: str) -> list[str]:
    """Sorted image files under a local folder or fsspec URL, recursively (see :func:`list_files`)."""
    return [p for p in list_files(root) if p.lower().endswith(IMAGE_EXTENSIONS)]


def list_files(root: str) -> list[str]:
    """Sorted files under a local folder or fsspec URL, recursively, of any type.

    Hidden files and anything inside hidden folders (names starting with ".") are skipped; files of
    other types are kept, so that a scan can list them as rejects (:func:`check_supported`). Local
    paths are returned as plain absolute paths, remote ones as full URLs.
    """
    fs, base = storage.url_to_fs(root)
    if not fs.isdir(base):
        raise FileNotFoundError(f"image folder not found: {root}")
    base = base.rstrip("/")
    out = []
    for p in fs.find(base):
        parts = p[len(base) :].strip("/").split("/")
        if any(part.startswith(".") for part in parts):
            continue
        out.append(p if storage.is_local(fs) else fs.unstrip_protocol(p))
    return sorted(out)


def file_stamp(path: str) -> str | None:
    """``"<size>:<modified>"`` of a local path or fsspec URL (None when the file system gives no
    modification time or the file is missing): equal stamps let a rescan skip reading the file."""
    if storage.is_local_path(path):  # what fsspec's local info gives, without its URL handling
        try:
            status = os.stat(path)
        except OSError:
            return None
        return f"{status.st_size}:{status.st_mtime}"
    try:
        fs, target = storage.url_to_fs(path)
        info = fs.info(target)
    except (FileNotFoundError, OSError):
        return None
    modified = info.get("mtime") or info.get("LastModified") or info.get("ETag")
    return None if modified is None else f"{info.get('size')}:{modified}"
