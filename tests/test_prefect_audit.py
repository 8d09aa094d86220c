"""How an audit reads in Prefect: run-directory keys, user errors as one line, the `sacv` logger.

The artifacts, the report and the alert event of a deployed audit are checked against a real
server in tests/test_deployment.py."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from sacv.audit.digest import run_slug
from sacv.cli import main
from tests.flow_helpers import pipeline_raw, write_collection

PREFECT_LOG_LINE = re.compile(r"(\d\d:\d\d:\d\d\.\d+ \| |(INFO|WARNING|ERROR) +prefect[.\w]*:)")  # console or caplog


def test_run_slug_is_a_stable_artifact_key():
    slug = run_slug("s3://audits/Nightly Runs/zebra_v2/")
    assert slug.startswith("sacv-nightly-runs-zebra-v2-") and len(slug) == len("sacv-nightly-runs-zebra-v2-") + 8
    assert slug == run_slug("s3://audits/Nightly Runs/zebra_v2")  # a trailing slash is the same directory
    assert run_slug("/a/zebra_v2") != run_slug("/b/zebra_v2")  # same last parts, other directory
    for uri in ("/data/runs/zebra", "s3://b/x.y/ÄÖ", "/"):
        assert all(c.islower() or c.isdigit() or c == "-" for c in run_slug(uri)), run_slug(uri)


@pytest.mark.parametrize("command", ["extract", "run"])
def test_a_stray_class_folder_is_one_line_without_traceback(tmp_path, prefect, capfd, caplog, command):
    """A folder of dataset.root named like no class (here `run`): one `error:` line naming the
    closest class names, exit 1, and no traceback from the CLI, the flow or the task."""
    root = write_collection(tmp_path / "collection")
    (root / "data" / "run").mkdir()
    Image.new("RGB", (40, 40)).save(root / "data" / "run" / "x.png")
    raw = pipeline_raw(str(root), str(tmp_path / "run"))
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, [command, str(tmp_path / "config.yaml")])
    captured = capfd.readouterr()
    everything = result.output + captured.out + captured.err + caplog.text  # caplog: Prefect's run logs
    own = [line for line in everything.splitlines() if line.strip() and not PREFECT_LOG_LINE.match(line)]
    errors = [line for line in own if line.startswith("error:")]
    assert result.exit_code == 1, everything
    assert len(errors) == 1 and errors == own, own  # beside Prefect's log lines: the one error line
    assert "class folder 'run' matches no class of the model" in errors[0] and "['cat', 'dog'" in errors[0]
    assert "Traceback" not in everything, everything
    assert not [r for r in caplog.records if r.exc_info], "a log record with a traceback"
    assert "Finished in state Failed(\"class folder 'run'" in everything  # the flow run's state message


def test_an_internal_error_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("sacv.report.build.build_report", broken)
    result = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and isinstance(result.exception, ZeroDivisionError)
    assert "error:" not in result.output


def test_the_sacv_logger_reaches_prefect_handlers():
    """Set up as a flow run process is (flows.process.configure_process, then Prefect's logging):
    the `sacv` logger gets Prefect's API handler, so its records land in the run's logs."""
    code = (
        "import logging\n"
        "from flows.process import configure_process\n"
        "configure_process()\n"
        "from prefect.logging.configuration import setup_logging\n"
        "setup_logging()\n"
        "print(sorted(type(h).__name__ for h in logging.getLogger('sacv').handlers))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}  # not this session's settings
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "APILogHandler" in done.stdout, done.stdout + done.stderr


def test_the_alert_automation_recipe_is_a_valid_automation():
    from prefect.events.schemas.automations import AutomationCore

    from tasks.publish import ALERT_EVENT

    recipe = yaml.safe_load((Path(__file__).parents[1] / "deployments" / "alert-automation.yaml").read_text())
    automation = AutomationCore.model_validate(recipe)
    assert automation.trigger.expect == {ALERT_EVENT}
    assert automation.trigger.match.model_dump()["prefect.resource.id"] == "sacv.run-dir.*"
