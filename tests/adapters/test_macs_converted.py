"""Multiply-adds of converted torchvision models (adapters.convert) and the learned-mask
evaluation, against fvcore on the dense networks and sites x cost from the dense emulation."""
import json
import os

import numpy as np
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from tests.support import dense_reference as ref
from cad_apps import cli
from cad_spconv.learned_mask import MaskEstimator
from cad_spconv.macs import count_macs
from tests.support.counters import fvcore_conv_linear
import adapters  # a broken import fails the module, it does not skip it

SIZE = (49, 71)          # finest grid 7 x 9 at stride 8
GRID = (7, 9)


def deeplab(replace=(False, True, True), num_classes=5):
    """torchvision DeepLabV3-ResNet-50 with the given dilation setting (random weights)."""
    torch.manual_seed(0)
    model = torchvision.models.segmentation.deeplabv3_resnet50(
        weights=None, weights_backbone=None, num_classes=num_classes)
    if tuple(replace) != (False, True, True):
        resnet = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=list(replace))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            setattr(model.backbone, name, getattr(resnet, name))
    return model.eval()


def sparse_layer_costs(model):
    """(per-site cost, output step) of the converted convs of a ResNet-50 adapting 8 -> 16,
    read off the torchvision model: layer3.0.conv1 runs before the stride (step 0), the rest
    after it (step 1)."""
    out = []
    for name, m in model.backbone.named_modules():
        if isinstance(m, torch.nn.Conv2d) and name.split(".")[0] in ("layer3", "layer4"):
            step = 0 if name == "layer3.0.conv1" else 1
            k = m.kernel_size[0] * m.kernel_size[1]
            out.append((k * (m.in_channels // m.groups) * m.out_channels, step))
    return out


def test_converted_deeplab_all_none_and_random_masks():
    model = deeplab()
    cad = adapters.convert(model, finest_stride=8, coarsest_stride=16)
    images = torch.randn(2, 3, *SIZE)
    ones = torch.ones(2, 1, *GRID, dtype=torch.bool)

    r_all = count_macs(cad, images, ones)
    assert r_all["total"] == fvcore_conv_linear(model, images)  # == dense stride 8
    r_none = count_macs(cad, images, ~ones)
    coarse = deeplab((False, False, True))
    coarse_backbone = fvcore_conv_linear(coarse.backbone, images)
    assert r_none["parts"]["dense"] + r_none["parts"]["sparse"] == coarse_backbone
    assert r_none["parts"]["head"] == r_all["parts"]["head"]  # dense at stride 8 both times
    assert r_none["sparse_layers"]["actual"] == r_all["sparse_layers"]["none_kept"]
    assert r_all["sparse_layers"]["actual"] == r_none["sparse_layers"]["all_kept"]

    # a random mask, different per image: sites x cost from the dense emulation
    rng = np.random.default_rng(0)
    keep = rng.uniform(size=(2, *SIZE)) < np.array([0.002, 0.01])[:, None, None]
    r = count_macs(cad, images, torch.from_numpy(keep)[:, None])
    levels = ref.levels_from_masks([ref.keep_to_grid(keep, GRID)], 1)
    stem = IntermediateLayerGetter(torchvision.models.resnet50(weights=None), {"layer2": "out"})
    dense = fvcore_conv_linear(stem, images[:1])
    head = fvcore_conv_linear(model.classifier, torch.randn(1, 2048, *GRID))
    for b in range(2):
        sites = {t: int((ref.Geometry(levels, t).sites[:, 0] == b).sum()) for t in (0, 1)}
        sparse = sum(c * sites[t] for c, t in sparse_layer_costs(model))
        assert r["per_image_parts"]["dense"][b] == dense
        assert r["per_image_parts"]["sparse"][b] == sparse
        assert r["per_image_parts"]["head"][b] == head
        assert r["per_image"][b] == dense + sparse + head
    assert r["per_image"][0] != r["per_image"][1]


def test_converted_deeplab_sparse_head_none_kept_equals_stride_16():
    model = deeplab()
    cad = adapters.convert(model, finest_stride=8, coarsest_stride=16, sparse_head=True)
    images = torch.randn(1, 3, *SIZE)
    ones = torch.ones(1, 1, *GRID, dtype=torch.bool)
    assert count_macs(cad, images, ~ones)["total"] == fvcore_conv_linear(deeplab((False, False, True)), images)
    assert count_macs(cad, images, ones)["total"] == fvcore_conv_linear(model, images)


def test_estimator_counted_in_converted_model():
    model = deeplab()
    cad = adapters.convert(model, finest_stride=8, coarsest_stride=16)
    estimator = MaskEstimator(512).eval()
    images = torch.randn(1, 3, *SIZE)
    r = count_macs(cad, images, estimator)
    H0, W0 = GRID
    h, w = -(-H0 // 2), -(-W0 // 2)
    assert r["parts"]["mask"] == 9 * (512 * 128 + 128 * 64) * H0 * W0 + 9 * (64 * 64 + 64 * 2) * h * w
    assert r["total"] - r["parts"]["mask"] == count_macs(cad, images, cad.last_plan)["total"]


def test_cli_train_mask_evaluates_the_sparse_network(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "2",
                     "--batch-size", "2", "--crop-size", "48", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 images" in printed and "mIoU" in printed
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    s = result["summary"]
    assert s["num_images"] == 2 and set(s["macs_mean"]) >= {"dense", "sparse", "head", "mask"}
    assert result["config"]["mask"].startswith("learned:") and 0 < s["macs_fraction_of_finest"]
    assert result["environment"]["model"] == "FCN"  # the trained model, not the default builder
