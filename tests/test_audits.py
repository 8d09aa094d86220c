"""Audits and drift: history rows per audit, commit order, `sacv history`, drift tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from flows.pipeline import run_pipeline
from sacv.audit import audits
from sacv.audit.drift import drift_table
from sacv.cli import main
from sacv.io.rundir import RunDir
from tests.flow_helpers import pipeline_config, write_collection

CLASSES = 5


def per_set(levels: dict, rng, sets: int, shift: dict | None = None) -> pd.DataFrame:
    """A per-set table: for every (name, target) of ``levels`` (a concept, or a pseudo-concept when the
    name starts with ``pseudo_``), ``sets`` random sets whose contribution scatters (sd 0.03) around
    the level, plus ``shift`` for some keys; spatial and tcav alike around 0.5."""
    records = []
    for (name, target), level in levels.items():
        for r in range(sets):
            records.append(
                {
                    "layer": "l",
                    "concept": name,
                    "target": target,
                    "random_set": f"random_{r}",
                    "kind": "pseudo" if name.startswith("pseudo_") else "concept",
                    "contribution": rng.normal(level + (shift or {}).get((name, target), 0.0), 0.03),
                    "spatial": rng.normal(0.5, 0.03),
                    "tcav": rng.normal(0.5, 0.03),
                }
            )
    return pd.DataFrame(records)


def drifted(levels: dict, rng, sd: float) -> dict:
    """The levels of a second audit: every concept and pseudo-concept moved alike (sd ``sd``)."""
    return {key: level + rng.normal(0, sd) for key, level in levels.items()}


def test_drift_finds_a_planted_change_and_few_false_ones():
    rng = np.random.default_rng(0)
    names = [f"c{k}" for k in range(20)] + [f"pseudo_{p}" for p in range(10)]
    levels = {(name, target): rng.normal(0, 0.2) for name in names for target in range(CLASSES)}
    before = per_set(levels, rng, sets=5)
    moved = drifted(levels, rng, sd=0.1)
    null = drift_table(before, per_set(moved, rng, sets=5), [f"k{i}" for i in range(CLASSES)], correction="holm")
    assert len(null) == 100 and (null["n_reference"] == 10).all() and null["significant"].mean() <= 0.05
    after = per_set(moved, rng, sets=5, shift={("c17", 2): 1.0})
    planted = drift_table(before, after, [f"k{i}" for i in range(CLASSES)], alpha=0.05)
    top = planted.iloc[0]  # sorted by |z|
    assert (top["concept"], top["class_index"]) == ("c17", 2) and top["significant"] and top["z"] > 0
    assert top["change"] == pytest.approx(moved["c17", 2] - levels["c17", 2] + 1.0, abs=0.05)
    assert planted["significant"].sum() <= 1 + 0.05 * 100
    assert (planted["statistic"] == "contribution").all() and planted["reason"].isna().all()
    # every row against a slow reference: mean over sets after - before, against the same change of
    # each pseudo-concept of the class, as one more draw (t with P - 1 degrees of freedom)
    for _, row in planted.iterrows():

        def mean(side, name, row=row):
            part = side[(side["concept"] == name) & (side["target"] == row["class_index"])]
            return part["contribution"].sum() / len(part)

        change = mean(after, row["concept"]) - mean(before, row["concept"])
        reference = [mean(after, f"pseudo_{p}") - mean(before, f"pseudo_{p}") for p in range(10)]
        centre, sd = np.mean(reference), np.std(reference, ddof=1)
        t = abs(change - centre) / (sd * np.sqrt(1 + 1 / 10))
        assert row["change"] == pytest.approx(change, rel=1e-9)
        assert row["z"] == pytest.approx((change - centre) / sd, rel=1e-9)
        assert row["reference_sd"] == pytest.approx(sd, rel=1e-9)
        assert row["p_value"] == pytest.approx(2 * stats.t.sf(t, 9), rel=1e-9)
        side = min(sum(x >= change for x in reference), sum(x <= change for x in reference))
        assert row["p_rank"] == pytest.approx(min(1, 2 * (side + 1) / 11))
    ranks = planted["p_value"].rank(method="first").to_numpy()
    m = len(planted)
    holm = np.sort(planted["p_value"].to_numpy()) * (m - np.arange(m))
    holm = np.minimum(np.maximum.accumulate(holm), 1.0)
    np.testing.assert_allclose(planted["p_adjusted"], holm[ranks.astype(int) - 1], rtol=1e-12)
    assert (planted["significant"] == (planted["p_adjusted"] < 0.05)).all()


def test_a_change_that_moves_every_direction_alike_is_not_drift():
    """More images of a class move the concept and every pseudo-concept the same way: the change is
    large, but no larger than random images', so no row is flagged; the old per-set comparison of
    the two sides would have flagged every row (Welch p < 1e-6)."""
    rng = np.random.default_rng(1)
    names = [f"c{k}" for k in range(5)] + [f"pseudo_{p}" for p in range(8)]
    levels = {(name, 0): rng.normal(0, 0.2) for name in names}
    before = per_set(levels, rng, sets=5)
    after = per_set({key: level + 0.5 + rng.normal(0, 0.05) for key, level in levels.items()}, rng, sets=5)
    table = drift_table(before, after, ["cat"], alpha=0.05)
    assert (table["change"] > 0.3).all() and not table["significant"].any()
    for concept in table["concept"]:
        sides = (side.loc[side["concept"] == concept, "contribution"] for side in (before, after))
        welch = stats.ttest_ind(*sides, equal_var=False)
        assert welch.pvalue < 1e-6


@pytest.fixture(scope="module")
def two_audits(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("audits"), n_per_concept=5, n_per_class=5)
    config = pipeline_config(root)
    first = run_pipeline(config)
    victim = sorted((root / "data" / "cat").glob("*.jpg"))[0]
    victim.unlink()
    second = run_pipeline(config)
    return root, config, first, second


def test_each_audit_adds_one_audit_row_and_its_history(two_audits):
    _, config, first, second = two_audits
    run = RunDir(config.run_dir)
    table = run.read_audits()
    assert table["audit_id"].tolist() == [first.audit_id, second.audit_id]
    assert table["status"].tolist() == ["done", "done"]
    assert table["images_added"].tolist() == [25, 0] and table["images_removed"].tolist() == [0, 1]
    assert table["images_total"].tolist() == [25, 24] and (table["finished"] > table["started"]).all()
    assert table["weight_hash"].notna().all() and table["config_hash"].nunique() == 1
    history = audits.history(run, "contributions")
    latest = run.read_table("contributions")
    assert history.groupby("audit_id").size().to_dict() == {first.audit_id: len(latest), second.audit_id: len(latest)}
    pd.testing.assert_frame_equal(
        history[history["audit_id"] == second.audit_id].drop(columns="audit_id").reset_index(drop=True), latest
    )
    drift = run.read_table("drift")
    assert set(drift["before"]) == {first.audit_id} and set(drift["after"]) == {second.audit_id}
    assert len(drift) == len(latest)
    history_text = CliRunner().invoke(main, ["history", config.run_dir]).output
    assert first.audit_id in history_text and second.audit_id in history_text
    assert f"audit    {second.audit_id} done" in CliRunner().invoke(main, ["inspect", config.run_dir]).output


def test_a_crashed_audit_leaves_no_history_rows(two_audits, tmp_path, monkeypatch):
    _, config, first, second = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    run = RunDir(str(copy))
    config = config.model_copy(update={"run_dir": str(copy)})
    before = audits.history(run, "contributions")

    def crash(self, table):
        raise OSError("disk full")

    monkeypatch.setattr(RunDir, "write_audits", crash)  # history written, the commit fails
    with pytest.raises(OSError):
        audits.record_audit(str(copy), "crashed", 0.0, config, second.extract, scored=True)
    assert len(run.read_history("contributions")) > len(before)  # the rows are on disk ...
    pd.testing.assert_frame_equal(audits.history(run, "contributions"), before)  # ... but never read
    monkeypatch.undo()
    audits.record_audit(str(copy), "next", 0.0, config, second.extract, scored=True)
    assert list(dict.fromkeys(run.read_history("contributions")["audit_id"])) == [
        first.audit_id,
        second.audit_id,
        "next",
    ]
    assert run.read_table("drift")["before"].iloc[0] == second.audit_id


def test_a_failed_stage_records_a_failed_audit_and_no_history(two_audits, tmp_path, monkeypatch):
    root, config, first, second = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    config = config.model_copy(
        update={"run_dir": str(copy), "score": config.score.model_copy(update={"mode": "streamed"})}
    )
    import sacv.score.scoring

    def broken(*args, **kwargs):
        raise RuntimeError("scoring broke")

    monkeypatch.setattr(sacv.score.scoring, "score_shard", broken)
    with pytest.raises(RuntimeError, match="scoring broke"):
        run_pipeline(config)
    table = RunDir(str(copy)).read_audits()
    assert table["status"].tolist() == ["done", "done", "failed"] and "scoring broke" in table["message"].iloc[-1]
    assert set(audits.history(RunDir(str(copy)), "contributions")["audit_id"]) == {first.audit_id, second.audit_id}


def test_a_null_pair_of_audits_shows_at_most_alpha_false_drifts(two_audits, tmp_path):
    """Same images, new random sets (another fit seed): every row of drift.parquet is a null."""
    _, config, _, second = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    # seed 6: three distinct pseudo-concepts per concept in this tiny collection (a pool of 10 images per
    # concept, from which some seeds draw the same set twice, and some failed to plan at all)
    config = config.model_copy(update={"run_dir": str(copy), "fit": config.fit.model_copy(update={"seed": 6})})
    third = run_pipeline(config)
    # new sets, same store; every job fitted anew and none twice: no two pseudo-concepts are the same set
    assert third.extract.shards_run == 0 and third.fit.fitted == third.fit.vectors
    drift = RunDir(str(copy)).read_table("drift")
    assert set(drift["before"]) == {second.audit_id} and drift["p_value"].notna().all()
    assert (drift["n_reference"] == config.concepts.pseudo_concepts).all()
    assert drift["significant"].mean() <= config.score.alpha


def test_report_shows_the_history_and_the_drift_table(two_audits):
    from sacv.report.build import build_report

    _, config, first, second = two_audits
    page = Path(build_report(config.run_dir)).read_text()
    history = page[page.index("<h2>History (2 audits)</h2>") :]
    drift = RunDir(config.run_dir).read_table("drift")
    assert f"against {first.audit_id}" in history and 'alt="scores over audits"' in history
    table = history[history.index('id="drift"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == len(drift) + 1  # header + one row per drift row


def test_a_failing_check_exits_with_status_4_and_is_recorded(two_audits, tmp_path):
    import yaml

    _, config, _, second = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    lowest = RunDir(config.run_dir).read_table("contributions").sort_values("spatial_score").iloc[0]
    failing = {
        "kind": "min_spatial_score",
        "concept": lowest["concept"],
        "class_name": lowest["class_name"],
        "layer": lowest["layer"],
        "value": round(min(1.0, float(lowest["spatial_score"]) + 0.05), 3),
    }
    raw = config.model_dump(mode="json") | {
        "run_dir": str(copy),
        "checks": [failing, {"kind": "max_drift", "value": 10.0}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 4, result.output
    assert (
        f"min_spatial_score(concept={lowest['concept']}, class_name={lowest['class_name']}, "
        f"layer={lowest['layer']}, value={failing['value']})"
    ) in result.output
    run = RunDir(str(copy))
    checks = run.read_table("checks")
    drift = run.read_table("drift")
    assert checks["passed"].tolist() == [False] + [True] * len(drift)
    assert checks.loc[0, "value"] == pytest.approx(lowest["spatial_score"])  # same data: same score
    audit = run.read_audits().iloc[-1]
    assert audit["status"] == "done" and audit["checks_failed"] == 1
    assert audit["audit_id"] in set(audits.history(run, "contributions")["audit_id"])  # the audit's data is kept
    raw["checks"][0]["class_name"] = lowest["class_name"][:-1]
    path.write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(main, ["run", str(path)])
    assert result.exit_code == 1
    assert (
        f"checks[0].class '{lowest['class_name'][:-1]}' is unknown: did you mean '{lowest['class_name']}'"
        in result.output
    )


def test_failing_checks_end_the_flow_runs_failed_with_the_checks_in_the_message(two_audits, tmp_path):
    """The deployment entry (audit_flow) with two failing checks and a passing one: both its flow
    run and the pipeline's sub-flow run, read back from the Prefect API, are Failed, and their
    state message names each failing check and not the passing one."""
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.pipeline import audit_flow
    from sacv.audit.policy import ChecksFailed

    _, config, _, _ = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    lowest = RunDir(config.run_dir).read_table("contributions").sort_values("spatial_score").head(2)
    failing = [
        {
            "kind": "min_spatial_score",
            "concept": r["concept"],
            "class_name": r["class_name"],
            "layer": r["layer"],
            "value": round(min(1.0, float(r["spatial_score"]) + 0.05), 3),
        }
        for _, r in lowest.iterrows()
    ]
    passing = {"kind": "max_drift", "value": 10.0}
    raw = config.model_dump(mode="json") | {"run_dir": str(copy), "checks": [failing[0], passing, failing[1]]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))

    state = audit_flow(str(path), return_state=True)
    assert state.is_failed() and isinstance(state.result(raise_on_failure=False), ChecksFailed)
    described = [
        f"min_spatial_score(concept={c['concept']}, class_name={c['class_name']}, layer={c['layer']}, "
        f"value={c['value']})"
        for c in failing
    ]
    with get_client(sync_client=True) as client:
        parent = client.read_flow_run(state.state_details.flow_run_id)
        children = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id]))
        )
        flows = {client.read_flow(run.flow_id).name: run for run in [parent, *children]}
    assert set(flows) >= {"sacv-audit", "sacv-run"}
    for name in ("sacv-audit", "sacv-run"):
        run = flows[name]
        assert run.state.is_failed(), (name, run.state)
        message = run.state.message
        assert "2 of " in message and "policy check rows failed" in message, (name, message)
        for text in described:
            assert text in message, (name, text, message)
        assert "max_drift" not in message, (name, message)
    audit = RunDir(str(copy)).read_audits().iloc[-1]
    assert audit["status"] == "done" and audit["checks_failed"] == 2


def test_compare_two_models_on_the_same_images(two_audits, tmp_path):
    root, config, _, _ = two_audits
    other = config.model_copy(
        update={
            "run_dir": str(root / "other"),
            "model": config.model.model_copy(update={"spec": "tests.models:small_other"}),
        }
    )
    run_pipeline(other)
    result = CliRunner().invoke(main, ["compare", config.run_dir, other.run_dir, "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "cmp/compare.parquet")
    a, b = (
        RunDir(r).read_table("contributions").set_index(["layer", "concept", "class_index"])
        for r in (config.run_dir, other.run_dir)
    )
    keyed = table.set_index(["layer", "concept", "class_index"])
    assert len(table) == len(a) and set(keyed.index) == set(a.index)
    for column, side in (("spatial_before", a), ("spatial_after", b)):
        np.testing.assert_allclose(keyed[column], side.loc[keyed.index, "spatial_score"])
    for column, side in (("value_before", a), ("value_after", b)):  # the tested statistic: contribution
        np.testing.assert_allclose(keyed[column], side.loc[keyed.index, "contribution_score"])
    assert (keyed["statistic"] == "contribution").all() and keyed["p_value"].notna().all()
    np.testing.assert_allclose(
        keyed["tcav_change"], b.loc[keyed.index, "tcav_score"] - a.loc[keyed.index, "tcav_score"]
    )
    assert keyed["spatial_change"].abs().max() > 0  # another model, other scores
    page = (tmp_path / "cmp/compare.html").read_text()
    assert page.count("<tr") == len(table) + 1 + 4  # table rows, its header, four facts
    same = CliRunner().invoke(main, ["compare", config.run_dir, config.run_dir, "--out", str(tmp_path / "same")])
    identical = pd.read_parquet(tmp_path / "same/compare.parquet")
    assert same.exit_code == 0 and (identical["spatial_change"] == 0).all() and not identical["significant"].any()
    assert (identical["change"] == 0).all() and (identical["p_value"] == 1).all()  # nothing moved, nor the reference


def test_a_named_baseline_is_used_and_an_unknown_one_is_refused_before_any_work(two_audits, tmp_path):
    _, config, first, second = two_audits
    copy = tmp_path / "run"
    shutil.copytree(config.run_dir, copy)
    named = config.model_copy(
        update={"run_dir": str(copy), "audit": config.audit.model_copy(update={"baseline": first.audit_id})}
    )
    run_pipeline(named)
    assert set(RunDir(str(copy)).read_table("drift")["before"]) == {first.audit_id}
    typo = named.model_copy(update={"audit": config.audit.model_copy(update={"baseline": first.audit_id[:-1]})})
    with pytest.raises(ValueError, match=f"close audit ids: \\['{first.audit_id}'"):
        run_pipeline(typo)
    assert RunDir(str(copy)).read_audits()["status"].tolist()[-1] == "failed"
