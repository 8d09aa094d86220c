"""Cost of a nightly increment: a first extraction of N generated images, then +1 % new images
(and a few removed), then a rerun with nothing new, on the same run directory.

The extraction flow (``flows.extract.run_extract``, Prefect embedded mode, warmed up on a 4-image
run first) with ``dataset.target: label``. Images are generated 24x24 PNGs in two class folders.
It also times the planning step alone (``sacv.extract.extraction_plan.plan_extraction``: listing, stamps,
tables) once more with nothing new. For comparison the script also counts the shards that the earlier
row assignment (all rows sorted
by (label, image_id) on every scan) would have redone for the same increment: computed from the
two images tables, not run.

    python benchmarks/nightly_increment.py --images 10000 --out benchmarks/results/nightly_increment_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images of the first audit")
    parser.add_argument("--add-percent", type=float, default=1.0, help="new images of the increment, in %% of --images")
    parser.add_argument("--remove", type=int, default=10, help="images deleted before the increment")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--model", default="tests.models:small", help="model spec (default: the tiny test CNN)")
    parser.add_argument("--layers", nargs="+", default=["features.2"])
    parser.add_argument("--out", default="benchmarks/results/nightly_increment.json")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def write_images(folder: Path, start: int, count: int, rng: np.random.Generator) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        paths.append(folder / f"img_{i:06d}.png")
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def sorted_shards_changed(before: pd.DataFrame, after: pd.DataFrame, shard_size: int) -> int:
    """Shards whose image ids differ when every scan sorts the current rows by (label, image_id)."""

    def shards(table):
        ok = table[(table["status"] == "ok") & (table["group"] == "dataset")].sort_values(["label", "image_id"])
        ids = ok["image_id"].tolist()
        return [tuple(ids[i : i + shard_size]) for i in range(0, len(ids), shard_size)]

    old, new = shards(before), shards(after)
    return sum(i >= len(old) or old[i] != new[i] for i in range(len(new)))


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from flows.extract import run_extract
    from sacv.config import parse_config

    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sacv-nightly-"))

    def config(root: Path):
        return parse_config(
            {
                "run_dir": str(root / "run"),
                "model": {"spec": args.model},
                "layers": args.layers,
                "dataset": {"root": str(root / "data"), "target": "label"},
                "extract": {"shard_size": args.shard_size, "batch_size": 64},
            }
        )

    warm = work / "warm"
    for name in ("cat", "dog"):
        write_images(warm / "data" / name, 0, 2, rng)
    run_extract(config(warm))

    root = work / "audit"
    half = args.images // 2
    paths = write_images(root / "data" / "cat", 0, half, rng) + write_images(
        root / "data" / "dog", 0, args.images - half, rng
    )
    cfg = config(root)
    timings = {}
    started = time.perf_counter()
    first = run_extract(cfg)
    timings["first"] = (time.perf_counter() - started, first)
    before = pd.read_parquet(root / "run/tables/images.parquet")

    added = round(args.images * args.add_percent / 100)
    write_images(root / "data" / "cat", args.images, added - added // 2, rng)
    write_images(root / "data" / "dog", args.images, added // 2, rng)
    for path in rng.choice(np.array(paths, dtype=object), size=args.remove, replace=False):
        os.remove(path)
    started = time.perf_counter()
    second = run_extract(cfg)
    timings["increment"] = (time.perf_counter() - started, second)
    after = pd.read_parquet(root / "run/tables/images.parquet")

    third = run_extract(cfg)
    timings["nothing new"] = (time.perf_counter() - started, third)

    from sacv.extract.extraction_plan import plan_extraction

    started = time.perf_counter()
    plan_extraction(cfg.run_dir, cfg)  # the planning step alone: listing, stamps, tables (nothing new)
    plan_seconds = time.perf_counter() - started

    result = {
        "command": "python benchmarks/nightly_increment.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": platform.platform(),
        "cpus": os.cpu_count(),
        "model": args.model,
        "layers": args.layers,
        "images": args.images,
        "added": added,
        "removed": args.remove,
        "shard_size": args.shard_size,
        "runs": {
            name: {
                "seconds": round(seconds, 2),
                "shards_run": s.shards_run,
                "shards_total": sum(s.shards.values()),
                "images_extracted": s.images_extracted,
                "added": s.added,
                "removed": s.removed,
            }
            for name, (seconds, s) in timings.items()
        },
        "sorted_rows_shards_redone": sorted_shards_changed(before, after, args.shard_size),
        "plan_seconds_nothing_new": round(plan_seconds, 2),
    }
    rows = [
        (
            f"{name}: seconds / shards run / images extracted",
            f"{r['seconds']} / {r['shards_run']} of {r['shards_total']} / {r['images_extracted']}",
        )
        for name, r in result["runs"].items()
    ]
    rows.append(("planning alone, nothing new: seconds", str(result["plan_seconds_nothing_new"])))
    rows.append(("increment under sorted rows (computed): shards redone", str(result["sorted_rows_shards_redone"])))
    print_table(rows)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
