"""ResNet / ResNeXt / Wide ResNet classifiers: guarantees against torchvision's dense networks
and the whole converted network against the independent emulation (float64, random weights,
random batch-norm statistics, odd image sizes, a batch of 2 with different masks)."""
import copy
from functools import lru_cache

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.resnet import Bottleneck

from tests.support import emulation as emu
from tests.support.keep import as_keep
from tests.support.rounding import LayerCheck
from adapters import CADResNet, UnsupportedModelError, convert
from adapters.resnet import CADResNetFeatures, convert_resnet
from cad_spconv import CADTensor, LevelPlan
from cad_spconv.backend import spconv_status

# the full set of checks on one BasicBlock and one Bottleneck network; every other family
# member gets the combined check below (the big ones only with --runslow)
ARCHS = ["resnet18", "resnet50"]
OTHERS = ["resnet34", "resnext50_32x4d", "wide_resnet50_2",
          pytest.param("resnet101", marks=pytest.mark.slow),
          pytest.param("resnet152", marks=pytest.mark.slow),
          pytest.param("resnext101_32x8d", marks=pytest.mark.slow),
          pytest.param("resnext101_64x4d", marks=pytest.mark.slow),
          pytest.param("wide_resnet101_2", marks=pytest.mark.slow)]
ODD = (33, 47)        # finest grid 5x6 at stride 8
MIXED = (49, 67)      # finest grid 7x9 at stride 8, 13x17 at stride 4
GRID8 = (7, 9)


@lru_cache(maxsize=4)
def model(arch: str, dtype=torch.float64, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return emu.prepare(getattr(tvm, arch)(num_classes=10, **kwargs), dtype)


def images(size, dtype=torch.float64, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def trunk(m: nn.Module) -> nn.Module:
    return nn.Sequential(*list(m.children())[:-2])


def dilated_copy(m: nn.Module, stride: int) -> nn.Module:
    """The network at output stride ``stride`` made by editing a copy: strides of the stages
    past ``stride`` become 1 and every conv after a removed stride is dilated by it (for
    Bottlenecks this is torchvision's replace_stride_with_dilation, checked below)."""
    m = copy.deepcopy(m)
    s = 4
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(m, name)):
            unit = name != "layer1" and i == 0
            s_out = 2 * s if unit else s
            strided = block.conv2 if isinstance(block, Bottleneck) else block.conv1
            after = [] if isinstance(block, Bottleneck) else [block.conv2]
            if unit and s_out > stride:
                strided.stride = (1, 1)
                block.downsample[0].stride = (1, 1)
            for conv, s_in in [(strided, s)] + [(c, s_out) for c in after]:
                d = max(1, s_in // stride)
                conv.dilation, conv.padding = (d, d), (d, d)
            s = s_out
    return m


def finest_reference(arch, stride):
    """torchvision's own network at ``stride`` for Bottleneck archs; an edited copy for
    BasicBlock archs (torchvision's BasicBlock refuses dilation)."""
    base = model(arch)
    if isinstance(base.layer1[0], Bottleneck):
        flags = [8 * 2 ** i > stride for i in range(3)]  # layer2..4 past the stride
        torch.manual_seed(0)
        ref = emu.prepare(getattr(tvm, arch)(num_classes=10, replace_stride_with_dilation=flags))
        ref.load_state_dict(base.state_dict())
        return ref
    return dilated_copy(base, stride)


def test_dilated_copy_is_torchvisions_rule_for_bottlenecks():
    base = model("resnet50")
    for stride, flags in [(8, [False, True, True]), (16, [False, False, True])]:
        edited = dilated_copy(base, stride)
        tv = getattr(tvm, "resnet50")(num_classes=10, replace_stride_with_dilation=flags)
        for (name, a), (_, b) in zip(edited.named_modules(), tv.named_modules()):
            if isinstance(a, nn.Conv2d):
                assert (a.stride, a.dilation, a.padding) == (b.stride, b.dilation, b.padding), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("finest,coarsest", [(8, 16), (4, 32)])
def test_all_kept_equals_network_at_finest_stride(arch, finest, coarsest):
    cad = convert(model(arch), finest, coarsest)
    x = images(ODD)
    with torch.no_grad():
        out = cad(x, torch.ones(2, 1, *ODD, dtype=torch.bool))
        emu.assert_rel(out, finest_reference(arch, finest)(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_none_kept_equals_network_at_coarsest_stride(arch):
    base = model(arch)
    with torch.no_grad():
        for coarsest, ref in [(32, base), (16, finest_reference(arch, 16))]:
            cad = convert(base, 8, coarsest)
            x = images(ODD)
            feats = cad.forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
            expected = trunk(ref)(x)
            emu.assert_rel(feats.dense(grid="step"), expected)
            # densified: the coarse output repeated (nearest) over the finest grid
            s = 2 ** cad.num_levels
            rep = expected.repeat_interleave(s, 2).repeat_interleave(s, 3)
            H, W = feats.spatial_shape
            emu.assert_rel(feats.dense(), rep[:, :, :H, :W])
        # logits: the global pool is area-weighted, equal to torchvision's plain mean when the
        # finest grid is a multiple of the coarse block (at odd grids border sites weigh less)
        x = images((64, 64))
        cad = convert(base, 8, 32)
        emu.assert_rel(cad(x, torch.zeros(2, 64, 64, dtype=torch.bool)), base(x))


@pytest.mark.parametrize("arch", ARCHS)
def test_guarantee_2_random_masks(arch):
    """For any mask the densified output sampled every 2**L cells is the stride-c network."""
    base = model(arch)
    cad = convert(base, 8, 32)
    x = images(MIXED)
    with torch.no_grad():
        expected = trunk(base)(x)
        for seed, kind in [(0, "keep"), (1, "levels")]:
            spec, _ = emu.mixed_masks(seed, 2, GRID8, 2, kind)
            feats = cad.forward_features(x, spec)
            emu.assert_rel(feats.dense()[:, :, ::4, ::4], expected)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("finest,coarsest,kind", [(8, 16, "keep"), (8, 32, "levels"),
                                                  (4, 16, "map")])
@pytest.mark.parametrize("semantics", ["paper", "reference"])
def test_matches_dense_emulation(arch, finest, coarsest, kind, semantics, device):
    base = model(arch) if device.type == "cpu" else copy.deepcopy(model(arch)).to(device)
    cad = convert(base, finest, coarsest, semantics=semantics)
    x = images(MIXED).to(device)
    grid = (-(-MIXED[0] // finest), -(-MIXED[1] // finest))
    spec, levels = emu.mixed_masks(3, 2, grid, cad.num_levels, kind)
    keep = as_keep(spec, cad.num_levels, device)
    if isinstance(keep, LevelPlan):  # a plan carries its semantics; masks take the model's
        keep = keep.with_semantics(semantics)
    with torch.no_grad():
        out = cad(x, keep)
        expected = emu.resnet_classifier(base, x, levels, finest, coarsest, semantics)
    emu.assert_rel(out, expected)
    assert (cad.last_plan.levels.cpu().numpy() == levels).all()


@pytest.mark.parametrize("arch", OTHERS)
def test_family_member(arch):
    """All kept == the finest-stride network, none kept == the coarsest-stride network, and the
    emulation for a random mask (L = 1)."""
    base = model(arch)
    x = images(ODD)
    cad = convert(base, 8, 16)
    spec, levels = emu.mixed_masks(11, 2, (5, 6), 1, "keep")
    with torch.no_grad():
        emu.assert_rel(cad(x, torch.ones(2, *ODD, dtype=torch.bool)), finest_reference(arch, 8)(x))
        emu.assert_rel(cad(x, spec), emu.resnet_classifier(base, x, levels, 8, 16))
        feats = convert(base, 8, 32).forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), trunk(base)(x))


@pytest.mark.parametrize("arch", ["resnet18", "resnext50_32x4d"])
def test_matches_dense_emulation_float32(arch):
    base = emu.prepare(getattr(tvm, arch)(num_classes=10), torch.float32)
    cad = convert(base, 8, 32)
    x = images(MIXED, torch.float32)
    spec, levels = emu.mixed_masks(4, 2, GRID8, 2, "keep")
    with torch.no_grad():
        out = cad(x, spec)
        expected = emu.resnet_classifier(base.double(), x.double(), levels, 8, 32)
    emu.assert_rel(out.double(), expected, torch.float32)


@pytest.mark.parametrize("blocks,semantics", [("basic", "paper"), ("grouped bottleneck", "paper"),
                                              ("grouped bottleneck", "reference")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layer_by_layer(blocks, semantics, dtype):
    """The converted network in float32 and bfloat16 (ResNet-18, and a narrow ResNeXt for
    grouped convs and in-place batch norms; two images with different masks, three levels):
    every conv and batch norm within its rounding bound on the input it got
    (``rounding.LayerCheck``)."""
    torch.manual_seed(0)
    base = emu.prepare(tvm.resnet18(num_classes=10) if blocks == "basic" else tvm.ResNet(
        Bottleneck, [1, 2, 1, 1], num_classes=10, groups=4, width_per_group=8), dtype)
    cad = convert(base, 4, 32, semantics=semantics)
    x = images(MIXED, dtype)
    spec, levels = emu.mixed_masks(6, 2, (13, 17), 3, "levels")
    with torch.no_grad(), LayerCheck(cad, levels) as check:
        assert cad(x, spec).dtype == dtype
    names = {name for name, _ in check.ratios}
    assert {"layer2.0.conv1", "layer4.0.bn2"} <= names  # the check saw the adaptive trunk
    assert len(names) == len(check.ratios)  # each layer once


SPCONV = spconv_status()[0]


@pytest.mark.skipif(not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}")
def test_spconv_engine_matches_emulation():
    base = model("resnet18")
    cad = convert(base, 8, 32, engine="spconv")
    x = images(MIXED)
    spec, levels = emu.mixed_masks(5, 2, GRID8, 2, "keep")
    with torch.no_grad():
        emu.assert_rel(cad(x, spec), emu.resnet_classifier(base, x, levels, 8, 32))


@pytest.mark.parametrize("flags", [[False, True, True], [True, True, True], [False, False, True],
                                   [False, True, False]])
def test_any_replace_stride_with_dilation_converts_the_same(flags):
    """The given model's own dilation setting does not matter: the CAD network is defined by
    the strides, and the dense part is rebuilt with the standard strides where needed."""
    base = model("resnet50")
    torch.manual_seed(0)
    given = emu.prepare(tvm.resnet50(num_classes=10, replace_stride_with_dilation=flags))
    given.load_state_dict(base.state_dict())
    x = images(MIXED)
    spec, levels = emu.mixed_masks(6, 2, GRID8, 1, "keep")
    with torch.no_grad():
        before = given(x)
        cad = convert(given, 8, 16)
        emu.assert_rel(cad(x, spec), emu.resnet_classifier(base, x, levels, 8, 16))
        emu.assert_rel(given(x), before)  # the given model is untouched
    assert isinstance(cad, CADResNet)


# ---------------------------------------------------------------------- features
def identity_fc(m: nn.Module) -> nn.Module:
    m = copy.deepcopy(m)
    m.fc = nn.Identity()
    return m


@pytest.mark.parametrize("arch", ARCHS)
def test_fc_identity_gives_the_pooled_features(arch):
    """Issue 11 item 6: a ResNet whose fc is nn.Identity() (the usual way to get features) was
    refused; it converts and returns the (area-weighted) pooled vector."""
    base = identity_fc(model(arch))
    x = images(MIXED)
    with torch.no_grad():
        cad = convert(base, 8, 16)
        feats = cad(x, torch.ones(2, 1, *MIXED, dtype=torch.bool))
        assert feats.shape == (2, base.layer4[-1].conv1.in_channels)
        emu.assert_rel(feats, identity_fc(finest_reference(arch, 8))(x))
        spec, levels = emu.mixed_masks(7, 2, GRID8, 1, "keep")
        emu.assert_rel(cad(x, spec), emu.resnet_classifier(base, x, levels, 8, 16))
        x64 = images((64, 64))
        emu.assert_rel(convert(base, 8, 32)(x64, torch.zeros(2, 64, 64, dtype=torch.bool)),
                       base(x64))
    assert set(cad.parts()) == {"dense", "sparse", "head"}


LAYERS = {"layer1": "low", "layer3": "feat3", "layer4": "out"}


def stage_outputs(m: nn.Module, x, names):
    from torchvision.models._utils import IntermediateLayerGetter
    return IntermediateLayerGetter(m, {n: n for n in names})(x)


@pytest.mark.parametrize("arch", ARCHS)
def test_return_layers_guarantees(arch):
    """Backbone features, torchvision IntermediateLayerGetter style: all kept == the network at
    the finest stride, none kept == the strided network (nearest-upsampled on the finest grid,
    exactly itself on the step's grid), and the dense emulation for masks that differ per
    image, for every returned stage."""
    base = model(arch)
    cad = convert_resnet(base, 8, 32, return_layers=LAYERS)
    assert isinstance(cad, CADResNetFeatures)
    x = images(MIXED)
    with torch.no_grad():
        out = cad(x, torch.ones(2, 1, *MIXED, dtype=torch.bool))
        assert list(out) == ["low", "feat3", "out"]
        want = stage_outputs(finest_reference(arch, 8), x, LAYERS)
        for name, key in LAYERS.items():
            emu.assert_rel(out[key], want[name])
        out = cad(x, torch.zeros(2, 1, *MIXED, dtype=torch.bool))
        want = stage_outputs(base, x, LAYERS)
        for name, key in LAYERS.items():
            s = 2 ** {"layer1": 0, "layer3": 1, "layer4": 2}[name]
            rep = want[name].repeat_interleave(s, 2).repeat_interleave(s, 3)
            emu.assert_rel(out[key], rep[:, :, :out[key].shape[-2], :out[key].shape[-1]])
        spec, levels = emu.mixed_masks(9, 2, GRID8, 2, "keep")
        out = cad(x, spec)
        _, want = emu.resnet_trunk(dict(base.named_children()), x, levels, 8, 32,
                                   tuple(LAYERS))
        for name, key in LAYERS.items():
            emu.assert_rel(out[key], want[name].dense())
        sparse = convert_resnet(base, 8, 32, return_layers=LAYERS, dense=False)(x, spec)
        assert isinstance(sparse["out"], CADTensor) and not isinstance(sparse["low"], CADTensor)
        emu.assert_rel(sparse["out"].dense(grid="step"), stage_outputs(base, x, ["layer4"])["layer4"])
        emu.assert_rel(sparse["feat3"].dense(), out["feat3"])


def test_return_layers_up_to_the_coarsest_stride_only():
    base = model("resnet18")
    cad = convert_resnet(base, 8, 16, return_layers={"layer3": "feat"})
    assert not hasattr(cad, "layer4") and not hasattr(cad, "fc")
    x = images(ODD)
    spec, levels = emu.mixed_masks(2, 2, (5, 6), 1, "levels")
    with torch.no_grad():
        out = cad(x, spec)["feat"]
        _, want = emu.resnet_trunk(dict(base.named_children()), x, levels, 8, 16, ("layer3",))
    emu.assert_rel(out, want["layer3"].dense())
    with pytest.raises(ValueError, match=r"ends at layer3 \(stride 16\), before coarsest_stride 32"):
        convert_resnet(base, 8, 32, return_layers={"layer3": "feat"})
    with pytest.raises(ValueError, match=r"'fc' is not a child of the ResNet trunk.*nn.Identity"):
        convert_resnet(base, 8, 16, return_layers={"fc": "logits"})
    with pytest.raises(TypeError, match="non-empty dict"):
        convert_resnet(base, 8, 16, return_layers={})
    with pytest.raises(ValueError, match="repeated output names"):
        convert_resnet(base, 8, 16, return_layers={"layer3": "a", "layer4": "a"})
    with pytest.raises(ValueError, match="dense= applies with return_layers only"):
        convert_resnet(base, 8, 16, dense=False)
    flat = copy.deepcopy(base)
    flat.avgpool = nn.Identity()
    with pytest.raises(UnsupportedModelError, match=r"avgpool \(nn.Identity\).*return_layers"):
        convert(flat, 8, 16)


def test_return_layers_fold_and_count():
    """Feature models fold their batch norms (stem included) and count multiply-adds."""
    from adapters import fold_batchnorm
    from cad_spconv import count_macs
    base = model("resnet18")
    cad = convert_resnet(base, 8, 32, return_layers=LAYERS)
    x = images(MIXED)
    spec, _ = emu.mixed_masks(9, 2, GRID8, 2, "keep")
    with torch.no_grad():
        want = cad(x, spec)
        folded = fold_batchnorm(cad)
        got = folded(x, spec)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    for key in want:
        emu.assert_rel(got[key], want[key])
    macs = count_macs(cad, x, spec)
    assert set(macs["parts"]) == {"dense", "sparse"} and macs["total"] > 0
    assert len(set(macs["per_image"])) == 2  # the images' masks differ


# ---------------------------------------------------------------------- blocks on grid maps
def _op_by_op(run):
    """``run()`` with a no-op global module hook: every block goes op by op
    (``block_on_grid`` leaves hooked layers to their own calls)."""
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        return run()
    finally:
        handle.remove()


def _plan(levels):
    """(the plan of a level map, the map for the emulation)."""
    return LevelPlan.from_level_map(levels, 2), levels.numpy()


def _levels_at_least_one(batch, grid, seed):
    """Level maps without a kept cell (every level >= 1) that mix levels 1 and 2, different
    per image: sites are grid cells up to step 1 only."""
    gen = torch.Generator().manual_seed(seed)
    H, W = grid
    density = torch.tensor([[[0.3]], [[0.7]]])  # of level-2 blocks, per image
    top = torch.rand(batch, -(-H // 4), -(-W // 4), generator=gen) < density
    levels = 1 + top.repeat_interleave(4, 1).repeat_interleave(4, 2)[:, :H, :W].long()
    assert all(len(levels[b].unique()) == 2 for b in range(batch)) and not torch.equal(*levels)
    return levels


@pytest.mark.parametrize("arch", ARCHS)
def test_blocks_on_a_grid_run_as_dense_blocks(arch, monkeypatch):
    """Where a block's input and output sites are all the cells of one grid each, it runs on
    the NHWC map (``block_on_grid``): same features as op by op (float64) and as the
    emulation, for nothing kept, everything kept, levels 1 and 2 only (layer3's blocks on the
    map, layer4's op by op) and a fully mixed batch (op by op); with folded batch norms too.
    Train mode and hooked layers go op by op."""
    import adapters.resnet as R
    from adapters import fold_batchnorm
    from cad_spconv.macs import MacCounter

    used = []

    def spy(x, stride, layers):
        grid = real(x, stride, layers)
        used.append(grid is not None)
        return grid

    real = R.block_on_grid
    monkeypatch.setattr(R, "block_on_grid", spy)
    base = model(arch)
    layers = {"layer3": "feat3", "layer4": "out"}
    cad = convert_resnet(base, 8, 32, return_layers=layers)
    n3, n4 = len(base.layer3), len(base.layer4)
    x = images(MIXED)
    cases = {"none kept": (_plan(torch.full((2, *GRID8), 2)), [True] * (n3 + n4)),
             "all kept": (_plan(torch.zeros(2, *GRID8, dtype=torch.long)), [True] * (n3 + n4)),
             "levels 1, 2": (_plan(_levels_at_least_one(2, GRID8, 3)), [True] * n3 + [False] * n4),
             "mixed": (emu.mixed_masks(9, 2, GRID8, 2, "keep"), [False] * (n3 + n4))}
    folded = fold_batchnorm(cad)
    for name, ((spec, levels), expected) in cases.items():
        with torch.no_grad():
            used.clear()
            out = cad(x, spec)
            assert used == expected, name
            used.clear()
            slow = _op_by_op(lambda: cad(x, spec))
            assert not any(used), name
            _, want = emu.resnet_trunk(dict(base.named_children()), x, levels, 8, 32,
                                       tuple(layers))
            for stage, key in layers.items():
                assert torch.equal(out[key], slow[key]), (name, stage)
                emu.assert_rel(out[key], want[stage].dense())
            used.clear()
            emu.assert_rel(folded(x, spec)["out"], out["out"])
            assert used == expected, f"{name}, folded"
    spec = cases["none kept"][0][0]
    with torch.no_grad():
        used.clear()
        with MacCounter(cad, 2) as counter:
            cad(x, spec)
        assert not any(used) and counter.result()["total"] > 0
        train = copy.deepcopy(cad).train()
        used.clear()
        train(x, spec)
        assert not any(used)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_on_a_grid_give_the_bits_of_op_by_op(dtype):
    """On the map or op by op (as under a hook), the same ops on the same values: a MAC count
    or a debugging hook never changes a result (float32 and bfloat16, channels-last)."""
    base = copy.deepcopy(model("resnet50")).to(dtype).to(memory_format=torch.channels_last)
    cad = convert_resnet(base, 8, 32, return_layers={"layer4": "out"})
    x = images(MIXED).to(dtype).contiguous(memory_format=torch.channels_last)
    for levels in (torch.full((2, *GRID8), 2), torch.zeros(2, *GRID8, dtype=torch.long),
                   _levels_at_least_one(2, GRID8, 5)):
        plan = LevelPlan.from_level_map(levels, 2)
        with torch.no_grad():
            fast = cad(x, plan)["out"]
            slow = _op_by_op(lambda: cad(x, plan)["out"])
        assert fast.dtype == dtype and torch.equal(fast, slow)
