"""Image input robustness: every file is generated here with PIL/numpy (seeded)."""

from __future__ import annotations

import io
import pickle

import fsspec
import numpy as np
import pytest
from PIL import Image

from sacv.io.images import (
    ImageRejected,
    decode_image,
    image_id,
    list_images,
    load_image,
    read_bytes,
)

RNG_SEED = 0


def noise_rgb(w: int, h: int, seed: int = RNG_SEED) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img).astype(int)


# ---------------------------------------------------------------- rejections


def test_truncated_jpeg_rejected(tmp_path):
    data = encode(noise_rgb(64, 64), "JPEG", quality=90)
    assert decode_image(data).size == (64, 64)  # the full file is fine
    path = write(tmp_path / "cut.jpg", data[: len(data) // 2])
    with pytest.raises(ImageRejected) as ei:
        load_image(path)
    assert ei.value.stage == "decode"
    assert ei.value.reason == "truncated image"


def test_zero_byte_file_rejected_at_read(tmp_path):
    path = write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageRejected) as ei:
        load_image(path)
    assert (ei.value.stage, ei.value.reason) == ("read", "zero-byte file")


def test_missing_file_rejected_at_read(tmp_path):
    with pytest.raises(ImageRejected) as ei:
        read_bytes(str(tmp_path / "nope.png"))
    assert ei.value.stage == "read"
    assert "not found" in ei.value.reason


def test_text_file_named_png_rejected(tmp_path):
    path = write(tmp_path / "notes.png", b"this is not an image\n" * 10)
    with pytest.raises(ImageRejected) as ei:
        load_image(path)
    assert ei.value.stage == "decode"
    assert ei.value.reason.startswith("not an image")


def test_one_pixel_image_too_small():
    data = encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")
    with pytest.raises(ImageRejected) as ei:
        decode_image(data)
    assert ei.value.stage == "decode"
    assert ei.value.reason == "too small: 1x1 pixels < minimum 8x8"
    assert decode_image(data, min_size=1).size == (1, 1)


def test_too_small_on_one_side_only():
    data = encode(Image.new("RGB", (100, 7)), "PNG")
    with pytest.raises(ImageRejected, match="too small"):
        decode_image(data)


def test_pixel_limit_is_our_argument():
    data = encode(noise_rgb(40, 40), "PNG")
    with pytest.raises(ImageRejected) as ei:
        decode_image(data, max_pixels=1000)
    assert ei.value.stage == "decode"
    assert ei.value.reason == "too large: 1600 pixels > limit 1000"
    assert decode_image(encode(noise_rgb(25, 40), "PNG"), max_pixels=1000).size == (25, 40)


def test_pil_decompression_bomb_warning_is_a_rejection():
    # 100M pixels exceeds PIL's default limit (warning, not error) but not ours.
    data = encode(Image.new("1", (10_000, 10_000)), "PNG")
    with pytest.raises(ImageRejected) as ei:
        decode_image(data, max_pixels=10**9)
    assert ei.value.stage == "decode"
    assert ei.value.reason.startswith("too large")
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # global left untouched


def test_rejection_pickles():
    err = pickle.loads(pickle.dumps(ImageRejected("decode", "truncated image")))
    assert (err.stage, err.reason) == ("decode", "truncated image")


# ---------------------------------------------------------------- conversions


def test_cmyk_jpeg_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))  # pure cyan
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    img = decode_image(data)
    assert img.mode == "RGB"
    assert np.abs(pixels(img) - [0, 255, 255]).max() <= 8


def test_16bit_png_scaled_to_8bit():
    arr = np.full((10, 10), 65535, dtype=np.uint16)
    arr[:, 5:] = 257 * 100
    src = Image.fromarray(arr)
    assert src.mode == "I;16"
    img = decode_image(encode(src, "PNG"))
    assert img.mode == "RGB"
    px = pixels(img)
    assert (px[:, :5] == 255).all()
    assert (px[:, 5:] == 100).all()


def test_16bit_big_endian_tiff():
    arr = np.full((10, 10), 257 * 42, dtype=np.uint16)
    src = Image.frombytes("I;16B", (10, 10), arr.astype(">u2").tobytes())
    data = encode(src, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I;16B"
    assert (pixels(decode_image(data)) == 42).all()


def test_float_tiff_min_max_scaled():
    arr = np.zeros((10, 10), dtype=np.float32)
    arr[:, 5:] = 3.5
    arr[0, 0] = -1.0
    img = decode_image(encode(Image.fromarray(arr), "TIFF"))
    px = pixels(img)[..., 0]
    assert px[0, 0] == 0 and px[1, 0] == round(255 / 4.5)
    assert (px[:, 5:] == 255).all()


def test_rgba_png_composited_over_white():
    arr = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent black
    arr[:, 5:] = (255, 0, 0, 255)  # opaque red
    arr[0, 0] = (0, 0, 0, 128)  # half-transparent black
    img = decode_image(encode(Image.fromarray(arr), "PNG"))
    px = pixels(img)
    assert (px[1:, :5] == 255).all()
    assert (px[:, 5:] == [255, 0, 0]).all()
    assert np.abs(px[0, 0] - 127).max() <= 1


def test_la_png_composited_over_white():
    src = Image.new("LA", (10, 10), (0, 0))
    assert (pixels(decode_image(encode(src, "PNG"))) == 255).all()


def test_palette_png():
    src = Image.new("P", (10, 10), 1)
    src.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    src.paste(0, (0, 0, 5, 10))
    px = pixels(decode_image(encode(src, "PNG")))
    assert (px[:, :5] == 0).all()
    assert (px[:, 5:] == [10, 200, 30]).all()


def test_palette_png_with_transparency():
    src = Image.new("P", (10, 10), 1)
    src.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    src.paste(0, (0, 0, 5, 10))
    data = encode(src, "PNG", transparency=0)  # index 0 fully transparent
    px = pixels(decode_image(data))
    assert (px[:, :5] == 255).all()
    assert (px[:, 5:] == [10, 200, 30]).all()


def test_grayscale_png():
    arr = np.full((10, 10), 77, dtype=np.uint8)
    img = decode_image(encode(Image.fromarray(arr), "PNG"))
    assert img.mode == "RGB" and img.size == (10, 10)
    assert (pixels(img) == 77).all()


def test_bilevel_png():
    src = Image.new("1", (10, 10), 0)
    src.paste(1, (0, 0, 10, 5))
    px = pixels(decode_image(encode(src, "PNG")))
    assert (px[:5] == 255).all() and (px[5:] == 0).all()


def test_exif_orientation_applied():
    w, h = 48, 24
    src = Image.new("RGB", (w, h), (0, 0, 255))
    src.paste((255, 0, 0), (0, 0, 12, 12))  # red block at stored top-left
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    data = encode(src, "JPEG", quality=95, exif=exif)
    assert Image.open(io.BytesIO(data)).size == (w, h)
    img = decode_image(data)
    assert img.size == (h, w)
    px = pixels(img)
    assert np.abs(px[6, h - 6] - [255, 0, 0]).max() < 30  # top-left went to top-right
    assert np.abs(px[6, 6] - [0, 0, 255]).max() < 30


def test_result_is_loaded_and_independent_of_input():
    img = decode_image(encode(noise_rgb(20, 12), "PNG"))
    assert img.mode == "RGB" and img.size == (20, 12)
    assert (pixels(img) == pixels(noise_rgb(20, 12))).all()  # PNG is lossless


# ---------------------------------------------------------------- ids, listing, fsspec


def test_image_id_is_content_hash(tmp_path):
    data = encode(noise_rgb(16, 16), "PNG")
    a = write(tmp_path / "a.png", data)
    b = write(tmp_path / "sub_b.png", data)
    c = write(tmp_path / "c.png", encode(noise_rgb(16, 16, seed=1), "PNG"))
    id_a, _ = load_image(a)
    id_b, _ = load_image(b)
    id_c, _ = load_image(c)
    assert id_a == id_b != id_c
    assert len(id_a) == 16 and int(id_a, 16) >= 0
    assert id_a == image_id(data)


def test_list_images_nested(tmp_path):
    png = encode(noise_rgb(8, 8), "PNG")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden_dir").mkdir()
    files = {
        "z.png": png,
        "a/one.JPG": png,
        "a/b/two.webp": png,
        "a/b/three.tiff": png,
        "a/.hidden.png": png,
        ".hidden_dir/x.png": png,
        "a/notes.txt": b"hello",
        "a/b/noext": png,
    }
    for rel, data in files.items():
        (tmp_path / rel).write_bytes(data)
    got = list_images(str(tmp_path))
    kept = ["z.png", "a/one.JPG", "a/b/two.webp", "a/b/three.tiff"]
    expected = sorted(str(tmp_path / r) for r in kept)
    assert got == expected
    assert all(isinstance(p, str) and "://" not in p for p in got)


def test_list_images_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_images(str(tmp_path / "missing"))


def test_memory_url_read_and_list():
    fs = fsspec.filesystem("memory")
    data = encode(noise_rgb(12, 12), "PNG")
    root = "memory:///sacv_test_images"  # canonical form fsspec returns
    fs.pipe({f"{root}/x/img.png": data, f"{root}/x/readme.txt": b"no"})
    try:
        assert read_bytes(f"{root}/x/img.png") == data
        assert list_images(root) == [f"{root}/x/img.png"]
        iid, img = load_image(list_images(root)[0])
        assert iid == image_id(data) and img.size == (12, 12)
        with pytest.raises(ImageRejected) as ei:
            read_bytes(f"{root}/x/missing.png")
        assert ei.value.stage == "read"
    finally:
        fs.rm(root, recursive=True)


def test_local_paths_read_and_stamp_as_through_fsspec(tmp_path):
    """Plain local paths skip fsspec (its URL handling cost more than the read): same bytes, same
    stamp string as fsspec's local file system gives (a stamp from either matches), same rejects."""
    from sacv.io.images import file_stamp

    data = encode(noise_rgb(12, 12), "PNG")
    (tmp_path / "img.png").write_bytes(data)
    (tmp_path / "link.png").symlink_to(tmp_path / "img.png")
    local = fsspec.filesystem("file")
    for name in ("img.png", "link.png"):
        path = str(tmp_path / name)
        info = local.info(path)
        assert file_stamp(path) == f"{info['size']}:{info['mtime']}" == file_stamp(f"file://{path}")
        assert read_bytes(path) == data == read_bytes(f"file://{path}")
    assert file_stamp(str(tmp_path / "missing.png")) is None
    for bad, reason in ((tmp_path / "missing.png", "file not found"), (tmp_path, "is a directory")):
        with pytest.raises(ImageRejected, match=reason):
            read_bytes(str(bad))
