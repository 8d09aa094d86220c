"""The fitting flow: one task per (layer, block of jobs) sharing one read; cached per vector by content."""

from __future__ import annotations

import time

from prefect import flow
from prefect.futures import as_completed
from tqdm import tqdm

from flows.runners import Progress, call_flow, finish_stage, known_failures
from sacv.config import RunConfig
from sacv.errors import InputError
from sacv.io.handoffs import FitSummary
from tasks.fit import collect_vectors, fit_block, plan_fits


@flow(name="sacv-fit")
@known_failures
def fit_flow(config: RunConfig) -> FitSummary:
    """Fit every planned concept and pseudo-concept vector that has no cached result, then collect them."""
    started = time.perf_counter()
    run_uri = config.run_dir
    if config.concepts is None:
        raise InputError("the fit stage needs a `concepts` section in the config")
    plan = plan_fits(run_uri, config)
    futures = [fit_block.submit(run_uri, config, layer, keys) for layer, keys in plan.blocks]
    per_layer: dict[str, int] = {}
    for layer, keys in plan.blocks:
        per_layer[layer] = per_layer.get(layer, 0) + len(keys)
    bars = {layer: tqdm(total=n, unit="vector", desc=f"fit {layer}", disable=None) for layer, n in per_layer.items()}
    progress = Progress(sum(per_layer.values()), f"vectors fitted in {run_uri}")
    near_chance = fitted = 0
    for future in as_completed(futures):
        done = future.result()
        near_chance += done["near_chance"]
        fitted += done["vectors"]
        bars[done["layer"]].update(done["vectors"])
        progress.advance(done["vectors"])
    for bar in bars.values():
        bar.close()
    table_uri = collect_vectors(run_uri, config)
    summary = FitSummary(
        status="done", vectors=plan.total, fitted=fitted, near_chance_fitted=near_chance, table=table_uri
    )
    return finish_stage(run_uri, "fit", summary, started)


def run_fit(config: RunConfig) -> FitSummary:
    return call_flow(fit_flow, config)
