"""The anchor job with Captum's TCAV and with ``sacv run``, each in a fresh process: wall, peak RSS, significance.

The job: EfficientNet-Lite0, layers ``_blocks.8 _blocks.14``; concept ``striped`` (``--concept``
images from ``sacv.demo.textures.striped``) against ``--sets`` random sets of ``--per-set`` images from a
pool of ``--pool`` random textures (``sacv.demo.textures.random_texture``), null sets random vs random;
``--scenes`` zebra scenes (striped horses, ``sacv.demo.scenes.make_scene``), target class zebra.

Captum is not a dependency of the project: the script installs ``captum==0.9.0`` with pip into a
separate ``--target`` folder (``pip install --no-deps``; its own dependencies, torch, numpy,
matplotlib, tqdm and packaging, are already in the project's environment) and puts that folder on the
Captum process's ``PYTHONPATH`` only. Captum's process: ``TCAV(model, layers)`` with its default layer
attribution (gradients) and classifier, ``interpret`` of the scenes for every experimental set
``[striped, random_i]`` and ``[random_i, random_{i+1}]``, then a two-sided Welch t-test of the
concept's TCAV scores (``sign_count``, over the sets) against the null sets' per layer (p < 0.05), as
Captum's tutorial does. sacv's process: ``sacv run CONFIG`` (extract, fit, score) with
``concepts.random_sets`` = ``--sets``; its significance is ``contributions.parquet`` (Holm,
alpha 0.05). Both preprocess with the model's ``Preprocessing`` (resize 256, crop 224).

    python benchmarks/captum_side_by_side.py --out benchmarks/results/captum_side_by_side_cpu.json
    python benchmarks/captum_side_by_side.py --sacv-only --out /tmp/anchor_sacv.json   # the sacv side alone
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
CAPTUM = "captum==0.9.0"
LAYERS = ["_blocks.8", "_blocks.14"]

CAPTUM_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from PIL import Image
from scipy import stats
from captum.concept import TCAV, Concept
from sacv.method.models import load_model

work, sets, per_set, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(",")
torch.set_grad_enabled(True)
model = load_model("efficientnet_lite0")
prep = model.preprocessing

def tensors(paths):
    return torch.stack([prep(Image.open(p).convert("RGB")) for p in paths])

def concept(cid, name, paths):
    loader = torch.utils.data.DataLoader(tensors(paths), batch_size=50)
    return Concept(cid, name, loader)

pool = sorted((work / "pool").glob("*.png"))
draws = [
    np.random.default_rng([0, i]).choice(len(pool), size=min(per_set, len(pool)), replace=False) for i in range(sets)
]
striped = concept(0, "striped", sorted((work / "concepts" / "striped").glob("*.png")))
randoms = [concept(1 + i, f"random_{i}", [pool[k] for k in sorted(d)]) for i, d in enumerate(draws)]
zebra = model.class_names.index("zebra")
scenes = tensors(sorted((work / "data" / "zebra").glob("*.png")))
tcav = TCAV(model.module, layers, model_id="anchor", save_path=str(work / "captum_cav"))
experiments = [[striped, r] for r in randoms] + [[randoms[i], randoms[(i + 1) % sets]] for i in range(sets)]
started = time.perf_counter()
scores = tcav.interpret(inputs=scenes, experimental_sets=experiments, target=zebra)
seconds = time.perf_counter() - started
out = {"interpret_s": round(seconds, 2), "layers": {}}
for layer in layers:
    concept_sc = [float(scores[f"0-{r.id}"][layer]["sign_count"][0]) for r in randoms]
    null_sc = [
        float(scores[f"{randoms[i].id}-{randoms[(i + 1) % sets].id}"][layer]["sign_count"][0]) for i in range(sets)
    ]
    p = float(stats.ttest_ind(concept_sc, null_sc, equal_var=False).pvalue)
    out["layers"][layer] = {"tcav_mean": float(np.mean(concept_sc)), "null_mean": float(np.mean(null_sc)),
                            "p_value": p, "significant": p < 0.05}
print(json.dumps(out))
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", type=int, default=50, help="striped images")
    parser.add_argument("--pool", type=int, default=250, help="random pool")
    parser.add_argument("--sets", type=int, default=10, help="random sets")
    parser.add_argument("--per-set", type=int, default=50, help="images per random set (seeded draws from the pool)")
    parser.add_argument("--scenes", type=int, default=60, help="zebra scenes")
    parser.add_argument(
        "--target", default=str(Path(tempfile.gettempdir()) / "sacv-captum"), help="Captum install folder"
    )
    parser.add_argument("--keep", default=None, help="keep the data and run folders here")
    parser.add_argument("--sacv-only", action="store_true", help="run only the sacv side (no Captum install or run)")
    parser.add_argument("--out", default="benchmarks/results/captum_side_by_side.json", help="JSON result path")
    return parser.parse_args(argv)


def install_captum(target: Path) -> None:
    if (target / "captum").is_dir():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), CAPTUM], check=True)


def write_data(work: Path, args) -> None:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from sacv.demo import scenes, textures

    for folder in ("concepts/striped", "pool", "data/zebra"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.concept):
        Image.fromarray(textures.striped(224, rng)).save(work / "concepts/striped" / f"{i:03d}.png")
    for i in range(args.pool):
        Image.fromarray(textures.random_texture(224, rng)).save(work / "pool" / f"{i:03d}.png")
    for i in range(args.scenes):
        image, *_ = scenes.make_scene("horse", "striped", np.random.default_rng([3, i]))
        Image.fromarray(image).save(work / "data/zebra" / f"{i:03d}.png")


def run_measured(command: list[str], cwd: Path, pythonpath: str) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    out = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    if status != 0:
        raise RuntimeError(f"{command[:4]} failed with status {status}; run it by hand to see why")
    return {
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2),
        "stdout": out.decode(errors="replace"),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import pandas as pd
    import yaml

    target = Path(args.target)
    if not args.sacv_only:
        install_captum(target)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="sacv-captum-job-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep", "target")},
        "captum": CAPTUM,
    }
    try:
        if not (work / "pool").exists():
            write_data(work, args)
        for stale in ("captum_cav", "run"):
            shutil.rmtree(work / stale, ignore_errors=True)
        if args.sacv_only:
            result["captum"] = "not run (--sacv-only)"
        else:
            print("captum ...", flush=True)
            captum = run_measured(
                [sys.executable, "-c", CAPTUM_SCRIPT, str(work), str(args.sets), str(args.per_set), ",".join(LAYERS)],
                REPO,
                f"{target}{os.pathsep}{REPO}",
            )
            result["captum"] = {
                **{k: v for k, v in captum.items() if k != "stdout"},
                **json.loads(captum["stdout"].strip().splitlines()[-1]),
            }
        config = {
            "run_dir": str(work / "run"),
            "model": {"spec": "efficientnet_lite0"},
            "layers": LAYERS,
            "concepts": {
                "root": str(work / "concepts"),
                "random_pool": str(work / "pool"),
                "random_sets": args.sets,
                "images_per_set": args.per_set,
            },
            "dataset": {"root": str(work / "data"), "target": "label"},
        }
        (work / "config.yaml").write_text(yaml.safe_dump(config))
        print("sacv run ...", flush=True)
        sacv = run_measured(
            [sys.executable, "-c", "from sacv.cli import main; main()", "run", str(work / "config.yaml")],
            REPO,
            str(REPO),
        )
        record = json.loads((work / "run" / "run.json").read_text())
        table = pd.read_parquet(work / "run" / "tables" / "contributions.parquet")
        table = table[table["class_name"] == "zebra"]
        result["sacv"] = {
            "wall_s": sacv["wall_s"],
            "peak_rss_gib": sacv["peak_rss_gib"],
            "stages_s": {k: v.get("seconds") for k, v in record["timings"].items()},
            "layers": {
                r.layer: {
                    "spatial_score": r.spatial_score,
                    "reference_mean": r.reference_mean,
                    "z": r.z,
                    "tcav_score": r.tcav_score,
                    "p_adjusted": r.p_adjusted,
                    "significant": bool(r.significant),
                }
                for r in table.itertuples()
            },
        }
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_avg_1min_at_end"] = round(os.getloadavg()[0], 2)
    c, s = result["captum"], result["sacv"]
    print(f"\n{'tool':<10} {'wall s':>7} {'peak RSS GiB':>12}  significance (striped -> zebra) per layer")
    if isinstance(c, dict):
        print(
            f"{'captum':<10} {c['wall_s']:>7.1f} {c['peak_rss_gib']:>12.2f}  "
            + ", ".join(
                f"{k}: TCAV {v['tcav_mean']:.2f} vs null {v['null_mean']:.2f}, p {v['p_value']:.2g}"
                for k, v in c["layers"].items()
            )
        )
    print(
        f"{'sacv run':<10} {s['wall_s']:>7.1f} {s['peak_rss_gib']:>12.2f}  "
        + ", ".join(
            f"{k}: spatial {v['spatial_score']:.2f}, z {v['z']:.1f} vs pseudo-concepts, p_adj {v['p_adjusted']:.2g}"
            for k, v in s["layers"].items()
        )
    )
    result["command"] = "python benchmarks/captum_side_by_side.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
