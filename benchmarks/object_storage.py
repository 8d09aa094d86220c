"""Local disk against S3 (moto's server on loopback, through s3fs): the same pipeline, same data.

The demo's small data set (``sacv.demo.scenes``, EfficientNet-Lite0, offline weights) is written to a
local folder and copied into a bucket. Then, in one process (Prefect's temporary API warmed up
first), for each repeat: the whole pipeline with images and ``run_dir`` on local disk, then with
images (concept folders, random pool, a manifest with relative paths) and ``run_dir`` on S3. Per
run: extraction images/s (images / wall time of the extract stage, the scan that reads, hashes
and decodes every image included), fit and score wall times (from run.json). The S3 server is a
local process: these numbers measure the client-side cost of the object-store path (HTTP, whole
objects, no rename), not a network.

    python benchmarks/object_storage.py --out benchmarks/results/object_storage_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="local/S3 pairs, alternating")
    parser.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", default="benchmarks/results/object_storage.json", help="JSON result path")
    return parser.parse_args(argv)


def to_s3(config: dict, local_data: Path, bucket: str, run: str, options: dict) -> dict:
    """The config with every local data path replaced by its copy in the bucket."""

    def url(path: str) -> str:
        return f"{bucket}/data/{Path(path).relative_to(local_data).as_posix()}"

    concepts = config["concepts"] | {
        "root": url(config["concepts"]["root"]),
        "random_pool": url(config["concepts"]["random_pool"]),
    }
    dataset = config["dataset"] | {"manifest": url(config["dataset"]["manifest"])}
    return config | {
        "run_dir": f"{bucket}/{run}",
        "concepts": concepts,
        "dataset": dataset,
        "storage_options": {f"{bucket}/": options},
    }


def timed_run(raw: dict) -> dict:
    from flows.pipeline import run_pipeline
    from sacv.config import parse_config
    from sacv.io.rundir import RunDir

    config = parse_config(raw)
    started = time.perf_counter()
    summary = run_pipeline(config)
    total = time.perf_counter() - started
    timings = RunDir(config.run_dir).read_run_record()["timings"]
    return {
        "images": summary.extract.images,
        "extract_s": timings["extract"]["seconds"],
        "extract_images_per_s": round(summary.extract.images / timings["extract"]["seconds"], 2),
        "fit_s": timings["fit"]["seconds"],
        "vectors": summary.fit.vectors,
        "score_s": timings["score"]["seconds"],
        "total_s": round(total, 2),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import yaml

    from sacv.demo.scenes import write_demo_data
    from tests.servers import S3_ENV, start_s3, stop, upload

    os.environ.update(S3_ENV)
    work = Path(tempfile.mkdtemp(prefix="sacv-bench-s3-"))
    config_path = write_demo_data(work, small=True)
    base = yaml.safe_load(config_path.read_text())
    base["execution"] = {"device": args.device}
    server = start_s3(work / "moto.log")
    try:
        bucket = server.create_bucket("sacv-bench")
        upload(server.filesystem(), work / "data", f"{bucket}/data")
        warm = base | {
            "run_dir": str(work / "warm"),
            "concepts": None,
            "dataset": {"manifest": base["dataset"]["manifest"], "target": "label"},
        }
        timed_run_extract_only(warm)  # Prefect's temporary API and the model load, outside the timings
        rows = []
        for repeat in range(args.repeats):
            local = timed_run(base | {"run_dir": str(work / f"local{repeat}")})
            remote = timed_run(to_s3(base, work / "data", bucket, f"run{repeat}", server.options))
            rows += [{"where": "local", "repeat": repeat, **local}, {"where": "s3", "repeat": repeat, **remote}]
    finally:
        stop(server.process)
    table = []
    for row in rows:
        table.append(
            (
                f"{row['where']} #{row['repeat']}",
                f"{row['images']} images: extract {row['extract_s']} s ({row['extract_images_per_s']} img/s), "
                f"fit {row['fit_s']} s ({row['vectors']} vectors), score {row['score_s']} s, total {row['total_s']} s",
            )
        )
    print_table(table)
    import torch

    result = {
        "rows": rows,
        "device": args.device,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "data": "sacv.demo.scenes small",
        "model": base["model"]["spec"],
        "layers": base["layers"],
        "s3": "moto server on 127.0.0.1 (s3fs)",
    }
    write_json(result, args.out)
    return result


def timed_run_extract_only(raw: dict) -> None:
    from flows.extract import run_extract
    from sacv.config import parse_config

    run_extract(parse_config(raw))


if __name__ == "__main__":
    main()
