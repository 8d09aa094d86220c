"""The offline demo: procedural concept images, a SACV on EfficientNet-Lite0, maps on masked scenes.

Fits "striped vs random textures" at one layer, then scores scenes of striped horses on random
backgrounds: S_k should peak on the horse (pointing game) and S_{k→zebra} says how much the stripes
there push the zebra logit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sacv.extract import extract
from sacv.maps import concept_maps, upsample_map
from sacv.models import LoadedModel, load_model
from sacv.textures import GENERATORS, random_texture, scene
from sacv.vectors import fit_concept_vector


def batch(model: LoadedModel, images: list[np.ndarray]) -> torch.Tensor:
    """uint8 RGB arrays -> preprocessed float32 batch (N, 3, S, S)."""
    return torch.stack([model.preprocessing(Image.fromarray(image)) for image in images])


def extract_batched(model: LoadedModel, images: list[np.ndarray], layer: str, target=None, batch_size: int = 16, with_gradients: bool = False):
    """Activations (and gradients) of ``layer`` for many images, (N, H, W, C) float32."""
    acts, grads = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        out = extract(model.module, batch(model, chunk), [layer], target=target, with_gradients=with_gradients)
        acts.append(out.activations[layer])
        if with_gradients:
            grads.append(out.gradients[layer])
    return torch.cat(acts), (torch.cat(grads) if with_gradients else None)


def _as_seen(model: LoadedModel, image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask after the model's resize and crop, so maps and masks line up."""
    seen = model.preprocessing.geometry(Image.fromarray(image))
    seen_mask = model.preprocessing.geometry(Image.fromarray(mask), Image.Resampling.NEAREST)
    return np.asarray(seen), np.asarray(seen_mask).astype(bool)


def pointing_hit(s_k: np.ndarray, mask: np.ndarray) -> bool:
    """Is the maximum of a map (h, w), upsampled to the mask's size, on the mask?"""
    up = upsample_map(s_k, mask.shape)
    i, j = np.unravel_index(np.argmax(up), up.shape)
    return bool(mask[i, j])


def run_demo(out: str | Path, n_concept: int = 30, n_random: int = 30, n_scenes: int = 12,
             layer: str = "_blocks.8", seed: int = 0) -> dict:
    """Run the demo and write ``summary.json`` and ``maps.png`` under ``out``; return the summary."""
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    model = load_model("efficientnet_lite0")
    zebra = model.class_names.index("zebra")

    concept_images = [GENERATORS["striped"](224, rng) for _ in range(n_concept)]
    random_images = [random_texture(224, rng) for _ in range(n_random)]
    concept_act, _ = extract_batched(model, concept_images, layer)
    random_act, _ = extract_batched(model, random_images, layer)
    vector = fit_concept_vector(concept_act, random_act, random_state=seed, max_positions_per_class=20000)

    scenes = [_as_seen(model, *scene(256, "striped", rng)) for _ in range(n_scenes)]
    act, grad = extract_batched(model, [s[0] for s in scenes], layer, target=zebra, with_gradients=True)
    maps = concept_maps(act, vector.vector_, [vector.offset_], grad)
    hits = [pointing_hit(maps.s_k[n, 0], scenes[n][1]) for n in range(n_scenes)]
    mask_share = float(np.mean([s[1].mean() for s in scenes]))
    summary = {
        "model": model.spec,
        "layer": layer,
        "vector": vector.metrics_,
        "pointing_game": float(np.mean(hits)),
        "random_baseline": mask_share,
        "zebra_s_kc_sum_mean": float(maps.s_kc[:, 0].sum(axis=(1, 2)).mean()),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _plot(out / "maps.png", scenes[:4], maps.s_k[:4, 0], maps.s_kc[:4, 0])
    return summary


def _plot(path: Path, scenes, s_k: np.ndarray, s_kc: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(scenes), figsize=(3 * len(scenes), 9), squeeze=False)
    for col, (image, _mask) in enumerate(scenes):
        axes[0, col].imshow(image)
        for row, (m, title) in enumerate([(s_k[col], "S_k (striped)"), (s_kc[col], "S_k→zebra")], start=1):
            lim = float(np.abs(m).max()) or 1.0
            axes[row, col].imshow(image, alpha=0.5)
            shown = axes[row, col].imshow(upsample_map(m, image.shape[:2]), cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6)
            axes[row, col].set_title(title)
            fig.colorbar(shown, ax=axes[row, col], fraction=0.046)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
