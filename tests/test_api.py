"""The notebook API (``sacv.open_run``) against the store and tables of a small real run."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
import zarr

import sacv
from flows.pipeline import run_pipeline
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import StoreMismatch
from sacv.method.maps import upsample_map
from scripts import example_notebook
from tests.flow_helpers import pipeline_config, write_collection

NOTEBOOK = example_notebook.NOTEBOOK


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect):
    """The run (gradients kept) and copies as other runs would leave it: without gradients
    (extract.keep_gradients: false), without class names (an older store), of an unknown format."""
    root = write_collection(tmp_path_factory.mktemp("api"), n_per_concept=5, n_per_class=5)
    config = pipeline_config(root)
    run_pipeline(config)
    run = Path(config.run_dir)
    copies = {}
    for name, change in {
        "nograd": _drop_gradients,
        "old": _drop_class_names,
        "future": _format(2),
        "noformat": _format(None),
    }.items():
        copies[name] = root / name
        shutil.copytree(run, copies[name])
        change(copies[name] / "store.zarr")
    return run, copies


def _drop_gradients(store: Path) -> None:
    for grad in store.glob("dataset/*/grad"):
        shutil.rmtree(grad)


def _edit_attrs(store: Path, edit) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    edit(meta["attributes"])
    (store / "zarr.json").write_text(json.dumps(meta))


def _drop_class_names(store: Path) -> None:
    _edit_attrs(store, lambda attrs: attrs.pop("class_names"))


def _format(version):
    return lambda store: _edit_attrs(
        store, lambda attrs: attrs.update(format=version) if version else attrs.pop("format")
    )


def test_run_facts_tables_and_engines(runs):
    run_dir, _ = runs
    run = sacv.open_run(f"file://{run_dir}", storage_options={"auto_mkdir": False})
    assert run.dir.fs.auto_mkdir is False  # storage_options reach fsspec
    record = json.loads((run_dir / "run.json").read_text())
    assert run.model.spec == "tests.models:small" and run.model.weight_hash == record["model"]["weight_hash"]
    assert run.config.layers == ["features.0", "features.2"] and set(run.timings) == {"extract", "fit", "score"}
    assert run.layers == {"features.0": (32, 32, 8), "features.2": (16, 16, 8)}
    assert run.class_names == ["cat", "dog", "zebra", "horse"]
    table = pd.read_parquet(run_dir / "tables/contributions.parquet")
    pd.testing.assert_frame_equal(run.table("contributions"), table)
    pd.testing.assert_frame_equal(run.table("contributions", engine="duckdb").df(), table, check_dtype=False)
    try:
        import polars  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install 'sacv\\[polars\\]'"):
            run.table("contributions", engine="polars")
    with pytest.raises(KeyError, match="contributions"):
        run.table("contribution")
    text = repr(run)
    assert str(run_dir) in text and "tests.models:small" in text and "features.2 16×16×8" in text
    assert "dataset 10, guidance 15" in text and f"{len(table)} rows" in text and "gradients      kept" in text
    # 2 layers x 3 concepts x 3 random sets; 2 layers x 3 concepts' own families of 3 pseudo-concepts x 3 sets
    assert "18 concept, 54 pseudo-concept" in text
    page = run._repr_html_()
    assert (
        page.count("<tr>") == len(run.facts()) == len(text.splitlines()) - 1
        and f"<td style='text-align:left'>file://{run_dir}</td>" in page
    )


def test_activations_gradients_and_vectors_are_lazy_views_of_the_store(runs):
    run_dir, _ = runs
    run = sacv.open_run(str(run_dir))
    store = zarr.open_group(str(run_dir / "store.zarr"), mode="r")
    images = pd.read_parquet(run_dir / "tables/images.parquet")
    dataset = images[(images["group"] == "dataset") & (images["status"] == "ok")].set_index("row")
    act, grad = run.activations("features.2"), run.gradients("features.2")
    assert act.dims == ("image", "row", "col", "channel") and type(act.data).__module__.startswith("dask")
    for row in (0, 6, 9):
        image_id = dataset.loc[row, "image_id"]
        np.testing.assert_array_equal(act.sel(image_id=image_id).to_numpy(), store["dataset/features.2/act"][row])
        np.testing.assert_array_equal(grad.isel(image=row).to_numpy(), store["dataset/features.2/grad"][row])
        assert act["path"][row] == dataset.loc[row, "path"] and act["label"][row] == dataset.loc[row, "label"]
        assert act["target"][row] == store["dataset/targets"][row]
    guidance = run.activations("features.0", group="guidance")
    striped = guidance.where(guidance["concept"] == "striped", drop=True)
    assert striped.sizes["image"] == 5
    np.testing.assert_array_equal(guidance.isel(image=3).to_numpy(), store["guidance/features.0/act"][3])
    vectors = run.vectors("features.2")
    table = pd.read_parquet(run_dir / "tables/vectors.parquet").query("layer == 'features.2'").sort_values("vector_row")
    np.testing.assert_array_equal(vectors.to_numpy(), store["vectors/features.2/v"][...])
    np.testing.assert_array_equal(vectors["offset"], store["vectors/features.2/b"][...])
    assert list(vectors["concept"].to_numpy()) == list(table["concept"]) and list(vectors["kind"].to_numpy()) == list(
        table["kind"]
    )


def test_a_run_on_fsspec_storage_reads_as_on_disk(runs):
    import fsspec

    run_dir, _ = runs
    fsspec.filesystem("memory").put(str(run_dir), "/api-test/run", recursive=True)
    remote = sacv.open_run("memory://api-test/run", storage_options={"skip_instance_cache": True})
    local = sacv.open_run(str(run_dir))
    assert remote.store is not None and remote.layers == local.layers
    pd.testing.assert_frame_equal(remote.table("image_scores"), local.table("image_scores"))
    np.testing.assert_array_equal(
        remote.activations("features.0").isel(image=[1, 9]), local.activations("features.0").isel(image=[1, 9])
    )
    np.testing.assert_array_equal(remote.maps(4, "features.2", "dotted"), local.maps(4, "features.2", "dotted"))


def _mean_vector(store, layer: str, rows: np.ndarray) -> tuple[np.ndarray, float]:
    v, b = store[f"vectors/{layer}/v"][...][rows].astype(np.float64), store[f"vectors/{layer}/b"][...][rows]
    norm = np.linalg.norm(v.mean(axis=0))
    return v.mean(axis=0) / norm, b.mean() / norm


def test_maps_equal_an_einsum_reference(runs):
    run_dir, _ = runs
    run = sacv.open_run(str(run_dir))
    store = zarr.open_group(str(run_dir / "store.zarr"), mode="r")
    vectors = pd.read_parquet(run_dir / "tables/vectors.parquet")
    images = run.table("images").query("group == 'dataset'")
    for layer, concept, row in [("features.2", "striped", 2), ("features.0", "dotted", 7)]:
        own = vectors[(vectors["layer"] == layer) & (vectors["concept"] == concept) & (vectors["kind"] == "concept")]
        v, b = _mean_vector(store, layer, own["vector_row"].to_numpy())
        act = store[f"dataset/{layer}/act"][row].astype(np.float64)
        grad = store[f"dataset/{layer}/grad"][row].astype(np.float64)
        path = images.loc[images["row"] == row, "path"].iloc[0]
        for name in (path, images.loc[images["row"] == row, "image_id"].iloc[0]):
            maps = run.maps(name, layer, concept)
            assert maps.attrs["gradients"] == "stored" and maps.attrs["row"] == row
            np.testing.assert_allclose(maps.sel(map="S_k"), np.einsum("hwc,c->hw", act, v), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(maps.sel(map="S_kc"), np.einsum("hwc,c->hw", grad, v), rtol=1e-5, atol=1e-8)
            np.testing.assert_allclose(
                maps.sel(map="decision"), np.einsum("hwc,c->hw", act, v) + b, rtol=1e-5, atol=1e-6
            )
    one = run.maps(2, "features.2", "striped", random_set="random_1")
    k = vectors[
        (vectors["layer"] == "features.2") & (vectors["concept"] == "striped") & (vectors["random_set"] == "random_1")
    ]
    v1 = store["vectors/features.2/v"][int(k["vector_row"].iloc[0])]
    np.testing.assert_allclose(
        one.sel(map="S_k"), store["dataset/features.2/act"][2].astype(np.float32) @ v1, rtol=1e-5, atol=1e-6
    )


def test_contributions_filter_and_top_images_order(runs):
    run_dir, _ = runs
    run = sacv.open_run(str(run_dir))
    table = pd.read_parquet(run_dir / "tables/contributions.parquet")
    expected = table[(table["layer"] == "features.2") & (table["concept"] == "dotted") & (table["class_index"] == 2)]
    pd.testing.assert_frame_equal(run.contributions(layer="features.2", concept="dotted", class_="zebra"), expected)
    pd.testing.assert_frame_equal(run.contributions(significant=False), table[~table["significant"]])
    with pytest.raises(KeyError, match="zebr"):
        run.contributions(class_="zebr")
    scores = RunDir(str(run_dir)).read_table("image_scores")
    mine = scores.query("layer == 'features.0' and concept == 'striped' and kind == 'concept' and target == 0")
    order = mine.groupby("row")["s_kc_sum"].mean().sort_values(ascending=False)
    top = run.top_images("features.0", "striped", "cat", n=3)
    assert list(top["row"]) == list(order.index[:3])
    np.testing.assert_allclose(top["s_kc_sum"], order.to_numpy()[:3])


def _torch_gradient(path: str, layer_index: int, cls: int) -> np.ndarray:
    """d logit_cls / d output of ``features[layer_index]`` of tests.models:small, (H, W, C)."""
    from sacv.io.images import load_image
    from sacv.method.models import load_model

    model = load_model("tests.models:small")
    captured = {}
    hook = model.module.features[layer_index].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = model.preprocessing(load_image(path)[1])[None]
    logits = model.module.eval()(x)
    hook.remove()
    (grad,) = torch.autograd.grad(logits[0, cls], captured["out"])
    return grad[0].permute(1, 2, 0).numpy()


def test_maps_without_stored_gradients_are_recomputed_with_the_model(runs):
    run_dir, copies = runs
    kept, lost = sacv.open_run(str(run_dir)), sacv.open_run(str(copies["nograd"]))
    assert not lost.kept_gradients and "not kept" in repr(lost)
    with pytest.raises(KeyError, match="keep_gradients"):
        lost.gradients("features.2")
    for layer, row in [("features.2", 1), ("features.0", 8)]:
        stored, recomputed = kept.maps(row, layer, "chequered"), lost.maps(row, layer, "chequered")
        assert stored.attrs["gradients"] == "stored" and recomputed.attrs["gradients"] == "recomputed"
        scale = float(np.abs(stored.sel(map="S_kc")).max())
        np.testing.assert_allclose(
            recomputed.sel(map="S_kc"), stored.sel(map="S_kc"), atol=1e-3 * scale
        )  # float16 both
        np.testing.assert_array_equal(recomputed.sel(map="S_k"), stored.sel(map="S_k"))
    assert np.isnan(lost.maps(1, "features.2", "chequered", recompute=False).sel(map="S_kc")).all()
    other = kept.maps(1, "features.2", "chequered", class_="horse")  # not the image's target: recomputed
    assert other.attrs["gradients"] == "recomputed" and other.attrs["class_index"] == 3
    v, _ = kept.concept_vector("features.2", "chequered")
    reference = np.einsum(
        "hwc,c->hw", _torch_gradient(other.attrs["path"], 2, 3).astype(np.float16).astype(np.float64), v
    )
    np.testing.assert_allclose(other.sel(map="S_kc"), reference, rtol=1e-4, atol=1e-8)


def test_older_stores_are_read_and_unknown_formats_refused_by_version(runs):
    _, copies = runs
    old = sacv.open_run(str(copies["old"]))
    assert old.class_names == ["cat", None, "zebra"]  # only the classes named in the contributions table
    assert list(old.top_images("features.2", "dotted", "zebra", n=2)["row"]) == list(
        sacv.open_run(str(copies["nograd"])).top_images("features.2", "dotted", 2, n=2)["row"]
    )
    with pytest.raises(StoreMismatch, match="store format 2; this version of sacv reads format\\(s\\) 1"):
        sacv.open_run(str(copies["future"]))
    with pytest.raises(StoreMismatch, match="records no format version"):
        sacv.open_run(str(copies["noformat"]))


def test_overlay_draws_the_maps_upsampled_on_the_model_input(runs):
    run_dir, copies = runs
    run = sacv.open_run(str(run_dir))
    maps = [run.maps(r, "features.2", "striped") for r in (0, 5)]
    pictures = [run.picture(r) for r in (0, 5)]
    assert pictures[0].shape == (32, 32, 3) and pictures[0].dtype == np.uint8
    fig = sacv.plot.overlay(maps, pictures)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6  # 3 rows x 2 images, plus 3 colour bars
    s_kc_panel = [ax for ax in panels if ax.get_subplotspec().rowspan.start == 2][1]  # row S_kc, image 2
    np.testing.assert_allclose(
        s_kc_panel.images[1].get_array(), upsample_map(maps[1].sel(map="S_kc").to_numpy(), (32, 32))
    )
    vmax = max(float(np.abs(m.sel(map="S_kc")).max()) for m in maps)
    assert s_kc_panel.images[1].norm.vmax == pytest.approx(vmax, rel=1e-6)  # one symmetric scale per row
    bare = sacv.plot.overlay(sacv.open_run(str(copies["nograd"])).maps(0, "features.2", "striped", recompute=False))
    assert len([ax for ax in bare.axes if ax.images]) == 2  # no S_kc row without gradients


def test_import_sacv_stays_light():
    heavy = "{'prefect', 'torch', 'xarray', 'zarr'}"
    code = f"import sys, sacv; print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy}))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]
    )
    assert out.stdout.strip() == "[]"  # the API and plots load on first use (test_layering: never prefect)
    assert sacv.open_run is sacv.api.open_run and sacv.plot.overlay.__module__ == "sacv.plot"


def test_the_example_notebook_runs_end_to_end(runs, tmp_path):
    """The notebook runs in a Jupyter kernel on the small run as scripts/example_notebook.py runs it on
    the demo's; the outputs committed with it come from the code committed with it."""
    run_dir, _ = runs
    stored = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in stored.cells if cell.cell_type == "code"]
    assert stored.metadata["sacv"]["code_sha256"] == example_notebook.code_hash(stored), (
        "the notebook's code changed since its outputs were made: run scripts/example_notebook.py"
    )
    assert all(cell.outputs for cell in code) and NOTEBOOK.stat().st_size < 1_000_000
    nb = copy.deepcopy(stored)
    facts = "strongest=(layer, concept, cls), top=top, lowest=lowest, panels=len([a for a in fig.axes if a.images])"
    nb.cells.append(nbformat.v4.new_code_cell(f"pd.to_pickle(dict({facts}), {str(tmp_path / 'ns.pkl')!r})"))
    example_notebook.execute(nb, str(run_dir), timeout=300)
    assert [cell.source for cell in nb.cells[:-1]] == [cell.source for cell in stored.cells]
    for ran, kept in zip([cell for cell in nb.cells if cell.cell_type == "code"], code):
        # the same kinds of outputs as the stored ones: tables as HTML, the figure as a PNG
        kinds = [
            [(o.output_type, sorted(o.get("data", {}))) for o in c.outputs if o.output_type != "stream"]
            for c in (ran, kept)
        ]
        assert kinds[0] == kinds[1]
    assert any("image/png" in o.get("data", {}) for cell in code for o in cell.outputs)
    namespace = pd.read_pickle(tmp_path / "ns.pkl")
    run = sacv.open_run(str(run_dir))
    strongest = run.contributions().sort_values("z", key=abs, ascending=False).iloc[0]
    layer, concept, cls = strongest["layer"], strongest["concept"], strongest["class_name"]
    assert namespace["strongest"] == (layer, concept, cls)
    pd.testing.assert_frame_equal(namespace["top"], run.top_images(layer, concept, cls, n=3))
    pd.testing.assert_frame_equal(namespace["lowest"], run.top_images(layer, concept, cls, n=3, lowest=True))
    assert namespace["panels"] == 3 * 6


def test_the_report_shows_the_notebook_figure(runs):
    from sacv.report.build import _chosen_rows, build_report
    from sacv.report.figures import figure_uri

    run_dir, _ = runs
    page = Path(build_report(str(run_dir))).read_text(encoding="utf-8")
    run = sacv.open_run(str(run_dir))
    row = _chosen_rows(run.table("contributions"))[0].iloc[0]  # the report's first section
    ranked = run.top_images(row["layer"], row["concept"], int(row["class_index"]), n=None)
    rows = list(ranked["row"][:3]) + [r for r in list(ranked["row"])[::-1][:3] if r not in list(ranked["row"][:3])]
    sums = ranked.set_index("row")["s_kc_sum"]
    labels = [
        f"{'top' if i < 3 else 'bottom'} {i + 1 if i < 3 else i - 2}\nΣS→c = {sums[r]:.3g}" for i, r in enumerate(rows)
    ]
    fig = sacv.plot.overlay(
        [run.maps(r, row["layer"], row["concept"]) for r in rows], [run.picture(r) for r in rows], labels
    )
    assert figure_uri(fig, photo=True) in page  # byte for byte the same image
