"""A CUDA out-of-memory error in a batch is retried with half the batch, down to one image."""

from __future__ import annotations

import logging

import pytest
import torch

from sacv.method.activations import extract, halving_on_oom
from tests.models import small

LAYERS = ["features.0", "features.2"]


def forward_fitting(limit: int, sizes: list[int]):
    """``extract`` on the tiny model that runs out of memory above ``limit`` images (an injected
    ``torch.cuda.OutOfMemoryError``, as CUDA raises it); ``sizes`` records every attempt."""
    module = small().module

    def forward(inputs, targets):
        sizes.append(len(inputs))
        if len(inputs) > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return extract(module, inputs, LAYERS, targets, with_gradients=True)

    return module, forward


def test_a_batch_out_of_memory_is_split_until_it_fits_and_gives_the_pieces_results(caplog):
    torch.manual_seed(0)
    inputs, targets = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 1])
    sizes: list[int] = []
    module, forward = forward_fitting(2, sizes)
    with caplog.at_level(logging.WARNING, logger="sacv"):
        joined = halving_on_oom(forward, inputs, targets)
    assert sizes == [5, 2, 3, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    assert len([r for r in caplog.records if "out of device memory" in r.getMessage()]) == 2
    pieces = [
        extract(module, inputs[s], LAYERS, targets[s], with_gradients=True)
        for s in (slice(0, 2), slice(2, 3), slice(3, 5))
    ]
    for layer in LAYERS:
        assert torch.equal(joined.activations[layer], torch.cat([p.activations[layer] for p in pieces]))
        assert torch.equal(joined.gradients[layer], torch.cat([p.gradients[layer] for p in pieces]))
    assert torch.equal(joined.targets, targets) and joined.logits.shape == (5, 4)
    whole = extract(module, inputs, LAYERS, targets, with_gradients=True)  # the batch as one, for scale
    torch.testing.assert_close(joined.gradients["features.2"], whole.gradients["features.2"], rtol=1e-4, atol=1e-6)


def test_one_target_for_all_is_kept_for_every_half_and_one_image_that_does_not_fit_fails():
    sizes: list[int] = []
    _, forward = forward_fitting(1, sizes)
    joined = halving_on_oom(forward, torch.randn(3, 3, 32, 32), 2)
    assert sizes == [3, 1, 2, 1, 1] and joined.targets.tolist() == [2, 2, 2]
    _, never = forward_fitting(0, [])
    with pytest.raises(torch.cuda.OutOfMemoryError):
        halving_on_oom(never, torch.randn(2, 3, 32, 32), None)
