"""Extraction on an external Dask cluster (one worker per GPU, or several sharing one card) against
the same flow in one process, same images.

Starts a Prefect API (a local server subprocess) that the workers report to, a ``dask scheduler`` and
one ``dask worker --nthreads 1`` per entry of ``--gpus`` from the command line, each with the
environment docs/deploy.md prescribes and its own ``CUDA_VISIBLE_DEVICES`` (``--gpus 0,1``: one
worker per GPU; ``0,0``: two workers sharing one card; ``--workers N``: N workers without it, for
the CPU). The flow (``flows.extract.run_extract``) runs in this process, with
``execution.dask_address`` for the cluster. After a warm-up run on each (model loads), timed turns
alternate: the one-process flow, then the cluster flow, each on a fresh run directory. Reports
images/s of each and their ratio (of the median times), the shards each worker extracted (the
markers' ``process``), and on CUDA the GPU utilisation over each run (``nvidia-smi``, 100 ms).

    python benchmarks/dask_workers.py --gpus 0,0 --model efficientnet_lite0 --images 8192
    python benchmarks/dask_workers.py --workers 2 --device cpu --out benchmarks/results/dask_workers_cpu.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)
from device_rates import GpuSampler  # benchmarks/device_rates.py
from scene_files import write_images  # benchmarks/scene_files.py

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="images in the timed runs")
    parser.add_argument("--gpus", default="", help="CUDA_VISIBLE_DEVICES of each worker, comma-separated (0,1 or 0,0)")
    parser.add_argument("--workers", type=int, default=2, help="workers when --gpus is not given")
    parser.add_argument(
        "--model", default="fast_proxy:lite0_shapes", help="model spec (fast_proxy: benchmarks/fast_proxy.py)"
    )
    parser.add_argument("--layers", nargs="+", default=["_blocks.8", "_blocks.12"])
    parser.add_argument("--device", default="auto", help="execution.device of both runs: auto | cpu | cuda")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--shards-per-task", type=int, default=2, help="extract.shards_per_task (tasks to spread)")
    parser.add_argument("--loader-workers", type=int, default=0, help="execution.loader_workers (per process)")
    parser.add_argument("--decoder", choices=["pil", "torchvision"], default="pil")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="execution.torch_threads of the cluster run (default: this machine's cores / workers)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="turns of the one-process and the cluster flow")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/dask_workers.json")
    return parser.parse_args(argv)


def config(root: Path, run: str, args, **execution):
    from sacv.config import parse_config

    return parse_config(
        {
            "run_dir": str(root / run),
            "model": {"spec": args.model},
            "layers": list(args.layers),
            "dataset": {"root": str(root / "data"), "target": "predicted"},
            "extract": {
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                "decoder": args.decoder,
                "shards_per_task": args.shards_per_task,
            },
            "execution": {"device": args.device, "loader_workers": args.loader_workers, **execution},
        }
    )


def timed_run(cfg) -> tuple[float, list[dict]]:
    """Wall time of ``run_extract(cfg)`` and the shards' markers."""
    from flows.extract import run_extract

    started = time.perf_counter()
    summary = run_extract(cfg)
    seconds = time.perf_counter() - started
    markers = [json.loads(p.read_text()) for p in Path(cfg.run_dir).glob("shards/*/*.json") if ".rejects" not in p.name]
    assert summary.images_extracted == sum(m["images"] for m in markers), "markers do not match the summary"
    return seconds, markers


def take_turns(args, root: Path, on_cluster: dict) -> tuple[list[dict], dict]:
    """A warm-up run of each, then ``args.repeats`` turns of the one-process flow and the cluster flow;
    returns the turns (seconds, shards per worker process) and each run's time window."""
    print("warm-up: one run of each (model loads) ...", flush=True)
    timed_run(config(root, "warm-local", args))
    timed_run(config(root, "warm-cluster", args, **on_cluster))
    turns, windows = [], {}
    for k in range(args.repeats):
        print(f"timed: one process, then the cluster, turn {k + 1} of {args.repeats} ...", flush=True)
        started = time.perf_counter()
        local, _ = timed_run(config(root, f"local-{k}", args))
        windows[f"local {k + 1}"] = (started, time.perf_counter())
        started = time.perf_counter()
        remote, markers = timed_run(config(root, f"cluster-{k}", args, **on_cluster))
        windows[f"cluster {k + 1}"] = (started, time.perf_counter())
        per_worker = collections.Counter(m.get("process") for m in markers)
        turns.append({"local_s": round(local, 3), "cluster_s": round(remote, 3), "shards": dict(per_worker)})
        write_json({"complete": False, "turns": turns}, args.out)  # what is measured survives a time limit
    return turns, windows


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path[:0] = [str(REPO), str(BENCHMARKS)]
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from flows.process import configure_process

    configure_process()
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.servers import start_dask  # the same command-line cluster the tests start

    gpus = [g for g in args.gpus.split(",") if g]
    n_workers = len(gpus) or args.workers
    threads = args.torch_threads or max(1, (os.cpu_count() or 1) // n_workers)
    # `timeout` sends SIGTERM: leave through the `finally` below, which stops the cluster (its processes
    # have their own sessions, out of the reach of a signal to this process group) and the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    server = cluster = sampler = None
    with tempfile.TemporaryDirectory(prefix="sacv-dask-") as tmp:
        root = Path(tmp)
        try:
            write_images(root / "data" / "tabby", args.images, args.seed)  # "tabby": an ImageNet class folder
            server = SubprocessASGIServer()
            server.start()
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(
                    [str(REPO), str(BENCHMARKS), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "MALLOC_ARENA_MAX": "1",
                "PREFECT_API_URL": server.api_url,
            }
            print(f"starting a scheduler and {n_workers} workers ...", flush=True)
            cluster = start_dask(n_workers, root, env, per_worker=[{"CUDA_VISIBLE_DEVICES": g} for g in gpus] or None)
            sampler = GpuSampler() if gpus else None
            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                turns, windows = take_turns(args, root, {"dask_address": cluster.address, "torch_threads": threads})
        finally:
            if sampler is not None:
                time.sleep(0.3)  # the last samples
            for stop in (cluster and cluster.stop, server and server.stop, sampler and sampler.stop):
                if stop:
                    stop()

    import torch

    local_s = float(np.median([t["local_s"] for t in turns]))
    cluster_s = float(np.median([t["cluster_s"] for t in turns]))
    result = {
        "complete": True,
        "device": torch.cuda.get_device_name(0) if gpus else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "torch": torch.__version__,
        "model": args.model,
        "layers": list(args.layers),
        "images": args.images,
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "shards_per_task": args.shards_per_task,
        "loader_workers": args.loader_workers,
        "decoder": args.decoder,
        "workers": n_workers,
        "gpus": gpus,
        "cluster_torch_threads": threads,
        "local_torch_threads": torch.get_num_threads(),  # what the one-process flow resolved (with_torch_threads)
        "local": {"seconds": round(local_s, 3), "images_per_s": round(args.images / local_s, 2)},
        "cluster": {"seconds": round(cluster_s, 3), "images_per_s": round(args.images / cluster_s, 2)},
        "ratio_cluster_over_local": round(local_s / cluster_s, 3),
        "worker_processes_seen": len({process for turn in turns for process in turn["shards"]}),
        "turns": turns,
        "gpu_utilisation": {name: sampler.window(*span) for name, span in windows.items()} if sampler else None,
        "what": "wall time of flows.extract.run_extract incl. planning, one process (thread pool, torch threads "
        "as set) vs an external Dask cluster (the flow in this process, tasks on the workers); medians of the "
        "turns; shards: shard markers per worker process",
        "command": " ".join(sys.argv),
    }
    write_json(result, args.out)
    rows = [
        ("device", result["device"]),
        ("images / batch / shard", f"{args.images} / {args.batch_size} / {args.shard_size}"),
        ("workers", f"{n_workers}" + (f" (CUDA_VISIBLE_DEVICES {','.join(gpus)})" if gpus else "")),
        ("one process", f"{result['local']['images_per_s']:.1f} img/s ({local_s:.2f} s)"),
        ("cluster", f"{result['cluster']['images_per_s']:.1f} img/s ({cluster_s:.2f} s)"),
        ("ratio cluster / one process", f"{result['ratio_cluster_over_local']:.3f} (medians of {len(turns)} turns)"),
        ("shards per worker (last turn)", " ".join(str(n) for n in sorted(turns[-1]["shards"].values()))),
    ]
    if sampler:
        rows += [
            (f"GPU {name}", f"{w['util_mean']} % mean" if w else "no samples")
            for name, w in result["gpu_utilisation"].items()
        ]
    print_table(rows)
    return result


if __name__ == "__main__":
    main()
