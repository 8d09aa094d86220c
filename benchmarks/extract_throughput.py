"""Extraction throughput: a bare torch loop against the Prefect extraction flow, same images.

One process, one run, EfficientNet-Lite0 (offline weights):

(a) bare loop: read + decode each JPEG (``sacv.io.images.load_image``), the model's preprocessing,
    ``sacv.method.activations.extract`` with gradients of the predicted-class logit, cast to float16 (the store's
    dtype) on the device as the flow does, results kept in memory;
(b) flow: the same files as a dataset folder (``tabby/``), ``flows.extract.run_extract`` with
    ``dataset.target: predicted``; wall time of the whole call, planning (scan: list, read, hash
    and check the header of every file) included.

Both are warmed up first (model load, first-call overhead; Prefect's temporary API server start-up
on a 4-image flow run), so neither timing includes them. Also measured in the same run: the card's
(or CPU's) raw rate on a batch already on the device (``raw_rates``), decoding alone
(``decode_rates``: the flow's thread-pool decoder; nvjpeg on CUDA), the flow's time split from the
shard markers (decode wait / compute / writer wait / writes), and on CUDA the GPU utilisation per
phase (``nvidia-smi`` sampled every 100 ms).

    python benchmarks/extract_throughput.py --images 64 --out benchmarks/results/extract_throughput_cpu.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)
from device_rates import GpuSampler, bare_loop, decode_rates, raw_rates  # benchmarks/device_rates.py
from scene_files import write_images  # benchmarks/scene_files.py

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="images in the timed runs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=32, help="images per shard (flow only)")
    parser.add_argument("--layers", nargs="+", default=["_blocks.8", "_blocks.12"])
    parser.add_argument(
        "--model",
        default="efficientnet_lite0",
        help="model spec of both loops; "
        "fast_proxy:lite0_shapes is the CPU proxy of a fast GPU (benchmarks/fast_proxy.py)",
    )
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--loader-workers",
        type=int,
        default=0,
        help="decoders: DataLoader processes (bare loop), execution.loader_workers (flow)",
    )
    parser.add_argument(
        "--loader", choices=["auto", "threads", "processes"], default="auto", help="execution.loader of the flow"
    )
    parser.add_argument("--autocast", choices=["none", "bfloat16", "float16"], default="none")
    parser.add_argument("--decoder", choices=["pil", "torchvision"], default="pil", help="extract.decoder (both paths)")
    parser.add_argument("--shards-per-task", type=int, default=8, help="extract.shards_per_task of the flow")
    parser.add_argument("--workers", type=int, default=1, help="execution.workers (concurrent shard tasks)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="bare loop and flow take turns this many times; the ratio is of the median times",
    )
    parser.add_argument(
        "--variants",
        nargs="*",
        default=[],
        metavar="SHARDS_PER_TASK:WORKERS[:WRITE_WORKERS]",
        help="more flow runs on the same images with these settings, one of each in every turn",
    )
    parser.add_argument("--out", default="benchmarks/results/extract_throughput.json", help="JSON result path")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    parser.add_argument(
        "--write-workers", type=int, default=None, help="execution.write_workers of the flow (default: unset)"
    )
    parser.add_argument(
        "--flow-torch-threads", type=int, default=None, help="execution.torch_threads of the flow (default: unset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    parser.add_argument(
        "--engine",
        choices=["prefect", "direct"],
        default="prefect",
        help="prefect: the extraction flow; direct: its task bodies in-process (no Prefect)",
    )
    return parser.parse_args(argv)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def store_only_write(results, layers: list[str], shard_size: int, dtype: str, folder: Path) -> tuple[float, int]:
    """Write the bare loop's in-memory results into a fresh Zarr store with the flow's layout
    (sacv.io.zarr_store.ensure_array / write_region, one region per shard). Returns (seconds, bytes on disk)."""
    import zarr

    from sacv.io.zarr_store import ensure_array, write_region

    arrays = {}
    for layer in layers:
        arrays[f"dataset/{layer}/act"] = np.concatenate([r.activations[layer].numpy() for r in results])
        arrays[f"dataset/{layer}/grad"] = np.concatenate([r.gradients[layer].numpy() for r in results])
    arrays["dataset/logits"] = np.concatenate([r.logits.numpy() for r in results])
    arrays["dataset/targets"] = np.concatenate([r.targets.numpy() for r in results])
    started = time.perf_counter()
    root = zarr.open_group(str(folder), mode="w", zarr_format=3)
    for path, data in arrays.items():
        target_dtype = dtype if data.ndim == 4 else str(data.dtype)
        array = ensure_array(root, path, data.shape, shard_size, target_dtype)
        for start in range(0, len(data), shard_size):
            write_region(array, start, data[start : start + shard_size])
    return time.perf_counter() - started, folder_bytes(folder)


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    processor = platform.processor() or platform.machine()
    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {processor})"


def flow_config(
    root: Path, run: str, data: str, args, device: str, shards_per_task: int, workers: int, writers: int | None = None
):
    from sacv.config import parse_config

    return parse_config(
        {
            "run_dir": str(root / run),
            "model": {"spec": args.model},
            "layers": list(args.layers),
            "dataset": {"root": str(root / data), "target": "predicted"},
            "extract": {
                "shard_size": args.shard_size,
                "batch_size": args.batch_size,
                "autocast": args.autocast,
                "decoder": args.decoder,
                "shards_per_task": shards_per_task,
            },
            "execution": {
                "device": device,
                "loader_workers": args.loader_workers,
                "loader": args.loader,
                "workers": workers,
                "torch_threads": args.flow_torch_threads,
                **({"write_workers": writers or args.write_workers} if writers or args.write_workers else {}),
            },
        }
    )


def run_flow(
    root: Path,
    run: str,
    args,
    device: str,
    data: str | None = None,
    shards_per_task: int | None = None,
    workers: int | None = None,
    writers: int | None = None,
) -> tuple[float, dict, Path]:
    """``--engine prefect``: the extraction flow; ``direct``: the same task bodies (plan, then every
    shard) called in-process without Prefect, for machines without it."""
    per_task, workers = shards_per_task or args.shards_per_task, workers or args.workers
    config = flow_config(root, run, data or f"{run}-data", args, device, per_task, workers, writers)
    started = time.perf_counter()
    if args.engine == "prefect":
        from flows.extract import run_extract

        summary = dataclasses.asdict(run_extract(config))
    else:
        from flows.extract import shard_blocks
        from sacv.extract.extraction import record_shard_rejects, run_shards
        from sacv.extract.extraction_plan import plan_extraction

        plan = plan_extraction(config.run_dir, config)
        for group, shards in shard_blocks(plan.todo, config.extract.shards_per_task):
            run_shards(config.run_dir, config, group, shards)
        record_shard_rejects(config.run_dir)
        summary = {
            "images": plan.images,
            "shards_run": len(plan.todo),
            "seconds": round(time.perf_counter() - started, 2),
        }
    seconds = time.perf_counter() - started
    return seconds, summary, root / run


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    sys.path.insert(0, str(REPO))
    if args.engine == "prefect":
        from flows.process import configure_process

        configure_process()  # Prefect embedded-mode defaults and malloc setting, before any thread

    import torch

    from sacv.method.models import cached_model, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    autocast = None if args.autocast == "none" else getattr(torch, args.autocast)

    with tempfile.TemporaryDirectory(prefix="sacv-bench-") as tmp:
        root = Path(tmp)
        # "tabby" is an ImageNet class name, so sacv.extract.image_sources.match_class accepts the folder.
        warm_paths = write_images(root / "warm-data" / "tabby", 4, args.seed + 1)
        paths = write_images(root / "timed-data" / "tabby", args.images, args.seed)

        # Same cached model instance as the flow's shard tasks use in this process.
        model = cached_model(args.model, None, str(device))

        print(f"warm-up: bare loop on {min(len(paths), 512)} images, flow on {len(warm_paths)} images ...", flush=True)
        bare_loop(model, paths[:512], args.layers, args.batch_size, args.loader_workers, autocast, args.decoder)
        run_flow(root, "warm", args, str(device))

        sampler = GpuSampler() if device.type == "cuda" else None
        windows = {}
        print("timed: raw rates and decoding alone ...", flush=True)
        started = time.perf_counter()
        raw = raw_rates(model, args.layers, args.batch_size, autocast)
        windows["raw"] = (started, time.perf_counter())
        decoding = decode_rates(paths[: min(len(paths), 2048)], model, args.loader_workers)
        partial = {
            "complete": False,
            "device": device_name(device),
            "command": " ".join(sys.argv),
            "raw_images_per_s": raw,
            "decode_images_per_s": decoding,
        }
        write_json(partial, args.out)  # what is measured so far survives a time limit

        print("timed: bare loop ...", flush=True)
        started = time.perf_counter()
        bare_seconds, results = bare_loop(
            model, paths, args.layers, args.batch_size, args.loader_workers, autocast, args.decoder
        )
        windows["bare"] = (started, time.perf_counter())
        write_seconds, write_bytes = store_only_write(
            results, args.layers, args.shard_size, "float16", root / "write-only.zarr"
        )
        del results

        print("timed: planning alone, then the flow ...", flush=True)
        from sacv.extract.extraction_plan import plan_extraction

        started = time.perf_counter()
        plan_extraction(str(root / "plan-only"), flow_config(root, "plan-only", "timed-data", args, str(device), 1, 1))
        plan_seconds = time.perf_counter() - started
        started = time.perf_counter()
        partial["bare_images_per_s"] = round(args.images / bare_seconds, 2)
        write_json(partial, args.out)
        flow_seconds, summary, run_dir = run_flow(root, "timed", args, str(device))
        partial |= {"plan_seconds": round(plan_seconds, 3), "flow_images_per_s": round(args.images / flow_seconds, 2)}
        write_json(partial, args.out)
        windows["flow"] = (started, time.perf_counter())
        pairs = [(bare_seconds, flow_seconds)]
        specs = [
            [int(v) for v in variant.split(":")] + [None] * (3 - variant.count(":") - 1) for variant in args.variants
        ]
        variant_seconds: list[list[float]] = [[] for _ in specs]

        def run_variants(turn: int) -> None:  # in every turn, after its flow: each variant meets the same spells
            for i, (per_task, workers, writers) in enumerate(specs):
                print(f"timed: flow variant {args.variants[i]} (shards per task:task workers:writers) ...", flush=True)
                started = time.perf_counter()
                seconds, _, _ = run_flow(
                    root, f"variant-{i}-{turn}", args, str(device), "timed-data", per_task, workers, writers
                )
                windows[f"flow {args.variants[i]}, turn {turn + 1}"] = (started, time.perf_counter())
                variant_seconds[i].append(seconds)

        run_variants(0)
        for k in range(1, args.repeats):  # more turns of both: a slow spell of a shared machine hits each alike
            print(f"timed: bare loop and flow, turn {k + 1} of {args.repeats} ...", flush=True)
            seconds, _ = bare_loop(
                model, paths, args.layers, args.batch_size, args.loader_workers, autocast, args.decoder
            )
            pairs.append((seconds, run_flow(root, f"timed-{k}", args, str(device), "timed-data")[0]))
            run_variants(k)
        bare_seconds, flow_seconds = (float(np.median(times)) for times in zip(*pairs))
        variants = []
        for (per_task, workers, writers), times in zip(specs, variant_seconds):
            seconds = float(np.median(times))
            variants.append(
                {
                    "shards_per_task": per_task,
                    "workers": workers,
                    "write_workers": writers,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(args.images / seconds, 2),
                    "ratio_flow_over_bare": round(bare_seconds / seconds, 3),
                    "turns_ratio_flow_over_bare": [round(b / t, 3) for (b, _), t in zip(pairs, times)],
                    "median_ratio_flow_over_bare": round(
                        float(np.median([b / t for (b, _), t in zip(pairs, times)])), 3
                    ),
                }
            )
        write_json(partial | {"variants": variants}, args.out)
        if sampler is not None:
            time.sleep(0.3)  # the last samples
            sampler.stop()
        markers = [
            json.loads(p.read_text())
            for p in sorted((run_dir / "shards").glob("*/*.json"))
            if not p.name.endswith(".rejects.json")
        ]
        shard_seconds = sum(m["seconds"] for m in markers)
        split = {
            key: round(sum(m["timing"][key] for m in markers), 3)
            for key in ("decode_wait_s", "compute_s", "writer_wait_s", "write_s")
        }
        # The shard phase's wall time from the markers' clocks; what the model thread did not spend on
        # a shard (decode wait, compute, writer wait) went to task boundaries and the last writes.
        shard_wall = max(m["finished_at"] for m in markers) - min(m["started_at"] for m in markers)
        split |= {
            "shard_phase_wall_s": round(shard_wall, 3),
            "model_thread_outside_shards_s": round(
                shard_wall - sum(split[k] for k in ("decode_wait_s", "compute_s", "writer_wait_s")), 3
            ),
        }
        stored_bytes = folder_bytes(run_dir / "store.zarr")
        n = summary["images"]
        assert n == args.images, f"the flow stored {n} images, expected {args.images}"

    mb = 1e6
    result = {
        "complete": True,
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": args.model,
        "layers": list(args.layers),
        "images": args.images,
        "image_size": "256x256 JPEG (sacv.demo.textures.scene, quality 90)",
        "batch_size": args.batch_size,
        "shard_size": args.shard_size,
        "loader_workers": args.loader_workers,
        "loader": args.loader,
        "autocast": args.autocast,
        "decoder": args.decoder,
        "torch_threads": torch.get_num_threads(),
        "bare": {
            "seconds": round(bare_seconds, 3),
            "images_per_s": round(args.images / bare_seconds, 2),
            "what": "load_image + preprocessing + extract(with_gradients, predicted target, float16), "
            "results kept in memory",
        },
        "engine": args.engine,
        "flow": {
            "seconds": round(flow_seconds, 3),
            "images_per_s": round(n / flow_seconds, 2),
            "flow_seconds": summary["seconds"],
            "phases": summary.get("phases"),
            "shard_seconds_sum": round(shard_seconds, 3),
            "shards_run": summary["shards_run"],
            "images_per_s_shard_phase": round(n / shard_seconds, 2),
            "what": "wall time of run_extract(config) incl. planning; flow_seconds = the flow's own timer; "
            "shard_seconds_sum = sum of marker 'seconds' (decode + extract + Zarr write per shard)",
        },
        "ratio_flow_over_bare": round((n / flow_seconds) / (args.images / bare_seconds), 3),
        "turns": {
            "bare_seconds": [round(b, 3) for b, _ in pairs],
            "flow_seconds": [round(f, 3) for _, f in pairs],
            "ratio_flow_over_bare": [round(b / f, 3) for b, f in pairs],
            "median_ratio_flow_over_bare": round(float(np.median([b / f for b, f in pairs])), 3),
            "what": "each turn runs the bare loop, then the flow on a fresh run dir; bare and flow above are "
            "the medians over the turns (ratio_flow_over_bare: of those medians; median_ratio_flow_over_bare: "
            "the median of the turns' ratios), the time split and storage are of the first flow",
        },
        "plan_seconds": round(plan_seconds, 3),
        "plan_files_per_s": round(args.images / plan_seconds, 1),
        "shards_per_task": args.shards_per_task,
        "workers": args.workers,
        "variants": variants,
        "raw_images_per_s": raw,
        "ratio_bare_over_raw_forward_backward": round((args.images / bare_seconds) / raw["forward_backward"], 3),
        "decode_images_per_s": decoding,
        "time_split": {
            **split,
            "what": "summed over shards from the markers' timing: the model thread waiting for "
            "decoded images / computing (batching, model, device copies) / waiting for a free writer; "
            "write_s: each shard's writes, from its first write job to its marker (a shard's arrays are written "
            "side by side; overlaps the others); shard_phase_wall_s: first shard "
            "start to last marker (markers' clocks); model_thread_outside_shards_s: that wall minus the "
            "model thread's three shares (task boundaries, the last writes of each task)",
        },
        "gpu_utilisation": {name: sampler.window(*span) for name, span in windows.items()} if sampler else None,
        "storage": {
            "bytes_stored": stored_bytes,
            "bytes_per_image": round(stored_bytes / n),
            "what": "sum of file sizes under store.zarr (chunks + zarr.json, float16 act+grad of each layer, "
            "float32 logits, int64 targets, the store's codec) / images",
            "write_mb_per_s_effective": round(stored_bytes / mb / shard_seconds, 2),
            "write_mb_per_s_effective_what": "bytes stored / summed shard seconds; the shard seconds include decode "
            "and forward/backward, so this is the rate the flow produced stored bytes, a lower bound on the disk rate",
            "write_mb_per_s_store_only": round(write_bytes / mb / write_seconds, 2),
            "write_mb_per_s_store_only_what": "the bare loop's float16 results written with "
            "sacv.io.zarr_store.ensure_array/write_region into a fresh store (same layout, one region per shard), "
            "bytes on disk / wall time of that write alone",
            "store_only_seconds": round(write_seconds, 3),
        },
        "command": "python benchmarks/extract_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }

    rows = [
        ("device", result["device"]),
        ("torch", result["torch"]),
        ("images / batch / shard", f"{args.images} / {args.batch_size} / {args.shard_size}"),
        ("decoder / loader workers", f"{args.decoder} / {args.loader_workers} {args.loader}"),
        ("model / layers", f"{args.model} / " + " ".join(args.layers)),
        ("bare loop", f"{result['bare']['images_per_s']:.2f} img/s ({bare_seconds:.2f} s)"),
        ("flow (whole call)", f"{result['flow']['images_per_s']:.2f} img/s ({flow_seconds:.2f} s)"),
        (
            "flow's own seconds, first turn",
            f"{summary['seconds']:.2f} s"
            + (
                " (" + ", ".join(f"{k} {v:.2f}" for k, v in summary["phases"].items()) + ")"
                if summary.get("phases")
                else ""
            ),
        ),
        ("planning alone", f"{plan_seconds:.2f} s ({args.images / plan_seconds:.0f} files/s)"),
        *[
            (
                f"flow, {v['shards_per_task']} shards/task, {v['workers']} workers, "
                f"{v['write_workers'] or 'default'} writers",
                f"{v['images_per_s']:.2f} img/s ({v['seconds']:.2f} s), ratio {v['ratio_flow_over_bare']:.3f} "
                f"(turns' median {v['median_ratio_flow_over_bare']:.3f})",
            )
            for v in variants
        ],
        ("shard phase (sum)", f"{result['flow']['images_per_s_shard_phase']:.2f} img/s ({shard_seconds:.2f} s)"),
        (
            "ratio flow / bare",
            f"{result['ratio_flow_over_bare']:.3f}"
            + (
                f" (medians of {len(pairs)} turns; per turn "
                + " ".join(f"{r:.3f}" for r in result["turns"]["ratio_flow_over_bare"])
                + f", their median {result['turns']['median_ratio_flow_over_bare']:.3f})"
                if len(pairs) > 1
                else ""
            ),
        ),
        (
            "raw fwd+bwd / extract()",
            f"{raw['forward_backward']:.0f} / {raw['extract']:.0f} img/s (batch on the device)",
        ),
        ("ratio bare / raw fwd+bwd", f"{result['ratio_bare_over_raw_forward_backward']:.3f}"),
        ("decoding alone", ", ".join(f"{k} {v}" for k, v in decoding.items())),
        (
            "time split (model thread)",
            f"decode wait {split['decode_wait_s']:.2f} s, compute {split['compute_s']:.2f} s, "
            f"writer wait {split['writer_wait_s']:.2f} s; shard writes {split['write_s']:.2f} s",
        ),
        (
            "shard phase (markers' clocks)",
            f"{split['shard_phase_wall_s']:.2f} s wall, model thread outside shards "
            f"{split['model_thread_outside_shards_s']:.2f} s",
        ),
        ("bytes per image", f"{result['storage']['bytes_per_image']:,}"),
        ("write MB/s (effective)", f"{result['storage']['write_mb_per_s_effective']:.2f}"),
        ("write MB/s (store only)", f"{result['storage']['write_mb_per_s_store_only']:.2f}"),
    ]
    if sampler:
        rows += [
            (
                f"GPU util. {name}",
                f"mean {w['util_mean']} %, median {w['util_median']} %, {w['memory_mib_peak']:.0f} MiB",
            )
            for name, w in result["gpu_utilisation"].items()
            if w
        ]
    print_table(rows)

    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
