"""The fitting flow: one task per (layer, concept, random set) and per null pair; cached by content."""

from __future__ import annotations

import time

from prefect import flow
from prefect.futures import as_completed
from tqdm import tqdm

from flows.runners import call_flow, finish_stage
from sacv.config import RunConfig
from sacv.plans import FitSummary
from tasks.fit import collect_vectors, fit_vector, plan_fits


@flow(name="sacv-fit")
def fit_flow(config: RunConfig) -> FitSummary:
    """Fit every planned concept and null vector that has no cached result, then collect them."""
    started = time.perf_counter()
    run_uri = config.run_dir
    if config.concepts is None:
        raise ValueError("the fit stage needs a `concepts` section in the config")
    plan = plan_fits(run_uri, config)
    futures = [fit_vector.submit(run_uri, config, key) for key in plan.todo]
    near_chance = 0
    with tqdm(total=len(futures), unit="vector", desc="fit", disable=None) as bar:
        for future in as_completed(futures):
            near_chance += future.result()["near_chance"]
            bar.update(1)
    table_uri = collect_vectors(run_uri, config)
    summary = FitSummary(status="done", vectors=plan.total, fitted=len(futures), near_chance_fitted=near_chance, table=table_uri)
    return finish_stage(run_uri, "fit", summary, started)


def run_fit(config: RunConfig) -> FitSummary:
    return call_flow(fit_flow, config)
