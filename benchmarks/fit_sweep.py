"""The fit stage of a concept sweep, fresh, before and after fit blocks: process wall, flow wall, peak RSS.

One collection of generated textures (``sacv.demo.textures``): ``--concepts`` concept folders of
``--per-concept`` images and a random pool of ``--pool`` random textures. Concept ``k`` is generator
``textures.CONCEPTS[k % 8]`` in variant ``k // 8`` of ``VARIANT_NAMES`` (as generated; fine: drawn at
twice the size and halved; coarse: drawn at half the size and doubled; warm / cool: a fixed colour
tint; inverted; blurred), so up to 56 distinct concepts (e.g. ``striped``, ``striped_fine``,
``striped_warm``); ``concepts.random_sets`` = ``--sets`` sets
of ``--per-set`` images; no dataset section (extract + fit only). It extracts once with this
checkout's code, then for each measured variant deletes every fit output (``fits/``,
``store.zarr/vectors``, ``tables/vectors.parquet``) and runs ``sacv fit CONFIG`` in a fresh process
(cwd = the code under test: ``--before`` is a checkout of the code before fit blocks, e.g.
``git archive <commit> | tar -x -C DIR``). Measured per variant: the process's wall time, the fit
flow's own wall (``run.json`` ``timings.fit.seconds``) and its ratio to the extraction flow's wall
(the extraction of the guidance images; the sweep goal is a fit below twice it), its peak RSS
(``os.wait4`` rusage of that
child), the number of vectors, the cosine of every vector to the same row of the first variant, the
median held-out balanced accuracy of the concept vectors and, for mean_difference, the median cosine
to the exact logistic vector of the same job (``cosine_to_logistic`` in vectors.parquet). Solver
``mean_difference_whiten`` is mean_difference with ``fit.whiten: true``, ``mean_difference_alone`` with
``fit.compare_logistic: false``. ``--exact-check N``: for the first N concept jobs of the first layer,
the cosine of each variant's vector to a tightly converged scikit-learn fit of the same training
positions (``LogisticRegression(class_weight="balanced", tol=1e-10, max_iter=20000)``, split as the
fit stage draws it).

    python benchmarks/fit_sweep.py --before /tmp/sacv-before --out benchmarks/results/fit_sweep_cpu.json
    python benchmarks/fit_sweep.py --concepts 50 --per-concept 20 --pool 200 --per-set 20 \
        --layers _blocks.4 _blocks.8 _blocks.11 _blocks.14 --solvers auto mean_difference_alone \
        --out benchmarks/results/fit_sweep_50x4_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
CLI = "from sacv.cli import main; main()"
VARIANT_NAMES = ("", "fine", "coarse", "warm", "cool", "inverted", "blurred")
VARIANTS = {
    "mean_difference_whiten": {"solver": "mean_difference", "whiten": True},
    "mean_difference_alone": {"solver": "mean_difference", "compare_logistic": False},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="efficientnet_lite0", help="model spec")
    parser.add_argument("--layers", nargs="+", default=["_blocks.8", "_blocks.14"], help="layers")
    parser.add_argument("--concepts", type=int, default=1, help="concept folders")
    parser.add_argument("--per-concept", type=int, default=50, help="images per concept folder")
    parser.add_argument("--pool", type=int, default=250, help="images of the random pool")
    parser.add_argument("--sets", type=int, default=10, help="random sets R")
    parser.add_argument("--per-set", type=int, default=50, help="images per random set")
    parser.add_argument("--size", type=int, default=128, help="generated image size in pixels")
    parser.add_argument("--before", default=None, help="a checkout of the code before fit blocks (optional)")
    parser.add_argument("--before-label", default="before (per-vector tasks, auto)", help="its label in the table")
    parser.add_argument(
        "--solvers", nargs="+", default=["auto", "mean_difference"], help="solvers measured on this code"
    )
    parser.add_argument("--exact-check", type=int, default=2, help="concept jobs checked against a tight fit")
    parser.add_argument("--keep", default=None, help="keep the collection and run directory here")
    parser.add_argument("--out", default="benchmarks/results/fit_sweep.json", help="JSON result path")
    return parser.parse_args(argv)


def concept_image(name: str, variant: str, size: int, rng):
    """One image of concept ``name`` in ``variant`` (see the module docstring): (size, size, 3) uint8."""
    import numpy as np
    from PIL import Image, ImageFilter

    from sacv.demo import textures

    drawn = {"fine": 2 * size, "coarse": size // 2}.get(variant, size)
    image = Image.fromarray(textures.GENERATORS[name](drawn, rng)).resize((size, size), Image.BILINEAR)
    if variant == "blurred":
        image = image.filter(ImageFilter.GaussianBlur(2.5))
    pixels = np.asarray(image).astype(np.float64)
    if variant in ("warm", "cool"):
        pixels = pixels * (np.array([1.0, 0.75, 0.45]) if variant == "warm" else np.array([0.45, 0.75, 1.0]))
    if variant == "inverted":
        pixels = 255 - pixels
    return pixels.clip(0, 255).astype(np.uint8)


def write_collection(root: Path, args) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from sacv.demo import textures

    n = len(textures.CONCEPTS)
    if args.concepts > n * len(VARIANT_NAMES):
        raise SystemExit(f"at most {n * len(VARIANT_NAMES)} distinct concepts")
    for k in range(args.concepts):
        name, variant = textures.CONCEPTS[k % n], VARIANT_NAMES[k // n]
        folder = root / "concepts" / (f"{name}_{variant}" if variant else name)
        folder.mkdir(parents=True)
        rng = np.random.default_rng([1, k])
        for i in range(args.per_concept):
            Image.fromarray(concept_image(name, variant, args.size, rng)).save(folder / f"{i:04d}.png")
    pool = root / "pool"
    pool.mkdir()
    rng = np.random.default_rng(2)
    for i in range(args.pool):
        Image.fromarray(textures.random_texture(args.size, rng)).save(pool / f"{i:04d}.png")


def run_cli(command: list[str], cwd: Path) -> dict:
    """Run the CLI in a fresh process; its wall time and peak RSS (its own rusage)."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", CLI, *command],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(cwd)},
    )
    output = process.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{command} in {cwd} failed:\n{output[-3000:]}")
    return {
        "process_wall_s": round(wall, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "output_tail": output[-400:],
    }


def clear_fit(run: Path) -> None:
    for path in (run / "fits", run / "store.zarr" / "vectors", run / "tables" / "vectors.parquet"):
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def coefs(run: Path, layers: list[str]) -> list:
    """Per layer, the (K, C) raw normals."""
    import zarr

    group = zarr.open_group(str(run / "store.zarr"), mode="r")
    return [group[f"vectors/{layer}/coef"][...] for layer in layers]


def exact_check(run: Path, layer: str, n: int, kept: dict) -> dict:
    """Cosine of every variant's vector to a tightly converged scikit-learn fit, first n concept jobs of ``layer``."""
    import numpy as np
    import zarr
    from sklearn.linear_model import LogisticRegression

    sys.path.insert(0, str(REPO))
    from sacv.extract.catalog import ImageCatalog
    from sacv.io.rundir import RunDir
    from sacv.method.vectors import grouped_validation_split

    rundir = RunDir(str(run))
    jobs = [j for j in rundir.read_fit_plan() if j["layer"] == layer]
    array = zarr.open_group(rundir.store_uri, mode="r")[f"guidance/{layer}/act"]
    catalog = ImageCatalog.read(rundir)
    out = {label: [] for label in kept}
    for index, job in [(i, j) for i, j in enumerate(jobs) if j["kind"] == "concept"][:n]:
        label_of = dict.fromkeys(catalog.row_of(job["pos"]).tolist(), 1) | dict.fromkeys(
            catalog.row_of(job["neg"]).tolist(), 0
        )
        rows = np.array(sorted(label_of))
        X = array.oindex[rows].astype(np.float64)  # (n, H, W, C)
        per = X.shape[1] * X.shape[2]
        X = X.reshape(-1, X.shape[-1])
        y, groups = np.repeat([label_of[r] for r in rows], per), np.repeat(rows, per)
        train = ~grouped_validation_split(y, groups, 0.25, 0)
        w = LogisticRegression(class_weight="balanced", tol=1e-10, max_iter=20000).fit(X[train], y[train]).coef_[0]
        for label, c in kept.items():
            v = c[0][index]
            out[label].append(round(float(v @ w / (np.linalg.norm(v) * np.linalg.norm(w))), 6))
    return {
        "layer": layer,
        "what": "cosine to LogisticRegression(class_weight=balanced, tol=1e-10, max_iter=20000)",
        "cosines": out,
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import numpy as np
    import pandas as pd
    import yaml

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sacv-fitsweep-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
        "variants": {},
    }
    try:
        if not (work / "concepts").exists():
            print("writing the collection ...", flush=True)
            write_collection(work, args)
        config = {
            "run_dir": str(work / "run"),
            "model": {"spec": args.model},
            "layers": args.layers,
            "concepts": {
                "root": str(work / "concepts"),
                "random_pool": str(work / "pool"),
                "random_sets": args.sets,
                "images_per_set": args.per_set,
            },
        }
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        shutil.rmtree(work / "run", ignore_errors=True)  # a kept run would make the extraction incremental
        print("extracting ...", flush=True)
        extract = run_cli(["extract", str(work / "config.yaml")], REPO)
        record = json.loads((work / "run" / "run.json").read_text())
        result["extract"] = {
            **extract,
            "flow_s": record["timings"]["extract"]["seconds"],
            "images": record["timings"]["extract"]["images"],
        }
        variants = []
        if args.before:
            variants.append((args.before_label, Path(args.before), "auto"))
        variants += [(f"after ({solver})", REPO, solver) for solver in args.solvers]
        reference = None
        kept: dict = {}
        for label, code, solver in variants:
            print(f"fit: {label} ...", flush=True)
            clear_fit(work / "run")
            fit = VARIANTS.get(solver, {"solver": solver})
            (work / f"config_{solver}.yaml").write_text(yaml.safe_dump({**config, "fit": fit}))
            measured = run_cli(["fit", str(work / f"config_{solver}.yaml")], code)
            record = json.loads((work / "run" / "run.json").read_text())
            c = coefs(work / "run", args.layers)
            kept[label] = c
            reference = c if reference is None else reference
            cos = np.concatenate(
                [(a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)) for a, b in zip(c, reference)]
            )
            table = pd.read_parquet(work / "run" / "tables" / "vectors.parquet")
            concept = table[table["kind"] == "concept"]
            quality = {
                "concept_bal_acc_median": round(float(concept["bal_acc"].median()), 4),
                "pseudo_bal_acc_median": round(float(table.loc[table["kind"] == "pseudo", "bal_acc"].median()), 4),
            }
            if "cosine_to_logistic" in table and table["cosine_to_logistic"].notna().any():
                quality |= {
                    "concept_cosine_to_logistic_median": round(float(concept["cosine_to_logistic"].median()), 4),
                    "concept_cosine_to_logistic_min": round(float(concept["cosine_to_logistic"].min()), 4),
                    "concept_bal_acc_logistic_median": round(float(concept["bal_acc_logistic"].median()), 4),
                }
            results = [json.loads(p.read_text()) for p in (work / "run" / "fits").glob("*/*.json")]
            flow_s = record["timings"]["fit"]["seconds"]
            result["variants"][label] = {
                **measured,
                "load_avg_1min_after": round(os.getloadavg()[0], 2),
                **quality,
                "flow_s": flow_s,
                "fit_over_extract": round(flow_s / result["extract"]["flow_s"], 3),
                "vectors": record["timings"]["fit"]["vectors"],
                "passes_median": float(table["passes"].median()),
                "image_stats": sorted({str(r.get("image_stats")) for r in results}),
                "min_cos_to_first": round(float(cos.min()), 6),
            }
        if args.exact_check:
            print("tight reference fits ...", flush=True)
            result["exact_check"] = exact_check(work / "run", args.layers[0], args.exact_check, kept)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    result["command"] = "python benchmarks/fit_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(result, args.out)
    e = result["extract"]
    for label, cosines in result.get("exact_check", {}).get("cosines", {}).items():
        print(f"cosine to a tight fit ({result['exact_check']['layer']}), {label}: {cosines}")
    print(
        f"\nextract (guidance images): {e['images']} images, flow {e['flow_s']:.1f} s, "
        f"process {e['process_wall_s']:.1f} s"
    )
    print(
        f"{'fit variant':<34} {'vectors':>7} {'flow s':>7} {'fit/extract':>11} {'process s':>9} {'peak RSS MB':>11} "
        f"{'min cos':>9} {'bal_acc':>7} {'cos to logistic':>15}"
    )
    for label, r in result["variants"].items():
        print(
            f"{label:<34} {r['vectors']:>7} {r['flow_s']:>7.1f} {r['fit_over_extract']:>11.2f} "
            f"{r['process_wall_s']:>9.1f} "
            f"{r['peak_rss_mb']:>11.0f} {r['min_cos_to_first']:>9.5f} {r['concept_bal_acc_median']:>7.3f} "
            f"{r.get('concept_cosine_to_logistic_median', float('nan')):>15.4f}"
        )
    return result


if __name__ == "__main__":
    main()
