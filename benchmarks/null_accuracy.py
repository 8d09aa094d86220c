"""Held-out balanced accuracy of null vectors (random set against random set) over many seeds.

Both parts go through the fit stage's own code: ``plan_jobs`` draws the random sets and null pairs
(``draw_random_sets``), ``sweep.JobSides`` the held-out images, ``sweep.fit_jobs`` fits and scores.
``fit.seed`` draws both the sets and the split, so each seed is one fresh draw of the design.

- ``--planted``: no model. Each image is an image-level offset (sd ``img_sd``) plus position noise
  (sd 1), i.i.d., 4×4 positions × 8 channels, float16 as in the store; a pool of 100 and 10 sets of
  10, as in the 50-concept sweep. One factor is varied at a time: pool size (a pool smaller than
  sets × images gives overlapping sets), what happens to images both sets share (``drop``: the fit
  stage's null pairs drop them from both sides; ``negative``: kept, counted on the random side, as
  ``JobSides`` counts an image on both sides; ``positive``: kept on the first side only), set
  size, validation fraction, intercept, solver, image offset. Control ``leak``: the held-out images
  also in training (a dependence the measure must see).
- ``--run RUN_DIR``: the stored guidance activations of a run, its random pool and settings;
  ``--run-seeds`` fresh draws per layer and solver. Only the extraction is needed: a run directory of
  ``benchmarks/fit_sweep.py --keep DIR`` (``DIR/run``), or ``sacv extract`` on its collection.

Reported per case: the held-out balanced accuracies of every null vector of every seed: mean, its
standard error (from the spread of the per-seed means), median, sd, shares below / above / at 0.5;
for ``--run`` also the per-seed medians over all layers (what a run's table shows), where the run's
own seed falls among them, and the correlation of the values from the first layer to the last.

    # SWEEP: fit_sweep.py --concepts 50 --per-concept 10 --pool 100 --per-set 10 --layers _blocks.4
    #        _blocks.8 _blocks.11 _blocks.14 --keep SWEEP;  ANCHOR: fit_sweep.py --keep ANCHOR
    python benchmarks/null_accuracy.py --planted --seeds 200 --run SWEEP/run --run-seeds 200 \
        --out benchmarks/results/null_accuracy_cpu.json
    python benchmarks/null_accuracy.py --run SWEEP/run --run-seeds 60 --run-solvers lbfgs \
        --out benchmarks/results/null_accuracy_sweep_lbfgs_cpu.json
    python benchmarks/null_accuracy.py --run ANCHOR/run --run-seeds 200 \
        --out benchmarks/results/null_accuracy_anchor_cpu.json
    python benchmarks/null_accuracy.py --run ANCHOR/run --run-seeds 30 --run-solvers lbfgs \
        --out benchmarks/results/null_accuracy_anchor_lbfgs_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from common import write_json  # benchmarks/common.py (the script folder is on sys.path)

from sacv.config import parse_config
from sacv.extract.catalog import IMAGE_COLUMNS, ImageCatalog
from sacv.fit import solvers, sweep
from sacv.fit.fit_plan import draw_random_sets, plan_jobs
from sacv.io.zarr_store import store_identity

PLANTED = [  # one factor away from the first case each
    {},
    {"solver": "lbfgs"},
    {"intercept": "logistic"},
    {"pool": 50},
    {"pool": 50, "overlap": "negative"},
    {"pool": 50, "overlap": "positive"},
    {"pool": 20},
    {"pool": 20, "overlap": "negative"},
    {"pool": 40, "per_set": 4},
    {"pool": 500, "per_set": 50},
    {"validation_fraction": 0.1},
    {"validation_fraction": 0.5},
    {"img_sd": 0.0},
    {"img_sd": 5.0},
    {"control": "leak"},
]


def summary(accuracies: np.ndarray) -> dict:
    """Statistics of (seeds, jobs) held-out balanced accuracies."""
    per_seed = accuracies.mean(axis=1)
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {
        "vectors": int(accuracies.size),
        "seeds": len(accuracies),
        "mean": r(accuracies.mean()),
        "se_mean": r(per_seed.std(ddof=1) / np.sqrt(len(per_seed))),
        "median": r(np.median(accuracies)),
        "sd": r(accuracies.std()),
        "below_half": r((accuracies < 0.5).mean()),
        "above_half": r((accuracies > 0.5).mean()),
        "at_half": r((accuracies == 0.5).mean()),
    }


def config_for(tmp: Path, layer: str, sets: int, per_set: int, fit: dict):
    return parse_config(
        {
            "run_dir": str(tmp / "run"),
            "layers": [layer],
            "concepts": {"root": str(tmp), "random_pool": str(tmp), "random_sets": sets, "images_per_set": per_set},
            "fit": {"compare_logistic": False, **fit},
        }
    )


def null_group(array, jobs: list[dict], row_of: dict, config, stats=None) -> list[float]:
    """Held-out balanced accuracies of the null ``jobs`` fitted as ``fit_block`` fits a group."""
    sides = sweep.JobSides(jobs, row_of, config.fit.validation_fraction, config.fit.seed)
    reader = sweep.PositionReader(array, sides.rows, resident=True)
    if stats is None:
        stats = solvers.image_stats(
            reader.blocks_of(sides.rows, np.arange(len(sides.rows))), len(sides.rows), reader.channels
        )
    else:  # (rows, sums, squares, counts) of a superset of the group's rows
        at = np.searchsorted(stats[0], sides.rows)
        stats = tuple(s[at] for s in stats[1:])
    return [r["bal_acc"] for r in sweep.fit_jobs(reader, sides, stats, config)]


def planted_case(
    tmp: Path,
    seed: int,
    pool=100,
    sets=10,
    per_set=10,
    img_sd=2.0,
    solver="mean_difference",
    intercept="midpoint",
    validation_fraction=0.25,
    overlap="drop",
    control=None,
) -> list[float]:
    rng = np.random.default_rng([11, seed])
    n, hw, channels = pool + 2, 4, 8  # 2 concept images: plan_jobs wants a concept
    ids = [f"{i:04d}" for i in range(n)]
    rows = [
        {
            "image_id": ids[i],
            "path": f"/x/{i}.png",
            "group": "guidance",
            "role": "concept" if i < 2 else "random",
            "concept": "k" if i < 2 else "random",
            "label": pd.NA,
            "mask": None,
            "row": i,
            "shard": i // 8,
            "status": "ok",
        }
        for i in range(n)
    ]
    images = pd.DataFrame(rows, columns=IMAGE_COLUMNS).astype({"label": "Int64", "row": "Int64", "shard": "Int64"})
    fit = {"solver": solver, "seed": seed, "validation_fraction": validation_fraction}
    config = config_for(
        tmp, "block", sets, per_set, fit | ({"intercept": intercept} if solver == "mean_difference" else {})
    )
    identity = store_identity("planted", "0" * 64, {"crop": 32}, {"block": [hw, hw, channels]}, "float16")
    jobs = [job for job in plan_jobs(images, config, identity) if job["kind"] == "null"]
    if overlap != "drop":
        null_sets = draw_random_sets(ids[2:], set(), sets, per_set, seed)  # as plan_jobs draws them
        for job in jobs:
            a = set(null_sets[int(job["concept"].rsplit("_", 1)[1])])
            b = set(null_sets[int(job["random_set"].rsplit("_", 1)[1])])
            job["pos"], job["neg"] = (sorted(a), sorted(b)) if overlap == "negative" else (sorted(a), sorted(b - a))
    values = rng.normal(0, img_sd, (n, 1, 1, channels)) + rng.normal(0, 1.0, (n, hw, hw, channels))
    array = zarr.create_array(
        zarr.storage.MemoryStore(), shape=values.shape, chunks=(16, hw, hw, channels), dtype="float16"
    )
    array[...] = values.astype(np.float16)
    original = sweep.JobSides.__init__
    if control == "leak":

        def leaking(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.train = self.member.copy()

        sweep.JobSides.__init__ = leaking
    try:
        return null_group(array, jobs, dict(zip(ids, range(n))), config)
    finally:
        sweep.JobSides.__init__ = original


def planted(seeds: int) -> list[dict]:
    tmp = Path(tempfile.mkdtemp(prefix="sacv-nulls-"))
    out = []
    for case in PLANTED:
        started = time.perf_counter()
        accuracies = np.array([planted_case(tmp, seed, **case) for seed in range(seeds)])
        out.append(
            {
                "case": case or {"baseline": "pool 100, sets of 10, mean_difference, midpoint, 0.25, drop, img_sd 2"},
                **summary(accuracies),
                "wall_s": round(time.perf_counter() - started, 1),
            }
        )
        print(out[-1], flush=True)
    return out


def real(run_dir: str, seeds: int, solvers_: list[str], layers: list[str] | None) -> list[dict]:
    from sacv.io.rundir import RunDir
    from sacv.io.zarr_store import store_identity_of

    run = RunDir(run_dir)
    base = json.loads((Path(run_dir) / "run.json").read_text())["config"]  # the run's settings
    catalog = ImageCatalog.read(run)
    images = catalog.current()
    identity = store_identity_of(run.store_uri, run.storage_options)
    root = run.open_zarr("r")
    pool = images[(images["group"] == "guidance") & (images["role"] == "random")]
    pool_rows = np.sort(catalog.row_of(pool["image_id"]))
    out = []
    for solver in solvers_:
        per_layer = {}
        for layer in layers or base["layers"]:
            array = root[f"guidance/{layer}/act"]
            reader = sweep.PositionReader(array, pool_rows, resident=True)
            pool_blocks = reader.blocks_of(pool_rows, np.arange(len(pool_rows)))
            stats = (pool_rows, *solvers.image_stats(pool_blocks, len(pool_rows), reader.channels))
            started, accuracies = time.perf_counter(), []
            for seed in range(seeds):
                config = parse_config(
                    {
                        **base,
                        "layers": [layer],
                        "fit": {**base["fit"], "solver": solver, "seed": seed, "compare_logistic": False},
                    }
                )
                jobs = [job for job in plan_jobs(images, config, identity) if job["kind"] == "null"]
                ids = sorted({i for job in jobs for i in job["pos"] + job["neg"]})
                accuracies.append(null_group(array, jobs, dict(zip(ids, catalog.row_of(ids).tolist())), config, stats))
            per_layer[layer] = np.array(accuracies)
            out.append(
                {
                    "solver": solver,
                    "layer": layer,
                    **summary(per_layer[layer]),
                    "wall_s": round(time.perf_counter() - started, 1),
                }
            )
            print(out[-1], flush=True)
        together = np.concatenate(list(per_layer.values()), axis=1)  # (seeds, layers × jobs)
        medians = np.median(together, axis=1)
        own = int(base["fit"].get("seed", 0))
        out.append(
            {
                "solver": solver,
                "layer": "all",
                **summary(together),
                "per_seed_median_quantiles_2.5_50_97.5": [
                    round(float(q), 4) for q in np.percentile(medians, [2.5, 50, 97.5])
                ],
                "run_seed": own,
                "run_seed_median": round(float(medians[own]), 4),
                "share_of_seeds_with_median_at_most_the_run_seed": round(float((medians <= medians[own]).mean()), 4),
                "share_of_seeds_with_median_at_least_the_run_seed": round(float((medians >= medians[own]).mean()), 4),
                "share_of_seeds_with_median_as_far_from_half": round(
                    float((np.abs(medians - 0.5) >= abs(medians[own] - 0.5) - 1e-12).mean()), 4
                ),
                "correlation_between_first_and_last_layer": round(
                    float(
                        np.corrcoef(per_layer[next(iter(per_layer))].ravel(), per_layer[list(per_layer)[-1]].ravel())[
                            0, 1
                        ]
                    ),
                    3,
                ),
            }
        )
        print(out[-1], flush=True)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--planted", action="store_true", help="the planted cases")
    parser.add_argument("--seeds", type=int, default=200, help="seeds per planted case")
    parser.add_argument("--run", help="a run directory with guidance activations")
    parser.add_argument("--run-seeds", type=int, default=200, help="seeds per layer and solver of --run")
    parser.add_argument("--run-solvers", nargs="+", default=["mean_difference"], help="solvers for --run")
    parser.add_argument("--run-layers", nargs="+", help="layers for --run (default: the run's)")
    parser.add_argument("--out", help="JSON result path")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")  # null vectors are near chance by design
    result = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }
    if args.planted:
        result["planted"] = planted(args.seeds)
    if args.run:
        result["run"] = real(args.run, args.run_seeds, args.run_solvers, args.run_layers)
    if args.out:
        write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
