"""The report's contributions table: its columns, its row order (significant rows first, by |z|)
and the rows shown (at most ``CONTRIBUTION_ROWS``; all of them stay in the Parquet file)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sacv.report.html import fmt, missing, sort_key, table_html

CONTRIBUTION_ROWS = 300  # rows of the contributions table shown (significant first); the rest stay in the Parquet file
CONTRIBUTION_VIEW = [  # (header, column, formatter); the first column of a cell is its sort key
    ("class", "class_name"),
    ("layer", "layer"),
    ("concept", "concept"),
    ("n_images", "n_images"),
    ("contribution", "contribution_score"),
    ("spatial_score [95% CI]", "spatial_score"),
    ("tcav_score", "tcav_score"),
    ("z (vs pseudo-concepts)", "z"),
    ("p_adjusted", "p_adjusted"),
    ("direction", "direction"),
    ("significant", "significant"),
    ("reason", "reason"),
]


def contributions_html(table: pd.DataFrame) -> str:
    """The sortable contributions table (``CONTRIBUTION_VIEW`` columns, rows coloured by direction)."""
    headers = [name for name, *_ in CONTRIBUTION_VIEW]
    return table_html(table, "contributions", contribution_cells, row_class, headers=headers)


def contribution_cells(row) -> list[tuple[str, str]]:
    out = []
    for _, column in CONTRIBUTION_VIEW:
        value = row[column]
        shown = fmt(value)
        if column == "spatial_score" and not missing(row["spatial_score_ci_low"]):
            shown += (
                f' <span class="ci">[{fmt(row["spatial_score_ci_low"])}, {fmt(row["spatial_score_ci_high"])}]</span>'
            )
        out.append((sort_key(value), shown))
    return out


def ordered_contributions(table: pd.DataFrame) -> pd.DataFrame:
    """Significant rows that raise the class logit, then significant rows that lower it, then the
    rest; within each, the largest |z| (against the pseudo-concepts) first."""
    group = np.select([table["significant"] & (table["direction"] == "positive"), table["significant"]], [0, 1], 2)
    ordered = table.assign(_g=group, _s=-table["z"].abs().fillna(-1.0))
    return ordered.sort_values(["_g", "_s"], kind="stable").drop(columns=["_g", "_s"])


def row_class(row) -> str:
    if not row["significant"]:
        return ""
    return "sig neg" if row["direction"] == "negative" else "sig"


def shown_contributions(table: pd.DataFrame) -> pd.DataFrame:
    """At most ``CONTRIBUTION_ROWS`` rows, in :func:`ordered_contributions` order: every significant
    row first (while they fit), then the strongest of the rest."""
    return ordered_contributions(table).head(CONTRIBUTION_ROWS)
