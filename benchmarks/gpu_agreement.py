"""CUDA against CPU on the real model: how far activations, gradients and sum S_{k->c} move per numeric mode.

EfficientNet-Lite0 (offline weights), the same images on both devices, ``sacv.method.activations.extract``
with gradients of the CPU's predicted-class logit. The CPU in exact float32 is the reference; on
CUDA each mode is measured:

- ``fp32``: the project's default (TF32 off for convolutions and matmuls while the model runs);
- ``tf32``: ``execution.allow_tf32: true`` (PyTorch's own default for cuDNN convolutions);
- ``bf16`` / ``fp16``: ``extract.autocast`` (forward pass in half precision).

``cpu-bf16`` (bfloat16 autocast on the CPU against the same reference) is measured on every machine.

Per layer: activation error (max |diff| / range of the reference), gradient error (relative L2 and
max |diff| / range) and the relative error of ``sum S_{k->c}`` along 8 random unit directions (the
directional derivative every contribution number rests on; median and max over images and
directions); per mode: images whose predicted class changed.

    python benchmarks/gpu_agreement.py --out benchmarks/results/gpu_agreement.json

Without a CUDA device it measures ``cpu-bf16`` only, says so, and exits with status 2.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
from common import print_table, write_json  # benchmarks/common.py (the script folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]
MODES = {"fp32": (None, False), "tf32": (None, True), "bf16": ("bfloat16", False), "fp16": ("float16", False)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--layers", nargs="+", default=["_blocks.3", "_blocks.8", "_blocks.12"])
    parser.add_argument("--directions", type=int, default=8, help="random unit directions for sum S_k->c")
    parser.add_argument("--out", default="benchmarks/results/gpu_agreement.json")
    return parser.parse_args(argv)


def test_images(n: int, preprocessing):
    """(n, 3, S, S) float32 tensor: scikit-image's bundled photos and procedural textures, preprocessed."""
    import torch
    from PIL import Image

    from sacv.demo import textures

    rng = np.random.default_rng(0)
    photos = [textures.bundled(name) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    generated = [textures.GENERATORS[name](256, rng) for name in sorted(textures.GENERATORS)]
    pictures = (photos + generated + [textures.random_texture(256, rng) for _ in range(n)])[:n]
    return torch.stack([preprocessing(Image.fromarray(p).convert("RGB")) for p in pictures])


def compare(reference, other, directions: np.ndarray) -> dict[str, dict[str, float]]:
    """Per layer: errors of ``other`` against ``reference`` (both ``sacv.method.activations.Extraction``)."""
    out = {}
    for layer, act in reference.activations.items():
        a_ref, a = act.double().numpy(), other.activations[layer].double().numpy()  # (N, H, W, C)
        g_ref, g = reference.gradients[layer].double().numpy(), other.gradients[layer].double().numpy()
        sums_ref = np.einsum("nhwc,dc->nd", g_ref, directions[layer])  # (N, D): sum over positions of S_k->c
        sums = np.einsum("nhwc,dc->nd", g, directions[layer])
        relative = np.abs(sums - sums_ref) / np.maximum(np.abs(sums_ref), 1e-12)
        out[layer] = {
            "act_max_err_of_range": float(np.abs(a - a_ref).max() / np.ptp(a_ref)),
            "grad_rel_l2": float(np.linalg.norm(g - g_ref) / np.linalg.norm(g_ref)),
            "grad_max_err_of_range": float(np.abs(g - g_ref).max() / np.ptp(g_ref)),
            "sum_s_kc_rel_err_median": float(np.median(relative)),
            "sum_s_kc_rel_err_max": float(relative.max()),
        }
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    import torch

    from sacv.method.activations import extract
    from sacv.method.models import load_model

    result = {
        "benchmark": "gpu_agreement",
        "images": args.images,
        "layers": args.layers,
        "torch": torch.__version__,
        "machine": platform.node(),
        "modes": {},
    }
    model = load_model("efficientnet_lite0")
    images = test_images(args.images, model.preprocessing)
    reference = extract(model.module, images, args.layers)  # CPU float32, predicted classes
    targets = reference.targets
    rng = np.random.default_rng(1)
    directions = {}
    for layer, act in reference.activations.items():
        d = rng.standard_normal((args.directions, act.shape[-1]))
        directions[layer] = d / np.linalg.norm(d, axis=1, keepdims=True)  # (D, C) unit rows
    runs = {"cpu-bf16": ("bfloat16", False)}
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name(0)
        runs |= MODES
    result["cuda_measured"] = torch.cuda.is_available()
    rows = []
    for mode, (autocast, allow_tf32) in runs.items():
        model.module.to("cpu" if mode.startswith("cpu") else "cuda")
        other = extract(
            model.module,
            images,
            args.layers,
            targets,
            autocast=getattr(torch, autocast) if autocast else None,
            allow_tf32=allow_tf32,
        )
        changed = int((other.logits.argmax(1) != reference.logits.argmax(1)).sum())
        per_layer = compare(reference, other, directions)
        result["modes"][mode] = {"predicted_class_changed": changed, "layers": per_layer}
        for layer, m in per_layer.items():
            rows.append(
                (
                    f"{mode:<8} {layer}",
                    f"act {m['act_max_err_of_range']:.1e} of range | grad L2 "
                    f"{m['grad_rel_l2']:.1e}, max {m['grad_max_err_of_range']:.1e} of range | sum S_k->c "
                    f"median {m['sum_s_kc_rel_err_median']:.1e}, max {m['sum_s_kc_rel_err_max']:.1e}",
                )
            )
        rows.append((f"{mode:<8} predicted class changed", f"{changed} of {args.images}"))
    print_table(rows)
    write_json(result, args.out)
    if not torch.cuda.is_available():
        print("no CUDA device here: only cpu-bf16 measured (run this script on a GPU machine for the CUDA modes)")
        raise SystemExit(2)
    return result


if __name__ == "__main__":
    main()
