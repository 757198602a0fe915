"""NaN / Inf isolation through whole converted networks (issue 11 item 1), every engine.

The issue's repro: DeepLabV3-ResNet50 8 -> 16, a batch of 2, one NaN pixel in image 0, all
kept: image 1's output was not finite with the lattice engine (an out-of-grid tap read row 0
of the batch and multiplied it by 0). Now image 1 equals its output without the NaN, exactly,
and image 0's NaN / Inf pattern is the dense network's: torchvision's for all kept, the dense
emulation for masks that differ per image.

One non-finite pixel reaches every cell of a whole network's output (the receptive field
covers the image; Inf times mixed-sign weights gives NaN), so image 0's pattern is compared
where it covers only part of the grid, and each test asserts that it does: at the first
sparse layers (``layer3.0``, through forward hooks) against torchvision, or at ``layer3`` on
an image wide enough for it against the emulation. The finite part of image 0 must be finite
and equal the reference there too."""
import contextlib
from functools import lru_cache

import pytest
import torch
import torchvision.models as tvm
from torchvision.models.segmentation import deeplabv3_resnet50

from adapters import convert
from cad_spconv import CADTensor
from cad_spconv.backend import spconv_status
from tests.support import emulation as emu

SPCONV = spconv_status()[0]
ENGINES = ["lattice", "torch", "products", "auto", "tuned"] + [pytest.param("spconv", marks=pytest.mark.skipif(
    not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}"))]
# the first sparse layers of a ResNet converted from stride 8 (the 1x1 conv, the adaptive
# 3x3 conv, the block): image 0 is only partly non-finite there
FIRST_SPARSE = ("layer3.0.conv1", "layer3.0.conv2", "layer3.0")


def classes(t):
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def assert_same_nonfinite(actual, expected, dtype=torch.float64):
    bad = (classes(actual) != classes(expected)).any(0)
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} entries differ in finiteness"
    fin = torch.isfinite(expected)
    emu.assert_rel(actual[fin], expected[fin], dtype)


def assert_partly_finite(expected, where=""):
    """Image 0 of the reference is non-finite, but not everywhere (else the comparison of its
    pattern could not fail); image 1 is finite."""
    share = float(torch.isfinite(expected[0]).double().mean())
    assert 0 < share < 1, f"{where}: image 0 finite share {share} (trivial pattern)"
    assert torch.isfinite(expected[1]).all(), where


@contextlib.contextmanager
def outputs_of(model, names, prefix=""):
    """Forward hooks: the outputs of the modules ``prefix + name``, densified on the finest
    grid when they are CADTensors, copied when they run."""
    got, modules = {}, dict(model.named_modules())

    def hook(name):
        def store(module, args, out):
            got[name] = (out.dense() if isinstance(out, CADTensor) else out).clone()
        return store

    handles = [modules[prefix + n].register_forward_hook(hook(n)) for n in names]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def assert_first_sparse_layers(got, want, dtype):
    for name in FIRST_SPARSE:
        assert_partly_finite(want[name], name)
        assert_same_nonfinite(got[name], want[name], dtype)


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
    torchvision (all kept == the given model at output stride 8), at the first sparse layers
    (where the NaN covers part of image 0) and at the output (all NaN)."""
    m = deeplab()
    cad = convert(m, 8, 16)
    x = torch.randn(2, 3, 128, 256, generator=torch.Generator().manual_seed(0))
    keep = torch.ones(2, 1, 128, 256, dtype=torch.bool)
    with torch.no_grad():
        clean = cad(x, keep)["out"]
        x[0, :, 64, 128] = float("nan")
        with outputs_of(cad, FIRST_SPARSE, "backbone.") as got:
            out = cad(x, keep)["out"]
        with outputs_of(m, FIRST_SPARSE, "backbone.") as want:
            want_out = m(x)["out"]
    assert torch.isfinite(out[1]).all()
    assert torch.equal(out[1], clean[1])
    assert torch.equal(classes(out), classes(want_out))
    assert_first_sparse_layers(got, want, torch.float32)


@lru_cache(maxsize=2)
def deeplab_first_sparse_layers(value: str):
    """torchvision's DeepLabV3 (output stride 8) on test_deeplabv3_every_engine's images with
    a non-finite corner pixel in image 0: (the images, the outputs of FIRST_SPARSE)."""
    bad = deeplab_images()
    bad[0, :, 48, 66] = float(value)
    with torch.no_grad(), outputs_of(deeplab(), FIRST_SPARSE, "backbone.") as want:
        deeplab()(bad)
    return bad, want


def deeplab_images():
    return torch.randn(2, 3, 49, 67, generator=torch.Generator().manual_seed(1))


def deeplab_mask():
    """test_deeplabv3_every_engine's mask that differs per image: (keep spec, level maps)."""
    return emu.mixed_masks(3, 2, (7, 9), 1, "keep")


@lru_cache(maxsize=2)
def deeplab_emulated_layer3_0(value: str):
    """The dense emulation of layer3.0, the first sparse block (densified on the finest grid),
    on deeplab_first_sparse_layers' images under deeplab_mask."""
    bad, _ = deeplab_first_sparse_layers(value)
    stages = dict(deeplab().backbone.named_children())
    stages["layer3"] = stages["layer3"][:1]  # the trunk up to layer3.0
    del stages["layer4"]
    with torch.no_grad():
        _, got = emu.resnet_trunk(stages, bad, deeplab_mask()[1], 8, 16, capture=("layer3",))
    return got["layer3"].dense()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("sparse_head", [False, True])
def test_deeplabv3_every_engine(engine, sparse_head):
    """Image 1 unchanged (every output) for all kept and for a mask that differs per image;
    image 0 as torchvision at the first sparse layers for all kept, and as the dense emulation
    at layer3.0 for the per-image mask (a corner pixel, so that the non-finite region is part
    of the grid there)."""
    m = deeplab()
    cad = convert(m, 8, 16, sparse_head=sparse_head, engine=engine)
    x = deeplab_images()
    spec, _ = deeplab_mask()
    all_kept = torch.ones(2, 1, 49, 67, dtype=torch.bool)
    with torch.no_grad():
        for keep in (all_kept, spec):
            clean = cad(x, keep)
            for value in ("nan", "inf"):
                bad, want = deeplab_first_sparse_layers(value)
                with outputs_of(cad, FIRST_SPARSE, "backbone.") as got:
                    out = cad(bad, keep)
                for key in out:
                    assert torch.equal(out[key][1], clean[key][1]), (key, value)
                if keep is all_kept:
                    assert_first_sparse_layers(got, want, torch.float32)
                else:  # image 0's pattern under a mask of mixed levels too, not only all kept
                    emulated = deeplab_emulated_layer3_0(value)
                    assert_partly_finite(emulated, f"layer3.0, emulated, {value}")
                    assert_same_nonfinite(got["layer3.0"], emulated, torch.float32)


@pytest.mark.parametrize("engine", ENGINES)
def test_resnet18_8_to_32_every_engine(engine):
    """The issue's second repro (first wrong at layer3.0.conv1): batch of 2, the non-finite
    pixel in image 0; image 1 unchanged; image 0's feature maps of layer3 and layer4 have the
    NaN / Inf pattern of the dense emulation (float64), for a mask that differs per image.
    The image is wide (29x227) so that layer3's non-finite region is part of the grid."""
    base = resnet18()
    cad = convert(base, 8, 32, engine=engine)
    size = (29, 227)
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    spec, levels = emu.mixed_masks(4, 2, (4, 29), 2, "keep")
    stages = ("layer3", "layer4")
    partly_finite_layer4 = 0
    with torch.no_grad():
        with outputs_of(cad, stages) as clean:
            cad(x, spec)
        for pixel, value in [((0, 0), float("nan")), ((14, 41), float("inf")),
                             ((28, 226), -float("inf"))]:
            bad = x.clone()
            bad[0, 1, pixel[0], pixel[1]] = value
            with outputs_of(cad, stages) as got:
                logits = cad(bad, spec)
            _, want = emu.resnet_trunk(dict(base.named_children()), bad, levels, 8, 32,
                                       capture=stages)
            for name in stages:
                assert torch.equal(got[name][1], clean[name][1]), (pixel, value, name)
                assert_same_nonfinite(got[name], want[name].dense())
            assert_partly_finite(want["layer3"].dense(), f"layer3, {pixel}")
            partly_finite_layer4 += bool(torch.isfinite(want["layer4"].dense()[0]).any())
            assert torch.isfinite(logits[1]).all() and not torch.isfinite(logits[0]).all()
    assert partly_finite_layer4 >= 1  # layer4's pattern is not all NaN for every pixel


def test_resnet50_all_kept_pattern_equals_torchvision():
    """All kept == torchvision's network at the finest stride: the same NaN / Inf pattern, at
    the first sparse layers (non-finite pixels near one corner: part of the grid) and at
    layer4 (all non-finite)."""
    torch.manual_seed(0)
    base = emu.prepare(tvm.resnet50(num_classes=10))
    torch.manual_seed(0)
    dilated = emu.prepare(tvm.resnet50(num_classes=10, replace_stride_with_dilation=[False, True, True]))
    dilated.load_state_dict(base.state_dict())
    trunk = torch.nn.Sequential(*list(dilated.children())[:-2])
    cad = convert(base, 8, 32)
    x = torch.randn(2, 3, 49, 67, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x[0, 0, 0, 60] = float("inf")
    x[0, 2, 3, 66] = float("nan")
    with torch.no_grad():
        with outputs_of(cad, FIRST_SPARSE) as got:
            out = cad.forward_features(x, torch.ones(2, 49, 67, dtype=torch.bool)).dense()
        with outputs_of(dilated, FIRST_SPARSE) as want:  # trunk runs dilated's modules
            full = trunk(x)
        assert_same_nonfinite(out, full)
    assert_first_sparse_layers(got, want, torch.float64)
    assert torch.isfinite(out[1]).all() and not torch.isfinite(out[0]).all()
