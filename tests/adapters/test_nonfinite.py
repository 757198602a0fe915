"""NaN / Inf isolation through whole converted networks (issue 11 item 1), every engine.

The issue's repro: DeepLabV3-ResNet50 8 -> 16, a batch of 2, one NaN pixel in image 0, all
kept: image 1's output was not finite with the lattice engine (an out-of-grid tap read row 0
of the batch and multiplied it by 0). Now image 1 equals its output without the NaN, exactly,
and image 0's NaN / Inf pattern is the dense network's: torchvision's for all kept, the dense
emulation for masks that differ per image."""
import copy
from functools import lru_cache

import pytest
import torch
import torchvision.models as tvm
from torchvision.models.segmentation import deeplabv3_resnet50

from adapters import convert
from cad_spconv.backend import spconv_status
from tests.support import emulation as emu

SPCONV = spconv_status()[0]
ENGINES = ["lattice", "torch", "products", "auto", "tuned"] + [pytest.param("spconv", marks=pytest.mark.skipif(
    not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}"))]


def classes(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def assert_same_nonfinite(actual, expected, dtype=torch.float64):
    bad = (classes(actual) != classes(expected)).any(0)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries differ in finiteness"
    fin = torch.isfinite(expected)
    emu.assert_rel(actual[fin], expected[fin], dtype)


@lru_cache(maxsize=2)
def deeplab(dtype=torch.float32):
    torch.manual_seed(0)
    return emu.prepare(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=19),
                       dtype)


@lru_cache(maxsize=1)
def resnet18():
    torch.manual_seed(0)
    return emu.prepare(tvm.resnet18(num_classes=10))


def test_issue_repro_deeplabv3_resnet50():
    """Verbatim (float32, 128x256, default engine), plus: image 1 unchanged, image 0 as
    torchvision (all kept == the given model at output stride 8)."""
    m = deeplab()
    cad = convert(m, 8, 16)
    x = torch.randn(2, 3, 128, 256, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, 1, 128, 256, dtype=torch.bool)
    with torch.no_grad():
        clean = cad(x, keep)["out"]
        x[0, :, 64, 128] = float("nan")
        out = cad(x, keep)["out"]
        want = m(x)["out"]
    assert torch.isfinite(out[1]).all()
    assert torch.equal(out[1], clean[1])
    assert torch.equal(classes(out), classes(want))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sparse_head", [False, True])
def test_deeplabv3_every_engine(engine, sparse_head):
    m = deeplab()
    cad = convert(m, 8, 16, sparse_head=sparse_head, engine=engine)
    x = torch.randn(2, 3, 49, 67, generator=torch.Generator().manual_seed(1))
    spec, _ = emu.mixed_masks(3, 2, (7, 9), 1, "keep")
    with torch.no_grad():
        for keep in (torch.ones(2, 1, 49, 67, dtype=torch.bool), spec):
            clean = cad(x, keep)
            for value in (float("nan"), float("inf")):
                bad = x.clone()
                bad[0, :, 30, 40] = value
                out = cad(bad, keep)
                for key in out:
                    assert torch.equal(out[key][1], clean[key][1]), (key, value)


@pytest.mark.parametrize("engine", ENGINES)
def test_resnet18_8_to_32_every_engine(engine):
    """The issue's second repro (first wrong at layer3.0.conv1): batch of 2, the non-finite
    pixel in image 0; image 1 unchanged; image 0's backbone features have the NaN / Inf
    pattern of the dense emulation (float64), for a mask that differs per image."""
    base = resnet18()
    cad = convert(base, 8, 32, engine=engine)
    x = torch.randn(2, 3, 61, 83, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec, levels = emu.mixed_masks(4, 2, (8, 11), 2, "keep")
    with torch.no_grad():
        clean = cad.forward_features(x, spec).dense()
        for pixel, value in [((0, 0), float("nan")), ((30, 41), float("inf")),
                             ((60, 82), -float("inf"))]:
            bad = x.clone()
            bad[0, 1, pixel[0], pixel[1]] = value
            out = cad.forward_features(bad, spec).dense()
            assert torch.equal(out[1], clean[1]), (pixel, value)
            want, _ = emu.resnet_trunk(dict(base.named_children()), bad, levels, 8, 32)
            assert_same_nonfinite(out, want.dense())
            logits = cad(bad, spec)
            assert torch.isfinite(logits[1]).all() and not torch.isfinite(logits[0]).all()


def test_resnet50_all_kept_pattern_equals_torchvision():
    """All kept == torchvision's network at the finest stride: the same NaN / Inf pattern."""
    torch.manual_seed(0)
    base = emu.prepare(tvm.resnet50(num_classes=10))
    torch.manual_seed(0)
    dilated = emu.prepare(tvm.resnet50(num_classes=10, replace_stride_with_dilation=[False, True, True]))
    dilated.load_state_dict(base.state_dict())
    trunk = torch.nn.Sequential(*list(dilated.children())[:-2])
    cad = convert(base, 8, 32)
    x = torch.randn(2, 3, 49, 67, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[0, 0, 10, 60] = float("inf")
    x[0, 2, 40, 3] = float("nan")
    with torch.no_grad():
        out = cad.forward_features(x, torch.ones(2, 49, 67, dtype=torch.bool)).dense()
        assert_same_nonfinite(out, trunk(x))
    assert torch.isfinite(out[1]).all() and not torch.isfinite(out[0]).all()
