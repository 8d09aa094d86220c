"""The result stage at 10^4 .. 10^6 images: time and peak memory of building the tables from score shards.

No model is needed. ``--templates`` score shards of ``--shard-size`` images are generated with the
real ``image_scores`` schema and the default vector count (``--concepts`` concepts and ``--pseudo``
pseudo-concepts of one shared family, each against ``--random-sets`` random sets, on ``--layers``
layers; targets drawn from ``--classes`` classes), and written with ``RunDir.write_shard_scores``,
aggregates included, as the score stage writes them (the time of ``shard_aggregates`` per shard is
reported: it is part of scoring, once per shard). For each size a run directory of size / shard-size
shards is made of hard links to the templates' files (cycling through them) and a store that records
the class names. Then a fresh process per size runs, and times:

- ``build``: ``sacv.score.tables.build_tables`` (adds every shard's partial sums and merges their
  extreme images, a batch at a time; writes per_set, contributions, top_images and the dataset list);
- ``top_images``: ``Run.top_images(n=3)`` and ``(n=3, lowest=True)`` for every contributions row
  (what the report reads: the top_images table, and the images table's row groups that hold the
  images shown);
- peak RSS: the child's ``VmHWM`` over those steps, reset after its imports (``clear_refs``).

    python benchmarks/result_tables.py --sizes 10000 100000 1000000 --out benchmarks/results/result_tables_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time, types
import torch  # imported before the peak is reset, as every module the steps use
import sacv.api
from sacv.config import ScoreConfig
from sacv.score.tables import build_tables
import sacv

def vmhwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

run_dir, shards = sys.argv[1], int(sys.argv[2])
open("/proc/self/clear_refs", "w").write("5")  # VmHWM from here on: the stage, import baseline included
baseline = vmhwm()
started = time.perf_counter()
built = build_tables(run_dir, types.SimpleNamespace(score=ScoreConfig()), list(range(shards)))
build_s = time.perf_counter() - started
run = sacv.open_run(run_dir)
rows = run.table("contributions")
started = time.perf_counter()
for _, row in rows.iterrows():
    for lowest in (False, True):
        run.top_images(row["layer"], row["concept"], int(row["class_index"]), n=3, lowest=lowest)
top_s = time.perf_counter() - started
names = ("per_set", "contributions", "top_images")
sizes = {name: run.dir.fs.size(run.dir._path(f"tables/{name}.parquet")) for name in names}
print(json.dumps({"build_s": build_s, "top_images_s": top_s, "baseline_kb": baseline, "vmhwm_kb": vmhwm(),
                  "contribution_rows": len(rows), "significant": built["significant"], "table_bytes": sizes}))
"""


def vectors(args) -> list[tuple[str, str, str]]:
    """(concept, random_set, kind) of one layer: concepts, then the shared family's pseudo-concepts."""
    names = [(f"concept_{c}", "concept") for c in range(args.concepts)]
    names += [(f"pseudo_{p}", "pseudo") for p in range(args.pseudo)]
    return [(name, f"random_{r}", kind) for name, kind in names for r in range(args.random_sets)]


def template_scores(rng: np.random.Generator, shard: int, args) -> pd.DataFrame:
    """One shard's image_scores rows (the score stage's columns and dtypes), random values."""
    from sacv.score.scoring import SCORE_COLUMNS

    n, table = args.shard_size, vectors(args)
    k = len(table)
    rows = np.arange(shard * n, (shard + 1) * n, dtype=np.int64)
    frames = []
    for layer in range(args.layers):
        relevant = np.where(rng.random((n, k)) < 0.3, 0.0, rng.random((n, k)))
        has = relevant > 0
        frames.append(
            pd.DataFrame(
                {
                    "image_id": np.repeat([f"{r:040x}" for r in rows], k),
                    "row": np.repeat(rows, k),
                    "layer": f"layer_{layer}",
                    "concept": np.tile([v[0] for v in table], n),
                    "random_set": np.tile([v[1] for v in table], n),
                    "kind": np.tile([v[2] for v in table], n),
                    "vector_row": np.tile(np.arange(k, dtype=np.int64), n),
                    "target": np.repeat(rng.integers(0, args.classes, n), k),
                    "s_k_max": rng.normal(size=n * k),
                    "s_k_mean": rng.normal(size=n * k),
                    "relevant_frac": relevant.reshape(-1),
                    "s_kc_sum": rng.normal(size=n * k),
                    "s_kc_relevant_mean": np.where(has, rng.normal(size=(n, k)), np.nan).reshape(-1),
                    "positive_frac": np.where(has, rng.random((n, k)), np.nan).reshape(-1),
                    "argmax_i": rng.integers(0, 7, n * k),
                    "argmax_j": rng.integers(0, 7, n * k),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)[SCORE_COLUMNS]


def write_templates(folder: Path, args) -> dict:
    """The template shards, written as the score stage writes them; the per-shard aggregate time."""
    from sacv.io.rundir import RunDir
    from sacv.score.tables import shard_aggregates

    run, rng, seconds = RunDir(str(folder)), np.random.default_rng(0), []
    for shard in range(args.templates):
        scores = template_scores(rng, shard, args)
        started = time.perf_counter()
        sums, top = shard_aggregates(scores)
        seconds.append(time.perf_counter() - started)
        run.write_shard_scores(shard, scores, "template", sums, top)
    return {"rows_per_shard": len(scores), "aggregate_s_per_shard": float(np.median(seconds))}


def make_run(folder: Path, templates: Path, shards: int, args) -> None:
    """``shards`` score shards of hard links to the templates, a store with class names, and the
    images table of the dataset (one row per image, as extraction writes it)."""
    import zarr

    from sacv.extract.catalog import IMAGE_COLUMNS, write_images
    from sacv.io.rundir import RunDir
    from sacv.io.zarr_store import READABLE_FORMATS

    n = shards * args.shard_size
    rows = np.arange(n, dtype=np.int64)
    images = pd.DataFrame(
        {
            "image_id": [f"{r:040x}" for r in rows],
            "path": [f"/data/class_{r % args.classes}/{r:08d}.jpg" for r in rows],
            "group": "dataset",
            "role": "dataset",
            "label": (rows % args.classes).astype(float),
            "row": rows,
            "shard": rows // args.shard_size,
            "status": "ok",
        }
    ).reindex(columns=IMAGE_COLUMNS)
    write_images(RunDir(str(folder)), images)  # as extraction writes it

    for sub in ("scores", "score_sums", "score_top"):
        (folder / sub).mkdir(parents=True)
        for shard in range(shards):
            source = templates / sub / f"{shard % args.templates:06d}.parquet"
            os.link(source, folder / sub / f"{shard:06d}.parquet")
    store = zarr.open_group(str(folder / "store.zarr"), mode="w")
    store.attrs.update({"format": READABLE_FORMATS[-1], "class_names": [f"class_{c}" for c in range(args.classes)]})


def measure(folder: Path, shards: int) -> dict:
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(shards)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if child.returncode:
        raise SystemExit(f"the measuring process failed:\n{child.stderr[-3000:]}")
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--templates", type=int, default=16)
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--pseudo", type=int, default=40)
    parser.add_argument("--random-sets", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/result_tables_cpu.json")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    result = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": commit.strip(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "settings": vars(args),
        "vectors_per_layer": len(vectors(args)),
        "rows": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        templates = Path(tmp) / "templates"
        result |= write_templates(templates, args)
        for size in args.sizes:
            shards = -(-size // args.shard_size)
            folder = Path(tmp) / f"run_{size}"
            make_run(folder, templates, shards, args)
            row = {"images": size, "shards": shards, "image_score_rows": shards * result["rows_per_shard"]}
            row |= measure(folder, shards)
            result["rows"].append(row)
            print(f"{size} images: build {row['build_s']:.1f} s, peak RSS {row['vmhwm_kb'] / 1024:.0f} MB", flush=True)
            subprocess.run(["rm", "-rf", str(folder)], check=True)
    rows = result["rows"]
    table = [("vectors per layer", str(result["vectors_per_layer"])), ("rows per shard", str(result["rows_per_shard"]))]
    table += [("aggregates per shard (score stage)", f"{result['aggregate_s_per_shard'] * 1000:.0f} ms")]
    for row in rows:
        table.append(
            (
                f"{row['images']:>9} images",
                f"build {row['build_s']:.1f} s, top_images {row['top_images_s']:.1f} s, peak RSS "
                f"{row['vmhwm_kb'] / 1024:.0f} MB (baseline {row['baseline_kb'] / 1024:.0f} MB), "
                f"{row['build_s'] / row['images'] * 1e6:.1f} µs per image",
            )
        )
    if len(rows) >= 2:
        last, before = rows[-1], rows[-2]
        result["rss_ratio_last_two"] = last["vmhwm_kb"] / before["vmhwm_kb"]
        result["time_ratio_last_two"] = last["build_s"] / before["build_s"]
        result["build_s_at_1e7_extrapolated"] = last["build_s"] / last["images"] * 1e7
        table.append(("peak RSS, largest ÷ next", f"{result['rss_ratio_last_two']:.2f} (goal ≤ 1.2)"))
        table.append(
            (
                "build time, largest ÷ next",
                f"{result['time_ratio_last_two']:.1f} (images ×{last['images'] / before['images']:.0f})",
            )
        )
        table.append(("10^7 images, extrapolated", f"{result['build_s_at_1e7_extrapolated'] / 60:.0f} min"))
    print_table(table)
    write_json(result, args.out)


if __name__ == "__main__":
    main()
