"""What a per-shard task pays for its rows of ``tables/images.parquet``: the whole table against its shards' row groups.

Builds a synthetic images table of ``--rows`` rows (90% dataset, 10% guidance; 1% removed), writes
it with the real writer (``sacv.extract.catalog.write_images``) to a temporary run directory, and
times, each in a fresh process (so the peak RSS is the task's alone):

- ``whole``: ``ImageCatalog.read`` + the ``stored_rows`` of one task's block of shards (what every
  task's first read cost before; ``ImageCatalog.shared`` then kept the table, and its RSS, per process);
- ``shards``: ``ImageCatalog.for_shards`` of that block + the same lookups (what a task pays now),
  for a block at the start, the middle and the end of the dataset group.

    python benchmarks/catalog_reads.py --rows 1000000 --out benchmarks/results/catalog_reads_cpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, re, sys, time
sys.path.insert(0, sys.argv[1])
import pyarrow.parquet as pq
from sacv.extract.catalog import ImageCatalog
from sacv.io.rundir import RunDir

run_dir, mode, block = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
read, original = [], pq.ParquetFile.read_row_groups  # the row groups for_shards reads
pq.ParquetFile.read_row_groups = lambda self, groups, **kw: read.extend(groups) or original(self, groups, **kw)
def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1))
warm = RunDir(sys.argv[5])  # a tiny table read both ways first: lazy imports and set-up are not the task's
ImageCatalog.read(warm).stored_rows("dataset", 0)
ImageCatalog.for_shards(warm, "dataset", [0]).stored_rows("dataset", 0)
read.clear()
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here
before = status("VmRSS")
started = time.perf_counter()
run = RunDir(run_dir)
catalog = ImageCatalog.read(run) if mode == "whole" else ImageCatalog.for_shards(run, "dataset", block)
rows = sum(len(catalog.stored_rows("dataset", shard)) for shard in block)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": round(seconds, 4), "rows": rows, "catalog_rows": len(catalog.frame),
                  "row_groups_read": len(read) if mode == "shards" else None,
                  "peak_growth_mb": round((status("VmHWM") - before) / 1024, 1),
                  "held_mb": round((status("VmRSS") - before) / 1024, 1)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000], help="images table sizes to time")
    parser.add_argument("--shard-size", type=int, default=32, help="extract.shard_size")
    parser.add_argument("--shards-per-task", type=int, default=8, help="extract.shards_per_task")
    parser.add_argument("--out", default="benchmarks/results/catalog_reads_cpu.json")
    return parser.parse_args(argv)


def synthetic_images(n: int, shard_size: int):
    """An images table (``IMAGE_COLUMNS``) of ``n`` rows: 90% dataset, 10% guidance, 1% removed."""
    import numpy as np
    import pandas as pd

    from sacv.extract.catalog import IMAGE_COLUMNS

    rng = np.random.default_rng(0)
    n_guidance = n // 10
    group = np.where(np.arange(n) < n - n_guidance, "dataset", "guidance")
    row = np.r_[np.arange(n - n_guidance), np.arange(n_guidance)]
    label = rng.integers(0, 1000, n)
    status = np.where(rng.random(n) < 0.01, "removed", "ok")
    frame = pd.DataFrame(
        {
            "image_id": [f"{x:016x}" for x in rng.integers(0, 2**63, n)],
            "path": [f"/collection/n{c:08d}/img_{i:08d}.JPEG" for c, i in zip(label, range(n))],
            "group": group,
            "role": np.where(group == "dataset", "dataset", "concept"),
            "concept": np.where(group == "dataset", None, [f"concept_{c % 50}" for c in label]),
            "label": pd.array(label, dtype="Int64"),
            "mask": None,
            "row": pd.array(row, dtype="Int64"),
            "shard": pd.array(row // shard_size, dtype="Int64"),
            "status": status,
            "stamp": [f"{100_000 + s}:1712345678.{s}" for s in rng.integers(0, 10**6, n)],
            "added_in": "20240101T000000Z",
            "removed_in": np.where(status == "removed", "20240201T000000Z", None),
        }
    )
    frame.loc[frame["group"] == "guidance", "label"] = pd.NA
    return frame[IMAGE_COLUMNS]


def child(run_dir: Path, mode: str, block: list[int]) -> dict:
    """One task's catalog read in a fresh process (``CHILD``), after a warm-up on a tiny table."""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(REPO), str(run_dir), mode, json.dumps(block), str(run_dir.parent / "warm")],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(n: int, args: argparse.Namespace, tmp: Path) -> dict:
    import pyarrow.parquet as pq

    from sacv.extract.catalog import write_images
    from sacv.io.rundir import RunDir

    started = time.perf_counter()
    images = synthetic_images(n, args.shard_size)
    build = time.perf_counter() - started
    run = RunDir(str(tmp / f"run-{n}"))
    started = time.perf_counter()
    write_images(run, images)
    written = time.perf_counter() - started
    path = tmp / f"run-{n}" / "tables" / "images.parquet"
    last = int(images.loc[images["group"] == "dataset", "shard"].max())
    del images
    k = args.shards_per_task
    blocks = {
        "first": list(range(k)),
        "middle": list(range(last // 2, last // 2 + k)),
        "last": list(range(last - k + 1, last + 1)),
    }
    write_images(RunDir(str(tmp / "warm")), synthetic_images(100, args.shard_size))
    result = {
        "rows": n,
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "row_groups": pq.ParquetFile(path).metadata.num_row_groups,
        "build_s": round(build, 2),
        "write_s": round(written, 2),
        "whole": child(path.parents[1], "whole", blocks["middle"]),
        "shards": {name: child(path.parents[1], "shards", block) for name, block in blocks.items()},
    }
    assert result["whole"]["rows"] == result["shards"]["middle"]["rows"] == k * args.shard_size
    return result


def git(*command: str) -> str:
    try:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    result = {
        "benchmark": "catalog_reads",
        "command": "python benchmarks/catalog_reads.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_code": git("status", "--porcelain", "--", "sacv").splitlines(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "shard_size": args.shard_size,
        "shards_per_task": args.shards_per_task,
        "sizes": [],
    }
    table = []
    with tempfile.TemporaryDirectory(prefix="sacv-catalog-") as tmp:
        for n in args.rows:
            size = measure(n, args, Path(tmp))
            result["sizes"].append(size)
            whole, shards = size["whole"], size["shards"]
            table += [
                (
                    f"{n:,} rows",
                    f"{size['file_mb']} MB, {size['row_groups']} row groups, written in {size['write_s']} s",
                ),
                (
                    "  whole table + lookups",
                    f"{whole['seconds']} s, peak +{whole['peak_growth_mb']} MB, held +{whole['held_mb']} MB",
                ),
                *(
                    (
                        f"  for_shards ({name} block)",
                        f"{s['seconds']} s, peak +{s['peak_growth_mb']} MB, {s['row_groups_read']} row groups read",
                    )
                    for name, s in shards.items()
                ),
            ]
    print_table(table)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
