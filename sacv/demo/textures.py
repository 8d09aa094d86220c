"""Procedural texture images and masked scenes (seeded), for demos and end-to-end tests.

Every generator returns an RGB uint8 array (size, size, 3). Concepts vary colour, scale, angle,
wobble and noise so a concept vector learns the pattern, not one rendering of it.
"""

from __future__ import annotations

from functools import cache

import numpy as np

CONCEPTS = ("striped", "dotted", "chequered", "zigzagged", "banded", "crosshatched", "honeycomb", "spiralled")
PHOTOS = ("coffee", "chelsea", "astronaut", "rocket", "coins", "camera")
SURFACES = ("grass", "gravel", "brick")


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


def banded(size: int, rng: np.random.Generator) -> np.ndarray:
    """Broad bands (a few per image) of two to four colours, with gently wavy edges."""
    u, v = _grid(size, rng.uniform(0, np.pi))
    width = rng.uniform(30, 60)
    wobble = rng.uniform(0, 12) * np.sin(v / rng.uniform(30, 80))
    palette = rng.uniform(0, 255, size=(int(rng.integers(2, 5)), 3))
    index = np.floor((u + wobble) / width).astype(int) % len(palette)
    return np.clip(palette[index] + rng.normal(0, 10, (size, size, 3)), 0, 255).astype(np.uint8)


def crosshatched(size: int, rng: np.random.Generator) -> np.ndarray:
    """Two families of thin parallel lines crossing at 50-90 degrees."""
    angle = rng.uniform(0, np.pi)
    period, width = rng.uniform(8, 20), rng.uniform(0.12, 0.3)
    lines = np.zeros((size, size), dtype=bool)
    for a in (angle, angle + rng.uniform(0.9, 1.6) * rng.choice([-1, 1])):
        u, _ = _grid(size, a)
        lines |= ((u / period) % 1) < width
    return _paint((~lines).astype(float), rng)


def honeycomb(size: int, rng: np.random.Generator) -> np.ndarray:
    """Hexagonal cells with dark walls (edges of the Voronoi cells of a rotated hexagonal lattice)."""
    from scipy.spatial import cKDTree

    period = rng.uniform(14, 34)
    n = int(size / period) + 3
    i, j = np.mgrid[-n:n, -n:n].reshape(2, -1).astype(float)
    a = rng.uniform(0, np.pi / 3)
    x, y = period * (i + j / 2), period * j * np.sqrt(3) / 2
    centres = np.stack([np.cos(a) * x - np.sin(a) * y, np.sin(a) * x + np.cos(a) * y], 1) + size / 2
    yy, xx = np.mgrid[0:size, 0:size]
    dist, _ = cKDTree(centres).query(np.stack([xx.ravel(), yy.ravel()], 1), k=2)
    wall = (dist[:, 1] - dist[:, 0]).reshape(size, size) < period * rng.uniform(0.08, 0.2)
    return _paint((~wall).astype(float), rng)


def spiralled(size: int, rng: np.random.Generator) -> np.ndarray:
    """An Archimedean spiral of one to four arms around a random centre."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dy, dx = yy - rng.uniform(0.2, 0.8) * size, xx - rng.uniform(0.2, 0.8) * size
    arms, period = int(rng.integers(1, 5)), rng.uniform(12, 30)
    phase = arms * np.arctan2(dy, dx) * rng.choice([-1, 1]) + 2 * np.pi * np.hypot(dy, dx) / period
    return _paint((np.sin(phase) > 0).astype(float), rng)


@cache
def bundled(name: str) -> np.ndarray:
    """A scikit-image bundled image (offline) as RGB uint8."""
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def crop(name: str, size: int, rng: np.random.Generator, smallest: float = 0.4) -> np.ndarray:
    """A random square crop of a bundled image, resized to (size, size, 3)."""
    from skimage.transform import resize

    photo = bundled(name)
    side = int(min(photo.shape[:2]) * rng.uniform(smallest, 1.0))
    top = rng.integers(0, photo.shape[0] - side + 1)
    left = rng.integers(0, photo.shape[1] - side + 1)
    patch = photo[top : top + side, left : left + side]
    return resize(patch, (size, size), order=1, preserve_range=True).astype(np.uint8)


def background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A real background: a crop of grass, gravel or brick, or of a bundled photo."""
    names = SURFACES if rng.random() < 0.6 else PHOTOS
    return crop(str(rng.choice(names)), size, rng, smallest=0.3)


def random_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour noise, blobs or a crop of a bundled photo/texture (no stripes by design)."""
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
    return crop(str(name), size, rng)


GENERATORS = {name: globals()[name] for name in CONCEPTS}


def _place(shape: np.ndarray, size: int, rng: np.random.Generator, margin: int) -> np.ndarray:
    """Put a small boolean ``shape`` at a random spot of a (size, size) mask, ``margin`` px from the edges."""
    h, w = shape.shape
    mask = np.zeros((size, size), dtype=bool)
    top, left = rng.integers(margin, size - margin - h + 1), rng.integers(margin, size - margin - w + 1)
    mask[top : top + h, left : left + w] = shape
    return mask


def horse_mask(size: int, rng: np.random.Generator, scale: float = 0.6, margin: int = 0) -> np.ndarray:
    """Boolean (size, size) mask: scikit-image's horse silhouette, scaled and placed at random."""
    import skimage.data
    from skimage.transform import resize

    horse = ~skimage.data.horse()  # True on the horse
    h = int(size * scale * rng.uniform(0.8, 1.1))
    w = int(h * horse.shape[1] / horse.shape[0])
    w = min(w, size - 1 - 2 * margin)
    small = resize(horse.astype(float), (h, w), order=0) > 0.5
    return _place(small, size, rng, margin)


def shape_mask(size: int, rng: np.random.Generator, scale: float = 0.4, margin: int = 0) -> np.ndarray:
    """Boolean mask of a random ellipse, rounded blob or polygon about ``scale`` × size across."""
    from skimage.draw import ellipse, polygon

    r = (size - 2 * margin) * scale / 2 * rng.uniform(0.7, 1.1)
    d = int(2 * r) + 3
    small = np.zeros((d, d), dtype=bool)
    kind = rng.integers(0, 3)
    if kind == 0:
        rr, cc = ellipse(d / 2, d / 2, r, r * rng.uniform(0.45, 1.0), shape=small.shape, rotation=rng.uniform(0, np.pi))
    else:
        n = 90 if kind == 1 else int(rng.integers(3, 8))
        theta = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.3, 0.3, n) * (kind == 2) * 2 * np.pi / n
        if kind == 1:  # a rounded blob: a few low harmonics on the radius
            radius = 1 + sum(
                rng.uniform(-0.25, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)
            )
        else:
            radius = rng.uniform(0.6, 1.0, n)
        radius = r * radius / radius.max()
        rr, cc = polygon(d / 2 + radius * np.sin(theta), d / 2 + radius * np.cos(theta), shape=small.shape)
    small[rr, cc] = True
    return _place(small, size, rng, margin)


def scene(size: int, concept: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A horse silhouette filled with ``concept`` on a random background. Returns (image, mask)."""
    background = random_texture(size, rng)
    texture = GENERATORS[concept](size, rng)
    mask = horse_mask(size, rng)
    image = np.where(mask[..., None], texture, background)
    return image, mask
