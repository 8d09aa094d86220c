"""Analytic receptive fields against a hand computation and against input gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sacv.method.receptive_field import receptive_field


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


def positive(net: nn.Module) -> nn.Module:
    """Double precision, non-negative conv weights summing to 1 per output channel: with a positive
    input every ReLU stays open and the input gradient of one output position is non-zero on
    exactly the pixels it depends on."""
    torch.manual_seed(0)
    with torch.no_grad():
        for sub in net.modules():
            if isinstance(sub, nn.Conv2d):
                sub.weight.uniform_(0.5, 1.0)
                sub.weight /= sub.weight.sum((1, 2, 3), keepdim=True)
    return net.double().eval()


def gradient_box(output: torch.Tensor, x: torch.Tensor, i: int, j: int) -> tuple[int, int, int, int]:
    """Bounding box (top, left, bottom, right) of the non-zero input gradient of position (i, j)."""
    (grad,) = torch.autograd.grad(output[0, :, i, j].sum(), x, retain_graph=True)
    rows, cols = torch.nonzero(grad[0].abs().sum(0), as_tuple=True)
    return rows.min().item(), cols.min().item(), rows.max().item() + 1, cols.max().item() + 1


RESNET18_FIELDS = {  # (start, jump, size) per axis, composed by hand along the longest path
    "layer1": (-21, 4, 43),  # conv1 7x7/2 (start -3, size 7), maxpool 3/2, four 3x3 convs
    "layer2.0.conv1": (-25, 8, 51),
    "layer2.0.downsample.0": (-21, 8, 43),  # the 1x1/2 shortcut: jump 8, not 16
    "layer2.0": (-33, 8, 67),  # the residual sum sees what its longer path sees
    "layer2": (-49, 8, 99),
    "layer3": (-105, 16, 211),
    "layer4": (-217, 32, 435),
}


@pytest.mark.parametrize("layer", RESNET18_FIELDS)
def test_resnet18_fields_match_a_hand_computation(layer):
    import torchvision

    rf = receptive_field(torchvision.models.resnet18(weights=None), layer, (224, 224))
    start, jump, size = RESNET18_FIELDS[layer]
    assert (rf.start, rf.jump, rf.size) == ((start, start), (jump, jump), (size, size))


@pytest.fixture(scope="module")
def resnet18_outputs():
    """resnet18 at 256x256 with the max pool replaced by an average pool of the same geometry (a max
    passes gradient to one pixel per window), its input and the outputs of layer2..layer4."""
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    net.maxpool = nn.AvgPool2d(3, stride=2, padding=1)
    net = positive(net)
    x = torch.rand(1, 3, 256, 256, dtype=torch.float64, requires_grad=True)
    h = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    outputs = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        h = outputs[name] = getattr(net, name)(h)
    return net, x, outputs


@pytest.mark.parametrize(
    "layer, position",
    [("layer2", (0, 0)), ("layer2", (15, 20)), ("layer3", (8, 8)), ("layer4", (0, 0)), ("layer4", (7, 6))],
)
def test_resnet18_field_equals_the_region_of_non_zero_input_gradient(resnet18_outputs, layer, position):
    net, x, outputs = resnet18_outputs
    rf = receptive_field(net, layer, (256, 256))
    assert rf.box(*position) == gradient_box(outputs[layer], x, *position)


class DilatedPyramid(nn.Module):
    """Stem conv /2 -> parallel 3x3 convs of dilation 1, 2, 4 concatenated -> 1x1 fuse + residual,
    optionally gated by squeeze-and-excitation -> explicit F.pad -> 3x3/2 head."""

    def __init__(self, gate: bool = False):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.branches = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=d, dilation=d) for d in (1, 2, 4))
        self.fuse = nn.Conv2d(12, 4, 1)
        self.se = nn.Conv2d(4, 4, 1) if gate else None
        self.head = nn.Conv2d(4, 2, 3, stride=2)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.fuse(torch.cat([branch(x) for branch in self.branches], dim=1)) + x
        if self.se is not None:
            y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        return self.head(nn.functional.pad(y, (1, 0, 2, 0)))


def test_dilated_branches_match_a_hand_computation():
    # stem: start -1, jump 2, size 3; dilation-4 branch (k_eff 9, pad 4): start -9, size 19, the
    # widest of the concatenated branches; pad (top 2, left 1): start -13 rows, -11 cols; head: size 23
    net = DilatedPyramid().eval()
    fuse, head = receptive_field(net, "fuse", (48, 48)), receptive_field(net, "head", (48, 48))
    assert (fuse.start, fuse.jump, fuse.size) == ((-9, -9), (2, 2), (19, 19))
    assert (head.start, head.jump, head.size) == ((-13, -11), (4, 4), (23, 23))


@pytest.mark.parametrize("position", [(0, 0), (5, 7), (11, 11)])
def test_dilated_branches_field_equals_the_region_of_non_zero_input_gradient(position):
    net = positive(DilatedPyramid())
    x = torch.rand(1, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    assert receptive_field(net, "head", (48, 48)).box(*position) == gradient_box(net(x), x, *position)


def test_a_global_context_gate_keeps_the_spatial_field_and_itself_sees_the_whole_input():
    gated, plain = DilatedPyramid(gate=True).eval(), DilatedPyramid().eval()
    assert receptive_field(gated, "head", (48, 48)) == receptive_field(plain, "head", (48, 48))
    se = receptive_field(gated, "se", (48, 48))
    assert se.box(0, 0) == (0, 0, 48, 48)


class Upsampling(nn.Module):
    def forward(self, x):
        return nn.functional.interpolate(x, scale_factor=2.0)


class MixedSteps(nn.Module):
    def __init__(self):
        super().__init__()
        self.valid = nn.Conv2d(3, 2, 9)  # 16 -> 8, jump 1
        self.strided = nn.Conv2d(3, 2, 3, stride=2, padding=1)  # 16 -> 8, jump 2

    def forward(self, x):
        return self.valid(x) + self.strided(x)


@pytest.mark.parametrize(
    "net, match",
    [
        (nn.Sequential(nn.Conv2d(3, 2, 3), Upsampling(), nn.Conv2d(2, 2, 3)), "'interpolate' maps spatial size"),
        (nn.Sequential(MixedSteps(), nn.Conv2d(2, 2, 3)), r"step \[\(1, 1\), \(2, 2\)\] input pixels apart"),
    ],
)
def test_ops_that_break_the_grid_are_refused_with_a_reason(net, match):
    with pytest.raises(ValueError, match=match):
        receptive_field(net, str(len(net) - 1), (16, 16))
