"""The whole pipeline as one parent flow: extract -> fit -> score, each stage its own sub-flow."""

from __future__ import annotations

import pandas as pd
from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows.extract import extract_flow
from flows.fit import fit_flow
from flows.runners import call_flow, task_runner
from flows.score import score_flow
from sacv.config import RunConfig, load_config
from sacv.rundir import RunDir

TOP_ROWS = 20


@flow(name="sacv-run")
def run_flow(config: RunConfig) -> dict:
    """Run every stage; a rerun resumes (done shards, cached vectors and scored shards are skipped)."""
    runner = task_runner(config.execution)
    summary = {"extract": extract_flow.with_options(task_runner=runner)(config)}
    if config.concepts is not None:
        summary["fit"] = fit_flow.with_options(task_runner=runner)(config)
    if config.concepts is not None and config.dataset is not None:
        summary["score"] = score_flow.with_options(task_runner=runner)(config)
        _publish(config.run_dir)
    return summary


def _publish(run_uri: str) -> None:
    """A table artifact with the top contributions and a markdown artifact linking the tables."""
    run = RunDir(run_uri)
    table = run.read_table("contributions")
    top = table.sort_values(["significant", "effect_size"], ascending=False).head(TOP_ROWS)
    columns = ["layer", "concept", "class_name", "n_images", "spatial_score", "tcav_score", "p_adjusted", "significant"]
    records = top[columns].astype(object).where(pd.notna(top[columns]), None).to_dict("records")
    create_table_artifact(records, key="sacv-top-contributions", description=f"Top contributions in {run_uri}")
    links = "\n".join(f"- `{run_uri}/tables/{name}.parquet`" for name in ("contributions", "image_scores", "vectors", "images", "rejects"))
    create_markdown_artifact(
        f"# SACV run\n\n{int(table['significant'].sum())} significant of {len(table)} (layer, concept, class) rows.\n\n{links}\n",
        key="sacv-run-tables",
    )


@flow(name="sacv-audit")
def audit_flow(config_path: str) -> dict:
    """Deployment entry point: the whole pipeline from a config file path."""
    return run_flow(load_config(config_path))


def run_pipeline(config: RunConfig) -> dict:
    return call_flow(run_flow, config)
