"""VGG feature stacks (D2-Net backbone): the 2x2 max pools are the adaptive steps. Guarantees
against torchvision's dense stacks and the emulation with L = 1, 2, 3."""
import copy
from functools import lru_cache

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from tests.support import emulation as emu
from tests.support.rounding import LayerCheck
from tests.support.keep import as_keep
from adapters import CADVGGFeatures, convert
from cad_spconv import LevelPlan

# (torchvision builder, prefix up to relu4_3: stride 8, as D2-Net)
STACKS = {"vgg16": 23, "vgg16_bn": 33}
ODD = (29, 43)
EVEN = (32, 48)


@lru_cache(maxsize=2)
def features(name: str, dtype=torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    stack = emu.prepare(getattr(tvm, name)().features[:STACKS[name]], dtype)
    # torchvision zeroes VGG's conv biases; prepare draws them (a dropped bias must show)
    assert all(bool((m.bias != 0).all()) for m in stack if isinstance(m, nn.Conv2d))
    return stack


def images(size, dtype=torch.float64, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def edited(stack: nn.Sequential, finest: int, ceil_mode=False) -> nn.Sequential:
    """A copy with the pools from ``finest`` on removed and every conv after a removed pool
    dilated by the removed stride (all kept), or with those pools in ceil mode."""
    stack = copy.deepcopy(stack)
    pools, dilation = 0, 1
    for i, m in enumerate(stack):
        if isinstance(m, nn.MaxPool2d):
            if 2 ** pools >= finest:
                if ceil_mode:
                    m.ceil_mode = True
                else:
                    stack[i] = nn.Identity()
                    dilation *= 2
            pools += 1
        elif isinstance(m, nn.Conv2d) and not ceil_mode:
            m.dilation, m.padding = (dilation,) * 2, (dilation,) * 2
    return stack


def grid_at(size, finest):
    """torchvision's floor-mode pools before the finest stride."""
    h, w = size
    while finest > 1:
        h, w, finest = h // 2, w // 2, finest // 2
    return h, w


@pytest.mark.parametrize("name,finest", [("vgg16", 1), ("vgg16_bn", 2), ("vgg16", 4)])
def test_all_kept_equals_stack_at_finest_stride(name, finest):
    stack = features(name)
    cad = convert(stack, finest, 8)
    x = images(ODD)
    with torch.no_grad():
        out = cad(x, torch.ones(2, *ODD, dtype=torch.bool))
        emu.assert_rel(out, edited(stack, finest)(x))


@pytest.mark.parametrize("name", list(STACKS))
@pytest.mark.parametrize("finest", [1, 4])
def test_none_kept_equals_stack_at_coarsest_stride(name, finest):
    """CAD blocks are clipped at the border: on odd sizes the adaptive pools equal ceil-mode
    pools; where the grid divides, torchvision's own (floor-mode) stack."""
    stack = features(name)
    cad = convert(stack, finest, 8)
    with torch.no_grad():
        x = images(ODD)
        feats = cad.forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), edited(stack, finest, ceil_mode=True)(x))
        x = images(EVEN)
        feats = cad.forward_features(x, torch.zeros(2, *EVEN, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), stack(x))


@pytest.mark.parametrize("name", list(STACKS))
@pytest.mark.parametrize("finest,kind", [(4, "keep"), (2, "levels"), (1, "map"), (1, "keep")])
@pytest.mark.parametrize("semantics", ["paper", "reference"])
def test_matches_dense_emulation(name, finest, kind, semantics, device):
    stack = features(name)
    stack = stack if device.type == "cpu" else copy.deepcopy(stack).to(device)
    cad = convert(stack, finest, 8, semantics=semantics)
    x = images(ODD).to(device)
    spec, levels = emu.mixed_masks(12, 2, grid_at(ODD, finest), cad.num_levels, kind)
    keep = as_keep(spec, cad.num_levels, device)
    if isinstance(keep, LevelPlan):  # a plan carries its semantics; masks take the model's
        keep = keep.with_semantics(semantics)
    with torch.no_grad():
        out = cad(x, keep)
        expected = emu.vgg_features(stack, x, levels, finest, 8, semantics).dense()
    emu.assert_rel(out, expected)
    assert isinstance(cad, CADVGGFeatures) and cad.num_levels == {4: 1, 2: 2, 1: 3}[finest]


def test_matches_dense_emulation_float32():
    stack = features("vgg16_bn", torch.float32)
    cad = convert(stack, 2, 8)
    x = images(ODD, torch.float32)
    spec, levels = emu.mixed_masks(13, 2, grid_at(ODD, 2), 2, "keep")
    with torch.no_grad():
        out = cad(x, spec)
        expected = emu.vgg_features(copy.deepcopy(stack).double(), x.double(), levels, 2, 8)
    emu.assert_rel(out.double(), expected.dense(), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layer_by_layer(dtype):
    """VGG-16-BN in float32 and bfloat16: every conv and batch norm within its rounding bound
    on the input it got, every max pool exact (``rounding.LayerCheck``)."""
    stack = emu.prepare(copy.deepcopy(features("vgg16_bn")), dtype)
    cad = convert(stack, 2, 8)
    spec, levels = emu.mixed_masks(13, 2, grid_at(ODD, 2), 2, "keep")
    with torch.no_grad(), LayerCheck(cad, levels) as check:
        assert cad(images(ODD, dtype), spec).dtype == dtype
    kinds = {type(m).__name__ for name, m in cad.named_modules()
             if name in {n for n, _ in check.ratios}}
    assert kinds == {"CADConv2d", "CADBatchNorm2d", "CADMaxPool2d"}, kinds


def test_keep_at_image_resolution_ignores_pixels_dropped_by_floor_pools():
    """Image 29x43 at finest stride 4: grid 7x10 (floor); a cell is kept if any pixel of its
    4x4 footprint is; the last row (28) and columns (40..42) fall outside every footprint."""
    stack = features("vgg16")
    cad = convert(stack, 4, 8)
    x = images(ODD)
    keep = torch.zeros(2, *ODD, dtype=torch.bool)
    keep[0, 28, :] = True     # dropped by the floor-mode pools: keeps nothing
    keep[1, 5, 9] = True      # cell (1, 2)
    grid = torch.zeros(2, 7, 10, dtype=torch.bool)
    grid[1, 1, 2] = True
    with torch.no_grad():
        from_image = cad(x, keep)
        levels = cad.last_plan.levels
        emu.assert_rel(from_image, cad(x, grid))
    assert cad.last_plan.grid == (7, 10)
    # by hand: image 0 keeps nothing (all merged), image 1 the 2x2 block around cell (1, 2)
    assert bool((levels[0] == 1).all())
    assert torch.equal(levels[1, 0:2, 2:4], torch.zeros(2, 2, dtype=levels.dtype))
    assert int((levels[1] == 0).sum()) == 4


def test_full_vgg_and_bad_strides_are_refused():
    with torch.device("meta"):
        full = tvm.vgg11()
    with pytest.raises(TypeError, match="features"):
        convert(full)
    stack = full.features  # 5 pools: stride 32
    with pytest.raises(ValueError, match="coarsest_stride must be the stride the stack ends at"):
        convert(stack, 4, 8)
    with pytest.raises(ValueError, match="finest_stride must be one of"):
        convert(stack[:6], 8, 16)
    # only the unpadded 2x2/2 pool is an adaptive step (a padded one, a 3x3 window or a
    # dilated one would change the grid the stack's later layers see)
    for pool in (nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 2, padding=1),
                 nn.MaxPool2d(2, 2, dilation=2)):
        bad = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool)
        with pytest.raises(TypeError, match=r"cannot convert 1 .*MaxPool2d"):
            convert(bad, 1, 2)
    # the dense part (before the finest stride) is checked too: a strided or unpadded conv
    # there would put the finest grid at another stride than the pools count
    for conv, match in ((nn.Conv2d(4, 4, 3, 2, 1), "strided conv before the finest stride"),
                        (nn.Conv2d(4, 4, 3, padding=0), "only same padding")):
        stack = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), conv, nn.MaxPool2d(2, 2),
                              nn.Conv2d(4, 4, 3, padding=1), nn.MaxPool2d(2, 2))
        with pytest.raises(TypeError, match=rf"cannot convert 1 .*{match}"):
            convert(stack, 2, 4)
