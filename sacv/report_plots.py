"""Figures of the run report (``sacv.report``), each returned as a ``data:image/png;base64`` URI.

Matplotlib runs on the Agg backend; text that comes from folders or configs is passed through
``plain`` so that a ``$`` in a concept name is not read as mathtext.
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

CMAP = "RdBu_r"
plt.rcParams.update({"font.size": 9, "axes.titlesize": 9, "figure.dpi": 100})


def plain(text: str) -> str:
    """Text for matplotlib without mathtext interpretation."""
    return str(text).replace("$", r"\$")


def png_uri(fig) -> str:
    """Render a figure to a PNG data URI and close it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _symmetric(maps: list[np.ndarray]) -> Normalize:
    vmax = max((float(np.abs(m).max()) for m in maps if m is not None and m.size), default=0.0) or 1e-12
    return Normalize(-vmax, vmax)


def overlay_figure(images: list[np.ndarray], s_k: list[np.ndarray], s_kc: list[np.ndarray | None],
                   labels: list[str]) -> str:
    """Columns: images; rows: the model input, S_k over it, S_{k→c} over it (upsampled maps,
    diverging colour map centred at 0, one symmetric scale and colour bar per map row)."""
    rows = 3 if any(m is not None for m in s_kc) else 2
    fig, axes = plt.subplots(rows, len(images), figsize=(1.75 * len(images) + 2.2, 1.85 * rows + 0.5),
                             squeeze=False, layout="constrained")
    norms = [_symmetric(s_k), _symmetric([m for m in s_kc if m is not None])]
    names = ["model input", "$S_k$\n(concept)", "$S_{k\\to c}$\n(contribution)"]
    for c, image in enumerate(images):
        for r in range(rows):
            ax = axes[r, c]
            ax.imshow(image)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(plain(labels[c]))
            if c == 0:
                ax.set_ylabel(names[r], fontsize=10)
            values = None if r == 0 else (s_k if r == 1 else s_kc)[c]
            if values is not None:
                ax.imshow(values, cmap=CMAP, norm=norms[r - 1], alpha=0.65)
    for r in range(rows):  # row 0 gets an invisible bar so that all rows line up
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norms[max(r - 1, 0)], cmap=CMAP), ax=axes[r, :],
                           fraction=0.025, pad=0.01, aspect=12)
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_visible(r > 0)
    return png_uri(fig)


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
    return png_uri(fig)


def profile_figure(vectors: pd.DataFrame | None, table: pd.DataFrame | None, layers: list[str]) -> str | None:
    """Per layer and concept: mean held-out balanced accuracy of the concept vectors, mean spatial
    score and mean TCAV score over classes (null vectors dashed): where a concept emerges."""
    panels = []
    if vectors is not None and len(vectors):
        concepts = vectors[vectors["kind"] == "concept"]
        panels.append(("held-out balanced accuracy", concepts.groupby(["concept", "layer"])["bal_acc"].mean(),
                       vectors[vectors["kind"] == "null"].groupby("layer")["bal_acc"].mean(), (0.5, 0.6)))
    if table is not None and len(table):
        for score, title in (("spatial_score", "spatial score"), ("tcav_score", "TCAV score")):
            panels.append((f"mean {title} over classes", table.groupby(["concept", "layer"])[score].mean(),
                           table.groupby("layer")[f"{score}_null"].mean(), (0.5,)))
    if not panels:
        return None
    order = [layer for layer in layers if any(layer in p[1].index.get_level_values(1) for p in panels)]
    x = np.arange(len(order))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1.4, 3.2), squeeze=False,
                             layout="constrained")
    for ax, (title, means, null, guides) in zip(axes[0], panels, strict=True):
        for concept in sorted(means.index.get_level_values(0).unique()):
            y = means[concept].reindex(order).to_numpy(dtype=float)
            ax.plot(x, y, marker="o", label=plain(concept))
        ax.plot(x, null.reindex(order).to_numpy(dtype=float), ls="--", color="0.45", marker="x", label="null vectors")
        for guide in guides:
            ax.axhline(guide, color="0.8", lw=0.8, zorder=0)
        ax.set_title(title)
        ax.set_xticks(x, [plain(layer) for layer in order], rotation=30 if len(order) > 3 else 0, ha="right" if len(order) > 3 else "center")
        ax.set_xlim(-0.5, len(order) - 0.5)
        ax.set_ylim(0, 1.02)
        ax.grid(axis="y", alpha=0.3)
    axes[0, -1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    return png_uri(fig)


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
    fig, axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                             figsize=(columns * (0.55 * len(order) + 1.6) + 1.0, rows * (0.2 * len(concepts) + 1.0)))
    norm = Normalize(0.0, 1.0)
    for ax in axes.flat[len(classes):]:
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
    return png_uri(fig)
