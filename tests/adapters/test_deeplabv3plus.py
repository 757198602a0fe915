"""DeepLabV3+ (adapters.deeplabv3plus, the paper's Tab. 1 model): the dense model as built, and
its CAD form (dense and sparse ASPP) against the dense networks and the independent emulation,
in float64 with random weights, odd sizes and per-image masks."""
from functools import lru_cache

import numpy as np
import pytest
import torch

from adapters import convert
from cad_spconv import LevelPlan
from adapters.builders import segmentation_model
from tests.support import emulation as emu

ODD = (33, 47)    # finest grid 5x6 at stride 8, layer1 grid 9x12 at stride 4


@lru_cache(maxsize=2)
def v3plus(output_stride: int = 8):
    torch.manual_seed(0)
    model = segmentation_model("deeplabv3plus_resnet50", num_classes=5)
    model = emu.prepare(model)
    if output_stride != 8:  # the same weights at another stride (rates of that stride)
        other = emu.prepare(segmentation_model("deeplabv3plus_resnet50", num_classes=5,
                                               output_stride=output_stride,
                                               trained_output_stride=max(8, output_stride)))
        other.load_state_dict(model.state_dict())
        return other
    return model


def images(size=ODD, seed=1):
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def test_state_dict_is_the_reference_layout():
    keys = set(v3plus().state_dict())
    assert {"classifier.project.0.weight", "classifier.aspp.convs.0.0.weight",
            "classifier.aspp.convs.4.1.weight", "classifier.aspp.project.0.weight",
            "classifier.classifier.0.weight", "classifier.classifier.3.bias",
            "backbone.layer1.0.conv1.weight", "backbone.layer4.2.bn3.running_var"} <= keys
    assert not any(k.startswith(("backbone.fc", "aux_classifier")) for k in keys)
    sd = v3plus().state_dict()
    assert sd["classifier.project.0.weight"].shape == (48, 256, 1, 1)
    assert sd["classifier.classifier.0.weight"].shape == (256, 304, 3, 3)
    rates = [b[0].dilation[0] for b in list(v3plus().classifier.aspp.convs)[1:-1]]
    assert rates == [12, 24, 36]
    assert [b[0].dilation[0] for b in list(v3plus(16).classifier.aspp.convs)[1:-1]] == [6, 12, 18]


@pytest.mark.parametrize("sparse_head", [False, True])
def test_all_kept_equals_the_dense_model(sparse_head):
    given = v3plus()
    cad = convert(given, 8, 16, sparse_head=sparse_head).eval()
    x = images()
    with torch.no_grad():
        out = cad(x, torch.ones(2, *ODD, dtype=torch.bool))["out"]
        emu.assert_rel(out, given(x)["out"])


def test_none_kept_backbone_equals_the_stride_16_network():
    cad = convert(v3plus(), 8, 16).eval()
    x = images()
    with torch.no_grad():
        feats = cad.forward_features(x, torch.zeros(2, *ODD, dtype=torch.bool))
        emu.assert_rel(feats.dense(grid="step"), v3plus(16).backbone(x)["out"])


@pytest.mark.parametrize("sparse_head", [False, True])
@pytest.mark.parametrize("semantics", ["paper", "reference"])
@pytest.mark.parametrize("finest,coarsest,kind", [(8, 16, "keep"), (8, 32, "levels"),
                                                  (8, 32, "map"), (4, 16, "levels"),
                                                  (16, 32, "keep"), (8, 32, "none")])
def test_whole_network_matches_the_emulation(sparse_head, semantics, finest, coarsest, kind):
    """Random per-image masks mixing every level (or nothing kept), 1 or 2 adaptive steps from
    finest stride 4, 8 or 16, both anchor rules: logits against the emulated network."""
    given = v3plus()
    L = (coarsest // finest).bit_length() - 1
    grid = (-(-ODD[0] // finest), -(-ODD[1] // finest))
    if kind == "none":
        spec = torch.zeros(2, 1, *grid, dtype=torch.bool)
        levels = np.full((2, *grid), L, dtype=np.int64)
    else:
        spec, levels = emu.mixed_masks(3, 2, grid, L, kind)
    if isinstance(spec, LevelPlan):
        spec = spec.with_semantics(semantics)
    cad = convert(given, finest, coarsest, sparse_head=sparse_head, semantics=semantics).eval()
    x = images()
    with torch.no_grad():
        got = cad(x, spec)["out"]
        want = emu.deeplabv3plus(given, x, levels, finest, coarsest, sparse_head,
                                 semantics=semantics)
        emu.assert_rel(got, want)
        if semantics == "reference" and kind != "none":  # the anchors matter on these masks
            paper = emu.deeplabv3plus(given, x, levels, finest, coarsest, sparse_head)
            assert not torch.allclose(got, paper)


def test_all_kept_at_finest_stride_4_equals_the_stride_4_network():
    """finest 4 (layer2 adaptive too): the ASPP runs at stride 4 with doubled rates and the
    decoder's 3x3 conv dilated by 8 / 4 (the paper code's classifier_dilation)."""
    cad = convert(v3plus(), 4, 16).eval()
    x = images()
    with torch.no_grad():
        out = cad(x, torch.ones(2, *ODD, dtype=torch.bool))["out"]
        emu.assert_rel(out, v3plus(4)(x)["out"])
