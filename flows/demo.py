"""The offline demo, end to end: generated data -> extract, fit, score -> localisation -> report.

``run_demo`` writes the demo's concepts, random pool and masked audit scenes (``sacv.demo.scenes``),
runs the whole pipeline on EfficientNet-Lite0 as one Prefect flow, scores localisation against the
scene masks and builds the static HTML report. Everything lands under ``out``: ``data/``,
``config.yaml`` and the run directory ``run/``.
"""

from __future__ import annotations

import time
from pathlib import Path

from flows.pipeline import run_pipeline
from sacv.config import load_config
from sacv.demo.scenes import write_demo_data
from sacv.io.rundir import RunDir
from sacv.report.build import build_report
from sacv.score.localisation import evaluate_run


def run_demo(out: str | Path, small: bool = False, seed: int = 0) -> dict:
    """Run the demo under ``out``; print the time of every step and return a summary."""
    out = Path(out).resolve()
    seconds: dict[str, float] = {}

    def timed(step: str, work):
        started = time.perf_counter()
        result = work()
        seconds[step] = round(time.perf_counter() - started, 1)
        print(f"demo: {step} done in {seconds[step]} s", flush=True)
        return result

    config_path = timed("data", lambda: write_demo_data(out, small=small, seed=seed))
    config = load_config(config_path)
    pipeline = timed("pipeline", lambda: run_pipeline(config))
    localisation = timed("localisation", lambda: evaluate_run(config.run_dir))
    report = timed("report", lambda: build_report(config.run_dir))
    run = RunDir(config.run_dir)
    return {
        "config": str(config_path),
        "run_dir": config.run_dir,
        "report": str(report),
        "tables": {name: run.table_uri(name) for name in ("contributions", "image_scores", "vectors", "localisation")},
        "seconds": {**seconds, "total": round(sum(seconds.values()), 1)},
        "counts": {
            "images": pipeline.extract.images,
            "rejects": pipeline.extract.rejects,
            "concepts": sum(p.is_dir() for p in Path(config.concepts.root).iterdir()),
            "vectors": pipeline.fit.vectors,
            "contributions": pipeline.score.rows,
            "significant": pipeline.score.significant,
            "localisation_rows": len(localisation),
        },
    }
