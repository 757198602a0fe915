"""DeepLabV3+ (adapters.deeplabv3plus, the paper's Tab. 1 model): the dense model as built, and
its CAD form (dense and sparse ASPP) against the dense networks and the independent emulation,
in float64 with random weights, odd sizes and per-image masks."""
from functools import lru_cache

import pytest
import torch

from adapters import convert
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
@pytest.mark.parametrize("kind", ["keep", "levels"])
def test_whole_network_matches_the_emulation(sparse_head, kind):
    """Random per-image masks (1 or 2 adaptive steps): logits against the emulated network."""
    given = v3plus()
    coarsest = 16 if kind == "keep" else 32
    L = 1 if coarsest == 16 else 2
    spec, levels = emu.mixed_masks(3, 2, (5, 6), L, kind)
    cad = convert(given, 8, coarsest, sparse_head=sparse_head).eval()
    x = images()
    with torch.no_grad():
        got = cad(x, spec)["out"]
        want = emu.deeplabv3plus(given, x, levels, 8, coarsest, sparse_head)
    emu.assert_rel(got, want)


def test_all_kept_at_finest_stride_4_equals_the_stride_4_network():
    """finest 4 (layer2 adaptive too): the ASPP runs at stride 4 with doubled rates and the
    decoder's 3x3 conv dilated by 8 / 4 (the paper code's classifier_dilation)."""
    cad = convert(v3plus(), 4, 16).eval()
    x = images()
    with torch.no_grad():
        out = cad(x, torch.ones(2, *ODD, dtype=torch.bool))["out"]
        emu.assert_rel(out, v3plus(4)(x)["out"])
