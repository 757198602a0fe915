"""Dilated convs as im2col GEMMs (adapters.dilated): the same values as ``F.conv2d`` (float64,
odd sizes, batches, taps partly and wholly outside the map, band heights 1, 2, 4 and the
default; empty tensors NaN-filled, so a buffer cell left unwritten fails), one rounding in
bfloat16 as the direct conv, and models with their dilated convs replaced computing what they
computed through the GEMMs (torchvision DeepLabV3 and its converted form)."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torch import nn

from adapters import convert
from adapters.dilated import Im2colConv2d, im2col_conv2d, im2col_dilated_convs
from tests.support import emulation as emu

# (batch, C_in, C_out, H, W, kernel, dilation): odd sizes; dilations below, near and past the
# map's size (a tap wholly outside); a rectangular kernel and anisotropic dilations
CASES = [(2, 5, 7, 13, 11, (3, 3), (4, 4)), (3, 4, 3, 9, 17, (5, 5), (2, 3)),
         (1, 3, 2, 7, 5, (3, 3), (9, 9)), (2, 6, 4, 15, 8, (3, 5), (1, 6)),
         (1, 2, 3, 1, 6, (3, 3), (2, 1))]


@pytest.fixture
def nan_filled_empty():
    """``torch.empty`` and ``new_empty`` return NaNs (deterministic mode fills them), so an
    im2col buffer cell that no tap writes shows in the result, whatever memory comes back."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@pytest.fixture
def im2col_calls(monkeypatch):
    """The calls that reach the GEMMs (their input shapes)."""
    import adapters.dilated

    calls, real = [], adapters.dilated._im2col  # where every route to the GEMMs passes
    monkeypatch.setattr(adapters.dilated, "_im2col",
                        lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    return calls


def _random(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _reference(x, w, b, dilation):
    kh, kw = w.shape[-2:]
    return F.conv2d(x, w, b, 1, (dilation[0] * (kh // 2), dilation[1] * (kw // 2)), dilation)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("band_rows", [None, 1, 2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_equals_the_dense_conv_in_float64(case, band_rows, layout, nan_filled_empty):
    n, c, o, h, w_, k, d = case
    fmt = getattr(torch, f"{layout}_format" if layout == "contiguous" else layout)
    x = _random((n, c, h, w_), 0).contiguous(memory_format=fmt)
    w = _random((o, c, *k), 1).contiguous(memory_format=fmt)
    b = _random((o,), 2)
    for bias in (b, None):
        got = im2col_conv2d(x, w, bias, d, band_rows)
        emu.assert_rel(got, _reference(x, w, bias, d))
        assert got.is_contiguous(memory_format=fmt)  # the input's memory format


def test_each_image_alone(nan_filled_empty):
    """An image's output does not depend on the others of its batch (the buffer is shared)."""
    x = _random((3, 4, 11, 9), 3)
    x[1] = float("nan")  # a NaN image must not reach its neighbours through the buffer
    w = _random((5, 4, 3, 3), 4)
    got = im2col_conv2d(x, w, None, (3, 3), band_rows=2)
    for i in (0, 2):
        emu.assert_rel(got[i:i + 1], _reference(x[i:i + 1], w, None, (3, 3)))
    assert got[1].isnan().all()


def test_bfloat16_rounds_once_as_the_direct_conv():
    """In bfloat16 every output is one sum rounded once, as ``F.conv2d`` makes it: its error
    against the float64 conv of the same values is within 1.25x of the direct conv's (the two
    sum in different orders; measured equal at the ASPP's size, where rounding each tap row's
    partial sum first, one of the tried variants, made it ~1.5x). With and without a bias
    (``addmm``, as after batch-norm folding)."""
    x = _random((1, 256, 24, 40), 5).bfloat16().contiguous(memory_format=torch.channels_last)
    w = (_random((32, 256, 3, 3), 6) * 0.05).bfloat16().contiguous(
        memory_format=torch.channels_last)
    for d in (6, 12):
        for b in (None, _random((32,), 7).bfloat16()):
            exact = _reference(x.double(), w.double(), None if b is None else b.double(), (d, d))
            direct = (_reference(x, w, b, (d, d)).double() - exact).abs().max()
            ours = (im2col_conv2d(x, w, b, (d, d)).double() - exact).abs().max()
            assert 0 < ours <= 1.25 * direct, (d, float(ours), float(direct))


def test_refusals():
    x = _random((1, 4, 5, 5), 0)
    with pytest.raises(ValueError, match="input channels"):
        im2col_conv2d(x, _random((4, 2, 3, 3), 1), None, (2, 2))
    with pytest.raises(ValueError, match="odd"):
        im2col_conv2d(x, _random((4, 4, 2, 2), 1), None, (2, 2))
    with pytest.raises(TypeError, match="one dtype"):
        im2col_conv2d(x, _random((4, 4, 3, 3), 1).float(), None, (2, 2))
    with pytest.raises(ValueError, match="band_rows"):
        im2col_conv2d(x, _random((4, 4, 3, 3), 1), None, (2, 2), band_rows=0)
    with pytest.raises(ValueError, match="without autograd"):
        im2col_conv2d(x, _random((4, 4, 3, 3), 1).requires_grad_(), None, (2, 2))


@pytest.mark.parametrize("conv, fits", [
    (nn.Conv2d(4, 4, 3, padding=6, dilation=6), True),
    (nn.Conv2d(4, 4, 3, padding="same", dilation=6), True),
    (nn.Conv2d(4, 4, 3, padding=2, dilation=2), False),  # below min_dilation 6
    (nn.Conv2d(4, 4, 3, stride=2, padding=6, dilation=6), False),
    (nn.Conv2d(4, 4, 3, padding=6, dilation=6, groups=2), False),
    (nn.Conv2d(4, 4, 1, dilation=6), False),
    (nn.Conv2d(4, 4, 3, padding=5, dilation=6), False),  # not same padding
    (nn.Conv2d(4, 4, 3, padding=6, dilation=6, padding_mode="reflect"), False),
    (nn.Conv2d(4, 4, (1, 3), padding=(0, 1), dilation=(6, 1)), False),  # dilated along a 1
    (nn.Conv2d(4, 4, (1, 3), padding=(0, 6), dilation=(1, 6)), True),
])
def test_which_convs_fit(conv, fits):
    assert Im2colConv2d.fits(conv, min_dilation=6) is fits
    if not fits and conv.dilation == (6, 6):
        with pytest.raises(ValueError, match="Im2colConv2d computes"):
            Im2colConv2d.from_conv(conv)


def test_module_falls_back_where_it_does_not_compute(im2col_calls):
    """Autograd (also under autocast) takes nn.Conv2d's forward: the gradients are the
    conv's."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=6, dilation=6).double()
    fast = Im2colConv2d.from_conv(conv)
    x = _random((2, 3, 9, 7), 7).requires_grad_()
    fast(x).sum().backward()
    g = x.grad.clone()
    x.grad = None
    conv(x).sum().backward()
    assert torch.equal(g, x.grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _random((1, 3, 9, 7), 8, torch.float32)
        single = copy.deepcopy(conv).float()  # .float() converts in place: a copy
        assert torch.equal(Im2colConv2d.from_conv(single)(y), single(y))
    with torch.no_grad():  # unbatched input, as nn.Conv2d takes it
        assert torch.equal(fast(x[0]), conv(x[0]))
        with pytest.raises(RuntimeError) as theirs:  # other channels: torch's error
            conv(x[:, :2])
        with pytest.raises(RuntimeError) as ours:
            fast(x[:, :2])
        assert str(ours.value) == str(theirs.value)
    assert not im2col_calls


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_autocast_casts_as_it_casts_a_conv(low, layout, im2col_calls):
    """Under CPU autocast, without autograd, input, weight and bias are cast to autocast's dtype
    and go through the GEMMs: the result has the autocast conv's dtype, and its error against
    the float64 conv of the cast values is within 1.25x of the autocast conv's."""
    fmt = getattr(torch, f"{layout}_format" if layout == "contiguous" else layout)
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 16, 3, padding=12, dilation=12).to(memory_format=fmt)
    fast = Im2colConv2d.from_conv(conv)
    x = _random((2, 64, 19, 23), 10, torch.float32).contiguous(memory_format=fmt)
    with torch.no_grad(), torch.autocast("cpu", dtype=low):
        got, want = fast(x), conv(x)
    assert im2col_calls == [(2, 64, 19, 23)]
    assert got.dtype == want.dtype == low
    with torch.no_grad():
        exact = _reference(*(t.to(low).double() for t in (x, conv.weight, conv.bias)), (12, 12))
    direct = (want.double() - exact).abs().max()
    ours = (got.double() - exact).abs().max()
    assert 0 < ours <= 1.25 * direct, (float(ours), float(direct))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_autocast_keeps_the_cast_weight_until_it_changes(mode, im2col_calls, monkeypatch):
    """The weight is cast and reordered once, not in every forward, and again after it
    changes (eval runs under no_grad, the bench under inference mode)."""
    import adapters.dilated

    builds, real = [], adapters.dilated.krsc_filters
    monkeypatch.setattr(adapters.dilated, "krsc_filters",
                        lambda w, *a, **k: builds.append(w.dtype) or real(w, *a, **k))
    torch.manual_seed(0)
    fast = Im2colConv2d.from_conv(nn.Conv2d(8, 4, 3, padding=6, dilation=6, bias=False))
    x = _random((1, 8, 9, 10), 11, torch.float32)
    with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = fast(x)
        again = fast(x)
        assert builds == [torch.bfloat16]  # the first forward's, kept for the second
    with torch.no_grad():
        fast.weight.mul_(2)
    with mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        doubled = fast(x)
    assert builds == [torch.bfloat16] * 2
    assert torch.equal(again, first)
    assert torch.equal(doubled, 2 * first)  # the new weight's cast (x2 is exact in bfloat16)
    assert len(im2col_calls) == 3


def test_autocast_with_other_dtypes(im2col_calls):
    """Under bfloat16 autocast: float16 parameters are cast to bfloat16 as well, bfloat16 ones
    used as they are; all-float64 tensors, which autocast leaves alone, are computed in
    float64; a float64 input with float32 parameters fails as the autocast conv fails."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, 3, padding=6, dilation=6)
    x = _random((2, 6, 11, 9), 12, torch.float32)
    half = Im2colConv2d.from_conv(copy.deepcopy(conv).half())
    brain = Im2colConv2d.from_conv(copy.deepcopy(conv).bfloat16())
    double = Im2colConv2d.from_conv(copy.deepcopy(conv).double())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = half(x)
        assert torch.equal(got, im2col_conv2d(x.bfloat16(), half.weight.bfloat16(),
                                              half.bias.bfloat16(), (6, 6)))
        got = brain(x)
        assert torch.equal(got, im2col_conv2d(x.bfloat16(), brain.weight, brain.bias, (6, 6)))
        wide = double(x.double())
        assert wide.dtype == torch.float64
        assert len(im2col_calls) == 3 + 2  # the two im2col_conv2d calls above included
        emu.assert_rel(wide, _reference(x.double(), double.weight, double.bias, (6, 6)))
        single = Im2colConv2d.from_conv(copy.deepcopy(conv))
        with pytest.raises(RuntimeError) as theirs:
            conv(x.double())
        with pytest.raises(RuntimeError) as ours:
            single(x.double())
        assert str(ours.value) == str(theirs.value)
    assert len(im2col_calls) == 5


def _deeplab():
    torch.manual_seed(0)
    return emu.prepare(tvm.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=5, aux_loss=False))


@pytest.mark.parametrize("size", [(49, 67), (161, 203)])  # ASPP taps wholly / partly inside
def test_deeplabv3_computes_what_it_did(size, im2col_calls):
    source = _deeplab()
    x = _random((2, 3, *size), 9)
    with torch.no_grad():
        want = source(x)["out"]
        fast = im2col_dilated_convs(source)
        assert not im2col_calls
        got = fast(x)["out"]
    assert len(im2col_calls) == 3  # through the GEMMs, not the fallback
    # the three ASPP rates 12 / 24 / 36; the backbone's dilations (2, 4) stay
    assert fast.im2col_convs == 3
    assert sum(isinstance(m, Im2colConv2d) for m in fast.modules()) == 3
    assert not any(isinstance(m, Im2colConv2d) for m in source.modules())  # a copy
    assert list(fast.state_dict()) == list(source.state_dict())
    emu.assert_rel(got, want)


def test_converted_dense_head(im2col_calls):
    source = _deeplab()
    cad = convert(source, 8, 16)
    spec, _ = emu.mixed_masks(4, 2, (7, 9), cad.num_levels, "keep")
    x = _random((2, 3, 49, 67), 10)
    with torch.no_grad():
        want = cad(x, spec)["out"]
        fast = im2col_dilated_convs(cad)
        got = fast(x, spec)["out"]
    assert fast.im2col_convs == 3 and len(im2col_calls) == 3
    emu.assert_rel(got, want)


def test_inplace_and_min_dilation():
    m = nn.Sequential(nn.Conv2d(2, 2, 3, padding=2, dilation=2), nn.ReLU())
    assert im2col_dilated_convs(m, min_dilation=2, inplace=True) is m
    assert isinstance(m[0], Im2colConv2d) and m.im2col_convs == 1
    with pytest.raises(ValueError, match="min_dilation"):
        im2col_dilated_convs(m, min_dilation=0)
