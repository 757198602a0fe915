"""Exact multiply-adds: dense counts against fvcore, CAD counts against sites x per-site cost
computed from the dense emulation, all-kept / none-kept against the dense networks."""
import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from tests.support import dense_reference as ref
from cad_spconv import CADTensor
from cad_spconv.learned_mask import MaskEstimator
from cad_spconv.macs import MacCounter, count_macs
from cad_spconv.nn import CADBatchNorm2d, CADConv2d, CADPointwise, Densify
from tests.support.inputs import random_masks
from tests.support.keep import as_keep

from tests.support.counters import fvcore_conv_linear


# ------------------------------------------------------------------ dense models vs fvcore
TORCHVISION = [
    ("resnet50", lambda: torchvision.models.resnet50(weights=None)),
    ("resnet101", lambda: torchvision.models.resnet101(weights=None)),
    ("deeplabv3_resnet50", lambda: torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=19, aux_loss=True)),
    ("deeplabv3_resnet101", lambda: torchvision.models.segmentation.deeplabv3_resnet101(
        weights=None, weights_backbone=None, num_classes=19)),
]


@pytest.mark.parametrize("name,build", TORCHVISION, ids=[n for n, _ in TORCHVISION])
def test_dense_torchvision_counts_equal_fvcore(name, build):
    model = build().eval()
    x = torch.randn(1, 3, 33, 47)  # odd size; batch 1 keeps the 2-core CI fast
    r = count_macs(model, x)
    assert r["total"] == fvcore_conv_linear(model, x)
    assert isinstance(r["total"], int) and r["per_image"] == [r["total"]]
    assert sum(r["parts"].values()) == r["total"] == sum(r["layers"].values())
    if name.startswith("deeplab"):
        assert set(r["parts"]) <= {"backbone", "classifier", "aux_classifier"}
    else:
        assert r["parts"]["fc"] == 2048 * 1000
    assert "sparse_layers" not in r


def test_generic_layers_equal_fvcore():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 12, 3, stride=2, padding=2, dilation=2)
            self.dw = nn.Conv2d(12, 12, 5, padding=2, groups=12)
            self.up = nn.ConvTranspose2d(12, 6, 4, stride=2, padding=1, groups=3)
            self.c1 = nn.Conv1d(6, 8, 3)
            self.fc = nn.Linear(8, 5)

        def forward(self, x):
            x = self.up(self.dw(self.conv(x)))
            x = self.c1(x.flatten(2)[:, :, :50])
            return self.fc(x.transpose(1, 2))  # [B, N, in]: a row per position

    model = Mixed().eval()
    x = torch.randn(3, 3, 17, 23)
    r = count_macs(model, x)
    assert r["total"] == fvcore_conv_linear(model, x)
    assert r["parts"]["fc"] == 3 * 48 * 8 * 5
    assert r["per_image"] == [r["total"] // 3] * 3


# ------------------------------------------------------------------ a hand-built CAD model
# (kind, c_in, c_out, k, stride, dilation, groups) of the layers after the stem
SPEC = [
    ("conv", 8, 12, 3, 1, 1, 1), ("bn", 12), ("relu",),
    ("conv", 12, 12, 3, 2, 1, 1), ("bn", 12), ("relu",),      # adaptive step 0 -> 1
    ("conv", 12, 16, 1, 1, 1, 1), ("conv", 16, 16, 3, 1, 2, 2), ("relu",),
    ("conv", 16, 16, 3, 2, 1, 1), ("relu",),                   # adaptive step 1 -> 2
    ("conv", 16, 10, 3, 1, 1, 1),
]
HEAD = [("conv", 10, 6, 3, 1, 1, 1), ("relu",), ("conv", 6, 5, 1, 1, 1, 1)]
L = 2


def build_layers(spec, gen):
    layers = []
    for s in spec:
        if s[0] == "conv":
            _, cin, cout, k, stride, d, g = s
            conv = nn.Conv2d(cin, cout, k, stride, d * (k // 2), d, g).double()
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64) * 0.3)
                conv.bias.copy_(torch.randn(cout, generator=gen, dtype=torch.float64) * 0.1)
            layers.append(conv)
        elif s[0] == "bn":
            bn = nn.BatchNorm2d(s[1]).double().eval()
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            layers.append(bn)
        else:
            layers.append(nn.ReLU())
    return layers


def to_cad(layers):
    out = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            out.append(CADConv2d.from_module(m, engine="torch"))
        elif isinstance(m, nn.BatchNorm2d):
            out.append(CADBatchNorm2d.from_module(m))
        else:
            out.append(CADPointwise(m))
    return out


def dilated(layers, step=0):
    """The finest-stride network: strides of adaptive steps removed, later dilations x 2^t
    (written here from the rule, independently of the library)."""
    out = []
    for m in layers:
        if isinstance(m, nn.Conv2d):
            c = copy.copy(m)  # shares parameters
            c._parameters = m._parameters
            d = m.dilation[0] * 2 ** step
            c.stride, c.dilation, c.padding = (1, 1), (d, d), (d * (m.kernel_size[0] // 2),) * 2
            out.append(c)
            step += m.stride[0] == 2
        else:
            out.append(m)
    return out, step


class ToyCAD(nn.Module):
    """A converted model in the adapters' shape: dense stem, sparse part, head; ``parts()``."""

    def __init__(self, stem, sparse, head, sparse_head):
        super().__init__()
        self.stem, self.sparse, self.head = stem, sparse, head
        self.sparse_head = sparse_head

    def parts(self):
        return {"dense": self.stem, "sparse": self.sparse, "head": self.head}

    def forward(self, images, keep):
        x = self.stem(images)
        if isinstance(keep, nn.Module):
            keep = keep(x)
        t = self.sparse(CADTensor.from_dense(x, keep, L))
        return self.head(t) if self.sparse_head else self.head(t.dense())


def build_models(sparse_head: bool, seed=0):
    gen = torch.Generator().manual_seed(seed)
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1)).double()
    body = build_layers(SPEC, gen)
    head = build_layers(HEAD, gen)
    fine_body, step = dilated(body)
    assert step == L
    fine_head = dilated(head, L)[0] if sparse_head else head
    coarse = nn.Sequential(stem, *body, *head)
    fine = nn.Sequential(stem, *fine_body, *fine_head)
    if sparse_head:
        cad = ToyCAD(stem, nn.Sequential(*to_cad(body)), nn.Sequential(*to_cad(head), Densify()), True)
    else:
        cad = ToyCAD(stem, nn.Sequential(*to_cad(body)), nn.Sequential(*head), False)
    return cad.eval(), fine.eval(), coarse.eval()


def conv_steps(spec):
    """(per-site cost, output step) of every conv, from the spec alone."""
    out, step = [], 0
    for s in spec:
        if s[0] == "conv":
            _, cin, cout, k, stride, _, g = s
            step += stride == 2
            out.append((k * k * (cin // g) * cout, step))
    return out


def stem_macs(H, W):
    h1, w1 = (H - 1) // 2 + 1, (W - 1) // 2 + 1
    h2, w2 = (h1 - 1) // 2 + 1, (w1 - 1) // 2 + 1
    return 9 * 3 * 8 * h1 * w1 + 9 * 8 * 8 * h2 * w2, (h2, w2)


@pytest.mark.parametrize("sparse_head", [False, True])
@pytest.mark.parametrize("size", [(52, 76), (45, 61)])
def test_all_kept_and_none_kept_equal_dense_networks(sparse_head, size):
    cad, fine, coarse = build_models(sparse_head)
    images = torch.randn(2, 3, *size, dtype=torch.float64)
    _, grid = stem_macs(*size)
    all_kept = torch.ones(2, 1, *grid, dtype=torch.bool)
    r_all = count_macs(cad, images, all_kept)
    r_none = count_macs(cad, images, ~all_kept)
    fine_count, coarse_count = fvcore_conv_linear(fine, images), fvcore_conv_linear(coarse, images)
    assert r_all["total"] == fine_count
    # converted layers alone: all kept == finest, none kept == coarsest, analytically too
    for r in (r_all, r_none):
        assert r["sparse_layers"]["all_kept"] == r_all["sparse_layers"]["actual"]
        assert r["sparse_layers"]["none_kept"] == r_none["sparse_layers"]["actual"]
    stem_count = fvcore_conv_linear(cad.stem, images)
    assert r_none["parts"]["dense"] == r_all["parts"]["dense"] == stem_count
    coarse_body = fvcore_conv_linear(nn.Sequential(cad.stem, *coarse[1:1 + len(SPEC)]), images) - stem_count
    assert r_none["parts"]["sparse"] == coarse_body
    if sparse_head:
        assert r_none["total"] == coarse_count
    else:  # the head runs densified at the finest stride in both cases
        assert r_none["parts"]["head"] == r_all["parts"]["head"]
        assert r_none["total"] == coarse_body + stem_count + r_all["parts"]["head"]
    # the paper's convention too (ptflops: biases, norms, activations; these convs have biases)
    ptflops = pytest.importorskip("ptflops", reason="ptflops not installed (extra 'test')")

    def ptflops_count(model):
        return ptflops.get_model_complexity_info(
            model, (3, *size), as_strings=False, print_per_layer_stat=False, verbose=False,
            backend_specific_config={"count_functional": False})[0]
    assert r_all["ptflops"]["per_image"] == [ptflops_count(fine)] * 2
    if sparse_head:
        assert r_none["ptflops"]["per_image"] == [ptflops_count(coarse)] * 2
    r = count_macs(cad, images, ~all_kept, finest=r_all, coarsest=coarse_count)
    assert r["vs_finest"] == r_none["total"] / r_all["total"]
    assert r["vs_coarsest"] == r_none["total"] / coarse_count
    # a reference counted on another batch is refused, not divided by
    with pytest.raises(ValueError, match="counted on a batch of 1, this count on a batch of 2"):
        count_macs(cad, images, ~all_kept, finest=count_macs(cad, images[:1], ~all_kept[:1]))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] .*got shape \(\d+,\)"):
        count_macs(cad, images[0, 0, 0], ~all_kept[:1])


@pytest.mark.parametrize("kind", ["keep", "levels", "map"])
@pytest.mark.parametrize("sparse_head", [False, True])
def test_random_masks_equal_sites_times_cost(kind, sparse_head):
    cad, _, _ = build_models(sparse_head, seed=1)
    size = (61, 83)
    stem, grid = stem_macs(*size)
    rng = np.random.default_rng(11)
    spec, level_masks = random_masks(rng, 3, grid, L, kind)
    levels = ref.levels_from_masks(level_masks, L)
    images = torch.randn(3, 3, *size, dtype=torch.float64)
    r = count_macs(cad, images, as_keep(spec, L))
    H0, W0 = grid
    expected = []
    for b in range(3):
        n_sites = {t: int((ref.Geometry(levels, t).sites[:, 0] == b).sum()) for t in range(L + 1)}
        body = sum(c * n_sites[t] for c, t in conv_steps(SPEC))
        if sparse_head:
            head = sum(c * n_sites[L] for c, _ in conv_steps(HEAD))
        else:
            head = sum(c for c, _ in conv_steps(HEAD)) * H0 * W0
        expected.append((stem, body, head))
    assert r["per_image"] == [sum(e) for e in expected]
    assert r["per_image_parts"]["dense"] == [e[0] for e in expected]
    assert r["per_image_parts"]["sparse"] == [e[1] for e in expected]
    assert r["per_image_parts"]["head"] == [e[2] for e in expected]
    assert r["total"] == sum(sum(e) for e in expected)
    assert len(set(r["per_image"])) == 3  # the images' masks differ, so do their costs


def test_mask_estimator_is_counted_as_its_own_part():
    cad, _, _ = build_models(False, seed=2)
    estimator = MaskEstimator(in_channels=8).double().eval()
    images = torch.randn(2, 3, 45, 61, dtype=torch.float64)
    stem, (H0, W0) = stem_macs(45, 61)
    r = count_macs(cad, images, estimator)
    h, w = -(-H0 // 2), -(-W0 // 2)
    expected = 9 * (8 * 128 + 128 * 64) * H0 * W0 + 9 * (64 * 64 + 64 * 2) * h * w
    assert r["parts"]["mask"] == 2 * expected
    assert r["per_image_parts"]["mask"] == [expected, expected]
    keep = estimator(cad.stem(images))
    r_keep = count_macs(cad, images, keep)
    assert r["total"] - r["parts"]["mask"] == r_keep["total"]
    assert "mask" not in r_keep["parts"]


def test_counter_accumulates_and_removes_hooks():
    cad, _, _ = build_models(False, seed=3)
    images = torch.randn(1, 3, 33, 41, dtype=torch.float64)
    _, grid = stem_macs(33, 41)
    keep = torch.rand(1, *grid) < 0.2
    one = count_macs(cad, images, keep)["total"]
    counter = MacCounter(cad, 1)
    with counter, torch.no_grad():
        cad(images, keep)
        cad(images, keep)
    assert counter.result()["total"] == 2 * one
    assert all(not m._forward_hooks for m in cad.modules())
    counter.reset()
    assert counter.result()["total"] == 0


def test_per_image_needs_the_batch_on_dim_0():
    class Folds(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x.reshape(-1, 3, x.shape[-2] // 2, x.shape[-1]))

    with pytest.raises(ValueError, match="batch of 4"):
        count_macs(Folds(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="positive int"):
        count_macs(nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8), finest=0)


# ------------------------------------------------------------------ the paper's counter (ptflops)
def test_ptflops_convention_matches_ptflops_and_the_dense_ends():
    """``result()["ptflops"]`` counts as ptflops does (conv / linear + bias, batch norm,
    activations, pooling): equal to ptflops itself on a dense ResNet; a converted ResNet counts
    the dense finest-stride network with everything kept and the coarsest-stride one with
    nothing kept, per image; a mixed batch lies in between, image by image."""
    ptflops = pytest.importorskip("ptflops", reason="ptflops not installed (extra 'test')")
    from adapters import convert
    torch.manual_seed(0)
    standard = torchvision.models.resnet50().eval()
    # module hooks only, as the paper's vendored copy of ptflops counts
    res = ptflops.get_model_complexity_info(standard, (3, 64, 96), as_strings=False,
                                            print_per_layer_stat=False, verbose=False,
                                            backend_specific_config={"count_functional": False})
    x = torch.randn(1, 3, 64, 96)
    assert count_macs(standard, x)["ptflops"]["total"] == res[0]
    cad = convert(standard, 8, 32).eval()
    images = torch.randn(2, 3, 64, 96)
    trunk_fine = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    trunk_fine.load_state_dict(standard.state_dict())
    with torch.no_grad():
        dense_fine = count_macs(trunk_fine.eval(), images)["ptflops"]["per_image"]
        dense_coarse = count_macs(standard, images)["ptflops"]["per_image"]
        all_kept = count_macs(cad, images, torch.ones(2, 64, 96, dtype=torch.bool))["ptflops"]
        none_kept = count_macs(cad, images, torch.zeros(2, 64, 96, dtype=torch.bool))["ptflops"]
        keep = torch.zeros(2, 64, 96, dtype=torch.bool)
        keep[0, :20, :30] = True
        mixed = count_macs(cad, images, keep)["ptflops"]["per_image"]
    assert all_kept["per_image"] == dense_fine
    assert none_kept["per_image"] == dense_coarse
    assert dense_coarse[0] < mixed[0] < dense_fine[0] and mixed[1] == dense_coarse[1]


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm([8, 6, 10]), lambda: nn.GroupNorm(2, 8),
                                  lambda: nn.BatchNorm2d(8), nn.LeakyReLU, nn.ELU, nn.ReLU6,
                                  nn.PReLU, nn.GELU, lambda: nn.MaxPool2d(3, 1, 1),
                                  lambda: nn.AvgPool2d(2), lambda: nn.Upsample(scale_factor=2)])
def test_ptflops_convention_counts_norms_as_ptflops_does(norm):
    """Norm layers in the ptflops convention: twice the elements where ptflops sees ``affine``
    (LayerNorm's ``elementwise_affine`` is not that attribute, so it counts once); every
    activation, pooling and upsampling layer the convention names, as ptflops counts it."""
    ptflops = pytest.importorskip("ptflops", reason="ptflops not installed (extra 'test')")
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm(), nn.ReLU()).eval()
    res = ptflops.get_model_complexity_info(model, (3, 6, 10), as_strings=False,
                                            print_per_layer_stat=False, verbose=False,
                                            backend_specific_config={"count_functional": False})
    assert count_macs(model, torch.randn(1, 3, 6, 10))["ptflops"]["total"] == res[0]
