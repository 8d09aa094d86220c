"""Where a fit stage's time goes, in process and without Prefect: reads, statistics, solver, scoring.

Takes the config of a run whose extraction is done, deletes ``fits/`` and fits every block in this
process with ``sacv.fit.sweep.fit_block`` (as the ``fit-block`` task body does), timing each part by
wrapping: ``plan_fits``, reading stored statistics and shard markers (``read_stats``), reading
positions (``PositionReader``), the batched L-BFGS (``solvers.batched_logistic``), held-out scoring
(``solvers.select_scores``), metrics (``set_fitted_vector``), writing results, and
``collect_vectors``. Per block: jobs, wall, and per group of jobs (a concept's, a pseudo-concept's) the L-BFGS
iterations (median, max) and the most passes of a job. Compare the
sum with ``run.json`` ``timings.fit.seconds`` of a ``sacv fit`` of the same run to see the flow's
own overhead.

    python benchmarks/captum_side_by_side.py --sacv-only --keep /tmp/anchor --out /tmp/anchor.json
    python benchmarks/fit_profile.py /tmp/anchor/config.yaml --out benchmarks/results/fit_profile_anchor_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="config of a run whose extraction is done (its fits/ is deleted)")
    parser.add_argument("--solver", default=None, help="fit.solver to use (default: the config's)")
    parser.add_argument("--concepts", nargs="+", default=None, help="only these concepts (concepts.names)")
    parser.add_argument("--out", default="benchmarks/results/fit_profile.json", help="JSON result path")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import yaml

    from sacv.config import parse_config
    from sacv.fit import fit_plan, solvers, sweep

    raw = yaml.safe_load(Path(args.config).read_text())
    if args.solver:
        raw["fit"] = {**raw.get("fit", {}), "solver": args.solver}
    if args.concepts:
        raw["concepts"]["names"] = args.concepts
    config = parse_config(raw)
    shutil.rmtree(Path(config.run_dir) / "fits", ignore_errors=True)
    parts: dict[str, float] = defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] += time.perf_counter() - started

        return wrapper

    sweep.PositionReader.__init__ = timed("read positions (PositionReader)", sweep.PositionReader.__init__)
    sweep.read_stats = timed("read statistics and shard markers", sweep.read_stats)
    sweep.solvers.batched_logistic = timed("batched L-BFGS", solvers.batched_logistic)
    sweep.solvers.select_scores = timed("held-out scoring", solvers.select_scores)
    sweep.set_fitted_vector = timed("metrics (set_fitted_vector)", sweep.set_fitted_vector)
    sweep.RunDir.write_fit_result = timed("write results", sweep.RunDir.write_fit_result)
    result: dict = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "solver": config.fit.solver,
        "blocks": [],
    }
    started = time.perf_counter()
    plan = fit_plan.plan_fits(config.run_dir, config)
    parts["plan_fits"] = time.perf_counter() - started
    for layer, keys in plan.blocks:
        block_started = time.perf_counter()
        results = sweep.fit_block(config.run_dir, config, layer, keys)
        per_group: dict[str, list[dict]] = {}
        for r in results:
            per_group.setdefault(r["concept"] if r["kind"] == "concept" else "pseudo-concepts", []).append(r)
        groups = {
            name: {
                "n_iter_median": float(np.median([r["n_iter"] for r in rs])),
                "n_iter_max": max(r["n_iter"] for r in rs),
                "passes_max": max(r["passes"] for r in rs),
            }
            for name, rs in per_group.items()
        }
        result["blocks"].append(
            {
                "layer": layer,
                "jobs": len(keys),
                "wall_s": round(time.perf_counter() - block_started, 3),
                "groups": groups,
            }
        )
    collect_started = time.perf_counter()
    fit_plan.collect_vectors(config.run_dir)
    parts["collect_vectors"] = time.perf_counter() - collect_started
    result["total_s"] = round(time.perf_counter() - started, 3)
    result["parts_s"] = {k: round(v, 3) for k, v in parts.items()}
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["command"] = "python benchmarks/fit_profile.py " + " ".join(sys.argv[1:] if argv is None else argv)
    for block in result["blocks"]:
        print(
            f"{block['layer']}: {block['jobs']} jobs in {block['wall_s']:.2f} s; "
            "per group of jobs (n_iter median/max, passes max): "
            + ", ".join(
                f"{g} ({v['n_iter_median']:g}/{v['n_iter_max']}, {v['passes_max']})" for g, v in block["groups"].items()
            )
        )
    print_table(
        [(name, f"{seconds:7.2f} s") for name, seconds in result["parts_s"].items()]
        + [("total (in process)", f"{result['total_s']:7.2f} s")]
    )
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
