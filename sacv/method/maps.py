"""Spatial concept maps for many concepts at once.

For activations ``f`` (N, H, W, C), logit gradients ``g`` (N, H, W, C), stacked unit concept vectors
``V`` (K, C) and offsets ``b`` (K,):

- ``S_k[n, k, i, j]   = f[n, i, j, :] · V[k]`` — how much position (i, j) shows concept k;
- ``S_kc[n, k, i, j]  = g[n, i, j, :] · V[k]`` — concept k's contribution to the target logit there;
  its sum over positions is the directional derivative of the logit along ``V[k]`` placed at every
  position;
- ``decision[n, k, i, j] = S_k + b[k]`` — positive where the classifier says concept ("relevant").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class ConceptMaps:
    """Maps of shape (N, K, H, W); ``s_kc`` is None when no gradients were given."""

    s_k: np.ndarray
    decision: np.ndarray
    s_kc: np.ndarray | None


def _as_float_tensor(array) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array).float()


def concept_maps(activations, vectors, offsets=None, gradients=None) -> ConceptMaps:
    """Compute S_k, the decision map and (with ``gradients``) S_{k→c} with one einsum each.

    activations, gradients: (N, H, W, C); vectors: (K, C) or (C,); offsets: (K,) or None (zeros).
    """
    act = _as_float_tensor(activations)
    vec = _as_float_tensor(vectors)
    if vec.dim() == 1:
        vec = vec[None]
    if act.dim() != 4 or act.shape[-1] != vec.shape[-1]:
        raise ValueError(
            f"activations must be (N, H, W, C) with C = {vec.shape[-1]} (the vectors' length); "
            f"got {tuple(act.shape)}. Channels-first input? Permute it to channels last."
        )
    off = torch.zeros(vec.shape[0]) if offsets is None else _as_float_tensor(offsets).reshape(-1)
    s_k = torch.einsum("nhwc,kc->nkhw", act, vec)  # (N, K, H, W)
    decision = s_k + off[None, :, None, None]
    s_kc = None
    if gradients is not None:
        grad = _as_float_tensor(gradients)
        if grad.shape != act.shape:
            raise ValueError(f"gradients {tuple(grad.shape)} must have the activations' shape {tuple(act.shape)}")
        s_kc = torch.einsum("nhwc,kc->nkhw", grad, vec).numpy()  # (N, K, H, W)
    return ConceptMaps(s_k.numpy(), decision.numpy(), s_kc)


def upsample_map(maps, size: tuple[int, int]) -> np.ndarray:
    """Bilinearly resize maps (..., h, w) to (..., H, W) = ``size`` (e.g. the model input)."""
    tensor = _as_float_tensor(maps)
    lead = tensor.shape[:-2]
    flat = tensor.reshape(-1, 1, *tensor.shape[-2:])
    out = F.interpolate(flat, size=tuple(size), mode="bilinear", align_corners=False)
    return out.reshape(*lead, *size).numpy()
