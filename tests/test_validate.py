"""``sacv validate``: each planted mistake is found, one line each, without extracting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from PIL import Image

from sacv.cli import main
from tests.flow_helpers import pipeline_raw, write_collection


def validate(tmp_path: Path, raw: dict):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, ["validate", str(path)])


def test_a_good_config_passes_and_nothing_is_written(tmp_path):
    collection = write_collection(tmp_path / "c")
    raw = pipeline_raw(str(collection), str(tmp_path / "run"))
    result = validate(tmp_path, raw)
    assert result.exit_code == 0 and result.output.strip().endswith(f"ok (1 layers; run_dir {tmp_path / 'run'})")
    assert not (tmp_path / "run").exists()  # nothing extracted, not even the run directory


def test_every_planted_mistake_is_one_line(tmp_path):
    collection = write_collection(tmp_path / "c")
    stray = collection / "data" / "run"  # a folder that is no class of the model
    stray.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(stray / "x.png")
    (tmp_path / "taken").write_text("a file where a folder should be")
    raw = pipeline_raw(str(collection), str(tmp_path / "taken" / "run"))
    raw["layers"] = ["features.2", "features.9"]
    raw["concepts"]["images_per_concept"] = 9  # each concept folder has 5
    result = validate(tmp_path, raw)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [line.split(":")[0] for line in lines] == ["layers"] + ["concepts"] * 3 + ["dataset", "run_dir"]
    assert "unknown layer 'features.9'" in lines[0]
    assert all("concepts.images_per_concept is 9" in line and "to 5 or less" in line for line in lines[1:4])
    assert "class folder 'run' matches no class" in lines[4] and "[]" not in lines[4]
    assert "is a file" in lines[5]


def test_config_errors_are_listed_before_anything_is_loaded(tmp_path):
    collection = write_collection(tmp_path / "c")
    raw = pipeline_raw(str(collection), str(tmp_path / "run")) | {"layer": ["features.2"]}
    raw["model"]["spec"] = "tests.models:does_not_exist"  # never loaded: the keys are wrong
    result = validate(tmp_path, raw)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and "unknown key 'layer'" in lines[0]


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    collection = write_collection(tmp_path / "c")
    raw = pipeline_raw(str(collection), str(tmp_path / "run"), spec="tests.models:does_not_exist")
    result = validate(tmp_path, raw)
    assert result.exit_code == 1 and result.output.strip().startswith("model: cannot import")
