"""The Zarr v3 activation store: template written once, then one writer per chunk-aligned region.

Layout (docs/store.md): ``<group>/<layer>/act`` and ``dataset/<layer>/grad`` (N, H, W, C),
``dataset/logits`` (N, K) float32, ``dataset/targets`` (N,) int64; chunks along N only, one chunk
per shard. The root attributes record the model spec, weight hash and preprocessing (the identity;
a store made with another model or preprocessing is refused, never silently mixed) and the model's
class names (so later stages need not load the model to name classes).
"""

from __future__ import annotations

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

from sacv.errors import InputError
from sacv.io import storage

STORE_FORMAT = 1
READABLE_FORMATS = (1,)  # format 1 before class names were recorded is read too (no `class_names`)
IDENTITY_KEYS = ("format", "model_spec", "weight_hash", "preprocessing", "layers", "dtype")
# LZ4 after a bit shuffle (blosc, one thread): on Lite0's float16 activations and gradients 1.5 % more
# bytes than zstd level 1, written 1.3x and read 1.6x as fast (benchmarks/store_codecs.py); arrays made
# before keep their codec (readers need nothing).
COMPRESSOR = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")
# Blosc takes at most 2 GiB per chunk (numcodecs' limit); a larger chunk (a large shard of a wide
# float32 layer) gets zstd level 1, which has no limit.
LARGE_CHUNK_BYTES = 2_147_483_631
LARGE_CHUNK_COMPRESSOR = ZstdCodec(level=1)
# Chunks are written whole (one shard each), so zarr's check for an all-fill-value chunk, which it
# then leaves out, is only cost: a third of a float16 chunk's write (measured).
WRITE_CONFIG = {"write_empty_chunks": True}


# IEEE floats: a value is inf or NaN exactly when all its exponent bits are set.
_EXPONENT_MASKS = {
    np.dtype(np.float16): (np.uint16, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FF0000000000000),
}


def all_finite(values: np.ndarray) -> bool:
    """``np.isfinite(values).all()``, for native float16/32/64 by testing exponent bits (over ten
    times faster on float16, which numpy's ``isfinite`` converts first); other dtypes fall back."""
    spec = _EXPONENT_MASKS.get(values.dtype)
    if spec is None:
        return bool(np.isfinite(values).all())
    bits, mask = spec
    mask = bits(mask)
    return not bool(((values.view(bits) & mask) == mask).any())


class StoreMismatch(InputError):
    """The store on disk was written with another model, weights, preprocessing or layers."""


def store_identity(
    model_spec: str, weight_hash: str, preprocessing: dict, layers: dict[str, list[int]], dtype: str
) -> dict:
    """What a store's content depends on; stored as root attributes and checked on every open."""
    return {
        "format": STORE_FORMAT,
        "model_spec": model_spec,
        "weight_hash": weight_hash,
        "preprocessing": preprocessing,
        "layers": layers,  # layer -> [H, W, C]
        "dtype": dtype,
    }


def _open(uri: str, mode: str, storage_options: dict | None, **kwargs) -> zarr.Group:
    """``zarr.open_group`` with fsspec options for a URL (default: ``sacv.io.storage.options_for``)."""
    options = storage.options_for(uri) if storage_options is None else storage_options
    return zarr.open_group(uri, mode=mode, storage_options=options if "://" in uri and options else None, **kwargs)


def open_store(uri: str, identity: dict, storage_options: dict | None = None) -> zarr.Group:
    """Open (creating if absent) the store and check that it was made for ``identity``."""
    root = _open(uri, "a", storage_options, zarr_format=3)
    existing = root.attrs.asdict()
    if not existing:
        root.attrs.update(identity)
        return root
    for key in ("format", "model_spec", "weight_hash", "preprocessing", "dtype"):
        if existing.get(key) != identity[key]:
            raise StoreMismatch(
                f"the store at {uri} was written with {key} = {existing.get(key)!r}, but this run uses "
                f"{identity[key]!r}. Use a new run_dir for another model, or delete the store to start over."
            )
    for layer, shape in identity["layers"].items():
        known = existing.get("layers", {}).get(layer)
        if known is not None and known != shape:
            raise StoreMismatch(f"layer {layer!r} has shape {known} in the store at {uri} but {shape} now")
    layers = {**existing.get("layers", {}), **identity["layers"]}
    if layers != existing.get("layers"):
        root.attrs["layers"] = layers  # only when a layer is added: shard writers never touch the root
    return root


def store_identity_of(uri: str, storage_options: dict | None = None) -> dict:
    """The identity recorded in an existing store (see :func:`store_identity`)."""
    attrs = _open(uri, "r", storage_options).attrs.asdict()
    if not attrs:
        raise StoreMismatch(f"{uri} holds no activation store; run the extract stage first")
    return {key: attrs[key] for key in IDENTITY_KEYS if key in attrs}


def check_readable(attrs: dict, uri: str) -> None:
    """Refuse a store whose format this version cannot read, naming the format found."""
    found = attrs.get("format")
    if found is None:
        raise StoreMismatch(
            f"the store at {uri} records no format version (not an sacv store, or written before "
            f"format {READABLE_FORMATS[0]}); extract it again with this version of sacv"
        )
    if found not in READABLE_FORMATS:
        raise StoreMismatch(
            f"the store at {uri} has store format {found}; this version of sacv reads format(s) "
            f"{', '.join(map(str, READABLE_FORMATS))}. Open it with the sacv version that wrote it "
            "(run.json `versions.sacv`), or extract again"
        )


def write_class_names(root: zarr.Group, class_names: list[str]) -> None:
    """Record the model's class names (index -> name) in the root attributes, once."""
    if root.attrs.get("class_names") != list(class_names):
        root.attrs["class_names"] = list(class_names)


def class_names_of(uri: str, storage_options: dict | None = None) -> list[str]:
    """The class names recorded at extraction time."""
    names = _open(uri, "r", storage_options).attrs.get("class_names")
    if names is None:
        raise StoreMismatch(
            f"the store at {uri} records no class names (written by an older version); "
            "run the extract stage again to record them (done shards are kept)"
        )
    return list(names)


def ensure_array(
    root: zarr.Group,
    path: str,
    shape: tuple[int, ...],
    chunk_rows: int,
    dtype: str,
    dimension_names: list[str] | None = None,
) -> zarr.Array:
    """Create the array, or grow/shrink it along N when the plan changed; chunks (chunk_rows, ...).
    4-D arrays default to dimension names (image, row, col, channel)."""
    chunks = (chunk_rows, *shape[1:])
    if path in root:
        array = root[path]
        if array.chunks != chunks or str(array.dtype) != dtype or array.shape[1:] != shape[1:]:
            raise StoreMismatch(
                f"{path} exists with chunks {array.chunks}, dtype {array.dtype}, shape {array.shape}; "
                f"this run needs chunks {chunks}, dtype {dtype}, shape {shape}. Use a new run_dir."
            )
        if array.shape[0] != shape[0]:
            array.resize(shape)
        return array
    group_path, _, name = path.rpartition("/")
    group = root.require_group(group_path) if group_path else root
    if dimension_names is None and len(shape) == 4:
        dimension_names = ["image", "row", "col", "channel"]
    chunk_bytes = int(np.prod(chunks)) * np.dtype(dtype).itemsize
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=0,
        compressors=COMPRESSOR if chunk_bytes <= LARGE_CHUNK_BYTES else LARGE_CHUNK_COMPRESSOR,
        dimension_names=dimension_names,
    )


def write_region(array: zarr.Array, start: int, data: np.ndarray) -> None:
    """Write rows ``start : start + len(data)``; the region must be whole chunks (or end at N)."""
    chunk = array.chunks[0]
    stop = start + len(data)
    if start % chunk != 0 or (stop % chunk != 0 and stop != array.shape[0]):
        raise ValueError(
            f"region {start}:{stop} of {array.path} is not aligned to chunks of {chunk} rows; "
            "each writer must own whole chunks (one shard = one chunk)"
        )
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported just below
        values = data.astype(array.dtype, copy=False)
    if not all_finite(values):
        raise ValueError(
            f"{array.path}: values overflow {array.dtype} (largest magnitude {np.abs(data).max():.3g}); "
            "set extract.dtype: float32 in the config"
        )
    array.with_config(WRITE_CONFIG)[start:stop] = values
