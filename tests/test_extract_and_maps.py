"""Extraction (hooks, pre/post activation, eval, logit gradients) and the S_k / S_{k→c} maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sacv.method.activations import capture_layers, extract
from sacv.method.maps import concept_maps, upsample_map


def test_hooks_are_removed_even_when_the_body_raises(tiny):
    with pytest.raises(RuntimeError, match="boom"):
        with capture_layers(tiny, ["features.0", "features.2"]):
            assert len(tiny.features[0]._forward_hooks) == 1
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_hooks_are_removed_when_the_forward_pass_fails(tiny):
    tiny.fc = nn.Linear(7, 5)  # wrong input width: the forward pass raises after the hooks ran
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        extract(tiny, torch.randn(2, 3, 8, 8), ["features.0", "features.2"])
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_threads_sharing_one_module_get_the_results_of_one_thread(tiny):
    """Shard tasks in threads of one process share the cached model: each pass must see only its
    own hooks (without the module's lock, a layer "runs twice" or captures another batch)."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(16)]
    expected = [extract(tiny, x, ["features.0", "features.2"]) for x in batches]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda x: extract(tiny, x, ["features.0", "features.2"]), batches * 3))
    for k, result in enumerate(got):
        reference = expected[k % len(batches)]
        for layer in ("features.0", "features.2"):
            torch.testing.assert_close(result.activations[layer], reference.activations[layer], rtol=0, atol=0)
            torch.testing.assert_close(result.gradients[layer], reference.gradients[layer], rtol=0, atol=0)
    assert all(len(m._forward_hooks) == 0 for m in tiny.modules())


def test_layer_output_is_taken_before_a_following_in_place_relu(tiny):
    x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    out = extract(tiny, x, ["features.0", "features.1"], target=0, with_gradients=False)
    with torch.no_grad():
        expected_conv = tiny.features[0](x).permute(0, 2, 3, 1)
    # the conv output keeps its negative values although an in-place ReLU follows it
    torch.testing.assert_close(out.activations["features.0"], expected_conv)
    assert (out.activations["features.0"] < 0).any()
    # naming the ReLU gives the post-activation output
    torch.testing.assert_close(out.activations["features.1"], expected_conv.clamp(min=0))
    # and the network's output is unchanged by the hooks
    with torch.no_grad():
        torch.testing.assert_close(out.logits, tiny(x))


def test_gradient_is_of_the_target_logit_not_softmax_or_loss(tiny):
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([4, 0, 2])
    out = extract(tiny, x, ["features.2"], target=targets)
    # reference: split the network at features.2 and differentiate each image's own logit
    for n in range(3):
        head_in = tiny.features[:3](x[n : n + 1]).detach().requires_grad_(True)
        logit = tiny.fc(tiny.pool(tiny.features[3](head_in)).flatten(1))[0, targets[n]]
        (grad,) = torch.autograd.grad(logit, head_in)
        torch.testing.assert_close(out.gradients["features.2"][n], grad[0].permute(1, 2, 0))
    torch.testing.assert_close(out.targets, targets)


def test_default_target_is_the_predicted_class(tiny):
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    out = extract(tiny, x, ["features.2"])
    torch.testing.assert_close(out.targets, out.logits.argmax(1))


def test_model_is_put_in_eval_mode(tiny):
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    tiny.train()  # dropout active in train mode
    first = extract(tiny, x, ["features.2"], target=1)
    second = extract(tiny, x, ["features.2"], target=1)
    assert not tiny.training
    torch.testing.assert_close(first.gradients["features.2"], second.gradients["features.2"])
    with torch.no_grad():
        torch.testing.assert_close(first.logits, tiny.eval()(x))


def test_the_cpu_model_gets_a_channels_last_batch_and_the_layout_changes_only_rounding(tiny):
    """Whatever layout the caller's batch has, on the CPU the network sees it channels-last (its
    convolutions are faster there); results equal an NCHW forward/backward within float rounding."""
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    seen = []
    handle = tiny.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last))
    )
    try:
        out = extract(tiny, x, ["features.0", "features.2"], target=1)
        extract(tiny, x.contiguous(memory_format=torch.channels_last), ["features.0"], target=1)
    finally:
        handle.remove()
    assert seen == [True, True]
    captured = []  # an NCHW reference: the output of features.2 (no in-place op follows it)
    hook = tiny.features[2].register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        logits = tiny(x)
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), captured)
    finally:
        hook.remove()
    assert x.is_contiguous() and not captured[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(
        out.activations["features.2"], captured[0].detach().permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(out.gradients["features.2"], grad.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits, logits.detach(), rtol=1e-5, atol=1e-6)


def test_frozen_weights_still_give_gradients(tiny):
    for p in tiny.parameters():
        p.requires_grad_(False)
    out = extract(tiny, torch.randn(2, 3, 8, 8), ["features.0"], target=0)
    assert out.gradients["features.0"].abs().sum() > 0


def test_non_finite_activations_name_the_layer(tiny):
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="features.0"):
        extract(tiny, x, ["features.0"], with_gradients=False)


def test_float16_output_is_the_float32_result_rounded_as_numpy_rounds(tiny):
    """The store dtype is cast inside extract (on the device): bit for bit numpy's round-to-nearest-even
    of the float32 result, which the store used to apply; logits stay float32."""
    x = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(3)) * 40  # large values: many roundings
    full = extract(tiny, x, ["features.0", "features.2"], target=1)
    half = extract(tiny, x, ["features.0", "features.2"], target=1, dtype=torch.float16)
    for layer in ("features.0", "features.2"):
        for got, reference in (
            (half.activations[layer], full.activations[layer]),
            (half.gradients[layer], full.gradients[layer]),
        ):
            assert got.dtype == torch.float16 and got.shape == reference.shape
            np.testing.assert_array_equal(
                got.numpy().view(np.uint16), reference.numpy().astype(np.float16).view(np.uint16)
            )
    assert half.logits.dtype == torch.float32
    torch.testing.assert_close(half.logits, full.logits, rtol=0, atol=0)


def test_float16_overflow_names_the_layer_and_the_fix(tiny):
    x = torch.full((1, 3, 8, 8), 1e5)  # finite in float32, beyond float16's 65 504 after the conv
    with pytest.raises(
        ValueError, match=r"activations of layer 'features.0' overflow torch.float16.*extract.dtype: float32"
    ):
        extract(tiny, x, ["features.0"], with_gradients=False, dtype=torch.float16)
    extract(tiny, x, ["features.0"], with_gradients=False)  # float32 holds them


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_non_finite_value_anywhere_is_found(bad, dtype):
    """A single NaN or ±inf deep inside a batch's activations (planted by a layer) is an error in
    every output dtype."""

    class Plant(nn.Module):
        def forward(self, x):
            x = x.clone()
            x[2, 5, 3, 7] = bad
            return x

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), Plant(), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(4, 3, 9, 9)
    net(x)  # materialise the lazy layer
    with pytest.raises(ValueError, match="activations of layer '1' contain 1 NaN/inf"):
        extract(net, x, ["1"], with_gradients=False, dtype=dtype)


def test_unknown_layer_suggests_close_names(tiny):
    with pytest.raises(ValueError, match=r"unknown layer 'feature.2'.*features\.2"):
        extract(tiny, torch.randn(1, 3, 8, 8), ["feature.2"])


def test_wrong_image_shape_and_non_spatial_layer_are_refused(tiny):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        extract(tiny, torch.randn(3, 8, 8), ["features.0"])
    with pytest.raises(ValueError, match="not a \\(N, C, H, W\\) feature map"):
        extract(tiny, torch.randn(1, 3, 8, 8), ["fc"])


def test_maps_equal_a_slow_loop_reference():
    rng = np.random.default_rng(0)
    n, h, w, c, k = 2, 3, 5, 4, 3
    act, grad = rng.normal(size=(n, h, w, c)), rng.normal(size=(n, h, w, c))
    vectors, offsets = rng.normal(size=(k, c)), rng.normal(size=k)
    maps = concept_maps(act, vectors, offsets, grad)
    for ni in range(n):
        for ki in range(k):
            for i in range(h):
                for j in range(w):
                    s_k = sum(act[ni, i, j, ch] * vectors[ki, ch] for ch in range(c))
                    s_kc = sum(grad[ni, i, j, ch] * vectors[ki, ch] for ch in range(c))
                    assert maps.s_k[ni, ki, i, j] == pytest.approx(s_k, rel=1e-5, abs=1e-5)
                    assert maps.s_kc[ni, ki, i, j] == pytest.approx(s_kc, rel=1e-5, abs=1e-5)
                    assert maps.decision[ni, ki, i, j] == pytest.approx(s_k + offsets[ki], rel=1e-5, abs=1e-5)
    with pytest.raises(ValueError, match="channels last"):
        concept_maps(np.moveaxis(act, -1, 1), vectors)


def test_sum_of_s_kc_is_the_directional_derivative_of_the_logit():
    torch.manual_seed(0)
    net = (
        nn.Sequential(
            nn.Conv2d(3, 5, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(5, 4, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )
        .double()
        .eval()
    )
    layer, target, eps = "2", 2, 1e-6
    x = torch.randn(1, 3, 9, 11, dtype=torch.float64)
    v = torch.randn(4, dtype=torch.float64)
    v /= v.norm()
    out = extract(net, x, [layer], target=target)
    s_kc = concept_maps(out.activations[layer], v.numpy(), gradients=out.gradients[layer]).s_kc
    assert s_kc.shape == (1, 1, 9, 11)

    def logit_with_shift(delta: float) -> float:
        handle = net[2].register_forward_hook(lambda m, i, o: o + delta * v.view(1, -1, 1, 1))
        try:
            with torch.no_grad():
                return net(x)[0, target].item()
        finally:
            handle.remove()

    finite_difference = (logit_with_shift(eps) - logit_with_shift(-eps)) / (2 * eps)
    assert s_kc.sum() == pytest.approx(finite_difference, rel=1e-4)


def test_upsampling_keeps_constant_maps_and_the_requested_size():
    maps = np.full((2, 3, 7, 7), 2.5)
    up = upsample_map(maps, (224, 200))
    assert up.shape == (2, 3, 224, 200)
    np.testing.assert_allclose(up, 2.5, rtol=1e-6)
    ramp = np.arange(4.0)[None, :].repeat(4, 0)  # increases to the right
    up = upsample_map(ramp, (16, 16))
    assert (np.diff(up, axis=1) >= 0).all() and (np.diff(up, axis=0) == 0).all()
