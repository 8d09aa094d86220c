"""Chunk codecs of the activation store on real activations: bytes per image, write and read rates.

One shard (``--images`` generated scenes) through EfficientNet-Lite0 (and the fast-device proxy,
``benchmarks/fast_proxy.py``) with gradients of the predicted class, float16 as the store keeps them:
activations and gradients at ``_blocks.8 _blocks.12`` and the float32 logits. Each codec writes the
shard ``--shards`` times into a fresh Zarr array per store path with ``sacv.io.zarr_store.ensure_array``
and ``write_region`` (one thread, as one writer job), then reads it back (each read compared with
what was written, which the read time includes). Rates are of the
uncompressed bytes; codecs take turns ``--repeats`` times and the medians are reported.

    python benchmarks/store_codecs.py --out benchmarks/results/store_codecs_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def codecs() -> dict:
    from zarr.codecs import BloscCodec, ZstdCodec

    return {
        "zstd level 1": ZstdCodec(level=1),
        "blosc lz4 level 5, bit shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        "blosc zstd level 1, bit shuffle": BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle"),
        "none": (),
    }


def shard_arrays(spec: str, paths: list[str], layers: list[str]) -> dict[str, np.ndarray]:
    """The store's arrays of one shard: ``<layer>/act`` and ``<layer>/grad`` (n, H, W, C) float16, logits (n, K)."""
    import torch

    from sacv.io.images import load_image
    from sacv.method.activations import extract
    from sacv.method.models import cached_model

    model = cached_model(spec, None, "cpu")
    pixels = torch.stack([torch.from_numpy(model.preprocessing.pixels(load_image(p)[1])) for p in paths])
    result = extract(
        model.module, model.preprocessing.normalize(pixels), layers, None, with_gradients=True, dtype=torch.float16
    )
    arrays = {f"{layer}/act": result.activations[layer].numpy() for layer in layers}
    arrays |= {f"{layer}/grad": result.gradients[layer].numpy() for layer in layers}
    return {key: np.ascontiguousarray(value) for key, value in arrays.items()} | {"logits": result.logits.numpy()}


def measure(arrays: dict[str, np.ndarray], codec, shards: int) -> dict:
    """Write ``shards`` copies of the shard with ``codec``, read them back; seconds and bytes on disk."""
    import zarr

    from sacv.io import zarr_store

    n = len(next(iter(arrays.values())))
    with tempfile.TemporaryDirectory() as folder:
        root = zarr.open_group(f"{folder}/store.zarr", mode="w", zarr_format=3)
        saved, zarr_store.COMPRESSOR = zarr_store.COMPRESSOR, codec
        try:
            stored = {
                key: zarr_store.ensure_array(root, key, (n * shards, *a.shape[1:]), n, str(a.dtype))
                for key, a in arrays.items()
            }
        finally:
            zarr_store.COMPRESSOR = saved
        started = time.perf_counter()
        for shard in range(shards):
            for key, values in arrays.items():
                zarr_store.write_region(stored[key], shard * n, values)
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        for shard in range(shards):
            for key, values in arrays.items():
                assert np.array_equal(stored[key][shard * n : (shard + 1) * n], values)
        read_s = time.perf_counter() - started
        on_disk = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file() and "/c/" in str(f))
    return {"write_s": write_s, "read_s": read_s, "bytes": on_disk}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128, help="images per shard")
    parser.add_argument("--shards", type=int, default=8, help="copies of the shard written per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=["efficientnet_lite0", "fast_proxy:lite0_shapes"])
    parser.add_argument("--layers", nargs="+", default=["_blocks.8", "_blocks.12"])
    parser.add_argument("--out", default="benchmarks/results/store_codecs.json")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch
    from scene_files import write_images  # benchmarks/scene_files.py

    torch.set_num_threads(os.cpu_count() or 1)
    rows, result = [], {"images_per_shard": args.images, "shards": args.shards, "layers": args.layers, "models": {}}
    with tempfile.TemporaryDirectory() as folder:
        paths = write_images(Path(folder), args.images, seed=0)
        for spec in args.models:
            arrays = shard_arrays(spec, paths, args.layers)
            raw = sum(a.nbytes for a in arrays.values()) * args.shards
            runs = {name: [] for name in codecs()}
            for _ in range(args.repeats):  # codecs take turns: a slow spell of a shared machine hits each alike
                for name, codec in codecs().items():
                    runs[name].append(measure(arrays, codec, args.shards))
            per_codec = {}
            for name, measured in runs.items():
                write_s = float(np.median([m["write_s"] for m in measured]))
                read_s = float(np.median([m["read_s"] for m in measured]))
                per_image = measured[0]["bytes"] / (args.images * args.shards)
                per_codec[name] = {
                    "bytes_per_image": round(per_image),
                    "write_mb_per_s": round(raw / write_s / 1e6, 1),
                    "read_mb_per_s": round(raw / read_s / 1e6, 1),
                }
                rows.append(
                    (
                        f"{spec}: {name}",
                        f"{per_image:,.0f} B/image, write {raw / write_s / 1e6:.0f} MB/s, "
                        f"read {raw / read_s / 1e6:.0f} MB/s",
                    )
                )
            result["models"][spec] = {"raw_bytes_per_image": raw // (args.images * args.shards), "codecs": per_codec}
    result |= {
        "what": "one shard's float16 activations + gradients and float32 logits written with write_region "
        "(one thread) and read back, each read compared with what was written; MB/s of uncompressed bytes; "
        "medians of the turns; bytes: chunk files only",
        "command": " ".join(sys.argv),
    }
    print_table(rows)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
