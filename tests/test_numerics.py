"""Numeric mode: exact float32 by default (TF32 off while the model runs, restored after), and the
numeric mode reaches streamed scoring and every cache key."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from flows.pipeline import run_pipeline
from flows.score import run_score
from sacv.config import numeric_mode, numeric_warnings, parse_config
from sacv.extract.catalog import ImageCatalog
from sacv.fit.fit_plan import plan_jobs
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import store_identity_of
from sacv.method.activations import extract, tf32_mode
from sacv.score.scoring import shard_score_key
from tests.flow_helpers import make_config, write_collection


class FlagRecorder(nn.Module):
    """A conv net that records the TF32 flags in force while its forward pass runs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.fc(self.conv(x).mean(dim=(2, 3)))


@pytest.fixture
def tf32_on_outside():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_extract_runs_the_model_without_tf32_and_restores_the_settings(tf32_on_outside):
    net = FlagRecorder()
    extract(net, torch.rand(2, 3, 8, 8), ["conv"], target=0)
    assert net.seen == [(False, False)]
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)
    extract(net, torch.rand(2, 3, 8, 8), ["conv"], target=0, allow_tf32=True)
    assert net.seen[-1] == (True, True)


def test_tf32_settings_are_restored_when_the_body_raises(tf32_on_outside):
    with pytest.raises(RuntimeError, match="boom"), tf32_mode(False):
        assert not torch.backends.cudnn.allow_tf32
        raise RuntimeError("boom")
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)


def with_numerics(config, autocast: str = "none", allow_tf32: bool = False):
    return config.model_copy(
        update={
            "extract": config.extract.model_copy(update={"autocast": autocast}),
            "execution": config.execution.model_copy(update={"allow_tf32": allow_tf32}),
        }
    )


def test_numeric_mode_is_empty_by_default_and_warned_about_otherwise(tmp_path):
    config = parse_config({"run_dir": str(tmp_path / "run"), "layers": ["features.0"]})
    assert numeric_mode(config) == {} and numeric_warnings(config) == []
    half = with_numerics(config, "bfloat16", allow_tf32=True)
    assert numeric_mode(half) == {"autocast": "bfloat16", "allow_tf32": True}
    assert len(numeric_warnings(half)) == 2 and "docs/numerics.md" in numeric_warnings(half)[0]


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, prefect):
    root = write_collection(tmp_path_factory.mktemp("numerics"), n_per_concept=5, n_per_class=5)
    config = make_config(root, run="run")
    config = config.model_copy(
        update={
            "layers": ["features.2"],
            "concepts": config.concepts.model_copy(update={"random_sets": 3, "images_per_set": 4}),
            "fit": config.fit.model_copy(update={"solver": "lbfgs"}),
            "score": config.score.model_copy(update={"min_images": 2}),
        }
    )
    return with_numerics(config, "bfloat16")


def test_fit_and_score_keys_depend_on_the_numeric_mode(extracted):
    run_pipeline(extracted)
    run = RunDir(extracted.run_dir)
    catalog, identity = ImageCatalog.read(run), store_identity_of(run.store_uri)
    exact = with_numerics(extracted)
    keys = {c.extract.autocast: [j["key"] for j in plan_jobs(catalog.frame, c, identity)] for c in (exact, extracted)}
    assert not set(keys["none"]) & set(keys["bfloat16"])  # no stale vector is reused across modes
    rows, vectors = catalog.rows("dataset", 0), run.read_table("vectors")
    assert shard_score_key(rows, vectors, exact) != shard_score_key(rows, vectors, extracted)
    assert run.read_run_record()["numerics"] == {"autocast": "bfloat16", "allow_tf32": False, "decoder": "pil"}


def test_streamed_scoring_uses_the_autocast_of_the_extraction(extracted):
    run_pipeline(extracted)  # cached: nothing is extracted, fitted or scored again
    blockwise = RunDir(extracted.run_dir).read_table("image_scores")
    streamed = extracted.model_copy(update={"score": extracted.score.model_copy(update={"mode": "streamed"})})
    run_score(streamed)
    again = RunDir(extracted.run_dir).read_table("image_scores")
    pd.testing.assert_frame_equal(again, blockwise, check_exact=False, rtol=1e-5, atol=1e-7)


def test_cpu_numbers_follow_torch_threads_which_use_torch_threads_pins():
    """The test model of the multi-worker test sums its 1×1 convolution by thread on the CPU (oneDNN):
    the same count gives the same numbers, another count other numbers; the setting is per process."""
    import os

    from sacv.method.activations import use_torch_threads
    from tests.models import pointwise

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one CPU: torch's thread count cannot differ")
    model = pointwise().module
    torch.manual_seed(1)
    images = torch.randn(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 1):
            use_torch_threads(threads)
            assert torch.get_num_threads() == threads
            results.append(extract(model, images, ["features.2"], 0).activations["features.2"])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[2])
    if torch.equal(results[0], results[1]):
        pytest.skip("oneDNN sums this 1×1 convolution the same at 1 and 2 threads on this CPU")
