"""The conversion contract: parameters shared and state_dict compatible, every keep form,
callable keeps (mask estimators), parts(), last_plan, gradients, and clear errors."""
import numpy as np
import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large, deeplabv3_resnet50

from tests.support import dense_reference as ref
from tests.support import emulation as emu
from adapters import CADResNet, CADSegmentation, UnsupportedModelError, convert
from cad_spconv.plan import LevelPlan
from cad_spconv.nn import CADConv2d
from cad_spconv.engines import EngineUnsupported

SIZE = (49, 67)   # finest grid 7x9 at stride 8
GRID = (7, 9)


def resnet(kind="resnet18", **kw):
    torch.manual_seed(0)
    return emu.prepare(getattr(tvm, kind)(num_classes=10, **kw))


def deeplab(aux=True):
    torch.manual_seed(0)
    return emu.prepare(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                          aux_loss=aux))


def vgg():
    torch.manual_seed(0)
    return emu.prepare(tvm.vgg16_bn().features[:33])


def images(size=SIZE, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def storages(module):
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values() if t.numel()}


@pytest.mark.parametrize("build,kwargs", [
    (resnet, {}), (lambda: resnet("resnext50_32x4d"), {}),
    (lambda: resnet("resnet50", replace_stride_with_dilation=[True, True, True]), {}),
    (deeplab, {}), (deeplab, dict(sparse_head=True)),
    (deeplab, dict(finest_stride=16, coarsest_stride=32)),
    (deeplab, dict(finest_stride=4, coarsest_stride=16)),
    (vgg, dict(finest_stride=2, coarsest_stride=8))])
def test_parameters_are_shared_and_state_dict_loads(build, kwargs):
    model = build()
    cad = convert(model, **kwargs)
    assert list(cad.state_dict()) == list(model.state_dict())  # the same keys, in order
    assert storages(cad) == storages(model)  # nothing copied: the same tensors
    cad.load_state_dict(model.state_dict())  # strict
    n_model = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in cad.parameters()) == n_model


def test_converted_model_follows_the_original_weights():
    model = resnet()
    cad = convert(model, 8, 16)
    x = images()
    keep = torch.ones(2, *SIZE, dtype=torch.bool)
    with torch.no_grad():
        before = cad(x, keep)
        model.layer4[1].conv2.weight.mul_(2)
        model.fc.bias.add_(1)
        assert not torch.allclose(cad(x, keep), before)
        model.layer4[1].conv2.weight.div_(2)
        model.fc.bias.sub_(1)
        emu.assert_rel(cad(x, keep), before)


def test_keep_forms_agree():
    model = resnet("resnet50")
    cad = convert(model, 8, 32)
    x = images()
    rng = np.random.default_rng(0)
    keep_img = rng.uniform(size=(2, *SIZE)) < np.array([0.003, 0.02])[:, None, None]
    keep_grid = ref.keep_to_grid(keep_img, GRID)  # any pixel of the 8x8 footprint
    levels = ref.levels_from_masks([keep_grid], 2)
    assert len(np.unique(levels)) == 3
    with torch.no_grad():
        expected = emu.resnet_classifier(model, x, levels, 8, 32)
        forms = {"image [B,h,w]": torch.from_numpy(keep_img),
                 "image [B,1,h,w]": torch.from_numpy(keep_img)[:, None],
                 "grid": torch.from_numpy(keep_grid)[:, None],
                 "list": [torch.from_numpy(keep_grid)],
                 "list at image resolution": [torch.from_numpy(keep_img)],
                 "plan": LevelPlan.from_level_map(torch.from_numpy(levels), 2),
                 "callable": lambda feats: torch.from_numpy(keep_grid)}
        for name, keep in forms.items():
            out = cad(x, keep)
            emu.assert_rel(out, expected)
            assert (cad.last_plan.levels.numpy() == levels).all(), name


def test_keep_module_sees_the_map_entering_the_first_adaptive_step():
    seen = {}

    class Estimator(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(512, 1, 1).double()

        def forward(self, feats):
            seen["shape"] = tuple(feats.shape)
            return self.conv(feats)[:, 0] > 0

    model = resnet("resnet50")
    cad = convert(model, 8, 16)
    est = Estimator()
    with torch.no_grad():
        cad(images(), est)
    assert seen["shape"] == (2, 512, *GRID)  # layer2 output at stride 8
    parts = cad.parts()
    assert parts["mask"] is est
    assert not any(p is est.conv.weight for p in cad.parameters())  # not part of the model
    with torch.no_grad():
        cad(images(), torch.ones(2, *GRID, dtype=torch.bool))
    assert "mask" not in cad.parts()


@pytest.mark.parametrize("build,kwargs,keys", [
    (resnet, {}, {"dense", "sparse", "head"}),
    (deeplab, {}, {"dense", "sparse", "head", "aux"}),
    (lambda: deeplab(aux=False), dict(sparse_head=True), {"dense", "sparse", "head"}),
    (vgg, dict(finest_stride=4, coarsest_stride=8), {"dense", "sparse"})])
def test_parts_cover_the_model(build, kwargs, keys):
    model = build()
    cad = convert(model, **kwargs)
    parts = cad.parts()
    assert set(parts) == keys
    covered = {id(p) for part in parts.values() for p in part.parameters()}
    assert covered == {id(p) for p in cad.parameters()}
    seen = [id(p) for part in parts.values() for p in part.parameters()]
    assert len(seen) == len(set(seen))  # parts are disjoint
    sparse_convs = [m for m in parts["sparse"].modules() if isinstance(m, nn.Conv2d)]
    assert sparse_convs and all(isinstance(m, CADConv2d) for m in sparse_convs)
    assert not any(isinstance(m, CADConv2d) for m in parts["dense"].modules())


def test_attributes_and_last_plan():
    cad = convert(deeplab(), finest_stride=4, coarsest_stride=32)
    assert isinstance(cad, CADSegmentation)
    assert (cad.finest_stride, cad.coarsest_stride, cad.num_levels) == (4, 32, 3)
    assert cad.last_plan is None
    with torch.no_grad():
        cad(images((37, 53)), torch.zeros(2, 37, 53, dtype=torch.bool))
    assert cad.last_plan.grid == (10, 14) and cad.last_plan.num_levels == 3
    cad = convert(resnet(), 16, 32)
    with torch.no_grad():
        logits = cad(images((97, 131)), torch.zeros(2, 97, 131, dtype=torch.bool))
    assert cad.last_plan.grid == (7, 9) and logits.shape == (2, 10)
    assert isinstance(cad, CADResNet)


def test_engine_is_passed_to_every_converted_conv():
    cad = convert(resnet(), 8, 16, engine="torch")
    convs = [m for m in cad.modules() if isinstance(m, CADConv2d)]
    assert convs and all(m.engine == "torch" for m in convs)


@pytest.mark.parametrize("build", [resnet, deeplab])
def test_converted_model_takes_the_source_mode(build):
    for training in (False, True):
        cad = convert(build().train(training), 8, 16)
        assert {m.training for m in cad.modules()} == {training}


@pytest.mark.parametrize("build", [resnet, deeplab, vgg])
def test_frozen_batch_norms_stay_frozen_and_direct_converters_take_the_mode(build):
    """Fine-tuning with frozen batch norms (``model.train()``, then every batch norm
    ``.eval()``): the converted batch norms keep their layer's eval mode, so a training forward
    leaves the running statistics alone; the family converters follow the source's mode too."""
    from adapters.segmentation import convert_segmentation
    from adapters.vgg import convert_vgg_features

    model = build().train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.eval()
    direct = {resnet: None, deeplab: convert_segmentation, vgg: convert_vgg_features}[build]
    strides = (4, 8) if build is vgg else (8, 16)
    keep = torch.rand(2, *SIZE, generator=torch.Generator().manual_seed(3)) < 0.05
    for cad in [convert(model, *strides)] + ([direct(model, *strides)] if direct else []):
        wrapped = [m for m in cad.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(wrapped) >= len(bns) and not any(m.training for m in wrapped)
        assert cad.training
        before = [m.running_mean.clone() for m in bns]
        cad(images(), keep)
        assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns))
    if direct:
        assert {m.training for m in direct(build().eval(), *strides).modules()} == {False}


def test_batch_norm_buffers_stay_shared_through_moves_and_casts():
    """A cast (or a move to a device) replaces module buffers; the converted batch norms share
    the source's buffer tables, so both models still see one set of running statistics."""
    model = resnet().float()
    cad = convert(model, 8, 16).train()
    cad.double()
    bn = model.layer4[0].bn1
    assert bn.running_mean.dtype == torch.float64 and model.fc.weight.dtype == torch.float64
    spec, _ = emu.mixed_masks(0, 2, GRID, 1, "keep")
    before = bn.running_mean.clone()
    cad(images(), spec)  # training forward: updates the running statistics
    assert not torch.equal(before, bn.running_mean)
    with torch.no_grad():
        model.eval()(images())  # the source runs in the new dtype throughout
    state = {k: v + 1 if k.endswith("running_var") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    cad_bn = next(m for n, m in cad.named_modules() if n.endswith("layer4.0.bn1"))
    assert torch.equal(cad_bn.running_var, bn.running_var)


def test_gradients_reach_the_original_parameters():
    model = resnet().train()
    cad = convert(model, 8, 16)
    spec, _ = emu.mixed_masks(0, 2, GRID, 1, "keep")
    cad(images(), spec).square().sum().backward()
    for p in (model.conv1.weight, model.layer3[0].conv1.weight, model.layer4[1].conv2.weight,
              model.fc.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


# ---------------------------------------------------------------------- errors
def test_unsupported_models_name_the_module_and_what_is_supported():
    with torch.device("meta"):
        mobilenet = tvm.mobilenet_v2()
        seg_mobile = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None)
    with pytest.raises(UnsupportedModelError, match=r"MobileNetV2.*Supported: torchvision ResNet"):
        convert(mobilenet)
    with pytest.raises(UnsupportedModelError, match=r"backbone\.0 .*only ResNet backbones"):
        convert(seg_mobile)
    model = resnet()
    model.layer2[1].bn1 = nn.GroupNorm(4, 128)
    with pytest.raises(UnsupportedModelError, match=r"layer2\.1\.bn1 .*GroupNorm"):
        convert(model, 8, 16)

    class MyBlock(tvm.resnet.BasicBlock):
        pass

    model = resnet()
    model.layer3[0].__class__ = MyBlock
    with pytest.raises(UnsupportedModelError,
                       match=r"layer3\.0 .*MyBlock.*BasicBlock or Bottleneck"):
        convert(model, 8, 16)
    # block convs whose geometry the converted block would replace are refused, not rebuilt
    for path, change in (("layer2.1.conv2", dict(dilation=(2, 1), padding=(2, 1))),
                         ("layer4.1.conv2", dict(dilation=(4, 2), padding=(4, 2))),
                         ("layer2.0.conv1", dict(stride=(2, 1))),
                         ("layer3.0.downsample.0", dict(stride=(2, 1))),
                         ("layer3.1.conv1", dict(padding=(0, 0)))):
        model = resnet()
        for key, value in change.items():
            setattr(model.get_submodule(path), key, value)
        with pytest.raises(UnsupportedModelError, match=rf"{path.replace('.', '[.]')} .*"
                                                        r"(stride must be|anisotropic|same padding)"):
            convert(model, 8, 16)
    # isotropic changes off torchvision's layouts (the converted network would not keep them)
    for kind, flags, changes, match in (
            ("resnet50", None, {"layer4.0.conv2": (1, 1), "layer4.0.downsample.0": (1, None)},
             r"layer4\.1\.conv2 has stride 1, dilation 1 where torchvision's layout has stride 1, "
             r"dilation 2"),  # "last stride 1" (re-identification models)
            ("resnet50", None, {"layer1.0.conv2": (1, 2)}, r"layer1\.0\.conv2 has .* dilation 2 "),
            ("resnet18", None, {"layer3.1.conv1": (1, 2)}, r"layer3\.1\.conv1 has .* dilation 2 "),
            ("resnet50", [False, True, True], {"layer4.2.conv2": (1, 2)},
             r"layer4\.2\.conv2 has .*dilation 4"),
            ("resnet50", None, {"layer2.0.conv1": (2, None), "layer2.0.conv2": (1, None)},
             r"layer2\.0\.conv1 .*Bottleneck strides in conv2"),  # ResNet v1: the stride in conv1
            ("resnet18", None, {"layer3.0.conv2": (2, None)}, r"layer3\.0\.conv2 .*BasicBlock strides in conv1")):
        model = resnet(kind, replace_stride_with_dilation=flags or [False] * 3)
        for path, (stride, dilation) in changes.items():
            conv = model.get_submodule(path)
            conv.stride = (stride, stride)
            if dilation is not None:
                conv.dilation = conv.padding = (dilation, dilation)
        with pytest.raises(UnsupportedModelError, match=match):
            convert(model, 8, 16)
    model = resnet()
    model.layer4 = nn.Sequential()
    with pytest.raises(UnsupportedModelError, match=r"layer4: it has no blocks"):
        convert(model, 8, 16)
    seg = deeplab()
    seg.classifier[0].convs[4] = nn.Identity()
    convert(seg, 8, 16)  # the dense head runs as given
    with pytest.raises(UnsupportedModelError, match=r"classifier\.0\.convs\.4 .*Identity"):
        convert(seg, 8, 16, sparse_head=True)


@pytest.mark.parametrize("finest,coarsest,match", [
    (3, 16, "power of two"), (8, 8, "must be larger"), (16, 8, "must be larger"),
    (2, 16, "finest_stride must be one of 4, 8, 16"), (8, 64, "at most 32"),
    (True, 16, "power of two"), (8.0, 16, "power of two")])
def test_bad_strides(finest, coarsest, match):
    with pytest.raises(ValueError, match=match):
        convert(resnet(), finest, coarsest)


def test_bad_options():
    with pytest.raises(ValueError, match="unknown engine"):
        convert(resnet(), engine="cuda")
    with pytest.raises(EngineUnsupported, match="lattice engine needs semantics='paper'"):
        convert(resnet(), engine="lattice", semantics="reference")
    with pytest.raises(ValueError, match="segmentation models"):
        convert(resnet(), sparse_head=True)
    with pytest.raises(TypeError, match="sparse_head must be a bool"):
        convert(deeplab(), sparse_head="yes")
    seg = deeplab()
    seg.classifier[0].convs[1][0].dilation = (5, 5)  # rate 5 at stride 8 -> 2.5 at stride 16
    seg.classifier[0].convs[1][0].padding = (5, 5)
    with pytest.raises(ValueError, match="not a whole number"):
        convert(seg, 8, 16, sparse_head=True)


@pytest.mark.parametrize("keep,error,match", [
    (torch.ones(3, *SIZE, dtype=torch.bool), ValueError, "batch size 3"),
    (torch.ones(2, *SIZE), TypeError, "bool mask"),
    (torch.ones(2, 2, *SIZE, dtype=torch.bool), ValueError, r"\[B, 1, h, w\]"),
    (torch.ones(2, 10, 10, dtype=torch.bool), ValueError, "neither the image size"),
    ([torch.ones(2, *GRID, dtype=torch.bool)] * 2, ValueError, "per-level masks"),
    (torch.full((2, *GRID), 3), TypeError, "bool mask.*LevelPlan.from_level_map"),
    (torch.zeros(2, 5, 5, dtype=torch.int64), TypeError, "bool mask.*mask.bool()"),
    (torch.ones(2, 1, *SIZE, dtype=torch.uint8), TypeError, "bool mask.*mask.bool()"),
    ([torch.ones(2, *SIZE, dtype=torch.uint8)], TypeError, "bool tensor.*mask.bool()"),
    ("all", TypeError, "keep must be"),
    (lambda feats: feats.mean(1) > 0.5, None, None)])
def test_bad_keep_masks(keep, error, match):
    cad = convert(resnet(), 8, 16)
    with torch.no_grad():
        if error is None:
            cad(images(), keep)  # a callable returning a valid mask works
            return
        with pytest.raises(error, match=match):
            cad(images(), keep)


def test_masks_of_another_size_are_refused_not_rescaled():
    """A bool mask that is neither the image size nor the finest grid (made for another image
    size or crop) was read at a guessed scale: a 2x-size or a slightly cropped mask ran,
    misaligned. It is refused, naming the sizes; per-level masks too."""
    cad = convert(resnet(), 8, 16)
    h, w = SIZE
    for size in ((h - 2, w - 4), (2 * h, 2 * w), (h // 2, w // 2), (GRID[0] * 2, GRID[1] * 2)):
        keep = torch.zeros(2, *size, dtype=torch.bool)
        with torch.no_grad(), pytest.raises(
                ValueError, match=rf"{size[0]}x{size[1]} is neither the image size {h}x{w} nor "
                                  rf"the model's finest grid {GRID[0]}x{GRID[1]}"):
            cad(images(), keep)
        with torch.no_grad(), pytest.raises(ValueError, match="level mask 0 of size"):
            cad(images(), [keep])
    with torch.no_grad():  # the two accepted sizes
        for size in (SIZE, GRID):
            cad(images(), torch.zeros(2, *size, dtype=torch.bool))
            cad(images(), [torch.zeros(2, *size, dtype=torch.bool)])


def test_integer_keep_masks_are_refused_not_read_as_level_maps():
    """Issue 11 item 2: ``seg(x, keep.long())`` kept 93.75 % where ``seg(x, keep)`` kept
    6.25 % (the int mask was read as a level map, 1 = downsample). A keep mask of any other
    dtype than bool is refused with the conversions named, at image resolution too (a uint8
    mask there got "plan grid ... does not match" before)."""
    cad = convert(deeplab(), 8, 16)
    fixes = r"mask\.bool\(\).*mask > 0\.5.*LevelPlan\.from_level_map"
    for size in (SIZE, GRID):
        keep = torch.zeros(2, 1, *size, dtype=torch.bool)
        keep[..., :3, :3] = True
        with torch.no_grad():
            cad(images(), keep)
            kept = cad.last_plan.level_fractions()[:, 0]
            assert (kept < 0.5).all()
            for dtype in (torch.int64, torch.uint8, torch.int32, torch.float32):
                with pytest.raises(TypeError, match=rf"keep must be a bool mask.*{fixes}"):
                    cad(images(), keep.to(dtype))
                with pytest.raises(TypeError, match=rf"level mask 0 must be a bool.*{fixes}"):
                    cad(images(), [keep.to(dtype)])
            # the explicit entry for a level map
            cad(images(), LevelPlan.from_level_map(cad.last_plan.levels, 1))
        assert torch.equal(cad.last_plan.level_fractions()[:, 0], kept)


def test_bad_images():
    cad = convert(resnet(), 8, 16)
    with pytest.raises(ValueError, match=r"images must be a \[B, C, H, W\]"):
        cad(torch.zeros(3, *SIZE), torch.ones(1, *SIZE, dtype=torch.bool))


def test_dense_shells_leave_the_given_model_alone():
    """A given model at output stride 4 runs layer2 with the standard stride in the converted
    model: a shell sharing its parameters; the original modules and their hooks are untouched."""
    model = resnet("resnet50", replace_stride_with_dilation=[True, True, True])
    cad = convert(model, 8, 16)
    assert cad.layer2 is not model.layer2 and cad.layer1 is model.layer1
    assert cad.layer2[0].conv2.stride == (2, 2) and model.layer2[0].conv2.stride == (1, 1)
    assert cad.layer2[0].conv2.weight is model.layer2[0].conv2.weight
    assert cad.layer2[1].conv2.dilation == (1, 1) and model.layer2[1].conv2.dilation == (2, 2)
    assert cad.layer2[1].bn1 is model.layer2[1].bn1  # only what differs is a new shell
    handle = cad.layer2[0].register_forward_hook(lambda *a: None)
    assert len(model.layer2[0]._forward_hooks) == 0
    handle.remove()


def test_builders_dilate_the_aux_head_as_convert_does():
    """A model built for a finer stride than its weights were trained at has its heads' 3x3
    convs dilated as converting the trained model does: the main head by the layer4 ratio, the
    auxiliary head by layer3's (whose stride stops at 16)."""
    from adapters.builders import segmentation_model

    for trained, run in ((16, 8), (32, 16), (32, 8)):
        with torch.device("meta"):
            built = segmentation_model("fcn_resnet50", num_classes=3, aux_loss=True,
                                       output_stride=run, trained_output_stride=trained)
            source = segmentation_model("fcn_resnet50", num_classes=3, aux_loss=True,
                                        output_stride=trained)
        cad = convert(source, run, trained)
        for a, b in ((built.classifier[0], cad.classifier[0]),
                     (built.aux_classifier[0], cad.aux_classifier[0])):
            assert a.dilation == b.dilation, (trained, run)
        assert built.aux_classifier[0].dilation == (min(trained, 16) // min(run, 16),) * 2
