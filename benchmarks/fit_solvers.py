"""Out-of-core fit solvers against one raw read pass of the same positions, one synthetic store.

One process, one run. A float16 Zarr v3 store of shape (N, hw, hw, C), chunks (32, hw, hw, C), is
written with ``sacv.io.zarr_store.ensure_array`` / ``write_region`` (the extraction flow's layout). Odd images
are concept images: moved by ``--shift`` along a planted unit direction ``u``; the noise is anisotropic
(per-channel means and log-normal per-channel scales), as real activations are. Positions come from
``sacv.fit.per_job.positions_from_store`` over every row. For each solver of
``sacv.fit.per_job.OutOfCoreConceptVector`` (``lbfgs``, ``dask_ml``; the fit
settings are ``sacv.config.FitConfig``'s defaults), and for the fit stage's block solvers (``auto`` =
batched exact L-BFGS, ``mean_difference``; one job, through ``sacv.fit.sweep.fit_jobs`` on positions
read once into memory with ``PositionReader``; their time includes that read) it measures:

(a) ``raw read``: ``X_train.astype("float32").sum(axis=0).compute()`` over the very dask array the
    solver iterates over (the training positions), median of 3 after one warm-up read (page cache warm);
(b) wall time of ``fit`` (whole call, and ``fit_seconds_``: the solver alone, without the split and
    the held-out scoring), ``passes_`` and ``n_iter_``;
(c) ``fit_seconds_ / passes_ / raw read`` (goal <= 1.4 for lbfgs);
(d) cosine of ``coef_`` to the exact solution: ``sacv.method.vectors.fit_logistic`` (scikit-learn) in
    memory on the same training positions (split replicated with ``grouped_validation_split``);
(e) peak RSS of a fresh subprocess that fits lbfgs / dask_ml on the 1x store and on a 4x store (same
    generator, 4x the images), with ``max_iter=15`` as in tests/test_fitting.py's memory
    test. Measured as the child's own ``VmHWM`` (reset after the imports): ``ru_maxrss`` is recorded
    too, but Linux carries it across ``exec``, so a child started from a process that holds ~1 GB
    (torch imported) reports that 1 GB whatever the fit does.

    python benchmarks/fit_solvers.py --images 2000 --out benchmarks/results/fit_solvers_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from common import write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
SOLVERS = ("lbfgs", "dask_ml")
BLOCK_SOLVERS = (
    "auto",
    "mean_difference",
)  # through sacv.fit.sweep.fit_jobs on a resident block, as the fit stage runs them
MEMORY_SOLVERS = ("lbfgs", "dask_ml")
RATIO_GOAL = 1.4
SHARD = 32  # images per chunk, as extract.shard_size's default
ARRAY_PATH = "guidance/layer/act"  # inside the store, as a real run's guidance activations

MEMORY_SCRIPT = """
import resource, sys, json, warnings, zarr, numpy as np
warnings.simplefilter("ignore")
from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
import dask_ml.wrappers, sklearn.linear_model  # imported for both sizes alike


def hwm_kb():  # this process's own high-water mark (ru_maxrss also counts the parent's, see below)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


maxrss_before, hwm_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm_kb()
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS: the next peak is the fit's
except OSError:
    pass
array = zarr.open_array(sys.argv[1], mode="r")
rows = np.arange(array.shape[0])
X = positions_from_store(array, rows)
per = X.shape[0] // len(rows)
y, groups = np.repeat(rows % 2, per), np.repeat(rows, per)
estimator = OutOfCoreConceptVector(solver=sys.argv[2], C=float(sys.argv[3]), max_iter=15, random_state=0)
fitted = estimator.fit(X, y, groups)
maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"ru_maxrss_before_fit_kb": maxrss_before, "ru_maxrss_kb": maxrss_after,
                  "vmhwm_before_fit_kb": hwm_before, "vmhwm_fit_kb": hwm_kb(), "passes": fitted.passes_}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images in the 1x store (half of them concept)")
    parser.add_argument("--hw", type=int, default=8, help="spatial size: positions per image = hw * hw")
    parser.add_argument("--channels", type=int, default=112, help="channels C")
    parser.add_argument("--shift", type=float, default=0.5, help="concept shift along the planted unit direction")
    parser.add_argument("--seed", type=int, default=0, help="seed of the store and of the fits")
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (FitConfig default 1.0)")
    parser.add_argument(
        "--memory-scale", type=int, default=4, help="the larger store of (e) has this many times the images"
    )
    parser.add_argument("--skip-memory", action="store_true", help="skip (e)")
    parser.add_argument("--out", default="benchmarks/results/fit_solvers.json", help="JSON result path")
    return parser.parse_args(argv)


def write_store(path: Path, n_images: int, hw: int, channels: int, shift: float, seed: int):
    """The planted store; returns (zarr array, planted unit u, per-channel scale). Odd images: concept."""
    import numpy as np
    import zarr

    from sacv.io.zarr_store import ensure_array, write_region

    rng = np.random.default_rng(seed)  # same parameters for every size: only the images differ in number
    u = rng.normal(size=channels)
    u /= np.linalg.norm(u)
    mean = rng.normal(0.0, 1.0, size=channels)
    scale = np.exp(rng.normal(0.0, 0.5, size=channels))
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = ensure_array(root, ARRAY_PATH, (n_images, hw, hw, channels), SHARD, "float16")
    noise = np.random.default_rng([seed, n_images])
    for start in range(0, n_images, SHARD):
        n = min(SHARD, n_images - start)
        labels = (np.arange(start, start + n) % 2)[:, None, None, None]
        block = mean + scale * noise.normal(size=(n, hw, hw, channels)) + shift * labels * u
        write_region(array, start, block.astype(np.float32))
    return array, u, scale


def cosine(a, b) -> float:
    import numpy as np

    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def raw_read(X) -> float:
    """Median seconds of 3 reads of X (cast to float32, summed), after one warm-up read."""
    X.astype("float32").sum(axis=0).compute()
    times = []
    for _ in range(3):
        started = time.perf_counter()
        X.astype("float32").sum(axis=0).compute()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peak_rss(path: Path, solver: str, C: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(path / ARRAY_PATH), solver, str(C)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if out.returncode != 0:
        raise RuntimeError(f"memory subprocess ({solver}, {path.name}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def block_fit(array, rows, solver: str, C: float, seed: int, w_exact, read_s: float) -> dict:
    """One job (odd rows concept, even rows random) through the fit stage's block code."""
    import numpy as np

    from sacv.config import parse_config
    from sacv.fit import solvers, sweep

    config = parse_config({"run_dir": "unused", "layers": ["layer"], "fit": {"solver": solver, "C": C, "seed": seed}})
    job = {
        "layer": "layer",
        "concept": "planted",
        "kind": "concept",
        "random_set": "random_0",
        "key": "k",
        "pos": [str(r) for r in rows if r % 2],
        "neg": [str(r) for r in rows if r % 2 == 0],
    }
    started = time.perf_counter()
    reader = sweep.PositionReader(array, rows, resident=True)
    sides = sweep.JobSides([job], {str(i): int(i) for i in rows}, config.fit.validation_fraction, seed)
    stats = solvers.image_stats(reader.blocks(np.searchsorted(rows, sides.rows)), len(sides.rows), array.shape[-1])
    (r,) = sweep.fit_jobs(
        reader, sides, stats, config, computed=np.ones(len(sides.rows), bool)
    )  # statistics from this read (no markers here)
    wall = time.perf_counter() - started
    return {
        "raw_read_s": round(read_s, 4),
        "fit_wall_s": round(wall, 3),
        "solver_s": round(wall, 3),
        "passes": r["passes"],
        "n_iter": r["n_iter"],
        "s_per_pass": round(wall / r["passes"], 4),
        "ratio_pass_over_read": round(wall / r["passes"] / read_s, 3),
        "cos_to_exact": cosine(np.array(r["coef"]), w_exact),
        "intercept": r["intercept"],
        "bal_acc": r["bal_acc"],
        "auroc": r["auroc"],
        "near_chance": r["near_chance"],
        **(
            {"cosine_to_logistic": r["cosine_to_logistic"], "bal_acc_logistic": r["bal_acc_logistic"]}
            if "cosine_to_logistic" in r
            else {}
        ),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import dask
    import dask_ml
    import numpy as np
    import scipy
    import sklearn
    import zarr

    from sacv.config import FitConfig
    from sacv.fit.per_job import OutOfCoreConceptVector, positions_from_store
    from sacv.method.vectors import NearChanceWarning, fit_logistic, grouped_validation_split

    fit = FitConfig()
    seed = args.seed
    result: dict = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "python": platform.python_version(),
        "versions": {
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-learn": sklearn.__version__,
            "dask": dask.__version__,
            "dask-ml": dask_ml.__version__,
            "zarr": zarr.__version__,
        },
        "dask_scheduler": dask.config.get("scheduler", "threads (default)"),
        "store": {
            "images": args.images,
            "hw": args.hw,
            "channels": args.channels,
            "chunk_images": SHARD,
            "dtype": "float16",
            "shift": args.shift,
            "concept": "odd images (half)",
            "noise": "per-channel mean N(0,1), per-channel scale exp(N(0,0.5)), iid normal",
        },
        "fit_settings": {
            "C": args.C,
            "standardize": fit.standardize,
            "validation_fraction": fit.validation_fraction,
            "max_iter": fit.max_iter,
            "memory_budget_mb": fit.memory_budget_mb,
            "tol": OutOfCoreConceptVector().tol,
            "random_state": seed,
        },
        "ratio_goal": RATIO_GOAL,
        "solvers": {},
    }

    with tempfile.TemporaryDirectory(prefix="sacv-fitbench-") as tmp:
        tmp = Path(tmp)
        print(f"writing the {args.images}-image store ...", flush=True)
        array, u, scale = write_store(tmp / "x1.zarr", args.images, args.hw, args.channels, args.shift, seed)
        result["store"]["bytes_on_disk"] = folder_bytes(tmp / "x1.zarr")
        rows = np.arange(args.images)
        X = positions_from_store(array, rows)
        per = X.shape[0] // len(rows)
        y, groups = np.repeat(rows % 2, per).astype(np.int8), np.repeat(rows, per)
        is_val = grouped_validation_split(y, groups, fit.validation_fraction, seed)
        X_train = X[~is_val]
        result["store"]["positions"] = int(X.shape[0])
        result["store"]["train_positions"] = int((~is_val).sum())
        result["store"]["train_blocks"] = len(X_train.chunks[0])

        print("exact solution (scikit-learn, in memory) ...", flush=True)
        dense = X_train.compute().astype(np.float64)
        started = time.perf_counter()
        w_exact, b_exact = fit_logistic(dense, y[~is_val], args.C, False, 5000, seed)
        result["exact"] = {
            "seconds": round(time.perf_counter() - started, 3),
            "cos_to_bayes_direction": cosine(w_exact, u / scale**2),
            "what": "sacv.method.vectors.fit_logistic(train positions as float64, C, standardize=False, "
            "max_iter=5000); bayes direction = Sigma^-1 u",
        }
        del dense

        for solver in SOLVERS:
            print(f"{solver}: raw read ...", flush=True)
            read_s = raw_read(X_train)
            print(f"{solver}: fit ...", flush=True)
            estimator = OutOfCoreConceptVector(
                solver=solver,
                C=args.C,
                standardize=fit.standardize,
                validation_fraction=fit.validation_fraction,
                max_iter=fit.max_iter,
                random_state=seed,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NearChanceWarning)
                started = time.perf_counter()
                estimator.fit(X, y, groups)
                wall = time.perf_counter() - started
            per_pass = estimator.fit_seconds_ / estimator.passes_
            result["solvers"][solver] = {
                "raw_read_s": round(read_s, 4),
                "fit_wall_s": round(wall, 3),
                "solver_s": round(estimator.fit_seconds_, 3),
                "passes": estimator.passes_,
                "n_iter": estimator.n_iter_,
                "s_per_pass": round(per_pass, 4),
                "ratio_pass_over_read": round(per_pass / read_s, 3),
                "cos_to_exact": cosine(estimator.coef_, w_exact),
                "intercept": estimator.intercept_,
                "intercept_exact": b_exact,
                "bal_acc": estimator.metrics_["bal_acc"],
                "auroc": estimator.metrics_["auroc"],
                "near_chance": bool(estimator.near_chance_),
            }
        for solver in BLOCK_SOLVERS:
            print(f"{solver} (block): fit ...", flush=True)
            result["solvers"][f"{solver} (block)"] = block_fit(array, rows, solver, args.C, seed, w_exact, read_s)
        bal_exact = None
        try:
            from sklearn.metrics import balanced_accuracy_score

            scores = (X[is_val].astype(np.float64) @ w_exact + b_exact).compute()
            bal_exact = float(balanced_accuracy_score(y[is_val], (scores > 0).astype(int)))
        except Exception:  # informative only
            pass
        result["exact"]["bal_acc"] = bal_exact

        if not args.skip_memory:
            big = args.images * args.memory_scale
            print(f"writing the {big}-image store for (e) ...", flush=True)
            write_store(tmp / "xbig.zarr", big, args.hw, args.channels, args.shift, seed)
            memory = {
                "what": "a fresh subprocess (python -c) fits every row of the store (max_iter=15). "
                "vmhwm_fit_kb: the process's VmHWM (/proc/self/status) over the fit, reset after the "
                "imports (clear_refs), so it is the peak RSS during the fit, import baseline included "
                "(sacv.fit.per_job imports torch via sacv.method.vectors: ~0.8 GB); increment_mb = that peak "
                "minus the RSS after imports. ru_maxrss_kb is also recorded but is NOT usable here: "
                "Linux keeps ru_maxrss across exec, so the child reports at least the parent's "
                "(this benchmark's) RSS at spawn time",
                "scale": args.memory_scale,
                "float64_copy_mb": {
                    "1x": round(X.shape[0] * args.channels * 8 / 2**20, 1),
                    f"{args.memory_scale}x": round(X.shape[0] * args.memory_scale * args.channels * 8 / 2**20, 1),
                },
            }
            for solver in MEMORY_SOLVERS:
                print(f"{solver}: peak RSS at 1x and {args.memory_scale}x ...", flush=True)
                runs = {
                    "1x": peak_rss(tmp / "x1.zarr", solver, args.C),
                    f"{args.memory_scale}x": peak_rss(tmp / "xbig.zarr", solver, args.C),
                }
                peak = {k: round(r["vmhwm_fit_kb"] / 1024, 1) for k, r in runs.items()}
                memory[solver] = {
                    **runs,
                    "peak_mb": peak,
                    "increment_mb": {
                        k: round((r["vmhwm_fit_kb"] - r["vmhwm_before_fit_kb"]) / 1024, 1) for k, r in runs.items()
                    },
                    "growth": round(peak[f"{args.memory_scale}x"] / peak["1x"], 3),
                }
            result["memory"] = memory

    result["command"] = "python benchmarks/fit_solvers.py " + " ".join(sys.argv[1:] if argv is None else argv)

    header = (
        f"{'solver':<24} {'read s':>7} {'fit s':>7} {'solver s':>8} {'passes':>6} {'iter':>5} {'s/pass':>7} "
        f"{'ratio':>6} {'cos exact':>10} {'bal_acc':>7}"
    )
    print()
    print(
        f"store: {args.images} images x {args.hw}x{args.hw} x {args.channels} ch float16, "
        f"{result['store']['train_positions']} training positions in {result['store']['train_blocks']} blocks; "
        f"exact fit {result['exact']['seconds']:.2f} s, exact bal_acc {bal_exact}"
    )
    print(header)
    for solver, r in result["solvers"].items():
        print(
            f"{solver:<24} {r['raw_read_s']:>7.3f} {r['fit_wall_s']:>7.2f} {r['solver_s']:>8.2f} {r['passes']:>6} "
            f"{r['n_iter']:>5} {r['s_per_pass']:>7.3f} {r['ratio_pass_over_read']:>6.2f} {r['cos_to_exact']:>10.6f} "
            f"{r['bal_acc']:>7.3f}"
        )
    if "memory" in result:
        m = result["memory"]
        big_key = f"{m['scale']}x"
        print(
            f"peak RSS during the fit (MB, VmHWM), fresh process, 1x vs {m['scale']}x "
            f"(a float64 copy of the data would be {m['float64_copy_mb']['1x']} vs {m['float64_copy_mb'][big_key]} MB):"
        )
        for solver in MEMORY_SOLVERS:
            r = m[solver]
            print(
                f"  {solver:<6} {r['peak_mb']['1x']:7.1f} -> {r['peak_mb'][big_key]:7.1f}  (x{r['growth']:.3f}; "
                f"above the after-import RSS: {r['increment_mb']['1x']} -> {r['increment_mb'][big_key]})"
            )
    for solver in ("lbfgs",):
        ratio = result["solvers"][solver]["ratio_pass_over_read"]
        print(
            f"goal {solver}: s/pass / raw read = {ratio:.2f} {'<=' if ratio <= RATIO_GOAL else '>'} {RATIO_GOAL}: "
            f"{'met' if ratio <= RATIO_GOAL else 'NOT met'}"
        )
    result["goal_met"] = {s: result["solvers"][s]["ratio_pass_over_read"] <= RATIO_GOAL for s in ("lbfgs",)}

    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
