"""Decoding a shard's images in the caller, in threads and in processes: the same items in row
order, the same rejects, the same model inputs, the same store; a dead decode process is an error
that says what happened."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

import sacv.extract.decode_pool as loaders
from flows.extract import run_extract
from sacv.config import RunConfig, parse_config
from sacv.demo import textures
from sacv.extract.extraction import model_inputs
from sacv.io.images import ImageRejected, image_id
from sacv.method.models import Preprocessing
from tests.flow_helpers import make_config, store_arrays, write_collection
from tests.models import small

PRE = Preprocessing(resize=64, crop=56, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))


def shard(tmp_path, n: int = 11) -> loaders.ShardImages:
    """``n`` JPEGs and PNGs of mixed sizes, plus: a corrupt file, a file changed since planning, a
    removed and a quarantined row (both None)."""
    rows = []
    for k in range(n):
        rng = np.random.default_rng(k)
        path = tmp_path / (f"{k}.jpg" if k % 3 else f"{k}.png")
        Image.fromarray(textures.scene(40 + 13 * k, "striped", rng)[0]).save(path)
        rows.append((str(path), image_id(path.read_bytes()), "ok"))
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 20)
    rows.append((str(tmp_path / "corrupt.jpg"), image_id((tmp_path / "corrupt.jpg").read_bytes()), "ok"))
    rows.append((rows[1][0], "0" * 16, "ok"))  # its content id is not the one planned
    rows.append((rows[2][0], rows[2][1], "removed"))
    rows.append((rows[3][0], rows[3][1], "rejected"))
    frame = pd.DataFrame(rows, columns=["path", "image_id", "status"])
    return loaders.ShardImages(frame, PRE, parse_config({"run_dir": str(tmp_path / "run"), "layers": ["features.0"]}))


def as_comparable(item):
    if isinstance(item, torch.Tensor):
        return ("pixels", item.dtype, tuple(item.shape), item.numpy().tobytes())
    if isinstance(item, ImageRejected):
        return ("rejected", item.stage, item.reason)
    return item


@pytest.mark.parametrize("kind, workers", [("threads", 3), ("processes", 2)])
def test_pools_give_the_callers_items_in_row_order(tmp_path, kind, workers):
    """Two shards through a pool equal the same shards decoded in the caller, item for item:
    pixels byte for byte, the same reject reasons (corrupt, changed since planning), None for rows
    not to read."""
    first, second = shard(tmp_path / "a", 11), shard(tmp_path / "b", 5)
    expected = [[as_comparable(item) for item in items] for items in loaders.decoded_shards([first, second], 0)]
    got = [[as_comparable(item) for item in items] for items in loaders.decoded_shards([first, second], workers, kind)]
    assert got == expected
    kinds = [entry[0] if isinstance(entry, tuple) else entry for entry in expected[0]]
    assert kinds == ["pixels"] * 11 + ["rejected", "rejected", None, None]
    assert expected[0][12][2].startswith("file changed since planning")
    assert expected[0][0][1:3] == (torch.uint8, (56, 56, 3))


@pytest.fixture(autouse=True)
def _folders(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()


def test_model_inputs_normalise_pixels_as_the_preprocessing_does():
    """Stacked uint8 pixels normalised in one call equal ``Preprocessing.__call__`` of each image
    bit for bit; a reject and a None become zero rows and are reported by their index."""
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (70 + k, 64, 3), dtype=np.uint8)) for k in range(4)]
    model = dataclasses.replace(small(), preprocessing=PRE)
    reject = ImageRejected("decode", "truncated image")
    batch = [
        torch.from_numpy(PRE.pixels(images[0])),
        reject,
        torch.from_numpy(PRE.pixels(images[1])),
        None,
        *(torch.from_numpy(PRE.pixels(image)) for image in images[2:]),
    ]
    inputs, missing = model_inputs(batch, model, torch.device("cpu"))
    assert inputs.shape == (6, 3, 56, 56) and missing == {1: reject, 3: None}
    for row, image in zip([0, 2, 4, 5], images):
        assert torch.equal(inputs[row], PRE(image))
    assert not inputs[1].any() and not inputs[3].any()
    whole, none_missing = model_inputs(
        [torch.from_numpy(PRE.pixels(image)) for image in images], model, torch.device("cpu")
    )
    assert none_missing == {} and all(torch.equal(whole[k], PRE(image)) for k, image in enumerate(images))


def test_the_flow_with_decode_processes_stores_what_the_caller_stores(tmp_path, prefect):
    """The same collection (one corrupt JPEG) extracted with decoding in the model's thread and in 2
    processes: the same tables and rejects, bit-identical arrays."""
    root = write_collection(tmp_path / "c", n_per_concept=3, n_per_class=4)
    broken = bytearray((root / "data/cat/cat_0.jpg").read_bytes())
    (root / "data/cat/cat_broken.jpg").write_bytes(bytes(broken[: len(broken) // 2]))
    inline = make_config(root, run="inline")
    pooled = make_config(root, run="pooled")
    pooled = pooled.model_copy(
        update={"execution": pooled.execution.model_copy(update={"loader_workers": 2, "loader": "processes"})}
    )
    for config in (inline, pooled):
        assert run_extract(config).rejects == 1
    expected, got = store_arrays(root / "inline"), store_arrays(root / "pooled")
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)


def test_processes_with_the_device_decoder_are_refused_naming_the_fix(tmp_path):
    raw = {
        "run_dir": str(tmp_path / "run"),
        "layers": ["features.0"],
        "extract": {"decoder": "torchvision"},
        "execution": {"loader": "processes", "loader_workers": 2},
    }
    with pytest.raises(ValidationError, match="set execution.loader: threads"):
        RunConfig.model_validate(raw)
    for kind in ("threads", "auto"):
        raw["execution"]["loader"] = kind
        assert RunConfig.model_validate(raw).execution.loader == kind


def test_auto_loader_is_processes_for_pil_and_threads_for_the_device_decoder_or_a_daemon(tmp_path, monkeypatch):
    pil = shard(tmp_path / "a", 2)
    device = loaders.ShardImages(
        pil.rows,
        PRE,
        parse_config({"run_dir": str(tmp_path / "run"), "layers": ["x"], "extract": {"decoder": "torchvision"}}),
    )
    assert loaders.loader_kind("auto", [pil]) == "processes"
    assert loaders.loader_kind("auto", [device]) == loaders.loader_kind("processes", [device]) == "threads"
    assert loaders.loader_kind("threads", [pil]) == "threads"

    class Daemon:
        daemon = True

    monkeypatch.setattr(loaders.multiprocessing, "current_process", lambda: Daemon())
    assert loaders.loader_kind("auto", [pil]) == "threads"
    with pytest.raises(RuntimeError, match="distributed.worker.daemon: false"):
        loaders._pool("processes", 5)


def test_a_dead_decode_process_is_an_error_naming_it_and_the_next_call_gets_a_new_pool(tmp_path, monkeypatch):
    """A decode process that dies (planted: it exits on one file) fails the shard with a message
    saying so; the broken pool is dropped, and the next call decodes with a fresh one."""
    images = shard(tmp_path / "a", 4)
    victim = images.rows["path"].iloc[2]
    original = loaders.read_pixels

    def dies_on_victim(path, *args):
        if path == victim:
            os._exit(1)
        return original(path, *args)

    workers = 3  # a pool no other test made: this one forks with the planted function
    monkeypatch.setattr(loaders, "read_pixels", dies_on_victim)
    with pytest.raises(RuntimeError, match="a decode process died"):
        for items in loaders.decoded_shards([images], workers, "processes"):
            list(items)
    assert ("processes", workers) not in loaders._POOLS
    monkeypatch.setattr(loaders, "read_pixels", original)
    got = [as_comparable(item) for item in next(loaders.decoded_shards([images], workers, "processes"))]
    assert got == [as_comparable(item) for item in next(loaders.decoded_shards([images], 0))]


def test_decode_processes_exit_when_the_process_that_made_them_is_killed(tmp_path):
    """A SIGKILLed extraction leaves no decode process behind waiting for work."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from sacv.extract.decode_pool import _pool\n"
        "pool = _pool('processes', 2)\n"
        "pool.submit(os.getpid).result()\n"
        "print(*[p.pid for p in pool._processes.values()], flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1]
    )
    children = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(children) == 2

    def running(pid: int) -> bool:  # an exited orphan may linger as a zombie where nothing reaps it
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
        except FileNotFoundError:
            return False

    assert all(running(pid) for pid in children)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in children)


def test_the_scan_in_decode_processes_checks_what_threads_check(tmp_path):
    """Planning's file checks in the decode processes: the same rows, in order, as in threads, for
    good files, every kind of reject and a file whose known stamp keeps its id unread; the scan uses
    processes whenever there are loader workers, unless the loader is "threads"."""
    from sacv.extract.catalog import check_files
    from sacv.io.images import file_stamp

    good = []
    for k in range(70):  # more files than one call to a scan process takes
        good.append(tmp_path / (f"{k}.jpg" if k % 3 else f"{k}.png"))
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (16 + k % 5, 20, 3), dtype=np.uint8)).save(good[-1])
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all" * 20)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "tiny.png")
    paths = [
        *map(str, good),
        *(str(tmp_path / n) for n in ("corrupt.jpg", "empty.png", "text.jpg", "tiny.png", "gone.png")),
    ]
    known = paths[5]
    frame = pd.DataFrame(
        {
            "path": paths,
            "known_stamp": [file_stamp(known) if p == known else None for p in paths],
            "known_id": ["planted-known-id" if p == known else None for p in paths],
        }
    )
    in_threads = check_files(frame, 10**8, 8, threads=3)
    in_processes = check_files(frame, 10**8, 8, processes=2)
    pd.testing.assert_frame_equal(in_processes, in_threads)
    assert in_threads["stage"].notna().sum() == 5  # corrupt, empty, text, tiny, gone
    assert in_threads.loc[in_threads["path"] == known, "image_id"].item() == "planted-known-id"

    def config(decoder="pil", **execution):
        return parse_config(
            {"run_dir": str(tmp_path / "run"), "layers": ["x"], "execution": execution, "extract": {"decoder": decoder}}
        )

    assert loaders.scan_processes(config(loader_workers=3)) == 3
    assert loaders.scan_processes(config("torchvision", loader_workers=3)) == 3
    assert loaders.scan_processes(config(loader_workers=3, loader="threads")) == 0
    assert loaders.scan_processes(config(loader_workers=0)) == 0


def test_a_dead_scan_process_is_an_error_naming_it_and_the_next_call_gets_a_new_pool(tmp_path, monkeypatch):
    import sacv.extract.catalog as catalog

    paths = []
    for k in range(6):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.fromarray(np.full((12, 12, 3), k, np.uint8)).save(paths[-1])
    frame = pd.DataFrame({"path": paths, "known_stamp": [None] * 6, "known_id": [None] * 6})
    original = catalog._check

    def dies_on_victim(path, *args):
        if path == paths[3]:
            os._exit(1)
        return original(path, *args)

    workers = 5  # a pool no other test made: this one forks with the planted function
    monkeypatch.setattr(catalog, "_check", dies_on_victim)
    with pytest.raises(RuntimeError, match="a file-checking process died"):
        catalog.check_files(frame, 10**8, 8, processes=workers)
    assert ("processes", workers) not in loaders._POOLS
    monkeypatch.setattr(catalog, "_check", original)
    pd.testing.assert_frame_equal(
        catalog.check_files(frame, 10**8, 8, processes=workers), catalog.check_files(frame, 10**8, 8)
    )
