"""Figures of the run report (``sacv.report.build``), each returned as a base64 data URI.

Every figure is rendered no wider than ``FIGURE_WIDTH`` pixels, the widest the page shows it, so a
figure's bytes do not depend on the run's size: map overlays and patch galleries (photographs) as
lossy WebP, plots as a 256-colour PNG or lossless WebP, whichever is smaller (:func:`figure_uri`).
Matplotlib runs on the Agg backend; text that comes from folders or configs is passed through
``plain`` so that a ``$`` in a concept name is not read as mathtext. The map overlay is the
notebook's figure (``sacv.plot``).
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image  # noqa: E402

from sacv.plot import CMAP, STYLE, overlay, plain  # noqa: E402

plt.rcParams.update(STYLE)

FIGURE_WIDTH = 1146  # px: a section box's inner width on the widest page (sacv.report.html: 1180 less 34)
PHOTO_QUALITY = 80  # WebP quality of the photographic figures: the maps' colours stay clear over the pictures


def figure_uri(fig, photo: bool = False) -> str:
    """Render a figure (at 100 dpi, less where that is wider than ``FIGURE_WIDTH``) to a data URI
    and close it: lossy WebP for a ``photo``, else the smaller of a 256-colour PNG and lossless WebP."""
    buffer = io.BytesIO()
    dpi = min(STYLE["figure.dpi"], FIGURE_WIDTH / fig.get_size_inches()[0])
    fig.savefig(buffer, format="png", dpi=dpi, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    with Image.open(buffer) as rendered:
        image = rendered.convert("RGB")
    if photo:
        return _uri(image, "webp", quality=PHOTO_QUALITY, method=6)
    few = image.quantize(256, dither=Image.Dither.NONE)
    return min(_uri(few, "png", optimize=True), _uri(few, "webp", lossless=True, method=6), key=len)


def _uri(image: Image.Image, kind: str, **options) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=kind.upper(), **options)
    return f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay_figure(maps: list, pictures: list[np.ndarray], labels: list[str]) -> str:
    """The notebook's overlay figure (:func:`sacv.plot.overlay`) of maps from ``Run.maps``."""
    return figure_uri(overlay(maps, pictures, labels), photo=True)


def patch_gallery(patches: list[np.ndarray], labels: list[str], per_row: int = 6) -> str:
    """Receptive-field crops of the most contributing positions, with their S_{k→c} values."""
    rows = (len(patches) + per_row - 1) // per_row
    fig, axes = plt.subplots(rows, per_row, figsize=(1.45 * per_row, 1.6 * rows), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=1 - 0.25 / rows, wspace=0.12, hspace=0.3)
    for ax in axes.flat:
        ax.axis("off")
    for ax, patch, label in zip(axes.flat, patches, labels):
        ax.imshow(patch, interpolation="nearest")
        ax.set_title(plain(label), fontsize=7.5)
    return figure_uri(fig, photo=True)


def profile_figure(vectors: pd.DataFrame | None, table: pd.DataFrame | None, layers: list[str]) -> str | None:
    """Per layer and concept: mean held-out balanced accuracy of the concept vectors, mean spatial
    score and mean TCAV score over classes (pseudo-concepts dashed, where known): where a concept emerges."""
    panels = []
    if vectors is not None and len(vectors):
        concepts = vectors[vectors["kind"] == "concept"]
        panels.append(
            (
                "held-out balanced accuracy",
                concepts.groupby(["concept", "layer"])["bal_acc"].mean(),
                vectors[vectors["kind"] == "pseudo"].groupby("layer")["bal_acc"].mean(),
                (0.5, 0.6),
            )
        )
    if table is not None and len(table):
        for statistic, title in (("spatial", "spatial score"), ("tcav", "TCAV score")):
            tested = table[table["statistic"] == statistic]  # the pseudo-concepts' mean is known for this score
            panels.append(
                (
                    f"mean {title} over classes",
                    table.groupby(["concept", "layer"])[f"{statistic}_score"].mean(),
                    tested.groupby("layer")["reference_mean"].mean() if len(tested) else None,
                    (0.5,),
                )
            )
    if not panels:
        return None
    order = [layer for layer in layers if any(layer in p[1].index.get_level_values(1) for p in panels)]
    x = np.arange(len(order))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(3.6 * len(panels) + 1.4, 3.2), squeeze=False, layout="constrained"
    )
    for ax, (title, means, null, guides) in zip(axes[0], panels, strict=True):
        for concept in sorted(means.index.get_level_values(0).unique()):
            y = means[concept].reindex(order).to_numpy(dtype=float)
            ax.plot(x, y, marker="o", label=plain(concept))
        if null is not None:
            y = null.reindex(order).to_numpy(dtype=float)
            ax.plot(x, y, ls="--", color="0.45", marker="x", label="pseudo-concepts")
        for guide in guides:
            ax.axhline(guide, color="0.8", lw=0.8, zorder=0)
        ax.set_title(title)
        ax.set_xticks(
            x,
            [plain(layer) for layer in order],
            rotation=30 if len(order) > 3 else 0,
            ha="right" if len(order) > 3 else "center",
        )
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return figure_uri(fig)


def history_figure(history: pd.DataFrame, rows: pd.DataFrame, order: list[str]) -> str | None:
    """One small panel per (layer, concept, class) row of ``rows``: its spatial and TCAV scores in
    every audit of ``history`` (the contributions history), audits in ``order`` (oldest first)."""
    if rows.empty or history is None or history["audit_id"].nunique() < 2:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(2.8 * len(rows) + 0.6, 2.6), squeeze=False, layout="constrained")
    x = np.arange(len(order))
    for ax, (_, row) in zip(axes[0], rows.iterrows(), strict=True):
        own = (
            history[
                (history["layer"] == row["layer"])
                & (history["concept"] == row["concept"])
                & (history["class_index"] == row["class_index"])
            ]
            .set_index("audit_id")
            .reindex(order)
        )
        ax.plot(x, own["spatial_score"].to_numpy(dtype=float), marker="o", label="spatial score")
        ax.plot(x, own["tcav_score"].to_numpy(dtype=float), marker="s", label="TCAV score")
        ax.set_title(plain(f"{row['concept']} → {row['class_name']}\n{row['layer']}"))
        ax.set_xticks(x, [str(i + 1) for i in range(len(order))])
        ax.set_xlabel("audit")
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return figure_uri(fig)


def sweep_heatmap(table: pd.DataFrame, layers: list[str], max_classes: int = 12) -> str | None:
    """One panel per class (those with the most significant rows first, at most ``max_classes``):
    concepts × layers, coloured by the spatial score (0.5 = as many positions push the logit up as
    down), ``*`` where the row is significant. Returns None for an empty table."""
    if table is None or not len(table):
        return None
    ranking = table.groupby("class_name").agg(sig=("significant", "sum"), n=("n_images", "max"))
    classes = ranking.sort_values(["sig", "n"], ascending=False).index[:max_classes].tolist()
    concepts = sorted(table["concept"].unique())
    order = [layer for layer in layers if layer in set(table["layer"])]
    columns = min(4, len(classes))
    rows = (len(classes) + columns - 1) // columns
    fig, axes = plt.subplots(
        rows,
        columns,
        squeeze=False,
        layout="constrained",
        figsize=(columns * (0.55 * len(order) + 1.6) + 1.0, rows * (0.2 * len(concepts) + 1.0)),
    )
    norm = Normalize(0.0, 1.0)
    for ax in axes.flat[len(classes) :]:
        ax.axis("off")
    for ax, name in zip(axes.flat, classes):
        cls = table[table["class_name"] == name]
        grid = cls.pivot_table(index="concept", columns="layer", values="spatial_score", aggfunc="mean")
        grid = grid.reindex(index=concepts, columns=order)
        ax.imshow(grid.to_numpy(dtype=float), cmap=CMAP, norm=norm, aspect="auto", interpolation="nearest")
        significant = cls[cls["significant"].fillna(False).astype(bool)]
        for _, r in significant.iterrows():
            ax.text(order.index(r["layer"]), concepts.index(r["concept"]), "*", ha="center", va="center", fontsize=9)
        ax.set_title(plain(f"class {name}"))
        ax.set_xticks(range(len(order)), [plain(layer) for layer in order], rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(concepts)), [plain(c) for c in concepts] if ax in axes[:, 0] else [], fontsize=7)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=CMAP), ax=axes, fraction=0.02, pad=0.01, label="spatial score")
    return figure_uri(fig)
