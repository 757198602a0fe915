"""A hand-built residual CNN (strided 3x3 convs, strided 1x1 shortcuts, residual adds, a dilated
layer after the coarsest stride): the guarantees of SEMANTICS.md and gradients."""
import numpy as np
import pytest
import torch
from torch import nn

from tests.support import dense_reference as ref
from cad_spconv import CADTensor
from cad_spconv.backend import spconv_status
from cad_spconv.nn import CADBatchNorm2d, CADConv2d, CADPointwise
from tests.support.inputs import random_masks
from tests.support.keep import as_keep
from tests.support.rounding import LayerCheck


class Block(nn.Module):
    """Residual block; ``dilate`` turns the stride into dilation as torchvision does."""

    def __init__(self, cin, cout, stride, dilation, dilate):
        super().__init__()
        d_first = dilation
        d_next = dilation * stride if dilate else dilation
        s = 1 if dilate else stride
        self.conv1 = nn.Conv2d(cin, cout, 3, s, d_first, d_first, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, d_next, d_next, bias=True)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1, s, bias=False)
        self.bn_s = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.out_dilation = d_next

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.bn_s(self.short(x)))


class ToyNet(nn.Module):
    """Dense net at the finest grid: ``num_levels`` strided blocks, then a dilation-2 conv."""

    def __init__(self, num_levels, dilate=False, width=6):
        super().__init__()
        blocks, d, c = [], 1, 3
        for _ in range(num_levels):
            blocks.append(Block(c, width, 2, d, dilate))
            d, c = blocks[-1].out_dilation, width
        self.blocks = nn.Sequential(*blocks)
        self.last = nn.Conv2d(width, width, 3, 1, 2 * d, 2 * d)

    def forward(self, x):
        return self.last(self.blocks(x))


class CADBlock(nn.Module):
    """The test's own conversion of a strided Block (parameters shared)."""

    def __init__(self, block: Block):
        super().__init__()
        self.conv1, self.conv2 = CADConv2d.from_module(block.conv1), CADConv2d.from_module(block.conv2)
        self.short = CADConv2d.from_module(block.short)
        self.bn1, self.bn2, self.bn_s = (CADBatchNorm2d.from_module(b) for b in (block.bn1, block.bn2, block.bn_s))
        self.relu = CADPointwise(nn.ReLU())

    def forward(self, x):
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.bn_s(self.short(x)))


class CADToy(nn.Module):
    def __init__(self, strided: ToyNet, num_levels):
        super().__init__()
        self.num_levels = num_levels
        self.blocks = nn.Sequential(*[CADBlock(b) for b in strided.blocks])
        self.last = CADConv2d.from_module(strided.last)

    def forward(self, x, keep):
        return self.last(self.blocks(CADTensor.from_dense(x, keep, self.num_levels)))


def randomize(net: nn.Module, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return net.eval()


def build(num_levels, dtype, device, seed=0):
    strided = randomize(ToyNet(num_levels), seed).to(dtype=dtype, device=device)
    dilated = ToyNet(num_levels, dilate=True).to(dtype=dtype, device=device).eval()
    dilated.load_state_dict(strided.state_dict())
    return strided, dilated, CADToy(strided, num_levels).eval()


def emulate(strided: ToyNet, x, levels, num_levels):
    """The whole network through the dense reference, every conv read via the owner map."""
    feats = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])

    def bn(m, f):
        return m(f[:, :, None, None])[:, :, 0, 0]

    for step, b in enumerate(strided.blocks):
        y = torch.relu(bn(b.bn1, ref.conv(feats, levels, step, 2, b.conv1.weight, b.conv1.bias)))
        y = bn(b.bn2, ref.conv(y, levels, step + 1, 1, b.conv2.weight, b.conv2.bias))
        s = bn(b.bn_s, ref.conv(feats, levels, step, 2, b.short.weight, b.short.bias))
        feats = torch.relu(y + s)
    return ref.conv(feats, levels, num_levels, 1, strided.last.weight, strided.last.bias, dilation=2)


GRIDS = [(13, 11), (16, 20), (9, 7)]


@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("grid", GRIDS)
def test_guarantees(num_levels, grid, device):
    torch.manual_seed(0)
    strided, dilated, cad = build(num_levels, torch.float64, device)
    x = torch.randn(3, 3, *grid, dtype=torch.float64, device=device)
    s = 2 ** num_levels
    with torch.no_grad():
        coarse, fine = strided(x), dilated(x)
        # all kept == the dilated network at the finest stride
        out = cad(x, torch.ones(3, *grid, dtype=torch.bool, device=device))
        torch.testing.assert_close(out.dense(), fine, rtol=1e-9, atol=1e-9)
        # none kept == the strided network; densified, its nearest upsampling
        out = cad(x, torch.zeros(3, *grid, dtype=torch.bool, device=device))
        torch.testing.assert_close(out.dense(grid="step"), coarse, rtol=1e-9, atol=1e-9)
        up = coarse.repeat_interleave(s, 2).repeat_interleave(s, 3)[:, :, :grid[0], :grid[1]]
        torch.testing.assert_close(out.dense(), up, rtol=1e-9, atol=1e-9)
        # Guarantee 2 and the dense emulation, for random masks (one per image)
        rng = np.random.default_rng(num_levels)
        for kind in ("keep", "levels", "map"):
            spec, masks = random_masks(rng, 3, grid, num_levels, kind)
            out = cad(x, as_keep(spec, num_levels, device))
            torch.testing.assert_close(out.dense()[:, :, ::s, ::s], coarse, rtol=1e-9, atol=1e-9)
            levels = ref.levels_from_masks(masks, num_levels)
            torch.testing.assert_close(out.features, emulate(strided, x, levels, num_levels),
                                       rtol=1e-9, atol=1e-9)


LOW_ENGINES = ["torch", "lattice", "products", "auto", "tuned", pytest.param(
    "spconv", marks=pytest.mark.skipif(not spconv_status()[0],
                                       reason=f"spconv engine unavailable: {spconv_status()[1]}"))]


def low_precision_run(num_levels, grid, dtype, engine, device, spoil=None):
    """The network and its input rounded to ``dtype`` and run there by ``engine`` (two images,
    each its own masks) under ``rounding.LayerCheck``; returns the check. ``spoil``: a forward hook put on
    the first block's ``conv2`` ahead of the check (the control's planted error)."""
    low = build(num_levels, torch.float64, device, seed=num_levels)[0].to(dtype)
    cad = CADToy(low, num_levels).eval()
    for m in cad.modules():
        if isinstance(m, CADConv2d):
            m.engine = engine
    if spoil is not None:
        cad.blocks[0].conv2.register_forward_hook(spoil)
    rng = np.random.default_rng(num_levels)
    spec, masks = random_masks(rng, 2, grid, num_levels, "levels")
    levels = ref.levels_from_masks(masks, num_levels)
    gen = torch.Generator().manual_seed(num_levels)
    x = torch.randn(2, 3, *grid, generator=gen, dtype=torch.float64).to(device, dtype)
    with torch.no_grad(), LayerCheck(cad, levels) as check:
        assert cad(x, as_keep(spec, num_levels, device)).features.dtype == dtype
    return check


@pytest.mark.parametrize("engine", LOW_ENGINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_levels,grid", [(1, (13, 11)), (2, (16, 20)), (3, (17, 23))])
def test_low_precision_network_layer_by_layer(num_levels, grid, dtype, engine, device):
    """The whole network in float32 and bfloat16, every engine: every conv and batch norm
    within its rounding bound on the input it got (``rounding.LayerCheck``; the float64
    network's guarantees are test_guarantees')."""
    if engine == "spconv" and dtype != torch.float32:
        pytest.skip("spconv has no bfloat16 kernels (its refusal: test_ops)")
    if device.type == "cuda" and dtype != torch.float32:
        pytest.skip("half-precision networks on CUDA: not run on a GPU yet (the per-op "
                    "CUDA tolerances are in test_ops)")
    check = low_precision_run(num_levels, grid, dtype, engine, device)
    convs = sum(isinstance(m, CADConv2d) for m in check.model.modules())
    assert len(check.ratios) == 2 * convs - 1  # every conv but the last has a batch norm


def test_layer_check_catches_a_precision_leak(device):
    """Control: one conv whose output is rounded through bfloat16 in the float32 network
    fails the check, naming that conv."""
    def through_bfloat16(m, args, out):
        return out.replace_feature(out.features.to(torch.bfloat16).float())

    low_precision_run(2, (16, 20), torch.float32, "torch", device)
    with pytest.raises(AssertionError, match=r"blocks\.0\.conv2 \(torch\): .* exceed the rounding"):
        low_precision_run(2, (16, 20), torch.float32, "torch", device, spoil=through_bfloat16)


ENGINES = ["torch", pytest.param("spconv", marks=pytest.mark.skipif(
    not spconv_status()[0], reason=f"spconv engine unavailable: {spconv_status()[1]}"))]


@pytest.mark.parametrize("engine", ENGINES)
def test_gradients_match_dense_emulation(engine, device):
    """Parent fill makes one input row feed several outputs under one tap: gradients must add up."""
    if engine == "spconv" and device.type == "cuda":
        pytest.skip("spconv has no float64 kernels on CUDA (refused: test_ops)")
    strided, _, cad = build(2, torch.float64, device, seed=3)
    for m in cad.modules():
        if isinstance(m, CADConv2d):
            m.engine = engine
    rng = np.random.default_rng(7)
    spec, masks = random_masks(rng, 2, (13, 11), 2, "levels")
    levels = ref.levels_from_masks(masks, 2)
    x = torch.randn(2, 3, 13, 11, dtype=torch.float64, device=device, requires_grad=True)
    params = [p for p in strided.parameters()]
    out = cad(x, [m.to(device) for m in spec]).features
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x] + params, g)
    expected = torch.autograd.grad(emulate(strided, x, levels, 2), [x] + params, g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
