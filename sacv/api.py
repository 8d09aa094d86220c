"""A run in a notebook: ``run = sacv.open_run("runs/nightly")``.

Tables come as pandas DataFrames (or polars / DuckDB), arrays as lazy dask-backed xarray
DataArrays opened from the Zarr store as it is, and the maps of one image as a DataArray that
``sacv.plot.overlay`` draws exactly as the report does. Sign conventions as in docs/tables.md:
``v_k`` points towards the concept, ``S_k = f·v_k``, ``S_{k→c} = ∇logit_c · v_k``, decision
``S_k + b_k > 0`` where the classifier says concept.
"""

from __future__ import annotations

import difflib
import html
from dataclasses import dataclass

import dask.array as da
import numpy as np
import pandas as pd
import xarray as xr

from sacv.errors import NotYetRun
from sacv.extract.catalog import ImageCatalog
from sacv.io.rundir import RunDir
from sacv.io.zarr_store import check_readable
from sacv.method.maps import concept_maps

MAP_NAMES = ["S_k", "S_kc", "decision"]


@dataclass(frozen=True)
class ModelInfo:
    """The model a run was made with (``run.json``): spec, weights file or name (None: the spec's
    default), sha256 of its state dict, and the preprocessing (resize, crop, mean, std)."""

    spec: str
    weights: str | None
    weight_hash: str
    preprocessing: dict


def open_run(uri: str, storage_options: dict | None = None) -> Run:
    """Open a run directory (local path or fsspec URL; ``storage_options`` go to fsspec)."""
    return Run(RunDir(uri, storage_options=storage_options))


class Run:
    """One run directory, read only. Tables and the store are read when first asked for."""

    def __init__(self, rundir: RunDir):
        if not rundir.is_run():
            raise FileNotFoundError(f"{rundir.uri} is not a run directory (no run.json or tables/)")
        self.dir = rundir
        self.record: dict = rundir.read_run_record() or {}
        self.store = rundir.open_store()  # zarr.Group | None
        if self.store is not None:
            check_readable(self.store.attrs.asdict(), rundir.store_uri)
        self._tables: dict[str, pd.DataFrame] = {}
        self._catalog: ImageCatalog | None = None

    # --- what the run is ------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return self.dir.uri

    @property
    def config(self):
        """The run's validated config (``sacv.config.RunConfig``), as recorded in run.json."""
        from sacv.config import parse_config

        if "config" not in self.record:
            raise RuntimeError(f"{self.uri} has no run.json config (the extract stage has not finished)")
        return parse_config(self.record["config"], source=f"{self.uri}/run.json config")

    @property
    def model(self) -> ModelInfo | None:
        model = self.record.get("model")
        if model is None:
            return None
        return ModelInfo(
            model.get("spec"),
            (self.record.get("config", {}).get("model") or {}).get("weights"),
            model.get("weight_hash", ""),
            model.get("preprocessing") or {},
        )

    @property
    def layers(self) -> dict[str, tuple[int, int, int]]:
        """Layer -> (H, W, C) of the stored arrays."""
        layers = {} if self.store is None else self.store.attrs.get("layers", {})
        return {name: tuple(shape) for name, shape in layers.items()}

    @property
    def timings(self) -> dict:
        """Stage -> its record in run.json (status, seconds, counts)."""
        return dict(self.record.get("timings") or {})

    @property
    def audits(self) -> list[dict]:
        """The audit history recorded in run.json (empty for runs without one)."""
        return list(self.record.get("audits") or [])

    @property
    def class_names(self) -> list[str] | None:
        """Class index -> name: from the store, else (stores from before class names were recorded)
        the classes named in the contributions table, None for the others."""
        names = None if self.store is None else self.store.attrs.get("class_names")
        if names is not None:
            return list(names)
        table = self._table("contributions")
        if table is None or not len(table):
            return None
        known = dict(zip(table["class_index"].astype(int), table["class_name"]))
        return [known.get(i) for i in range(max(known) + 1)]

    @property
    def kept_gradients(self) -> bool:
        return any(f"dataset/{layer}/grad" in self.store for layer in self.layers) if self.store is not None else False

    # --- tables ---------------------------------------------------------------------------------

    def table_names(self) -> list[str]:
        return self.dir.table_names()

    def _table(self, name: str) -> pd.DataFrame | None:
        if name not in self._tables:
            table = self.dir.read_table(name)
            if table is None:
                return None
            self._tables[name] = table
        return self._tables[name]

    def table(self, name: str, engine: str = "pandas", columns: list[str] | None = None, **where):
        """Table ``name`` through ``engine`` (``sacv.io.table_scan``: pandas now; pyarrow, duckdb,
        polars, dask lazily), with only ``columns`` (None: all) and the rows where each keyword's
        column equals its value (or is in its list). ``class_`` (a name or index) filters the class
        column (``target`` or ``class_index``), ``image`` (an image_id, or a store row) the image.
        ``image_scores`` is a dataset of one file per shard: give filters, or a lazy engine, at scale.
        E.g. ``run.table("image_scores", layer="_blocks.8", concept="striped", class_="zebra")``."""
        from sacv.io.table_scan import scan

        if name not in self.table_names():
            close = difflib.get_close_matches(name, self.table_names(), n=3)
            raise KeyError(f"{self.uri} has no table {name!r}; tables: {self.table_names()} (close: {close})")
        if engine == "pandas" and columns is None and not where:
            cached = self._table(name)
            return cached.copy()
        dataset = self.dir.dataset(name)
        if dataset is None:
            raise NotYetRun(f"{self.uri} lists no files of {name}; run the score stage again")
        if "class_" in where:
            column = "target" if "target" in dataset.schema.names else "class_index"
            where[column] = self.class_index(where.pop("class_"))
        if "image" in where:
            image = where.pop("image")
            where["row" if isinstance(image, (int, np.integer)) else "image_id"] = image
        return scan(dataset, self.dir.table_files(name), self.dir.fs, engine, columns, where)

    # --- arrays ---------------------------------------------------------------------------------

    def _require_store(self):
        if self.store is None:
            raise RuntimeError(f"{self.uri} has no store.zarr; run the extract stage first")
        return self.store

    def _catalog_rows(self, group: str) -> pd.DataFrame:
        if self._catalog is None:
            self._catalog = ImageCatalog.read(self.dir)
        return self._catalog.rows(group)

    def _dataset_rows(self, rows) -> pd.DataFrame:
        """The current dataset images at these store rows: from the catalog when it is loaded, else
        from the row groups of ``images.parquet`` that hold them (a few of millions of rows)."""
        if self._catalog is not None:
            part = self._catalog.rows("dataset")
            return part[part["row"].isin(list(rows))]
        part = self.dir.read_table_rows("images", {"group": ["dataset"], "row": [int(r) for r in rows]})
        if part is None:
            raise NotYetRun(f"{self.uri} has no images table; run the extract stage first")
        return part[part["status"] == "ok"]

    def _image_array(self, path: str, group: str) -> xr.DataArray:
        store = self._require_store()
        if path not in store:
            raise KeyError(f"{self.uri} has no array {path}; layers in the store: {list(self.layers)}")
        array = store[path]
        rows = self._catalog_rows(group).set_index("row").reindex(range(array.shape[0]))  # a gap: empty coords
        coords = {
            "image_id": ("image", rows["image_id"].fillna("").to_numpy(dtype=str)),
            "path": ("image", rows["path"].fillna("").to_numpy(dtype=str)),
            "label": ("image", rows["label"].astype("Int64").fillna(-1).to_numpy(dtype=np.int64)),  # -1: none
        }
        if group == "guidance":
            coords["concept"] = ("image", rows["concept"].fillna("").to_numpy(dtype=str))
        else:
            coords["target"] = ("image", store["dataset/targets"][...])
        data = xr.DataArray(
            da.from_zarr(array),
            dims=("image", "row", "col", "channel"),
            coords=coords,
            name=path.rsplit("/", 1)[-1],
            attrs={"layer": path.split("/")[1], "group": group},
        )
        return data.set_xindex("image_id")

    def activations(self, layer: str, group: str = "dataset") -> xr.DataArray:
        """``<group>/<layer>/act`` (image, row, col, channel), lazy; coords image_id (indexed:
        ``.sel(image_id=...)``), path, label (-1: none), and target (dataset) or concept (guidance)."""
        if group not in ("dataset", "guidance"):
            raise ValueError(f"group must be 'dataset' or 'guidance', got {group!r}")
        return self._image_array(f"{group}/{layer}/act", group)

    def gradients(self, layer: str) -> xr.DataArray:
        """``dataset/<layer>/grad``: gradient of each image's target logit, laid out as the activations."""
        if f"dataset/{layer}/grad" not in self._require_store():
            raise KeyError(
                f"{self.uri} kept no gradients of {layer!r} (extract.keep_gradients: false); "
                "run.maps(...) recomputes them with the model"
            )
        return self._image_array(f"dataset/{layer}/grad", "dataset")

    def _vector_rows(self, layer: str) -> pd.DataFrame:
        vectors = self._table("vectors")
        if vectors is None or layer not in set(vectors["layer"]):
            raise KeyError(f"no fitted vectors for layer {layer!r} in {self.uri}; run the fit stage")
        return vectors[vectors["layer"] == layer].sort_values("vector_row")

    def vectors(self, layer: str) -> xr.DataArray:
        """Unit vectors ``v`` (vector, channel) of ``layer`` with coords concept, random_set, kind,
        offset (``b``) and bal_acc (held-out balanced accuracy), one row per fitted vector."""
        rows = self._vector_rows(layer)
        group = self._require_store()[f"vectors/{layer}"]
        per_vector = {c: ("vector", rows[c].to_numpy()) for c in ("concept", "random_set", "kind", "bal_acc")}
        return xr.DataArray(
            da.from_zarr(group["v"]),
            dims=("vector", "channel"),
            name="v",
            attrs={"layer": layer},
            coords={"vector": rows["vector_row"].to_numpy(), **per_vector, "offset": ("vector", group["b"][...])},
        )

    def concept_vector(self, layer: str, concept: str, random_set: str | None = None) -> tuple[np.ndarray, float]:
        """(unit vector (C,) float32, offset): the mean of the concept's unit vectors over its random
        sets, rescaled to unit length with its offset (decision ``f·mean(v) + mean(b)`` keeps its
        sign), or the one vector fitted against ``random_set``."""
        vectors = self.vectors(layer)
        own = (vectors["kind"] == "concept") & (vectors["concept"] == concept)
        if random_set is not None:
            own &= vectors["random_set"] == random_set
        if not bool(own.any()):
            known = sorted(set(vectors["concept"].to_numpy()))
            raise KeyError(
                f"no concept vector {concept!r}{'' if random_set is None else ' / ' + random_set} at "
                f"{layer!r}; concepts: {known}"
            )
        chosen = vectors.isel(vector=own.to_numpy())
        mean = chosen.to_numpy().mean(axis=0)
        norm = float(np.linalg.norm(mean)) or 1.0
        return mean / norm, float(chosen["offset"].to_numpy().mean()) / norm

    # --- images and maps ------------------------------------------------------------------------

    def image(self, image: str | int) -> pd.Series:
        """The dataset image named by its image_id, its path (or file name, when unique) or its store row."""
        if isinstance(image, (int, np.integer)):
            rows = found = self._dataset_rows([image])
        else:
            rows = self._catalog_rows("dataset")
            found = rows[(rows["image_id"] == image) | (rows["path"] == image)]
            if not len(found):
                found = rows[rows["path"].str.rsplit("/", n=1).str[-1] == image]
        if len(found) != 1:
            close = difflib.get_close_matches(str(image), list(rows["path"]) + list(rows["image_id"]), n=3)
            raise KeyError(
                f"{image!r} names {len(found)} dataset images of {self.uri}; give an image_id, path "
                f"or store row (close: {close})"
            )
        return found.iloc[0]

    def picture(self, image: str | int) -> np.ndarray:
        """The image as the model saw it (resized and cropped), (H, W, 3) uint8."""
        from sacv.io.images import load_image
        from sacv.method.models import Preprocessing

        _, picture = load_image(str(self.image(image)["path"]))
        prep = self.model.preprocessing if self.model else {}
        if prep:
            picture = Preprocessing.from_dict(prep).geometry(picture)
        return np.asarray(picture)

    def class_index(self, class_: str | int) -> int:
        """A class given by index or name -> its index."""
        if isinstance(class_, (int, np.integer)):
            return int(class_)
        names = self.class_names or []
        if class_ in names:
            return names.index(class_)
        close = difflib.get_close_matches(str(class_), [n for n in names if n], n=5)
        raise KeyError(f"class {class_!r} is not a class of the model (close names: {close}); give a name or an index")

    def maps(
        self,
        image: str | int,
        layer: str,
        concept: str,
        class_: str | int | None = None,
        random_set: str | None = None,
        recompute: bool | None = None,
    ) -> xr.DataArray:
        """Maps (map, row, col) float32 of one dataset image, ``map`` = S_k, S_kc, decision, with the
        concept vector of :meth:`concept_vector`. S_kc is for ``class_`` (default: the image's
        target): from the stored gradients, or recomputed with the model when none were kept or
        another class is asked for (``recompute=False`` leaves S_kc NaN instead, True forces it)."""
        store, info = self._require_store(), self.image(image)
        row = int(info["row"])
        target = int(store["dataset/targets"][row])
        cls = target if class_ is None else self.class_index(class_)
        vector, offset = self.concept_vector(layer, concept, random_set)
        act = store[f"dataset/{layer}/act"][row].astype(np.float32)[None]  # (1, H, W, C)
        stored = f"dataset/{layer}/grad" in store and cls == target
        if recompute is None:
            recompute = not stored
        grad, source = None, "none"
        if recompute:
            grad, source = self._recomputed_gradient(info, layer, cls), "recomputed"
        elif stored:
            grad, source = store[f"dataset/{layer}/grad"][row].astype(np.float32)[None], "stored"
        result = concept_maps(act, vector, np.array([offset]), grad)
        s_kc = np.full_like(result.s_k[0, 0], np.nan) if result.s_kc is None else result.s_kc[0, 0]
        names = self.class_names or []
        attrs = {
            "image_id": info["image_id"],
            "path": info["path"],
            "row": row,
            "layer": layer,
            "concept": concept,
            "random_set": random_set or "mean over random sets",
            "class_index": cls,
            "class_name": names[cls] if cls < len(names) and names[cls] else str(cls),
            "offset": offset,
            "gradients": source,
        }
        return xr.DataArray(
            np.stack([result.s_k[0, 0], s_kc, result.decision[0, 0]]),
            dims=("map", "row", "col"),
            coords={"map": MAP_NAMES},
            name="maps",
            attrs=attrs,
        )

    def _recomputed_gradient(self, info: pd.Series, layer: str, cls: int) -> np.ndarray:
        """Forward + backward of one image with the run's model and numeric settings; (1, H, W, C)."""
        from sacv.score.scoring import recompute_layers

        config = self.config
        config = config.model_copy(
            update={
                "layers": [layer],
                "extract": config.extract.model_copy(update={"batch_size": 1}),
                "dataset": config.dataset.model_copy(update={"target": str(cls)}),
            }
        )
        per_layer, _ = recompute_layers(config, info.to_frame().T)
        return per_layer[layer][1].astype(np.float32)

    def overlay(self, images, layer: str, concept: str, class_: str | int | None = None):
        """The report's figure (``sacv.plot.overlay``) for these dataset images; returns the figure."""
        from sacv.plot import overlay

        images = [images] if isinstance(images, (str, int, np.integer)) else list(images)
        return overlay([self.maps(i, layer, concept, class_) for i in images], [self.picture(i) for i in images])

    # --- contributions --------------------------------------------------------------------------

    def _scores_table(self, name: str) -> pd.DataFrame:
        table = self._table(name)
        if table is None:
            raise RuntimeError(f"{self.uri} has no {name} table; run the score stage")
        return table

    def contributions(
        self,
        significant: bool | None = None,
        layer: str | None = None,
        concept: str | None = None,
        class_: str | int | None = None,
    ) -> pd.DataFrame:
        """Rows of the contributions table matching every filter given (None: no filter)."""
        table = self._scores_table("contributions")
        keep = pd.Series(True, index=table.index)
        if significant is not None:
            keep &= table["significant"] == significant
        if layer is not None:
            keep &= table["layer"] == layer
        if concept is not None:
            keep &= table["concept"] == concept
        if class_ is not None:
            keep &= table["class_index"] == self.class_index(class_)
        return table[keep].copy()

    def top_images(
        self, layer: str, concept: str, class_: str | int, n: int | None = 6, lowest: bool = False
    ) -> pd.DataFrame:
        """Dataset images with target ``class_``, ranked by Σ S_{k→c} (``s_kc_sum``, mean over the
        concept's random sets), highest first, ties by row (``lowest``: the same ranking from its end); ``n=None``
        gives the whole ranking. Up to ``TOP_K`` images come from the ``top_images`` table, more from
        a scan of ``image_scores``. Columns: row, image_id, path, label, and the means of s_kc_sum,
        s_k_max, relevant_frac, positive_frac."""
        from sacv.score.tables import TOP_K, TOP_MEANS, image_means, rank_images

        target = self.class_index(class_)
        if n is not None and n <= TOP_K and "top_images" in self.table_names():
            top = self._scores_table("top_images")
            ranked = top[(top["layer"] == layer) & (top["concept"] == concept) & (top["target"] == target)]
        else:
            if "image_scores" not in self.table_names():
                raise NotYetRun(f"{self.uri} has no image_scores table; run the score stage")
            scores = self.table("image_scores", layer=layer, concept=concept, kind="concept", target=target)
            ranked = rank_images(image_means(scores))
        ranked = ranked.iloc[::-1] if lowest else ranked
        ranked = ranked if n is None else ranked.head(n)
        images = self._dataset_rows(ranked["row"]).set_index("row")[["path", "label"]]
        return ranked.join(images, on="row").reset_index(drop=True)[["row", "image_id", "path", "label", *TOP_MEANS]]

    # --- display --------------------------------------------------------------------------------

    def facts(self) -> list[tuple[str, str]]:
        """(name, value) lines of the run's summary: what ``repr`` and ``_repr_html_`` show."""
        model = self.model
        facts = [
            ("run", self.uri),
            ("model", "?" if model is None else f"{model.spec} (weights {model.weight_hash[:12]})"),
            ("layers", ", ".join(f"{n} {h}×{w}×{c}" for n, (h, w, c) in self.layers.items()) or "none"),
        ]
        images = self._table("images")
        if images is not None:
            ok = images[images["status"] == "ok"]
            facts.append(
                (
                    "images",
                    ", ".join(f"{g} {n}" for g, n in ok.groupby("group").size().items())
                    + f" (+{int((images['status'] == 'duplicate').sum())} duplicates)",
                )
            )
        if self.store is not None:
            facts.append(
                ("gradients", "kept" if self.kept_gradients else "not kept (maps recompute them with the model)")
            )
        vectors = self._table("vectors")
        if vectors is not None:
            facts.append(
                (
                    "vectors",
                    f"{int((vectors['kind'] == 'concept').sum())} concept, "
                    f"{int((vectors['kind'] == 'pseudo').sum())} pseudo-concept",
                )
            )
        table = self._table("contributions")
        if table is not None:
            facts.append(("contributions", f"{len(table)} rows, {int(table['significant'].sum())} significant"))
        stages = [
            f"{s} {t.get('status', 'done')} {t.get('seconds', '?')} s"
            for s, t in self.timings.items()
            if isinstance(t, dict)
        ]
        facts.append(("stages", ", ".join(stages) or "none recorded"))
        return facts

    def __repr__(self) -> str:
        facts = self.facts()
        width = max(len(name) for name, _ in facts)
        return "<sacv.Run>\n" + "\n".join(f"  {name:<{width}}  {value}" for name, value in facts)

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(n)}</th><td style='text-align:left'>"
            f"{html.escape(str(v))}</td></tr>"
            for n, v in self.facts()
        )
        return f"<div><b>sacv.Run</b><table>{rows}</table></div>"
