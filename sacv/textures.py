"""Procedural texture images and masked scenes (seeded), for demos and end-to-end tests.

Every generator returns an RGB uint8 array (size, size, 3). Concepts vary colour, scale, angle,
wobble and noise so a concept vector learns the pattern, not one rendering of it.
"""

from __future__ import annotations

import numpy as np

CONCEPTS = ("striped", "dotted", "chequered", "zigzagged")


def _grid(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c, s = np.cos(angle), np.sin(angle)
    return c * xx + s * yy, -s * xx + c * yy


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    dark = rng.uniform(0, 70, size=3)
    light = rng.uniform(180, 255, size=3)
    if rng.random() < 0.5:  # often black and white, as zebra stripes
        dark, light = np.full(3, rng.uniform(0, 40)), np.full(3, rng.uniform(210, 255))
    return dark, light


def _paint(pattern: np.ndarray, rng: np.random.Generator, noise: float = 12.0) -> np.ndarray:
    dark, light = _colours(rng)
    image = dark + pattern[..., None] * (light - dark)
    image += rng.normal(0, noise, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def striped(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _grid(size, rng.uniform(0, np.pi))
    period = rng.uniform(10, 28)
    wobble = rng.uniform(0, 6) * np.sin(v / rng.uniform(15, 40))  # wavy, zebra-like stripes
    return _paint((np.sin(2 * np.pi * (u + wobble) / period) > 0).astype(float), rng)


def dotted(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _grid(size, rng.uniform(0, np.pi / 2))
    period = rng.uniform(12, 30)
    radius = period * rng.uniform(0.2, 0.35)
    du = (u % period) - period / 2
    dv = (v % period) - period / 2
    return _paint((du**2 + dv**2 < radius**2).astype(float), rng)


def chequered(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _grid(size, rng.uniform(0, np.pi / 2))
    period = rng.uniform(14, 36)
    return _paint(((np.floor(u / period) + np.floor(v / period)) % 2).astype(float), rng)


def zigzagged(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _grid(size, rng.uniform(0, np.pi))
    period, amplitude = rng.uniform(12, 28), rng.uniform(6, 14)
    tooth = amplitude * np.abs(((v / rng.uniform(10, 20)) % 2) - 1)
    return _paint((np.sin(2 * np.pi * (u + tooth) / period) > 0).astype(float), rng)


def random_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise, blobs or a crop of a bundled photo/texture (no stripes by design)."""
    import skimage.data
    from skimage.transform import resize

    kind = rng.integers(0, 3)
    if kind == 0:
        coarse = rng.uniform(0, 255, size=(rng.integers(2, 8), rng.integers(2, 8), 3))
        return (resize(coarse, (size, size), order=3, mode="reflect") * 1).clip(0, 255).astype(np.uint8)
    if kind == 1:
        image = np.full((size, size, 3), rng.uniform(0, 255, size=3))
        yy, xx = np.mgrid[0:size, 0:size]
        for _ in range(rng.integers(3, 9)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(size / 10, size / 3)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0, 255, size=3)
        return np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    name = rng.choice(["grass", "gravel", "coffee", "chelsea", "astronaut", "rocket", "coins", "camera"])
    photo = getattr(skimage.data, str(name))()
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    crop = int(min(photo.shape[:2]) * rng.uniform(0.4, 1.0))
    top = rng.integers(0, photo.shape[0] - crop + 1)
    left = rng.integers(0, photo.shape[1] - crop + 1)
    patch = photo[top : top + crop, left : left + crop, :3]
    return (resize(patch, (size, size), order=1, preserve_range=True)).astype(np.uint8)


GENERATORS = {"striped": striped, "dotted": dotted, "chequered": chequered, "zigzagged": zigzagged}


def horse_mask(size: int, rng: np.random.Generator, scale: float = 0.6) -> np.ndarray:
    """Boolean (size, size) mask: scikit-image's horse silhouette, scaled and placed at random."""
    import skimage.data
    from skimage.transform import resize

    horse = ~skimage.data.horse()  # True on the horse
    h = int(size * scale * rng.uniform(0.8, 1.1))
    w = int(h * horse.shape[1] / horse.shape[0])
    w = min(w, size - 1)
    small = resize(horse.astype(float), (h, w), order=0) > 0.5
    mask = np.zeros((size, size), dtype=bool)
    top, left = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask[top : top + h, left : left + w] = small
    return mask


def scene(size: int, concept: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A horse silhouette filled with ``concept`` on a random background. Returns (image, mask)."""
    background = random_texture(size, rng)
    texture = GENERATORS[concept](size, rng)
    mask = horse_mask(size, rng)
    image = np.where(mask[..., None], texture, background)
    return image, mask
