"""Calibration of the contributions test end to end on EfficientNet-Lite0: placebo concepts and a planted concept.

One run of the pipeline (``flows.pipeline.run_pipeline``: extract, fit, score) with the pretrained
EfficientNet-Lite0 on generated data (``sacv.demo``), written under ``--work`` (else a temporary
folder, deleted at the end):

- ``concepts/striped``: the planted concept, ``n`` striped textures (``textures.striped``); the audit's
  zebras are horses filled with stripes, so ``striped → zebra`` must come out significant;
- ``concepts/placebo_<q>``: ``--placebos`` placebo concepts, each a fixed set of ``n`` images from the
  random pool's own generator (``textures.random_texture``, their own seeded streams), never in the
  pool. A placebo's images mean nothing the pool's do not, so each of its rows is a true null: the
  share of placebo rows with ``p_value < alpha`` estimates the test's size, and after the correction
  (Holm over the whole table, every layer and concept, as the pipeline corrects) no placebo row
  should survive;
- ``random/``: the pool, ``R·m + P·n`` images by default (``--pool``), so the random sets and the
  pseudo-concepts are disjoint (``sacv.fit.fit_plan``);
- ``audit/``: ``--scenes`` demo scenes (``sacv.demo.scenes.write_audit``: ~30 % zebras, 15 % sorrels,
  shapes) plus the four bundled photos, target = label.

The run uses the project's default test (``score.statistic`` contribution, ``score.correction`` holm)
with ``concepts.random_sets`` R, ``images_per_set`` m, ``images_per_concept`` n and ``pseudo_concepts``
P from the command line (defaults: the config's defaults). From the same run's ``image_scores`` the
script recomputes the table for every statistic (``sacv.stats.contributions.contributions(...,
statistic=...)``; the ``contribution`` one must equal the pipeline's table) and emulates the test it
replaced (as ``tests/test_calibration.py`` ``old_welch``): a two-sided Welch t-test of the concept's R
per-set values against R single vectors with distinct positive sets (pseudo-concept r against random
set r), per row for ``spatial`` and ``tcav`` (rows with fewer than ``--min-images`` images, or a NaN
spatial value on either side, untested; both sides constant: the exact permutation p-value, as the old
code did), and the old default ``both``: a row is below alpha when either p-value is, and Holm runs over
the table's spatial and tcav p-values together (a row's adjusted p is the smaller of its two).

Reported per test: placebo rows tested (classes with at least ``--min-images`` images), the share with
``p_value < alpha`` and the share significant after the correction, each with its Clopper-Pearson 95 %
interval (rows of one placebo set share its images, so they are correlated: the JSON also has a 95 %
bootstrap interval over placebo sets), the number of placebo sets with any significant row; the
planted rows per layer (``striped → zebra``: significant, z (Welch: t), p, p_adjusted; the other
classes: how many significant). Cost: vectors.parquet rows by kind, wall time of the data generation,
of every stage (the stage summaries), of the pipeline call (with Prefect's start) and of the analysis.

    python benchmarks/calibration.py --placebos 24 --out benchmarks/results/calibration.json
    python benchmarks/calibration.py --placebos 3 --random-sets 3 --images-per-set 8 --images-per-concept 8 \
        --pseudo-concepts 5 --scenes 24 --layers _blocks.3 _blocks.12 --out /tmp/calibration_smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sacv.config import ConceptsConfig, ScoreConfig, parse_config  # noqa: E402
from sacv.stats.contributions import STATISTICS, adjust, contributions, per_vector  # noqa: E402

LAYERS = ["_blocks.3", "_blocks.8", "_blocks.12", "_blocks.15"]
PLANTED, TARGET = "striped", "zebra"
PLACEBO = "placebo_"
OLD_TESTS = ("welch_spatial", "welch_tcav", "welch_both")


def _default(model, field: str):
    return model.model_fields[field].default


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--placebos", type=int, default=24, help="placebo concepts (at least 20 for the report)")
    parser.add_argument("--random-sets", type=int, default=_default(ConceptsConfig, "random_sets"), help="R")
    parser.add_argument("--images-per-set", type=int, default=_default(ConceptsConfig, "images_per_set"), help="m")
    parser.add_argument(
        "--images-per-concept", type=int, default=_default(ConceptsConfig, "images_per_concept"), help="n"
    )
    parser.add_argument("--pseudo-concepts", type=int, default=_default(ConceptsConfig, "pseudo_concepts"), help="P")
    parser.add_argument("--pool", type=int, default=None, help="random pool size (default R·m + P·n: disjoint sets)")
    parser.add_argument("--scenes", type=int, default=100, help="audit scenes (plus the four bundled photos)")
    parser.add_argument("--layers", nargs="+", default=LAYERS, help="layers")
    parser.add_argument("--alpha", type=float, default=_default(ScoreConfig, "alpha"), help="score.alpha")
    parser.add_argument("--correction", default=_default(ScoreConfig, "correction"), help="score.correction")
    parser.add_argument("--min-images", type=int, default=_default(ScoreConfig, "min_images"), help="score.min_images")
    parser.add_argument("--device", default="auto", help="execution.device")
    parser.add_argument("--seed", type=int, default=0, help="data generation seed (fit.seed stays 0)")
    parser.add_argument("--boot", type=int, default=2000, help="bootstrap resamples over placebo sets")
    parser.add_argument("--work", default=None, help="write data and run directory here and keep them")
    parser.add_argument("--out", default="benchmarks/results/calibration.json", help="JSON result path")
    args = parser.parse_args(argv)
    if args.pool is None:
        args.pool = args.random_sets * args.images_per_set + args.pseudo_concepts * args.images_per_concept
    if args.pseudo_concepts < args.random_sets:
        parser.error("the emulated Welch test needs --pseudo-concepts >= --random-sets (one single vector per set)")
    return args


def write_data(root: Path, args: argparse.Namespace) -> None:
    """concepts/{striped,placebo_*}, random/, audit/ (module docstring); independent seeded streams."""
    from sacv.demo import textures
    from sacv.demo.scenes import CONCEPT_SIZE, _save, write_audit

    def rng(*keys: int) -> np.random.Generator:
        return np.random.default_rng([args.seed, 90, *keys])  # 90: apart from the demo's own streams

    n = args.images_per_concept
    stream = rng(1)
    for i in range(n):
        _save(textures.striped(CONCEPT_SIZE, stream), root / "concepts" / PLANTED / f"{PLANTED}_{i:03d}.png")
    for q in range(args.placebos):
        stream = rng(2, q)
        for i in range(n):
            name = f"{PLACEBO}{q:02d}"
            _save(textures.random_texture(CONCEPT_SIZE, stream), root / "concepts" / name / f"{name}_{i:03d}.png")
    stream = rng(3)
    for i in range(args.pool):
        _save(textures.random_texture(CONCEPT_SIZE, stream), root / "random" / f"random_{i:04d}.png")
    write_audit(root / "audit", args.scenes, args.seed)


def run_config(work: Path, args: argparse.Namespace):
    data = work / "data"
    return parse_config(
        {
            "run_dir": str(work / "run"),
            "model": {"spec": "efficientnet_lite0"},
            "layers": args.layers,
            "concepts": {
                "root": str(data / "concepts"),
                "random_pool": str(data / "random"),
                "random_sets": args.random_sets,
                "images_per_set": args.images_per_set,
                "images_per_concept": args.images_per_concept,
                "pseudo_concepts": args.pseudo_concepts,
            },
            "dataset": {"manifest": str(data / "audit" / "manifest.csv"), "target": "label"},
            "score": {"alpha": args.alpha, "correction": args.correction, "min_images": args.min_images},
            "execution": {"device": args.device},
        }
    )


# --- the replaced test ---------------------------------------------------------------------------


def constant_sides_p(concept: np.ndarray, null: np.ndarray) -> float:
    """The old code's exact two-sided permutation p-value when each side is constant."""
    n, m = len(concept), len(null)
    if concept[0] == null[0]:
        return 1.0
    k = np.arange(max(0, n - m), n + 1)
    extreme = np.abs(k / n - (n - k) / m) >= 1 - 1e-12
    return float(stats.hypergeom.pmf(k[extreme], n + m, n, n).sum())


def welch(concept: np.ndarray, null: np.ndarray) -> tuple[float, float]:
    """(p, t) of the old row test; NaN when a value is missing."""
    if np.isnan(concept).any() or np.isnan(null).any():
        return np.nan, np.nan
    if concept.var(ddof=1) + null.var(ddof=1) == 0:
        return constant_sides_p(concept, null), np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(concept, null, equal_var=False)
    return float(result.pvalue), float(result.statistic)


def old_tables(scores: pd.DataFrame, class_names: list[str], alpha: float, min_images: int) -> dict[str, pd.DataFrame]:
    """The replaced test on this run's vectors (module docstring): one table per entry of OLD_TESTS."""
    per_set = per_vector(scores)
    pseudo = per_set[per_set["kind"] == "pseudo"]
    index = pseudo["concept"].str.removeprefix("pseudo_").astype(int)
    single = pseudo[index == pseudo["random_set"].str.removeprefix("random_").astype(int)]
    rows = []
    for (layer, target, concept), own in per_set[per_set["kind"] == "concept"].groupby(["layer", "target", "concept"]):
        null = single[(single["layer"] == layer) & (single["target"] == target)]
        row = {"layer": layer, "concept": concept, "class_name": class_names[int(target)]}
        for statistic in ("spatial", "tcav"):
            p, t = np.nan, np.nan
            if own["n_images"].max() >= min_images:
                p, t = welch(own[statistic].to_numpy(float), null[statistic].to_numpy(float))
            row |= {f"p_{statistic}": p, f"t_{statistic}": t}
        rows.append(row)
    table = pd.DataFrame(rows)
    out = {}
    for statistic in ("spatial", "tcav"):
        p = table[f"p_{statistic}"].to_numpy(float)
        out[f"welch_{statistic}"] = table.assign(p_value=p, p_adjusted=adjust(p, "holm"), z=table[f"t_{statistic}"])
    both = adjust(np.concatenate([table["p_spatial"], table["p_tcav"]]), "holm").reshape(2, -1)
    p = np.fmin(table["p_spatial"].to_numpy(float), table["p_tcav"].to_numpy(float))
    out["welch_both"] = table.assign(p_value=p, p_adjusted=np.fmin(*both), z=np.nan)
    for name, frame in out.items():
        out[name] = frame.assign(significant=(frame["p_adjusted"] < alpha).to_numpy(), direction=None)
    return out


# --- summaries -----------------------------------------------------------------------------------


def clopper_pearson(k: int, n: int) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    interval = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
    return [float(interval.low), float(interval.high)]


def set_bootstrap(flags: pd.Series, sets: pd.Series, boot: int, rng: np.random.Generator) -> list[float]:
    """95 % interval of the share of ``flags`` from resampling placebo sets (rows of a set together)."""
    per = flags.groupby(sets.to_numpy()).agg(["sum", "size"])
    if per.empty:
        return [float("nan"), float("nan")]
    draws = rng.integers(0, len(per), size=(boot, len(per)))
    shares = per["sum"].to_numpy()[draws].sum(1) / per["size"].to_numpy()[draws].sum(1)
    return [float(np.quantile(shares, 0.025)), float(np.quantile(shares, 0.975))]


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(f"{float(value):.6g}")


def summarize(table: pd.DataFrame, layers: list[str], alpha: float, boot: int, rng: np.random.Generator) -> dict:
    """Placebo shares and power on the planted concept for one test's table (columns: layer, concept,
    class_name, p_value, p_adjusted, significant, z, direction)."""
    table = table.assign(layer=pd.Categorical(table["layer"], categories=layers, ordered=True))
    tested = table[table["p_value"].notna()]
    placebo = tested[tested["concept"].str.startswith(PLACEBO)]
    n = len(placebo)
    below, significant = placebo["p_value"] < alpha, placebo["significant"].astype(bool)
    planted = {}
    for layer, rows in table[table["concept"] == PLANTED].groupby("layer", observed=True):
        target = rows[rows["class_name"] == TARGET]
        others = rows[(rows["class_name"] != TARGET) & rows["p_value"].notna()]
        row = target.iloc[0] if len(target) else None
        planted[layer] = {
            "target_significant": bool(row["significant"]) if row is not None else None,
            "target_z": _number(row["z"]) if row is not None else None,
            "target_p_value": _number(row["p_value"]) if row is not None else None,
            "target_p_adjusted": _number(row["p_adjusted"]) if row is not None else None,
            "target_direction": row["direction"] if row is not None else None,
            "other_rows_tested": len(others),
            "other_rows_significant": int(others["significant"].sum()),
            "other_rows_p_below_alpha": int((others["p_value"] < alpha).sum()),
            "other_rows": {
                r["class_name"]: {"significant": bool(r["significant"]), "z": _number(r["z"]), "p": _number(r.p_value)}
                for _, r in others.iterrows()
            },
        }
    per_layer = {
        layer: {"rows": len(rows), "p_below_alpha": int((rows["p_value"] < alpha).sum())}
        for layer, rows in placebo.groupby("layer", observed=True)
    }
    return {
        "table_rows_tested": len(tested),
        "placebo_rows": n,
        "placebo_p_below_alpha": int(below.sum()),
        "placebo_share_p_below_alpha": below.sum() / n if n else None,
        "placebo_share_p_below_alpha_ci": clopper_pearson(int(below.sum()), n),
        "placebo_share_p_below_alpha_ci_set_bootstrap": set_bootstrap(below, placebo["concept"], boot, rng),
        "placebo_significant": int(significant.sum()),
        "placebo_share_significant": significant.sum() / n if n else None,
        "placebo_share_significant_ci": clopper_pearson(int(significant.sum()), n),
        "placebo_sets": int(placebo["concept"].nunique()),
        "placebo_sets_any_significant": int(placebo.loc[significant, "concept"].nunique()),
        "placebo_per_layer": per_layer,
        "planted": planted,
    }


def git(*command: str) -> str:
    try:
        return subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table_rows(result: dict) -> list[tuple[str, str]]:
    sizes, cost = result["sizes"], result["cost"]
    rows = [
        ("commit / date / machine", f"{result['commit']} / {result['date']} / {result['machine']}"),
        (
            "sizes",
            f"placebos {sizes['placebos']}, R {sizes['R']}, m {sizes['m']}, n {sizes['n']}, P {sizes['P']}, "
            f"pool {sizes['pool']}, scenes {sizes['scenes']}, layers {' '.join(sizes['layers'])}",
        ),
        ("test", f"alpha {result['alpha']}, correction {result['correction']}, min_images {result['min_images']}"),
    ]
    for name, summary in result["tests"].items():
        n = summary["placebo_rows"]
        low, high = summary["placebo_share_p_below_alpha_ci"]
        rows.append(
            (
                f"{name}: placebo p<alpha",
                f"{summary['placebo_p_below_alpha']}/{n} = {summary['placebo_share_p_below_alpha']:.3f} "
                f"[{low:.3f}, {high:.3f}]",
            )
        )
        low, high = summary["placebo_share_significant_ci"]
        rows.append(
            (
                f"{name}: placebo significant",
                f"{summary['placebo_significant']}/{n} = {summary['placebo_share_significant']:.3f} "
                f"[{low:.3f}, {high:.3f}]; sets with any: {summary['placebo_sets_any_significant']}"
                f"/{summary['placebo_sets']}",
            )
        )
        power, letter = [], "t" if name in OLD_TESTS else "z"  # the Welch tests: their t statistic
        for layer, planted in summary["planted"].items():
            z = planted["target_z"]
            mark = "sig" if planted["target_significant"] else "n.s."
            value = "" if z is None else f" {letter}={z:.1f}"
            value += "" if planted["target_p_value"] is None else f" p={planted['target_p_value']:.2g}"
            power.append(f"{layer.removeprefix('_blocks.')}: {mark}{value}")
        rows.append((f"{name}: {PLANTED}→{TARGET} (block)", "; ".join(power)))
        others = [
            f"{layer.removeprefix('_blocks.')}: {p['other_rows_significant']}/{p['other_rows_tested']}"
            for layer, p in summary["planted"].items()
        ]
        rows.append((f"{name}: {PLANTED}→other classes significant", "; ".join(others)))
    fits = cost["fits"]
    stages = {"data / extract / fit / score": ("data", "extract", "fit", "score")}
    stages["pipeline call / analysis / total"] = ("pipeline", "analysis", "total")
    rows.append(("fits (vectors.parquet)", f"{fits['total']} (concept {fits['concept']}, pseudo {fits['pseudo']})"))
    rows += [(f"wall s: {label}", " / ".join(str(cost["seconds"][k]) for k in keys)) for label, keys in stages.items()]
    return rows


def main(argv=None) -> dict:
    args = parse_args(argv)
    from flows.process import configure_process

    configure_process()  # Prefect embedded-mode defaults and malloc setting, before any thread
    from flows.pipeline import run_pipeline
    from sacv.io.rundir import RunDir
    from sacv.io.zarr_store import class_names_of

    started, load = time.perf_counter(), os.getloadavg()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="sacv-calibration-"))
    seconds = {}
    try:
        t0 = time.perf_counter()
        write_data(work / "data", args)
        seconds["data"] = round(time.perf_counter() - t0, 1)
        print(f"calibration: data in {seconds['data']} s under {work}", flush=True)

        config = run_config(work, args)
        t0 = time.perf_counter()
        summary = run_pipeline(config)
        seconds["pipeline"] = round(time.perf_counter() - t0, 1)
        for stage in ("extract", "fit", "score"):
            seconds[stage] = round(getattr(summary, stage).seconds, 1)
        print(f"calibration: pipeline in {seconds['pipeline']} s", flush=True)

        t0 = time.perf_counter()
        run = RunDir(config.run_dir)
        pipeline_table, scores = run.read_table("contributions"), run.read_table("image_scores")
        vectors = run.read_table("vectors")
        class_names = class_names_of(run.store_uri, run.storage_options)
        rng = np.random.default_rng(0)
        tests, tables = {}, {}
        for statistic in STATISTICS:
            tables[statistic] = contributions(
                scores, class_names, args.alpha, args.correction, args.min_images, statistic=statistic
            )
        tables |= old_tables(scores, class_names, args.alpha, args.min_images)
        for name, table in tables.items():
            tests[name] = summarize(table, args.layers, args.alpha, args.boot, rng)
        default = tables[ScoreConfig().statistic]
        columns = ["layer", "concept", "class_name", "p_value", "p_adjusted", "significant"]
        merged = pipeline_table[columns].merge(default[columns], on=columns[:3], suffixes=("", "_recomputed"))
        same = len(merged) == len(pipeline_table) == len(default) and np.allclose(
            merged["p_value"], merged["p_value_recomputed"], equal_nan=True, rtol=1e-9, atol=0
        )
        seconds["analysis"] = round(time.perf_counter() - t0, 1)
        seconds["total"] = round(time.perf_counter() - started, 1)
        kinds = vectors["kind"].value_counts()
        result = {
            "command": "python benchmarks/calibration.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted_code": git("status", "--porcelain", "--", "sacv", "flows", "tasks").splitlines(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "processor": platform.processor() or platform.machine(),
            "load_average_at_start": [round(x, 2) for x in load],
            "python": platform.python_version(),
            "device": args.device,
            "model": "efficientnet_lite0",
            "sizes": {
                "placebos": args.placebos,
                "R": args.random_sets,
                "m": args.images_per_set,
                "n": args.images_per_concept,
                "P": args.pseudo_concepts,
                "pool": args.pool,
                "scenes": args.scenes,
                "audit_images": len(pd.read_csv(work / "data" / "audit" / "manifest.csv")),
                "classes_tested": int(default.loc[default["p_value"].notna(), "class_name"].nunique()),
                "layers": args.layers,
                "seed": args.seed,
            },
            "alpha": args.alpha,
            "correction": args.correction,
            "min_images": args.min_images,
            "default_statistic": ScoreConfig().statistic,
            "pipeline_table_equals_recomputed_default": bool(same),
            "pipeline_significant": int(pipeline_table["significant"].sum()),
            "pipeline_rows": len(pipeline_table),
            "tests": tests,
            "cost": {
                "fits": {
                    "total": len(vectors),
                    "concept": int(kinds.get("concept", 0)),
                    "pseudo": int(kinds.get("pseudo", 0)),
                    "per_layer": len(vectors) // len(args.layers),
                },
                "fitted_by_this_run": summary.fit.fitted,
                "images": summary.extract.images,
                "rejects": summary.extract.rejects,
                "seconds": seconds,
            },
        }
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_table(table_rows(result))
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
