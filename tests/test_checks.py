"""Policy checks: each kind against planted table values, and config errors with suggestions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sacv.audit.policy import evaluate_checks, failure_message, validate_checks
from sacv.config import ConfigError, parse_config


def config_with(*checks):
    raw = {"run_dir": "run", "layers": ["features.0", "features.2"], "checks": list(checks)}
    return parse_config(raw)


def contributions() -> pd.DataFrame:
    rows = [  # layer, concept, class, spatial, z (against the pseudo-concepts), direction, p_adjusted, significant
        ("features.2", "watermark", "zebra", 0.7, 6.0, "positive", 0.001, True),
        ("features.2", "watermark", "cat", 0.4, -4.5, "negative", 0.01, True),
        ("features.0", "watermark", "cat", 0.5, 0.3, "positive", 0.6, False),
        ("features.2", "striped", "zebra", 0.65, 3.0, "positive", 0.02, True),
    ]
    columns = [
        "layer",
        "concept",
        "class_name",
        "spatial_score",
        "z",
        "direction",
        "p_adjusted",
        "significant",
    ]
    return pd.DataFrame(rows, columns=columns)


def test_no_significant_contribution_fails_only_in_the_given_direction():
    rules = {"kind": "no_significant_contribution", "concept": "watermark"}
    positive = evaluate_checks(config_with(rules), contributions(), None)
    assert len(positive) == 3 and positive["passed"].tolist() == [False, True, True]
    assert positive.loc[0, "row"] == "features.2 / watermark -> zebra" and positive.loc[0, "threshold"] == 0.05
    either = evaluate_checks(config_with({**rules, "direction": "any"}), contributions(), None)
    assert either["passed"].tolist() == [False, False, True]
    only_cat = evaluate_checks(config_with({**rules, "classes": ["cat"], "layer": "features.2"}), contributions(), None)
    assert only_cat["passed"].tolist() == [True]


def test_min_spatial_score_and_max_drift():
    checks = [
        {"kind": "min_spatial_score", "concept": "striped", "class_name": "zebra", "layer": "features.2", "value": 0.6},
        {
            "kind": "min_spatial_score",
            "concept": "striped",
            "class_name": "zebra",
            "layer": "features.2",
            "value": 0.66,
        },
        {"kind": "min_spatial_score", "concept": "striped", "class_name": "cat", "layer": "features.2", "value": 0.1},
        {"kind": "max_drift", "value": 0.1},
        {"kind": "max_drift", "value": 0.1, "significant_only": True},
    ]
    drift = pd.DataFrame(
        {
            "layer": "features.2",
            "concept": ["a", "b"],
            "class_name": "cat",
            "spatial_change": [0.05, -0.2],
            "tcav_change": [0.12, 0.0],
            "significant": [True, False],
        }
    )
    table = evaluate_checks(config_with(*checks), contributions(), drift)
    assert table["passed"].tolist() == [True, False, False, False, False, False, True]
    assert np.isnan(table.loc[2, "value"])  # a row that does not exist fails
    np.testing.assert_allclose(table.loc[3:4, "value"], [0.12, 0.2])
    assert evaluate_checks(config_with(checks[3]), contributions(), None).empty  # first audit: no drift yet
    message = failure_message(table)
    assert message.startswith("5 of 7") and "min_spatial_score(concept=striped" in message


def test_unknown_names_in_checks_are_config_errors_with_suggestions():
    with pytest.raises(ConfigError, match=r"checks\[0\].layer 'features.02' is unknown: did you mean 'features.2'"):
        config_with(
            {"kind": "min_spatial_score", "concept": "s", "class_name": "zebra", "layer": "features.02", "value": 0.5}
        )
    with pytest.raises(ConfigError, match=r"unknown key 'checks.0.max_drift.valu': did you mean 'value'"):
        config_with({"kind": "max_drift", "valu": 0.1, "value": 0.1})
    config = config_with({"kind": "no_significant_contribution", "concept": "stripd", "classes": ["zebar"]})
    with pytest.raises(ValueError, match=r"checks\[0\].concept 'stripd' is unknown: did you mean 'striped'"):
        validate_checks(config, ["striped", "dotted"], ["cat", "zebra"])
    fixed = config_with({"kind": "no_significant_contribution", "concept": "striped", "classes": ["zebar"]})
    with pytest.raises(ValueError, match=r"checks\[0\].class 'zebar' is unknown: did you mean 'zebra'"):
        validate_checks(fixed, ["striped", "dotted"], ["cat", "zebra"])
