"""Image collections -> the images and rejects tables, and the shard plan.

Two groups of images go into the store:
- ``guidance``: concept folders (role ``concept``, concept = folder name) and, if configured, a
  separate random pool (role ``random``);
- ``dataset``: the audit images (role ``dataset``), from class folders or a manifest.

Every file is listed, read and hashed (``image_id``) while scanning, and its header checked (type,
size limits) without decoding pixels; files of unsupported types, unreadable files and bad headers go
to the rejects table with their stage and reason. A file whose ``stamp`` (size and modification time)
equals the one recorded in the previous images table is not read again: it keeps its id. Pixel data
is decoded once, by the extraction shard that owns the image; a shard that cannot decode an image
quarantines it (status ``rejected``: it keeps its row, recorded in the rejects table by
``sacv.extract.extraction.record_shard_rejects``), and later scans keep it rejected without trying again
until its content changes.

Rows are append-only for the life of the store. Within a group, each distinct image gets one store
row (duplicates under other names point to the same row). The first scan orders rows by
(concept/label, image_id); later scans keep every known image's row (renaming or moving a file
changes no row), give new images new rows after the last row of the group (in the same order), and
mark images no longer found ``removed`` (``removed_in`` = the audit that noticed), never moving or
reusing their rows. Rows are cut into shards of ``shard_size`` = Zarr chunks, so only the shards
that gain rows change.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd

from sacv.errors import NotYetRun
from sacv.extract.image_sources import Candidate
from sacv.io.images import ImageRejected, check_supported, file_stamp, image_id, probe_image, read_bytes
from sacv.io.rundir import RunDir
from sacv.io.storage import is_local_path

IMAGE_COLUMNS = [
    "image_id",
    "path",
    "group",
    "role",
    "concept",
    "label",
    "mask",
    "row",
    "shard",
    "status",
    "stamp",
    "added_in",
    "removed_in",
]
STORED = ("ok", "rejected", "removed")  # statuses that own a store row (a duplicate points to another image's row)
LIVE = ("ok", "rejected")  # found by the last scan and owning a row
REJECT_COLUMNS = ["path", "group", "stage", "reason", "image_id"]  # image_id: set for rejects found after hashing


CANDIDATE_COLUMNS = ["path", "group", "role", "concept", "label", "mask", "known_stamp", "known_id"]
CHECK_COLUMNS = ["path", "image_id", "stamp", "stage", "reason"]
CHECKS_PER_CALL = 64  # files one call to a scan process checks (amortises the pipe's overhead)


def candidate_frame(candidates: list[Candidate], previous: pd.DataFrame | None) -> pd.DataFrame:
    """The candidates as a table (``CANDIDATE_COLUMNS``) with the stamp and id that the previous
    images table records for each path (a file whose stamp is unchanged is not read again)."""
    frame = pd.DataFrame([c.__dict__ for c in candidates], columns=CANDIDATE_COLUMNS[:6])
    frame["label"] = frame["label"].astype("Int64")
    known_stamp, known_id = {}, {}
    if previous is not None:
        seen = previous.reindex(columns=IMAGE_COLUMNS)
        seen = seen[seen["status"] != "removed"].dropna(subset=["stamp"])
        known_stamp, known_id = dict(zip(seen["path"], seen["stamp"])), dict(zip(seen["path"], seen["image_id"]))
    frame["known_stamp"] = frame["path"].map(known_stamp).astype(object)
    frame["known_id"] = frame["path"].map(known_id).astype(object)
    return frame


def _check(path: str, known_stamp, known_id, max_pixels: int, min_size: int) -> tuple:
    """(path, image_id, stamp, stage, reason): type, bytes, content id and header (no pixel
    decoding); a file whose stamp is known keeps its id unread."""
    stamp = file_stamp(path)
    if stamp is not None and isinstance(known_stamp, str) and known_stamp == stamp:
        return path, known_id, stamp, None, None
    try:
        check_supported(path)
        data = read_bytes(path)
        probe_image(data, max_pixels=max_pixels, min_size=min_size)
        return path, image_id(data), stamp, None, None
    except ImageRejected as rejected:
        return path, None, None, rejected.stage, rejected.reason


def check_chunk(jobs: list[tuple], max_pixels: int, min_size: int) -> list[tuple]:
    """:func:`_check` of each (path, known stamp, known id): one call to a scan process."""
    return [_check(*job, max_pixels, min_size) for job in jobs]


def check_files(
    frame: pd.DataFrame, max_pixels: int, min_size: int, threads: int = 4, processes: int = 0
) -> pd.DataFrame:
    """Read, hash and check the header of every file of ``frame`` (rows of :func:`candidate_frame`)
    in a pool of ``processes`` (the process's decode pool, ``sacv.extract.decode_pool``), else in
    ``threads``, ``CHECKS_PER_CALL`` files per call; one row per file, in order, ``CHECK_COLUMNS``
    (stage and reason set for a reject). The per-file work is mostly Python, so threads only help
    while they wait for remote reads: local paths are checked in one thread (on two cores, four
    threads took twice as long, one call per file as long again: measured)."""
    jobs = list(zip(frame["path"], frame["known_stamp"], frame["known_id"]))
    chunks = [jobs[i : i + CHECKS_PER_CALL] for i in range(0, len(jobs), CHECKS_PER_CALL)]
    check = functools.partial(check_chunk, max_pixels=max_pixels, min_size=min_size)
    if processes:
        from sacv.extract.decode_pool import map_in_processes  # here: the catalog is read without torch elsewhere

        checked = [row for rows in map_in_processes(check, chunks, processes) for row in rows]
    else:
        workers = 1 if all(map(is_local_path, frame["path"])) else threads
        with ThreadPoolExecutor(workers) as pool:
            checked = [row for rows in pool.map(check, chunks) for row in rows]
    return pd.DataFrame(checked, columns=CHECK_COLUMNS).astype(object)


def catalog_from_checks(
    frame: pd.DataFrame,
    checked: pd.DataFrame,
    shard_size: int,
    previous: pd.DataFrame | None = None,
    audit_id: str | None = None,
    known_rejects: pd.DataFrame | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The (images, rejects) tables from the candidates ``frame`` and their ``checked`` rows (same
    order), with rows kept from ``previous`` (see the module doc).

    ``known_rejects``: the previous rejects table; an image whose (path, image_id) a shard could not
    decode before keeps its row with status ``rejected`` and its reject row, and is not tried again.
    """
    quarantined = {}
    if known_rejects is not None and "image_id" in known_rejects.columns:
        decode = known_rejects[known_rejects["image_id"].notna()]
        quarantined = {
            (p, i): (s, r) for p, i, s, r in zip(decode["path"], decode["image_id"], decode["stage"], decode["reason"])
        }
    if frame["path"].tolist() != checked["path"].tolist():
        raise ValueError("the checked files do not match the listed candidates; plan the extraction again")
    frame, checked = frame.reset_index(drop=True), checked.reset_index(drop=True)
    bad = checked["stage"].notna()
    rejects = [
        {"path": p, "group": g, "stage": s, "reason": r, "image_id": None}
        for p, g, s, r in zip(
            frame.loc[bad, "path"], frame.loc[bad, "group"], checked.loc[bad, "stage"], checked.loc[bad, "reason"]
        )
    ]
    found = frame.loc[~bad, CANDIDATE_COLUMNS[:6]].assign(
        image_id=checked.loc[~bad, "image_id"], stamp=checked.loc[~bad, "stamp"]
    )
    for path, group, content_id in zip(found["path"], found["group"], found["image_id"]):
        if (path, content_id) in quarantined:
            stage, reason = quarantined[path, content_id]
            rejects.append({"path": path, "group": group, "stage": stage, "reason": reason, "image_id": content_id})
    found = found[["image_id", "path", "group", "role", "concept", "label", "mask", "stamp"]]
    if previous is not None:
        previous = previous.reindex(columns=IMAGE_COLUMNS)  # tables written before a column existed
    images = assign_rows(found.reset_index(drop=True), previous, shard_size, audit_id)
    keep_out = {(r["path"], r["image_id"]) for r in rejects if r["image_id"] is not None}
    if keep_out:
        is_known = pd.Series(list(zip(images["path"], images["image_id"])), index=images.index).isin(keep_out)
        images.loc[is_known & (images["status"] == "ok"), "status"] = "rejected"
    return images, pd.DataFrame(rejects, columns=REJECT_COLUMNS)


def scan(
    candidates: list[Candidate],
    shard_size: int,
    max_pixels: int,
    min_size: int,
    threads: int = 4,
    previous: pd.DataFrame | None = None,
    audit_id: str | None = None,
    known_rejects: pd.DataFrame | None = None,
    processes: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """List, check and catalogue in one call (:func:`candidate_frame`, :func:`check_files` in
    ``threads`` or ``processes``, :func:`catalog_from_checks`); the extraction flow runs the checks
    in batches, as tasks."""
    frame = candidate_frame(candidates, previous)
    checked = check_files(frame, max_pixels, min_size, threads, processes)
    return catalog_from_checks(frame, checked, shard_size, previous, audit_id, known_rejects)


def assign_rows(
    found: pd.DataFrame, previous: pd.DataFrame | None, shard_size: int, audit_id: str | None
) -> pd.DataFrame:
    """The images table: ``found`` (the readable candidates with their ids) placed on store rows.

    Known images (status ok or rejected in ``previous``) keep their rows and ``added_in``; new
    distinct images get the next rows of their group in (concept/label, image_id) order; previously
    known images not found are kept with status ``removed`` and ``removed_in = audit_id``; removed
    rows stay removed (an image that comes back gets a new row). Further copies of an image are
    ``duplicate`` rows. Every found image comes out ``ok``: the scan marks known rejects.
    """
    found = found.assign(label=found["label"].astype("Int64"), status="ok", added_in=audit_id, removed_in=None)
    found = found.sort_values(["group", "concept", "label", "image_id", "path"], na_position="first", kind="stable")
    if previous is None:
        previous = pd.DataFrame(columns=IMAGE_COLUMNS)
    parts = []
    for group in sorted(set(found["group"]) | set(previous["group"])):
        part, old = found[found["group"] == group].copy(), previous[previous["group"] == group]
        live = old[old["status"].isin(LIVE)]
        row_of = dict(zip(live["image_id"], live["row"].astype(int)))
        added_of = {i: a for i, a in zip(live["image_id"], live["added_in"]) if isinstance(a, str)}
        stored = old.loc[old["status"].isin(STORED), "row"]
        next_row = int(stored.max()) + 1 if len(stored) else 0
        first = ~part["image_id"].duplicated()
        for content_id in part.loc[first, "image_id"]:
            if content_id not in row_of:
                row_of[content_id], next_row = next_row, next_row + 1
        part["row"] = part["image_id"].map(row_of)
        part["added_in"] = [added_of.get(i, audit_id) for i in part["image_id"]]
        part.loc[~first, "status"] = "duplicate"
        gone = live[~live["image_id"].isin(part["image_id"])].assign(status="removed", removed_in=audit_id)
        parts += [part, old[old["status"] == "removed"], gone]
    images = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else found
    images = images.reindex(columns=IMAGE_COLUMNS)
    images["row"] = images["row"].astype("Int64")
    images["label"] = images["label"].astype("Int64")
    images["shard"] = (images["row"] // shard_size).astype("Int64")
    images["duplicate"] = images["status"] == "duplicate"
    images = images.sort_values(["group", "row", "duplicate"], kind="stable")
    return images[IMAGE_COLUMNS].reset_index(drop=True)


IMAGES_ROW_GROUP = 32_768  # rows per row group of images.parquet: a shard task reads the one or two holding its rows
IMAGES_STATISTICS = ["group", "row", "shard"]  # columns with row-group min/max statistics (the rest: a smaller footer)
SHARED_CATALOGS = 2  # catalogs ImageCatalog.shared keeps per process (the most recent (run, group) pairs)
_SHARED_LOCK = threading.Lock()
_SHARED: dict[tuple[str, str | None], tuple[str, ImageCatalog]] = {}  # (run uri, group) -> (table stamp, catalog)


def write_images(run: RunDir, images: pd.DataFrame) -> None:
    """Write ``tables/images.parquet`` (columns ``IMAGE_COLUMNS``) sorted by (group, row), so each
    shard's rows are contiguous, in row groups of at most ``IMAGES_ROW_GROUP`` rows of one group,
    with min/max statistics of ``IMAGES_STATISTICS``: :meth:`ImageCatalog.for_shards` reads only
    the row groups of its shards."""
    ordered = images.sort_values(["group", "row"], kind="stable").reset_index(drop=True)
    run.write_table("images", ordered, IMAGES_ROW_GROUP, split_by="group", statistics=IMAGES_STATISTICS)


class ImageCatalog:
    """``tables/images.parquet``, or the part of it a task needs: which store rows hold which images.

    ``frame``: the rows read (columns ``IMAGE_COLUMNS``): the whole table (:meth:`read`,
    ``ImageCatalog(table)``), or one group's rows, or some of its shards' (:meth:`for_shards`),
    whose lookups outside that ``scope`` raise. Duplicates point to the row of their first copy and
    are skipped by every lookup below, as are removed and quarantined images (except in
    ``stored_rows``, the extraction stage's view of a shard's region).
    """

    def __init__(self, frame: pd.DataFrame, scope: tuple[str, frozenset[int] | None] | None = None):
        """``scope``: None (the whole table), or (group, shards) that ``frame`` holds every row of
        (shards None: the whole group)."""
        self.frame, self.scope = frame, scope
        self._ok = frame[frame["status"] == "ok"]
        self._stored = frame[frame["status"].isin(STORED)]
        self._index: dict[bool, tuple[pd.DataFrame, dict[tuple[str, int], slice]]] = {}  # stored? -> (rows, slices)

    def _require(self, group: str | None, shard: int | None = None) -> None:
        """Raise unless ``frame`` holds every row of ``group`` (of ``shard`` when given; group None:
        of the whole table)."""
        if self.scope is None:
            return
        held_group, held = self.scope
        if group == held_group and (held is None or shard in held):
            return
        what = f"the {held_group} rows" if held is None else f"{held_group} shards {sorted(held)}"
        raise ValueError(
            f"this catalog holds only {what} of images.parquet; read the rows a lookup needs with "
            "ImageCatalog.for_shards(run, group, shards), or the whole table with ImageCatalog.read(run)"
        )

    def _shard(self, stored: bool, group: str, shard: int) -> pd.DataFrame:
        """One shard's rows in row order. The first call sorts the rows once by (group, row) and
        finds where each (group, shard) starts and stops; each call then slices (no per-shard frames
        are built for shards nobody asks for: a task asks for a few of a million images' shards)."""
        self._require(group, shard)
        if stored not in self._index:
            rows = (self._stored if stored else self._ok).sort_values(["group", "row"], kind="stable")
            groups, shards = rows["group"].to_numpy(), rows["shard"].to_numpy(dtype=np.int64)
            change = np.ones(len(rows), dtype=bool)  # a shard's rows are contiguous once sorted by row
            change[1:] = (groups[1:] != groups[:-1]) | (shards[1:] != shards[:-1])
            starts = np.flatnonzero(change)
            stops = np.r_[starts[1:], len(rows)].astype(np.int64)
            self._index[stored] = (
                rows,
                {(groups[a], int(shards[a])): slice(int(a), int(b)) for a, b in zip(starts, stops)},
            )
        rows, slices = self._index[stored]
        where = slices.get((group, shard))
        return rows.iloc[where] if where is not None else self.frame.iloc[:0]

    @classmethod
    def read(cls, run: RunDir) -> ImageCatalog:
        """The whole table (planning, the API; a per-shard task reads :meth:`for_shards`)."""
        frame = run.read_table("images")
        if frame is None:
            raise NotYetRun(f"{run.uri} has no images table; run the extract stage first")
        return cls(frame)

    @classmethod
    def for_shards(cls, run: RunDir, group: str, shards: Iterable[int] | None = None) -> ImageCatalog:
        """The rows of ``group`` (of ``shards`` only, when given), read from just the row groups of
        ``images.parquet`` that hold them (:func:`write_images`, ``RunDir.read_table_rows``): what a
        per-shard task needs, at any table size. Its lookups of those rows answer as :meth:`read`'s."""
        held = None if shards is None else frozenset(int(s) for s in shards)
        where = {"group": [group]} | ({} if held is None else {"shard": sorted(held)})
        frame = run.read_table_rows("images", where)
        if frame is None:
            raise NotYetRun(f"{run.uri} has no images table; run the extract stage first")
        return cls(frame, (group, held))

    @classmethod
    def shared(cls, run: RunDir, group: str | None = None) -> ImageCatalog:
        """:meth:`read` (with ``group``: :meth:`for_shards` of the whole group), kept for the process
        while ``images.parquet`` is unchanged (same size, modification time and ETag): tasks of a stage
        that each look up a few images by id share one read. Read-only: never modify it."""
        stamp = run.table_stamp("images")
        key = run.uri, group
        with _SHARED_LOCK:  # tasks of one process run in threads
            cached = _SHARED.get(key)
            if cached is None or stamp is None or cached[0] != stamp:
                catalog = cls.read(run) if group is None else cls.for_shards(run, group)
                cached = _SHARED[key] = stamp, catalog
                while len(_SHARED) > SHARED_CATALOGS:
                    _SHARED.pop(next(iter(_SHARED)))
            return cached[1]

    def rows(self, group: str, shard: int | None = None) -> pd.DataFrame:
        """The distinct images of ``group`` (of one shard when given), in store-row order."""
        if shard is not None:
            return self._shard(False, group, shard)
        self._require(group)
        return self._ok[self._ok["group"] == group].sort_values("row")

    def current(self) -> pd.DataFrame:
        """The usable images found by the last scan, duplicates included (no removed or quarantined ones)."""
        self._require(None)
        frame = self.frame
        return frame[frame["status"].isin(("ok", "duplicate")) & frame["image_id"].isin(self._ok["image_id"])]

    def stored_rows(self, group: str, shard: int) -> pd.DataFrame:
        """Every store row of one shard, removed and quarantined ones included, in row order: the
        shard's region (rows ``shard * shard_size`` on, contiguous)."""
        return self._shard(True, group, shard)

    def shards(self, group: str) -> list[int]:
        """The shard numbers of ``group`` that hold current images, ascending (empty when none)."""
        self._require(group)
        return sorted(int(s) for s in self._ok.loc[self._ok["group"] == group, "shard"].unique())

    def row_of(self, image_ids, group: str = "guidance") -> np.ndarray:
        """Store rows (int64) of the given content ids within ``group``, in the order given."""
        self._require(group)
        part = self._ok[self._ok["group"] == group]
        lookup = pd.Series(part["row"].to_numpy(dtype=np.int64), index=part["image_id"].to_numpy())
        ids = list(image_ids)
        unknown = [i for i in ids if i not in lookup.index]
        if unknown:
            raise KeyError(
                f"{len(unknown)} image ids are not in the {group} rows of images.parquet "
                f"(e.g. {unknown[0]}); the plan is older than the store: run the stage again"
            )
        return lookup.loc[ids].to_numpy(dtype=np.int64)
