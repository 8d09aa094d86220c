"""Crashes anywhere: seeded trials that SIGKILL ``sacv run`` during extract, fit or score, then rerun.

Every rerun must give the tables of an uninterrupted run, and nothing finished before the kill may
be done again: extraction markers, fit results and score markers that existed at the kill are the
same files afterwards (same bytes, same modification time)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.pipeline import run_pipeline, run_stage
from sacv.config import parse_config
from sacv.io.rundir import RunDir
from tests.flow_helpers import assert_same_tables, pipeline_raw, run_tables, write_collection

REPO = Path(__file__).resolve().parents[1]
TRIALS = 4  # one kill in each stage, and a second one in extraction (the longest stage)
STAGES = ("extract", "fit", "score", "extract")
DONE_FILES = ("shards/*/*.json", "fits/*/*.json", "scores/*.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prefect):
    collection = write_collection(tmp_path_factory.mktemp("collection"))
    config = parse_config(pipeline_raw(str(collection), str(collection / "uninterrupted")))
    run_pipeline(config)
    return collection, run_tables(RunDir(config.run_dir), str(collection))


def done_files(run_dir: Path) -> dict[str, tuple[int, bytes]]:
    """What a rerun must not redo: relative path -> (mtime_ns, bytes)."""
    return {
        str(p.relative_to(run_dir)): (p.stat().st_mtime_ns, p.read_bytes())
        for pattern in DONE_FILES
        for p in run_dir.glob(pattern)
    }


def wait_for(process: subprocess.Popen, ready, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.02)


def kill_point(rng: random.Random, run_dir: Path, stage: str):
    """A seeded moment of ``stage``: after the k-th extraction marker, or after the fit plan, or after
    the vectors table (scoring), plus a random delay; returns (description, ready, delay)."""
    delay = round(rng.uniform(0, 0.4), 2)
    if stage == "extract":
        k = rng.randint(0, 5)
        return (
            f"extract, after {k} shard markers + {delay} s",
            lambda: len(list(run_dir.glob("shards/*/*.json"))) >= k and (run_dir / "tables/images.parquet").exists(),
            delay,
        )
    if stage == "fit":
        return f"fit, after the fit plan + {delay} s", lambda: (run_dir / "fits/plan.json").exists(), delay
    return f"score, after the vectors table + {delay} s", lambda: (run_dir / "tables/vectors.parquet").exists(), delay


@pytest.mark.slow
def test_killed_anywhere_the_rerun_gives_the_same_tables_and_redoes_nothing_done(reference, tmp_path):
    from prefect.settings import PREFECT_API_URL

    collection, expected = reference
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": PREFECT_API_URL.value(), "SACV_TEST_DELAY": "0.1"}
    rng = random.Random(20261126)
    report = []
    for trial in range(TRIALS):
        run_dir = tmp_path / f"trial{trial}"
        raw = pipeline_raw(str(collection), str(run_dir))
        config_path = tmp_path / f"trial{trial}.yaml"
        config_path.write_text(yaml.safe_dump(raw))
        where, ready, delay = kill_point(rng, run_dir, STAGES[trial])
        process = subprocess.Popen(
            [sys.executable, "-m", "sacv.cli", "run", str(config_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_for(process, ready)
        time.sleep(delay)
        finished_first = process.poll() is not None
        if not finished_first:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        before = done_files(run_dir)
        run_stage("run", parse_config(raw))  # takes over the dead run's lock
        after = done_files(run_dir)
        redone = sorted(path for path in before if after.get(path) != before[path])
        report.append(
            f"trial {trial}: killed at {where}{' (had finished)' if finished_first else ''}; "
            f"{len(before)} done files at the kill, {len(after) - len(before)} added by the rerun, "
            f"{len(redone)} redone"
        )
        print(report[-1])
        assert not redone, f"trial {trial} ({where}) redid {redone}"
        assert_same_tables(run_tables(RunDir(str(run_dir)), str(collection)), expected)
    print("\n".join(["chaos trials:", *report]))
    assert sum("had finished" not in line for line in report) >= TRIALS // 2  # most trials really were killed
