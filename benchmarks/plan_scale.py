"""Planning at collection scale: list, read, hash and header-check many small files.

Generates ``--files`` small PNGs (16x16, distinct content) in class folders (named by ImageNet class
name, or by index with ``--folder-names index``), then times
``sacv.extract.image_sources.dataset_candidates`` (listing) and ``sacv.extract.catalog.scan`` (read + sha256 + header
check in a pool of threads or of processes, row assignment) on them, the work of the ``plan-extraction`` task before
the store template. Pixels are not decoded at planning (the shards decode each image once).

    python benchmarks/plan_scale.py --files 100000 --out benchmarks/results/plan_scale_cpu.json
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100, help="class folders")
    parser.add_argument(
        "--folder-names",
        choices=["name", "index"],
        default="name",
        help="class folders named by ImageNet class name (as collections are) or by class index",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4, 16], help="scan thread counts to time")
    parser.add_argument(
        "--processes",
        type=int,
        nargs="*",
        default=[os.cpu_count()],
        help="scan process counts to time (the decode pool's processes: sacv.extract.decode_pool)",
    )
    parser.add_argument(
        "--catalog-rows",
        type=int,
        nargs="*",
        default=[1_000_000],
        help="also time one extraction task's catalog lookups on the scanned table tiled to these rows",
    )
    parser.add_argument("--out", default="benchmarks/results/plan_scale_cpu.json")
    return parser.parse_args(argv)


def write_files(root: Path, n: int, folders: list[str]) -> None:
    """``n`` distinct 16x16 PNGs, spread over the class ``folders``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
    for folder in folders:
        (root / folder).mkdir(parents=True)
    for i in range(n):
        pixels = base.copy()
        pixels.reshape(-1)[:4] = np.frombuffer(i.to_bytes(4, "little"), np.uint8)  # distinct content
        Image.fromarray(pixels).save(root / folders[i % len(folders)] / f"img_{i:07d}.png", compress_level=1)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    from sacv.config import DatasetConfig
    from sacv.extract.catalog import scan
    from sacv.extract.image_sources import dataset_candidates
    from sacv.method.models import imagenet_class_names

    result = {
        "benchmark": "plan_scale",
        "files": args.files,
        "folder_names": args.folder_names,
        "cpus": os.cpu_count(),
        "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="sacv-plan-") as tmp:
        root = Path(tmp) / "data"
        started = time.perf_counter()
        folders = [
            name.replace(" ", "_") if args.folder_names == "name" else str(k)
            for k, name in enumerate(imagenet_class_names()[: args.classes])
        ]
        write_files(root, args.files, folders)
        result["generate_seconds"] = round(time.perf_counter() - started, 1)
        config = DatasetConfig(root=str(root))
        class_names = imagenet_class_names()  # read before the timing
        rows = [("files", str(args.files)), ("generate", f"{result['generate_seconds']} s")]
        pools = [("threads", n) for n in args.threads] + [("processes", n) for n in args.processes]
        for kind, workers in pools:
            if kind == "processes":  # fork the pool before the clock, as a flow's first shard or scan does once
                from sacv.extract.decode_pool import map_in_processes

                map_in_processes(len, [[0]] * workers, workers)
            started = time.perf_counter()
            candidates = dataset_candidates(config, class_names)
            listed = time.perf_counter() - started
            images, rejects = scan(
                candidates,
                shard_size=32,
                max_pixels=89_478_485,
                min_size=8,
                threads=workers,
                processes=workers if kind == "processes" else 0,
            )
            total = time.perf_counter() - started
            assert len(images) == args.files and rejects.empty
            run = {
                kind: workers,
                "list_seconds": round(listed, 2),
                "plan_seconds": round(total, 2),
                "files_per_s": round(args.files / total, 1),
            }
            result["runs"].append(run)
            rows.append(
                (
                    f"list + hash + header, {workers} {kind}",
                    f"{run['plan_seconds']} s ({run['files_per_s']} files/s; listing {run['list_seconds']} s)",
                )
            )
        result["catalog"] = [
            catalog_per_task(images, n, Path(tmp) / f"run-{n}") for n in [len(images), *args.catalog_rows]
        ]
        rows += [
            (
                f"catalog per task, {c['rows']:,} rows",
                f"read + index in every task {c['read_every_task_s']} s; "
                f"shared: first task {c['shared_first_task_s']} s, later tasks {c['shared_later_task_s']} s",
            )
            for c in result["catalog"]
        ]
    print_table(rows)
    write_json(result, args.out)
    return result


def catalog_per_task(images, n_rows: int, run_dir: Path, shards_per_task: int = 8) -> dict:
    """What one extraction task pays for its rows of ``tables/images.parquet`` with ``n_rows`` rows
    (``images`` tiled with fresh ids and rows): reading and indexing the table in every task
    (``ImageCatalog.read``), against the process-wide ``ImageCatalog.shared`` (read once)."""
    import numpy as np
    import pandas as pd

    from sacv.extract.catalog import ImageCatalog
    from sacv.io.rundir import RunDir

    copies = -(-n_rows // len(images))
    table = pd.concat([images] * copies, ignore_index=True).iloc[:n_rows].copy()
    table["image_id"] = [f"{i:016x}" for i in range(n_rows)]
    table["row"] = pd.array(np.arange(n_rows), dtype="Int64")
    table["shard"] = pd.array(np.arange(n_rows) // 32, dtype="Int64")
    run = RunDir(str(run_dir))
    run.write_table("images", table)
    wanted = range(100, 100 + shards_per_task)

    def task(open_catalog) -> float:
        started = time.perf_counter()
        catalog = open_catalog(RunDir(str(run_dir)))
        for shard in wanted:
            catalog.stored_rows("dataset", shard)
        return round(time.perf_counter() - started, 4)

    return {
        "rows": n_rows,
        "shards_per_task": shards_per_task,
        "read_every_task_s": min(task(ImageCatalog.read) for _ in range(2)),
        "shared_first_task_s": task(ImageCatalog.shared),
        "shared_later_task_s": task(ImageCatalog.shared),
    }


if __name__ == "__main__":
    main()
