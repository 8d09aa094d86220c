"""Device JPEG decoding (``extract.decoder: torchvision``), checked on the CPU where torchvision
decodes with libjpeg: the same pixels as PIL, the same rejects, the same store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flows.extract import run_extract
from sacv.config import numeric_mode
from sacv.demo import textures
from sacv.io.device_decode import EncodedJpeg, decode_batch, read_for_device
from sacv.io.images import ImageRejected, load_image
from sacv.io.rundir import RunDir
from sacv.method.models import Preprocessing
from tests.flow_helpers import make_config, store_arrays, write_collection

PRE = Preprocessing(resize=64, crop=56, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
LIMITS = {"max_pixels": 10**8, "min_size": 8}
CPU = torch.device("cpu")


def jpeg(path, size, seed, mode="RGB", **save):
    rng = np.random.default_rng(seed)
    image = Image.fromarray(textures.scene(max(size), "striped", rng)[0]).resize(size).convert(mode)
    image.save(path, "JPEG", quality=90, **save)
    return str(path)


@pytest.mark.parametrize("size", [(64, 64), (120, 80), (300, 200), (40, 50), (57, 700)])
def test_device_decoding_gives_pil_pixels_within_one_level(tmp_path, size):
    """Downscaling, upscaling (smaller than the crop) and odd aspect ratios: at most two 8-bit
    levels apart anywhere (the resize kernels round differently), under 0.1 level on average."""
    path = jpeg(tmp_path / "a.jpg", size, seed=sum(size))
    _, reference = load_image(path, **LIMITS)
    content_id, encoded = read_for_device(path, **LIMITS)
    assert isinstance(encoded, EncodedJpeg) and content_id == load_image(path, **LIMITS)[0]
    (decoded,) = decode_batch([encoded], PRE, CPU)
    levels = ((decoded - PRE(reference)) * 0.25 * 255).abs()  # back to 8-bit levels
    assert decoded.shape == (3, 56, 56) and decoded.dtype == torch.float32
    assert float(levels.max()) <= 2.0 + 1e-4 and float(levels.mean()) <= 0.1


def test_files_the_device_cannot_take_go_through_pil_with_the_same_rejects(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(textures.scene(64, "striped", np.random.default_rng(0))[0]).save(png)
    cmyk = jpeg(tmp_path / "cmyk.jpg", (64, 64), 1, mode="CMYK")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL applies it, the device decoder would not
    rotated = jpeg(tmp_path / "rotated.jpg", (80, 64), 2, exif=exif.tobytes())
    grey = jpeg(tmp_path / "grey.jpg", (64, 64), 3, mode="L")
    for path in (png, cmyk, rotated):
        assert isinstance(read_for_device(str(path), **LIMITS)[1], Image.Image), path
    assert read_for_device(str(rotated), **LIMITS)[1].size == (64, 80)  # rotated by PIL
    assert isinstance(read_for_device(grey, **LIMITS)[1], EncodedJpeg)
    data = open(grey, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # no end marker: PIL finds it truncated
    with pytest.raises(ImageRejected, match="truncated"):
        read_for_device(str(tmp_path / "cut.jpg"), **LIMITS)


def test_a_corrupt_jpeg_in_a_batch_is_rejected_and_the_others_decode(tmp_path):
    good = [read_for_device(jpeg(tmp_path / f"{i}.jpg", (64, 64), i), **LIMITS)[1] for i in range(3)]
    data = bytearray(good[1].data.numpy().tobytes())
    for k in range(len(data) // 2, len(data) - 2):  # scan data scrambled, header and end marker kept
        data[k] = 0xFF if k % 7 == 0 else data[k] ^ 0x5A
    bad = EncodedJpeg(torch.frombuffer(data, dtype=torch.uint8))
    out = decode_batch([good[0], bad, good[2]], PRE, CPU)
    assert isinstance(out[1], ImageRejected) and out[1].stage == "decode" and "corrupt" in out[1].reason
    for i in (0, 2):
        np.testing.assert_array_equal(out[i].numpy(), decode_batch([good[i]], PRE, CPU)[0].numpy())


def test_the_flow_with_device_decoding_stores_what_pil_decoding_stores(tmp_path, prefect):
    """Same collection (PNGs of four modes fall back to PIL, JPEGs decode as tensors, one corrupt
    JPEG) through both decoders: the same tables and rejects, stored activations within 1 % and
    gradients within 5 % (relative L2); the decoder is in the numeric mode, the shard digests and run.json."""
    root = write_collection(tmp_path, n_per_concept=4, n_per_class=5)
    broken = bytearray((root / "data/cat/cat_0.jpg").read_bytes())
    for k in range(len(broken) // 2, len(broken) - 2):  # scan data scrambled, end marker kept
        broken[k] = 0xFF if k % 7 == 0 else broken[k] ^ 0x5A
    (root / "data/cat/cat_broken.jpg").write_bytes(bytes(broken))
    pil = make_config(root, run="pil")
    device = make_config(root, run="device", decoder="torchvision")
    assert numeric_mode(pil) == {} and numeric_mode(device) == {"decoder": "torchvision"}
    run_extract(pil)
    run_extract(device)
    images = [RunDir(c.run_dir).read_table("images").drop(columns=["added_in"]) for c in (pil, device)]
    pd.testing.assert_frame_equal(images[0], images[1])
    rejects = [RunDir(c.run_dir).read_table("rejects")[["path", "group", "stage"]] for c in (pil, device)]
    pd.testing.assert_frame_equal(rejects[0], rejects[1])  # the reasons name each decoder's own message
    assert rejects[0]["path"].str.endswith("cat_broken.jpg").tolist() == [True]
    assert (images[0]["status"] == "rejected").sum() == 1
    expected, got = store_arrays(root / "pil"), store_arrays(root / "device")
    assert expected.keys() == got.keys()
    for key in expected:  # relative L2; a pixel one level off may flip a ReLU gate or a max-pool choice of a gradient
        a, b = got[key].astype(np.float64), expected[key].astype(np.float64)
        bound = 0.05 if key.endswith("grad") else 0.01
        assert np.linalg.norm(a - b) <= bound * np.linalg.norm(b) + 1e-12, (
            key,
            np.linalg.norm(a - b) / np.linalg.norm(b),
        )
    assert RunDir(device.run_dir).read_run_record()["numerics"]["decoder"] == "torchvision"
    markers = [RunDir(c.run_dir).read_shard_marker("dataset", 0)["digest"] for c in (pil, device)]
    assert markers[0] != markers[1]  # switching the decoder redoes the shards
