"""Power and false-positive rate of the contributions test, by simulation of per-set scores.

A simulated audit table has ``layers x classes`` groups (one set of R null vectors each, shared by
the group's concepts) and ``concepts`` rows per group. One concept of one class is planted at every
layer (its TCAV score is ``0.59 + effect``, its spatial score moves by the same number of null
standard deviations); every other row is a placebo (same mean as the null, a concept's spread). Each
vector gets a (spatial, TCAV) pair with logit-normal marginals and a Gaussian copula, with the
spreads and correlations measured on a real run (``--from-run``; the defaults are the deepest layer
of the full demo, efficientnet_lite0, 10 random sets). Per row: Welch t-tests of the concept's R
per-set values against the group's R null values, then ``sacv.stats.contributions.table_adjust`` over the
table with the statistic ``spatial``, ``tcav`` or ``both`` (correction over both p-values of every
row). Power: share of planted rows significant; placebo rate: share of placebo rows significant.

    python benchmarks/power.py --out benchmarks/results/power.json
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)
from scipy import special, stats
from scipy.optimize import least_squares

from sacv.stats.contributions import STATISTICS, table_adjust

NULL_TCAV = 0.59  # the audit's null TCAV score; planted rows add ``effect``
AUDIT_EFFECT = 0.28  # the audit's concept: TCAV 0.87 against 0.59
# Measured on the full demo (`sacv demo`, concepts striped/dotted/chequered, random_sets 10), layer
# _blocks.12, classes with >= 7 images: medians over classes of the per-set standard deviations.
MEASURED = {
    "null_sd": (0.154, 0.265),
    "concept_sd": (0.076, 0.118),
    "null_corr": 0.88,
    "concept_corr": 0.61,
    "null_mean": (0.49, NULL_TCAV),
}
_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(40)


def _moments(mu: float, sigma: float) -> tuple[float, float]:
    values = special.expit(mu + sigma * _NODES)
    weights = _WEIGHTS / _WEIGHTS.sum()
    mean = float(values @ weights)
    return mean, float(np.sqrt(((values - mean) ** 2) @ weights))


def logit_normal(mean: float, sd: float) -> tuple[float, float]:
    """(mu, sigma) of expit(N(mu, sigma^2)) with this mean and standard deviation."""
    start = (special.logit(mean), sd / (mean * (1 - mean)))
    fit = least_squares(lambda p: np.subtract(_moments(p[0], abs(p[1])), (mean, sd)), start)
    return float(fit.x[0]), abs(float(fit.x[1]))


def draw(rng, shape: tuple, means: tuple, sds: tuple, corr: float) -> np.ndarray:
    """shape + (2,) per-set (spatial, tcav) values in (0, 1)."""
    z = rng.standard_normal((*shape, 2))
    z[..., 1] = corr * z[..., 0] + np.sqrt(1 - corr**2) * z[..., 1]
    params = [logit_normal(m, s) for m, s in zip(means, sds)]
    return np.stack([special.expit(mu + sigma * z[..., i]) for i, (mu, sigma) in enumerate(params)], axis=-1)


def welch(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Two-sided Welch t-test along the last axis (as scipy.stats.ttest_ind(equal_var=False))."""
    vx, vy = x.var(axis=-1, ddof=1) / x.shape[-1], y.var(axis=-1, ddof=1) / y.shape[-1]
    t = (x.mean(axis=-1) - y.mean(axis=-1)) / np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx**2 / (x.shape[-1] - 1) + vy**2 / (y.shape[-1] - 1))
    return 2 * stats.t.sf(np.abs(t), df)


def simulate(
    rng,
    r: int,
    effect: float,
    table: tuple[int, int, int],
    reps: int,
    spread: dict,
    r_null: int | None = None,
    carrier: str = "both",
) -> dict:
    """Significant shares of planted and placebo rows for every (statistic, correction).

    ``carrier``: ``both`` moves the planted concept's spatial and TCAV scores, ``spatial`` only the
    spatial score. ``r_null``: null vectors per group (default ``r``)."""
    layers, classes, concepts = table
    null = draw(
        rng, (reps, layers, classes, 1, r_null or r), spread["null_mean"], spread["null_sd"], spread["null_corr"]
    )
    concept = draw(
        rng, (reps, layers, classes, concepts, r), spread["null_mean"], spread["concept_sd"], spread["concept_corr"]
    )
    shift = effect / spread["null_sd"][1]  # null standard deviations
    means = (
        spread["null_mean"][0] + shift * spread["null_sd"][0],
        spread["null_mean"][1] + (effect if carrier == "both" else 0.0),
    )
    concept[:, :, 0, 0] = draw(rng, (reps, layers, r), means, spread["concept_sd"], spread["concept_corr"])
    p = np.stack([welch(concept[..., i], null[..., i]) for i in range(2)]).reshape(2, reps, -1)
    planted = np.zeros((layers, classes, concepts), dtype=bool)
    planted[:, 0, 0] = True
    planted = planted.reshape(-1)
    out = {}
    for statistic in STATISTICS:
        for correction in ("holm", "bh"):
            significant = np.array(
                [table_adjust(p[0, k], p[1, k], statistic, correction)[0] < 0.05 for k in range(reps)]
            )
            out[statistic, correction] = (float(significant[:, planted].mean()), float(significant[:, ~planted].mean()))
    return out


def estimate_spread(run_dir: str, layer: str, min_images: int) -> dict:
    """Per-set spreads and correlations of one layer of a run (classes with >= min_images images)."""
    import pandas as pd

    from sacv.stats.contributions import per_vector

    table = per_vector(pd.read_parquet(f"{run_dir}/tables/image_scores.parquet"))
    table = table[(table["layer"] == layer) & (table["n_images"] >= min_images)]
    out = {}
    for kind, keys in (("null", ["target"]), ("concept", ["target", "concept"])):
        part = table[table["kind"] == kind]
        centred = part.groupby(keys)[["spatial", "tcav"]].transform(lambda x: x - x.mean())
        sd = part.groupby(keys)[["spatial", "tcav"]].std().median()
        out[f"{kind}_sd"] = (round(float(sd["spatial"]), 3), round(float(sd["tcav"]), 3))
        out[f"{kind}_corr"] = round(float(centred.corr().iloc[0, 1]), 2)
    out["null_mean"] = (round(float(table.loc[table["kind"] == "null", "spatial"].mean()), 3), NULL_TCAV)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-sets", type=int, nargs="+", default=[3, 5, 10, 15, 20, 25, 30], help="R values")
    parser.add_argument(
        "--effects", type=float, nargs="+", default=[0.14, 0.21, 0.28, 0.35], help="planted TCAV-score differences"
    )
    parser.add_argument("--tables", nargs="+", default=["4x1x3", "4x5x3", "4x10x5"], help="layers x classes x concepts")
    parser.add_argument("--reps", type=int, default=300, help="simulated tables per cell")
    parser.add_argument("--from-run", help="estimate spreads from this run directory's image_scores")
    parser.add_argument("--layer", help="layer of --from-run")
    parser.add_argument("--min-images", type=int, default=7, help="classes of --from-run with fewer images are ignored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/power.json", help="JSON result path")
    return parser.parse_args(argv)


def _cell(result: dict, **keys) -> list[dict]:
    return [
        {**keys, "statistic": s, "correction": c, "power": pw, "placebo_rate": fp}
        for (s, c), (pw, fp) in result.items()
    ]


def _line(cells: list[dict]) -> str:
    return "  ".join(f"{c['random_sets']:>2}: {c['power']:.2f}/{c['placebo_rate']:.3f}" for c in cells)


def main(argv=None) -> dict:
    args = parse_args(argv)
    spread = estimate_spread(args.from_run, args.layer, args.min_images) if args.from_run else MEASURED
    rng = np.random.default_rng(args.seed)
    started, grid, spatial_only, null_count = time.perf_counter(), [], [], []
    shapes = {shape: tuple(int(v) for v in shape.split("x")) for shape in args.tables}
    for shape, table in shapes.items():
        rows = table[0] * table[1] * table[2]
        for r in args.random_sets:
            for effect in args.effects:
                grid += _cell(
                    simulate(rng, r, effect, table, args.reps, spread),
                    table=shape,
                    rows=rows,
                    random_sets=r,
                    effect=effect,
                )
    audit, largest = AUDIT_EFFECT, max(shapes, key=lambda k: np.prod(shapes[k]))
    for r in args.random_sets:  # the effect in the spatial score alone
        spatial_only += _cell(
            simulate(rng, r, audit, shapes[largest], args.reps, spread, carrier="spatial"),
            table=largest,
            random_sets=r,
            effect=audit,
        )
    for r, r_null in [(10, 20), (10, 30), (10, 45), (15, 30), (20, 40)]:  # fewer concept sets than null vectors
        null_count += _cell(
            simulate(rng, r, audit, shapes[largest], args.reps, spread, r_null=r_null),
            table=largest,
            random_sets=r,
            null_vectors=r_null,
            effect=audit,
        )
    print(f"power / placebo rate at alpha 0.05 for R = {args.random_sets} (null TCAV {NULL_TCAV} + planted effect)")
    print_table(
        [
            (
                f"{shape} {s:<7} {c:<4} +{e:.2f}",
                _line(
                    [g for g in grid if (g["table"], g["statistic"], g["correction"], g["effect"]) == (shape, s, c, e)]
                ),
            )
            for shape in shapes
            for s in STATISTICS
            for c in ("holm", "bh")
            for e in args.effects
        ]
    )
    print(f"\neffect +{audit} in the spatial score only, table {largest}")
    print_table(
        [
            (f"{s:<7} {c:<4}", _line([g for g in spatial_only if (g["statistic"], g["correction"]) == (s, c)]))
            for s in STATISTICS
            for c in ("holm", "bh")
        ]
    )
    print(f"\nconcept sets R vs null vectors, effect +{audit}, table {largest}, statistic both, holm")
    print_table(
        [
            (f"R={g['random_sets']} null={g['null_vectors']}", f"{g['power']:.2f}/{g['placebo_rate']:.3f}")
            for g in null_count
            if (g["statistic"], g["correction"]) == ("both", "holm")
        ]
    )
    result = {
        "spread": spread,
        "null_tcav": NULL_TCAV,
        "alpha": 0.05,
        "reps": args.reps,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "grid": grid,
        "spatial_only": spatial_only,
        "null_count": null_count,
    }
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
