"""Figures of a run for notebooks; the report draws the same figures (``sacv.report.figures``).

``overlay`` draws one column per image: the model input, ``S_k`` over it and ``S_{k→c}`` over it,
maps bilinearly upsampled to the input, a diverging colour map centred at 0 (blue negative, red
positive), one symmetric scale and colour bar per map row. Figures are made without pyplot (no
global state, nothing shown twice in a notebook) and returned.
"""

from __future__ import annotations

import numpy as np
from matplotlib import rc_context
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from sacv.method.maps import upsample_map

CMAP = "RdBu_r"
STYLE = {"font.size": 9, "axes.titlesize": 9, "figure.dpi": 100}


def plain(text: str) -> str:
    """Text for matplotlib without mathtext interpretation (a ``$`` in a concept name)."""
    return str(text).replace("$", r"\$")


def _symmetric(maps: list[np.ndarray]) -> Normalize:
    vmax = max((float(np.nanmax(np.abs(m))) for m in maps if m is not None and m.size), default=0.0) or 1e-12
    return Normalize(-vmax, vmax)


def overlay_panels(
    images: list[np.ndarray], s_k: list[np.ndarray], s_kc: list[np.ndarray | None], labels: list[str]
) -> Figure:
    """The overlay figure from pictures (H, W, 3) and maps already upsampled to (H, W) each;
    an ``s_kc`` entry of None leaves that panel bare (no row at all when every entry is None)."""
    rows = 3 if any(m is not None for m in s_kc) else 2
    with rc_context(STYLE):
        fig = Figure(figsize=(1.75 * len(images) + 2.2, 1.85 * rows + 0.5), layout="constrained")
        axes = fig.subplots(rows, len(images), squeeze=False)
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
            bar = fig.colorbar(
                ScalarMappable(norm=norms[max(r - 1, 0)], cmap=CMAP), ax=axes[r, :], fraction=0.025, pad=0.01, aspect=12
            )
            bar.ax.tick_params(labelsize=7)
            bar.ax.set_visible(r > 0)
    return fig


def overlay(maps, pictures=None, labels: list[str] | None = None) -> Figure:
    """The report's map figure for maps from :meth:`sacv.api.Run.maps` (one DataArray with dims
    ``(map, row, col)``, or a list of them).

    pictures: the model inputs (H, W, 3) uint8, one per map (``Run.picture``); None draws the maps
    on grey at the map size. labels: column titles (default: file name and Σ S_{k→c}). An all-NaN
    ``S_kc`` (gradients neither stored nor recomputed) leaves its panel bare.
    """
    maps = [maps] if not isinstance(maps, (list, tuple)) else list(maps)
    if pictures is None:
        pictures = [None] * len(maps)
    elif isinstance(pictures, np.ndarray) and pictures.ndim == 3:
        pictures = [pictures]
    if len(pictures) != len(maps):
        raise ValueError(f"{len(maps)} maps but {len(pictures)} pictures: give one picture per map")
    images, s_k, s_kc, titles = [], [], [], []
    for m, picture in zip(maps, pictures):
        k, kc = m.sel(map="S_k").to_numpy(), m.sel(map="S_kc").to_numpy()
        image = np.full((*k.shape, 3), 200, dtype=np.uint8) if picture is None else np.asarray(picture)
        size = image.shape[:2]
        images.append(image)
        s_k.append(upsample_map(k, size))
        s_kc.append(None if np.isnan(kc).all() else upsample_map(kc, size))
        name = str(m.attrs.get("path", m.attrs.get("image_id", ""))).rsplit("/", 1)[-1]
        titles.append(f"{name}\nΣS→c = {np.nansum(kc):.3g}" if s_kc[-1] is not None else name)
    return overlay_panels(images, s_k, s_kc, titles if labels is None else list(labels))
