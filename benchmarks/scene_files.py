"""Generated test images for the benchmarks: striped-horse scenes (``sacv.demo.textures.scene``) saved
as JPEG files, the same files for every script and seed."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _write_scene(job: tuple[str, int, int]) -> str:
    """One generated scene (striped horse on a random background, seeded by ``seed``) as a JPEG."""
    from PIL import Image

    from sacv.demo import textures

    path, seed, size = job
    image, _ = textures.scene(size, "striped", np.random.default_rng(seed))
    Image.fromarray(image).save(path, quality=90)
    return path


def write_images(folder: Path, n: int, seed: int, size: int = 256) -> list[str]:
    """``n`` generated scenes saved as JPEG (image i seeded by ``seed`` and i; a process per core
    for large ``n``); sorted paths."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"scene_{i:05d}.jpg"), seed * 1_000_003 + i, size) for i in range(n)]
    if n < 256:
        return sorted(map(_write_scene, jobs))
    import multiprocessing

    with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
        return sorted(pool.map(_write_scene, jobs, chunksize=64))
