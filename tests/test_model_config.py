"""Your own model from the config: preprocessing and class names replace the spec's own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from PIL import Image

from sacv.config import ConfigError, parse_config
from sacv.method.models import cached_model, configure_model, load_model

FRUIT = ["apple", "banana", "cherry", "date"]  # SmallNet has 4 outputs
PREPROCESSING = {"resize": 40, "crop": 32, "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.4]}


def fruit_dataset(root: Path) -> Path:
    """data/{apple,cherry}/ of small random images: folders named after the model's own classes."""
    rng = np.random.default_rng(0)
    for name in ("apple", "cherry"):
        (root / "data" / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (48, 56, 3), dtype=np.uint8)).save(root / "data" / name / f"{i}.png")
    return root


def fruit_config(root: Path, **model) -> dict:
    return {
        "run_dir": str(root / "run"),
        "model": {"spec": "tests.models:bare_small", **model},
        "layers": ["features.0"],
        "dataset": {"root": str(root / "data"), "target": "label"},
        "extract": {"shard_size": 4, "batch_size": 2},
    }


def test_configured_preprocessing_and_class_names_reach_the_store_and_the_labels(tmp_path, prefect):
    from flows.extract import run_extract

    root = fruit_dataset(tmp_path)
    names_file = tmp_path / "classes.txt"
    names_file.write_text("\n".join(FRUIT) + "\n")
    config = parse_config(fruit_config(root, preprocessing=PREPROCESSING, class_names=str(names_file)))
    run_extract(config)
    store = zarr.open_group(str(root / "run" / "store.zarr"), mode="r")
    assert store.attrs["class_names"] == FRUIT
    assert store.attrs["preprocessing"] == PREPROCESSING  # part of the store's identity
    assert store["dataset/features.0/act"].shape[1:3] == (32, 32)  # the configured crop
    images = pd.read_parquet(root / "run" / "tables" / "images.parquet")
    labels = {Path(p).parent.name: label for p, label in zip(images["path"], images["label"])}
    assert labels == {"apple": 0, "cherry": 2}

    # the spec's own names (class_<i>) do not match the folders: refused, with the fix named
    with pytest.raises(Exception, match="'apple' matches no class"):
        run_extract(parse_config(fruit_config(root) | {"run_dir": str(root / "other")}))


def test_the_configured_pixels_are_normalised_with_the_configured_mean_and_std():
    model = configure_model(load_model("tests.models:bare_small"), PREPROCESSING, None)
    image = Image.fromarray(np.full((50, 80, 3), 128, np.uint8))
    x = model.preprocessing(image)  # (3, 32, 32)
    assert tuple(x.shape) == (3, 32, 32)
    expected = (128 / 255 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.3, 0.4])
    np.testing.assert_allclose(x[:, 0, 0].numpy(), expected, rtol=0, atol=1e-6)  # float32


def test_the_configured_interpolation_resizes_as_pil_does_and_joins_the_store_identity(tmp_path):
    root = fruit_dataset(tmp_path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))  # sharp edges
    pixels = {}
    for name, pil in (("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)):
        config = parse_config(
            {**fruit_config(root), "model": {"preprocessing": {**PREPROCESSING, "interpolation": name}}}
        )
        model = configure_model(
            load_model("tests.models:bare_small"), config.model.loader_options()["preprocessing"], None
        )
        pixels[name] = model.preprocessing.pixels(image)  # (32, 32, 3) uint8
        resized = np.asarray(image.resize((64, 40), pil))[4:36, 16:48]  # shorter side 40, centre crop 32
        np.testing.assert_array_equal(pixels[name], resized)
        identity = model.preprocessing.to_dict()
        assert identity == (PREPROCESSING if name == "bilinear" else {**PREPROCESSING, "interpolation": name})
    assert np.abs(pixels["bicubic"].astype(int) - pixels["bilinear"]).max() > 10


def test_a_class_list_of_the_wrong_length_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"model.class_names has 3 names but .* has 4 outputs"):
        cached_model("tests.models:bare_small", None, "cpu", None, tuple(FRUIT[:3]))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"preprocessing": {"mean": [0.5, 0.5, 0.5, 0.5]}}, r"model.preprocessing.mean.*4 values; give one per RGB"),
        ({"preprocessing": {"std": [0.5, 0.0, 0.5]}}, r"model.preprocessing.std.*must be positive"),
        ({"preprocessing": {"interpolation": "cubic"}}, r"model.preprocessing.interpolation.*'bicubic'"),
        ({"class_names": "missing.txt"}, r"model.class_names.*does not exist"),
        ({"class_names": ["a", "b", "a"]}, r"model.class_names.*names appear twice: \['a'\]"),
    ],
)
def test_bad_model_settings_are_config_errors_naming_the_key(tmp_path, model, message):
    root = fruit_dataset(tmp_path)
    with pytest.raises(ConfigError, match=message):
        parse_config(fruit_config(root, **model))


def test_a_spec_returning_no_module_is_refused():
    with pytest.raises(ValueError, match="expected an nn.Module or LoadedModel"):
        load_model("tests.test_model_config:not_a_model")


def not_a_model() -> str:
    return "a string"
