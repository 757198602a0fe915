"""FCN / DeepLabV3 with ResNet backbones: guarantees against torchvision's dense networks and
the whole converted network (dense head and sparse head) against the independent emulation."""
import copy
from functools import lru_cache

import pytest
import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation import deeplabv3, fcn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
from torchvision.models.segmentation.fcn import FCN, FCNHead

from tests.support import emulation as emu
from tests.support.rounding import LayerCheck
from cad_spconv import LevelPlan
from adapters import CADSegmentation, convert
from cad_spconv.tensor import CADTensor

ODD = (33, 47)     # finest grid 5x6 at stride 8
MIXED = (65, 97)   # finest grid 9x13 at stride 8, 17x25 at stride 4
NAMES = ["deeplabv3_resnet50", "fcn_resnet50"]


@lru_cache(maxsize=3)
def seg_model(name: str, aux: bool = True) -> nn.Module:
    torch.manual_seed(0)
    builder = getattr(deeplabv3 if name.startswith("deeplab") else fcn, name)
    return emu.prepare(builder(weights=None, weights_backbone=None, num_classes=5, aux_loss=aux))


def images(size, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def rebuilt(name, given, output_stride, rates=None, head_dilation=1):
    """The same model (same state_dict) built at ``output_stride`` with torchvision parts; ASPP
    rates ``rates``; the head's plain 3x3 convs dilated by ``head_dilation``."""
    depth = name.split("resnet")[1]
    flags = [8 * 2 ** i > output_stride for i in range(3)]
    trunk = getattr(tvm, f"resnet{depth}")(replace_stride_with_dilation=flags)
    aux = given.aux_classifier is not None
    returns = {"layer4": "out", **({"layer3": "aux"} if aux else {})}
    backbone = IntermediateLayerGetter(trunk, returns)
    if name.startswith("deeplab"):
        head = DeepLabHead(2048, 5, rates)
        plain = [head[1]]
        cls = DeepLabV3
    else:
        head = FCNHead(2048, 5)
        plain = [head[0]]
        cls = FCN
    aux_head = FCNHead(1024, 5) if aux else None
    if aux:
        plain.append(aux_head[0])
    for conv in plain:
        conv.dilation, conv.padding = (head_dilation,) * 2, (head_dilation,) * 2
    model = emu.prepare(cls(backbone, head, aux_head))
    model.load_state_dict(given.state_dict())
    return model


def logits_before_upsampling(model, x):
    feats = model.backbone(x)
    out = {"out": model.classifier(feats["out"])}
    if model.aux_classifier is not None:
        out["aux"] = model.aux_classifier(feats["aux"])
    return out


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("aux", [True, False])
def test_default_head_all_kept_equals_given_model(name, aux):
    given = seg_model(name, aux)
    cad = convert(given, 8, 16)
    x = images(ODD)
    with torch.no_grad():
        out = cad(x, torch.ones(2, *ODD, dtype=torch.bool))
        expected = given(x)
    assert list(out) == list(expected) == (["out", "aux"] if aux else ["out"])
    for key in expected:
        emu.assert_rel(out[key], expected[key])


@pytest.mark.parametrize("name", NAMES)
def test_default_head_all_kept_at_stride_4(name):
    """finest 4: the head runs at stride 4 with ASPP rates doubled (same image-space rates)
    and its plain 3x3 convs dilated by 8 / 4 (the paper code's classifier_dilation)."""
    given = seg_model(name)
    ref = rebuilt(name, given, 4, rates=(24, 48, 72), head_dilation=2)
    cad = convert(given, 4, 16)
    x = images(ODD)
    with torch.no_grad():
        out, expected = cad(x, torch.ones(2, *ODD, dtype=torch.bool)), ref(x)
    for key in expected:
        emu.assert_rel(out[key], expected[key])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("finest,coarsest", [(8, 16), (8, 32)])
def test_none_kept_backbone_equals_coarsest_network(name, finest, coarsest):
    given = seg_model(name)
    ref = rebuilt(name, given, coarsest, rates=(6, 12, 18))
    cad = convert(given, finest, coarsest)
    x = images(ODD)
    with torch.no_grad():
        feats = cad.forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), ref.backbone(x)["out"])


@pytest.mark.parametrize("name,size", [("deeplabv3_resnet50", (64, 96)), ("fcn_resnet50", ODD)])
def test_sparse_head_none_kept_logits_equal_coarsest_network(name, size):
    """Logits before upsampling. DeepLab's image-pooling branch is area-weighted, equal to
    torchvision's plain mean when the finest grid is a multiple of the coarse block."""
    given = seg_model(name)
    ref = rebuilt(name, given, 16, rates=(6, 12, 18))
    cad = convert(given, 8, 16, sparse_head=True)
    x = images(size)
    with torch.no_grad():
        logits = cad.forward_logits(x, torch.zeros(2, *size, dtype=torch.bool))
        expected = logits_before_upsampling(ref, x)
    for key in expected:
        assert isinstance(logits[key], CADTensor)
        emu.assert_rel(logits[key].dense(grid="step"), expected[key])


@pytest.mark.parametrize("name", NAMES)
def test_sparse_head_all_kept_equals_finest_network(name):
    """All kept == the network at the finest stride with the adaptive strides replaced by
    dilation: the head's plain 3x3 convs then read 2**L cells apart (ASPP rates come out as
    given)."""
    given = seg_model(name)
    ref = rebuilt(name, given, 8, rates=(12, 24, 36), head_dilation=2)
    cad = convert(given, 8, 16, sparse_head=True)
    x = images(ODD)
    with torch.no_grad():
        out, expected = cad(x, torch.ones(2, 1, *ODD, dtype=torch.bool)), ref(x)
    for key in expected:
        emu.assert_rel(out[key], expected[key])


@pytest.mark.parametrize("name", NAMES)
def test_guarantee_2_random_masks(name):
    given = seg_model(name)
    x = images(MIXED)
    with torch.no_grad():
        for coarsest, step in [(16, 2), (32, 4)]:
            ref = rebuilt(name, given, coarsest, rates=(6, 12, 18))
            expected = logits_before_upsampling(ref, x) if name.startswith("fcn") else None
            feats_ref = ref.backbone(x)["out"]
            cad = convert(given, 8, coarsest, sparse_head=True)
            spec, _ = emu.mixed_masks(7, 2, (9, 13), cad.num_levels, "keep")
            emu.assert_rel(cad.forward_features(x, spec).dense()[:, :, ::step, ::step], feats_ref)
            if expected is not None:  # FCN: no global branch, the logits obey it too
                logits = cad.forward_logits(x, spec)
                for key in expected:  # aux reads layer3: one adaptive step fewer at 8 -> 32
                    s = 2 ** logits[key].step
                    emu.assert_rel(logits[key].dense()[:, :, ::s, ::s], expected[key])


CASES = [(8, 16, False, "keep"), (4, 16, False, "levels"), (8, 16, True, "keep"),
         (8, 32, True, "map"), (16, 32, False, "keep"), (16, 32, True, "levels")]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("finest,coarsest,sparse,kind", CASES)
def test_matches_dense_emulation(name, finest, coarsest, sparse, kind, device):
    given = seg_model(name)
    given = given if device.type == "cpu" else copy.deepcopy(given).to(device)
    cad = convert(given, finest, coarsest, sparse_head=sparse)
    x = images(MIXED).to(device)
    grid = (-(-MIXED[0] // finest), -(-MIXED[1] // finest))
    spec, levels = emu.mixed_masks(8, 2, grid, cad.num_levels, kind)
    with torch.no_grad():
        out = cad(x, emu.to_device(spec, device))
        _, expected = emu.segmentation(given, x, levels, finest, coarsest, sparse)
    assert list(out) == ["out", "aux"]
    for key in expected:
        emu.assert_rel(out[key], expected[key])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("finest,coarsest,sparse,kind", [(8, 16, True, "keep"), (8, 32, True, "map"),
                                                         (8, 16, False, "levels")])
def test_reference_semantics_matches_dense_emulation(name, finest, coarsest, sparse, kind):
    """The paper code's anchors (``semantics="reference"``) through whole models, dense and
    sparse heads, against the emulation's centre-anchored conv rule."""
    given = seg_model(name)
    cad = convert(given, finest, coarsest, sparse_head=sparse, semantics="reference")
    x = images(MIXED)
    grid = (-(-MIXED[0] // finest), -(-MIXED[1] // finest))
    spec, levels = emu.mixed_masks(9, 2, grid, cad.num_levels, kind)
    if isinstance(spec, LevelPlan):
        spec = spec.with_semantics("reference")
    with torch.no_grad():
        out = cad(x, spec)
        _, expected = emu.segmentation(given, x, levels, finest, coarsest, sparse,
                                       semantics="reference")
        _, paper = emu.segmentation(given, x, levels, finest, coarsest, sparse)
    for key in expected:
        emu.assert_rel(out[key], expected[key])
        assert not torch.allclose(out[key], paper[key])  # the anchors matter on these plans


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_head_low_precision_layer_by_layer(dtype):
    """DeepLabV3 with the sparse head in float32 and bfloat16 (the ASPP's dilated convs, the
    auxiliary head): every conv and batch norm of the backbone and heads within its rounding
    bound on the input it got (``rounding.LayerCheck``)."""
    given = emu.prepare(copy.deepcopy(seg_model("deeplabv3_resnet50")), dtype)
    cad = convert(given, 8, 16, sparse_head=True)
    spec, levels = emu.mixed_masks(8, 2, (9, 13), cad.num_levels, "keep")
    with torch.no_grad(), LayerCheck(cad, levels) as check:
        assert {v.dtype for v in cad(images(MIXED).to(dtype), spec).values()} == {dtype}
    names = {name for name, _ in check.ratios}
    assert {f"classifier.0.convs.{i}.0" for i in range(4)} | {
        "classifier.0.project.0", "classifier.1", "classifier.4", "aux_classifier.4"} <= names


def test_without_aux_matches_dense_emulation():
    given = seg_model("deeplabv3_resnet50", aux=False)
    for sparse in (False, True):
        cad = convert(given, 8, 16, sparse_head=sparse)
        x = images(MIXED)
        spec, levels = emu.mixed_masks(9, 2, (9, 13), 1, "keep")
        with torch.no_grad():
            out = cad(x, spec)
            _, expected = emu.segmentation(given, x, levels, 8, 16, sparse)
        assert list(out) == ["out"] and cad.aux_classifier is None and "aux" not in cad.parts()
        emu.assert_rel(out["out"], expected["out"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deeplabv3_resnet101", "fcn_resnet101"])
def test_resnet101_models(name):
    given = seg_model(name)
    x = images(ODD)
    with torch.no_grad():
        cad = convert(given, 8, 16)
        out, expected = cad(x, torch.ones(2, *ODD, dtype=torch.bool)), given(x)
        for key in expected:
            emu.assert_rel(out[key], expected[key])
        ref16 = rebuilt(name, given, 16, rates=(6, 12, 18))
        feats = cad.forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), ref16.backbone(x)["out"])
        for sparse in (False, True):
            cad = convert(given, 8, 16, sparse_head=sparse)
            spec, levels = emu.mixed_masks(10, 2, (5, 6), 1, "keep")
            out = cad(x, spec)
            _, expected = emu.segmentation(given, x, levels, 8, 16, sparse)
            for key in expected:
                emu.assert_rel(out[key], expected[key])
    assert isinstance(cad, CADSegmentation)


@pytest.mark.parametrize("sparse", [False, True])
def test_forward_releases_engine_workspaces(sparse, monkeypatch):
    """The sparse part of a forward runs in a workspace scope: the lattice engine's scratch is
    used during the forward and released at its end (nothing left for a dense head's peak or
    between forwards), and the result stays exact."""
    import cad_spconv.engines.lattice as lattice
    from cad_spconv.engines import layouts
    taken = []

    def spy(like, numel, slot):
        taken.append(slot)
        return layouts.workspace(like, numel, slot)

    monkeypatch.setattr(lattice, "workspace", spy)
    given = seg_model("deeplabv3_resnet50")
    cad = convert(given, 8, 16, sparse_head=sparse)
    x = images(MIXED)
    spec, levels = emu.mixed_masks(10, 2, (9, 13), 1, "keep")
    layouts.clear_caches()
    with torch.no_grad():
        out = cad(x, spec)
        _, expected = emu.segmentation(given, x, levels, 8, 16, sparse)
    assert "im2col" in taken
    assert not getattr(layouts._workspaces, "buffers", {})
    for key in expected:
        emu.assert_rel(out[key], expected[key])
