"""The one place where the library reaches the Prefect flows (used by the command line only)."""

from __future__ import annotations

from sacv.config import RunConfig


def run_stage(stage: str, config: RunConfig) -> dict:
    """Run one pipeline stage's flow with the task runner the config asks for."""
    if stage == "extract":
        from flows.extract import run_extract

        return run_extract(config)
    if stage == "fit":
        from flows.fit import run_fit

        return run_fit(config)
    if stage == "score":
        from flows.score import run_score

        return run_score(config)
    if stage == "run":
        from flows.pipeline import run_pipeline

        return run_pipeline(config)
    raise ValueError(f"unknown stage {stage!r}; choose extract, fit, score or run")
