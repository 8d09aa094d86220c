"""The README's picture, docs/report-maps.png: one section of the HTML report drawn with the report's
own figure code (``sacv.plot.overlay``, which ``sacv.report`` renders into the page).

It shows, for one (layer, concept, class) row of the contributions table, the class's images with
the highest and the lowest Σ S_{k→c}: the model input, S_k (where the concept is) and S_{k→c} (how
much the concept there pushes the class logit), exactly as the report's section does, with the
row's test against the pseudo-concepts in the title.

Regenerate, offline, from the repository root:

    make demo                                    # writes demo-out/ (about 8 minutes on two CPU cores)
    .venv/bin/python scripts/readme_figure.py    # reads demo-out/run, writes docs/report-maps.png

Without a demo run, ``--build`` first runs ``sacv demo --out DEMO_OUT`` (add ``--small`` for the
small demo, a few minutes; its tables have fewer significant rows). Options: ``--layer``,
``--concept``, ``--class``, ``--images`` (top and bottom images shown), ``--out``.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

import sacv
from sacv.plot import overlay

ROOT = Path(__file__).resolve().parent.parent


def build_demo(out: Path, small: bool) -> None:
    """``sacv demo`` into ``out`` (generated data, the whole pipeline, the report), offline."""
    sacv_cli = Path(sys.executable).with_name("sacv")
    command = [str(sacv_cli), "demo", "--out", str(out)] + (["--small"] if small else [])
    subprocess.run(command, check=True, cwd=ROOT)


def section_figure(run, layer: str, concept: str, class_: str, images: int):
    """The report's map figure of one contributions row: top and bottom images by Σ S_{k→c}."""
    rows = run.contributions(layer=layer, concept=concept, class_=class_)
    if rows.empty:
        raise SystemExit(f"{run.uri} has no contributions row for {concept} → {class_} at {layer}")
    row = rows.iloc[0]
    highest = run.top_images(layer, concept, class_, n=images).set_index("row")["s_kc_sum"]
    lowest = run.top_images(layer, concept, class_, n=images, lowest=True).set_index("row")["s_kc_sum"]
    ranked = pd.concat([highest, lowest[~lowest.index.isin(highest.index)]])
    top, bottom = list(highest.index), [r for r in lowest.index if r not in highest.index]
    chosen = [(f"top {i + 1}", r) for i, r in enumerate(top)] + [(f"bottom {i + 1}", r) for i, r in enumerate(bottom)]
    maps = [run.maps(int(r), layer, concept, recompute=False) for _, r in chosen]
    pictures = [run.picture(int(r)) for _, r in chosen]
    labels = [f"{rank}\nΣS→c = {ranked[r]:.3g}" for rank, r in chosen]
    fig = overlay(maps, pictures, labels)
    verdict = "significant" if bool(row["significant"]) else "not significant"
    fig.suptitle(
        f"{concept} → {row['class_name']} at {layer}: contribution {row['contribution_score']:.3g}, "
        f"z {row['z']:.1f} against {int(row['n_reference'])} pseudo-concepts, "
        f"p_adj {row['p_adjusted']:.1g} ({verdict}, {row['direction']})",
        fontsize=9,
    )
    return fig


def save_small_png(fig, out: Path, dpi: int) -> int:
    """Write the figure as a palette PNG (256 colours) and return its size in bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    picture = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture.save(out, format="PNG", optimize=True)
    return out.stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-out", type=Path, default=ROOT / "demo-out", help="the demo's output folder")
    parser.add_argument("--build", action="store_true", help="run `sacv demo` into --demo-out first")
    parser.add_argument("--small", action="store_true", help="with --build: the small demo")
    parser.add_argument("--layer", default="_blocks.12")
    parser.add_argument("--concept", default="striped")
    parser.add_argument("--class", dest="class_", default="zebra")
    parser.add_argument("--images", type=int, default=3, help="top images, and as many bottom images")
    parser.add_argument("--dpi", type=int, default=80)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "report-maps.png")
    args = parser.parse_args(argv)
    if args.build:
        build_demo(args.demo_out, args.small)
    run_dir = args.demo_out / "run"
    if not (run_dir / "run.json").exists():
        raise SystemExit(f"no demo run at {run_dir}: run `make demo` first, or pass --build")
    run = sacv.open_run(str(run_dir))
    fig = section_figure(run, args.layer, args.concept, args.class_, args.images)
    size = save_small_png(fig, args.out, args.dpi)
    print(f"{args.out}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
