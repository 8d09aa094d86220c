"""Analytic receptive fields against a hand computation and against input gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sacv.receptive_field import receptive_field


def conv_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2, padding=1),  # k3 s2 p1
        nn.AvgPool2d(2, 2),  # k2 s2
        nn.Conv2d(4, 4, 3, stride=1, padding=0, dilation=2),  # k_eff 5
        nn.ZeroPad2d((1, 0, 2, 0)),  # left 1, top 2
        nn.Conv2d(4, 2, 3, stride=1),
    ).eval()


def test_matches_a_hand_computation():
    rf = receptive_field(conv_stack(), "4", (64, 64))
    # conv k3 s2 p1: start -1, size 3, jump 2; avgpool k2 s2: size 3+1*2=5, jump 4;
    # dilated conv k_eff 5: size 5+4*4=21; pad (top 2, left 1): start -1-2*4=-9 rows, -1-1*4=-5 cols;
    # conv k3: size 21+2*4=29
    assert rf.jump == (4, 4)
    assert rf.size == (29, 29)
    assert rf.start == (-9, -5)
    assert rf.box(3, 2, clip=False) == (-9 + 12, -5 + 8, -9 + 12 + 29, -5 + 8 + 29)


@pytest.mark.parametrize("position", [(0, 0), (3, 5), (9, 9), (11, 12)])
def test_matches_the_region_of_non_zero_input_gradient(position):
    net = conv_stack()
    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    out = net(x)
    i, j = position
    i, j = min(i, out.shape[2] - 1), min(j, out.shape[3] - 1)
    (grad,) = torch.autograd.grad(out[0, 0, i, j], x)
    rows, cols = torch.nonzero(grad[0].abs().sum(0), as_tuple=True)
    observed = (rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1)
    assert receptive_field(net, "4", (64, 64)).box(i, j) == observed


def test_same_padding_conv_and_the_layer_itself_count():
    net = nn.Sequential(nn.Conv2d(3, 2, 5, padding="same"), nn.Conv2d(2, 2, 3, stride=2)).eval()
    rf = receptive_field(net, "0", (20, 20))
    assert (rf.start, rf.jump, rf.size) == ((-2, -2), (1, 1), (5, 5))
    rf = receptive_field(net, "1", (20, 20))
    assert (rf.start, rf.jump, rf.size) == ((-2, -2), (2, 2), (7, 7))


@pytest.mark.slow
def test_efficientnet_block_receptive_field_contains_the_gradient_region(lite0):
    net = lite0.module
    rf = receptive_field(net, "_blocks.3", (224, 224))
    assert rf.jump == (8, 8)
    captured = {}
    handle = net._blocks[3].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    x = torch.randn(1, 3, 224, 224, requires_grad=True)
    try:
        net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(captured["out"][0, :, 12, 9].sum(), x)
    rows, cols = torch.nonzero(grad[0].abs().sum(0), as_tuple=True)
    top, left, bottom, right = rf.box(12, 9)
    assert top <= rows.min() and rows.max() < bottom and left <= cols.min() and cols.max() < right
    # ReLU6 may zero a few border gradients, but the observed box spans nearly the analytic one
    assert (rows.max() - rows.min() + 1) >= 0.8 * (bottom - top)
