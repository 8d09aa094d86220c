"""Model loading by spec, class names, weight checks, layer listing and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from sacv.cli import main
from sacv.method.models import imagenet_class_names, load_model, resolve_layers, state_dict_hash

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_callable_spec_loads_in_eval_mode_with_class_names():
    model = load_model("tests.conftest:tiny_net")
    assert not model.module.training
    assert model.class_names == [f"class_{i}" for i in range(5)]
    assert len(model.weight_hash) == 64


def test_weights_file_round_trip_and_hash(tmp_path):
    model = load_model("tests.conftest:tiny_net")
    with torch.no_grad():
        for p in model.module.parameters():
            p.add_(1.0)
    path = tmp_path / "w.pt"
    torch.save(model.module.state_dict(), path)
    reloaded = load_model("tests.conftest:tiny_net", weights=str(path))
    assert reloaded.weight_hash == state_dict_hash(model.module)
    assert reloaded.weight_hash != load_model("tests.conftest:tiny_net").weight_hash


def test_state_dict_with_wrong_keys_lists_them(tmp_path):
    state = load_model("tests.conftest:tiny_net").module.state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(
        ValueError, match=r"1 missing keys \(first: \['fc.weight'\]\).*1 unexpected keys \(first: \['extra.weight'\]\)"
    ):
        load_model("tests.conftest:tiny_net", weights=str(path))


def test_state_dict_with_wrong_shape_is_refused(tmp_path):
    state = load_model("tests.conftest:tiny_net").module.state_dict()
    state["fc.weight"] = torch.zeros(5, 7)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"fc.weight is \(5, 7\), the model needs \(5, 6\)"):
        load_model("tests.conftest:tiny_net", weights=str(path))


def test_weights_are_loaded_with_weights_only(tmp_path):
    import argparse

    path = tmp_path / "evil.pt"
    torch.save({"obj": argparse.Namespace(x=1)}, path)  # arbitrary pickled objects are refused
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_model("tests.conftest:tiny_net", weights=str(path))


def test_unknown_models_are_clear_errors():
    with pytest.raises(
        ValueError, match=r"unknown model spec 'efficientnet_lite' \(did you mean \['efficientnet_lite0'\]"
    ):
        load_model("efficientnet_lite")
    with pytest.raises(ValueError, match=r"unknown torchvision model 'resnet181'; close names: \['resnet18'"):
        load_model("torchvision/resnet181")
    with pytest.raises(ValueError, match="cannot import 'tests.conftest:nope'"):
        load_model("tests.conftest:nope")
    with pytest.raises(ValueError, match="neither a file nor a weights name of resnet18"):
        load_model("torchvision/resnet18", weights="IMAGENET_NOPE")


def test_shipped_imagenet_names_are_torchvisions():
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    assert imagenet_class_names() == list(_IMAGENET_CATEGORIES)


def test_every_data_file_of_the_package_is_declared_for_the_build():
    """Files of ``sacv/`` that are not Python reach a wheel only through package-data."""
    import tomllib
    from pathlib import Path

    import sacv

    package = Path(sacv.__file__).parent
    data = {p.name for p in package.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")}
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    assert "imagenet_classes.txt" in data
    assert data <= set(pyproject["tool"]["setuptools"]["package-data"]["sacv"])


def test_torchvision_model_without_weights_has_imagenet_names():
    model = load_model("torchvision/resnet18")
    assert len(model.class_names) == 1000 and model.class_names[340] == "zebra"
    assert not model.module.training


def test_unknown_layer_lists_close_names(tiny):
    with pytest.raises(ValueError, match=r"unknown layer 'features\.9'; closest layer names: \[.*'features\.0'"):
        resolve_layers(tiny, ["features.9"])


def test_cli_layers_lists_shapes_and_reports_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["layers", "tests.conftest:tiny_net", "--size", "16"])
    assert result.exit_code == 0, result.output
    assert "features.0" in result.output and "6 x  16 x  16" in result.output
    assert "features.2" in result.output and "6 x   8 x   8" in result.output
    result = runner.invoke(main, ["layers", "nonsense"])
    assert result.exit_code != 0 and "unknown model spec 'nonsense'" in result.output


@pytest.mark.slow
def test_efficientnet_lite0_classifies_bundled_photos_offline(lite0):
    import skimage.data

    assert lite0.spec == "efficientnet_lite0" and not lite0.module.training
    batch = torch.stack(
        [lite0.preprocessing(Image.fromarray(getattr(skimage.data, n)())) for n in ("chelsea", "coffee")]
    )
    with torch.no_grad():
        top1 = lite0.module(batch).argmax(1).tolist()
    assert lite0.class_names[top1[0]] in CAT_CLASSES
    assert lite0.class_names[top1[1]] == "espresso"


@pytest.mark.slow
def test_cli_lists_efficientnet_blocks():
    result = CliRunner().invoke(main, ["layers", "efficientnet_lite0"])
    assert result.exit_code == 0, result.output
    for i in range(16):
        assert f"_blocks.{i} " in result.output
    assert "_blocks.8" in result.output and "112 x  14 x  14" in result.output


@pytest.mark.slow
def test_preprocessing_matches_the_trained_normalisation(lite0):
    white = Image.fromarray(np.full((300, 400, 3), 255, np.uint8))
    x = lite0.preprocessing(white)
    assert x.shape == (3, 224, 224)
    torch.testing.assert_close(x, torch.full_like(x, (255 - 127) / 128))


def test_normalize_is_numpys_float32_arithmetic_bit_for_bit():
    """The batch normalisation on the model's device (in place on one float copy) gives exactly
    ``(x / 255 - mean) / std`` in numpy float32, channels first, for a batch and for one image."""
    from sacv.method.models import Preprocessing

    pre = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 20, 24, 3), dtype=np.uint8)  # (N, H, W, 3)
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (pre.mean, pre.std))
    expected = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255) - mean) / std  # (N, 3, H, W)
    before = pixels.copy()
    got = pre.normalize(torch.from_numpy(pixels))
    assert got.shape == (3, 3, 20, 24) and got.dtype == torch.float32
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(pre.normalize(torch.from_numpy(pixels[1])).numpy(), expected[1])
    np.testing.assert_array_equal(pixels, before)  # in place on the float copy, never on the caller's pixels
