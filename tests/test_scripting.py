"""Scripting: ``sacv.run`` from Python, ``--json`` output, ``--version`` and the exit codes."""

from __future__ import annotations

import json
from importlib.metadata import version

import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

import sacv
from sacv.cli import main
from tests.flow_helpers import pipeline_raw, write_collection


@pytest.fixture(scope="module")
def finished(tmp_path_factory, prefect):
    """A small pipeline run through ``sacv.run`` with a dict config; its YAML twin beside it."""
    collection = write_collection(tmp_path_factory.mktemp("scripting"))
    raw = pipeline_raw(str(collection), str(collection / "run"))
    run = sacv.run(raw)
    config_path = collection / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return run, raw, config_path


def test_sacv_run_returns_the_finished_run(finished):
    run, raw, _ = finished
    assert isinstance(run, sacv.Run) and run.uri.rstrip("/").endswith("run")
    contributions = pd.read_parquet(f"{raw['run_dir']}/tables/contributions.parquet")
    pd.testing.assert_frame_equal(run.table("contributions"), contributions)
    with pytest.raises(TypeError, match="YAML path, a dict or a RunConfig"):
        sacv.run(42)


def test_json_of_run_inspect_and_history_match_the_tables(finished):
    _, raw, config_path = finished
    runner = CliRunner()
    done = runner.invoke(main, ["run", str(config_path), "--json"])  # a rerun: resumes, nothing to redo
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert set(summary) == {"extract", "fit", "score", "audit_id"}
    assert summary["extract"]["shards_run"] == 0 and summary["fit"]["fitted"] == 0
    contributions = pd.read_parquet(f"{raw['run_dir']}/tables/contributions.parquet")
    assert summary["score"]["rows"] == len(contributions)
    assert summary["score"]["significant"] == int(contributions["significant"].sum())

    shown = runner.invoke(main, ["inspect", raw["run_dir"], "--json", "--top", "3"])
    assert shown.exit_code == 0, shown.output
    facts = json.loads(shown.output)
    assert facts["contributions"]["rows"] == len(contributions) and len(facts["contributions"]["top"]) == 3
    images = pd.read_parquet(f"{raw['run_dir']}/tables/images.parquet")
    assert facts["images"]["ok"] == images[images["status"] == "ok"].groupby("group").size().to_dict()

    history = runner.invoke(main, ["history", raw["run_dir"], "--json"])
    audits = pd.read_parquet(f"{raw['run_dir']}/tables/audits.parquet")
    rows = json.loads(history.output)["audits"]
    assert [row["audit_id"] for row in rows] == audits["audit_id"].tolist()
    assert len(rows) == 2 and rows[-1]["audit_id"] == summary["audit_id"]  # sacv.run, then the rerun


def test_version_and_exit_codes(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["--version"])
    assert shown.exit_code == 0 and shown.output.strip() == f"sacv {version('sacv')}"
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: x\nlayers: []\n")
    failed = runner.invoke(main, ["run", str(bad)])
    assert failed.exit_code == 1 and "Traceback" not in failed.output and "layers" in failed.output
    assert runner.invoke(main, ["run"]).exit_code == 2  # a wrong command line


def test_the_demo_without_its_extra_names_the_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    result = CliRunner().invoke(main, ["demo", "--out", "unused"])
    assert result.exit_code == 1
    assert "pip install 'sacv[demo]'" in result.output and "Traceback" not in result.output
