"""Multiply-adds of converted torchvision models (adapters.convert) and the learned-mask
evaluation, against fvcore on the dense networks and sites x cost from the dense emulation."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

from tests.support import dense_reference as ref
from cad_apps import cli
from cad_apps.blended import features_before_adaptive
from cad_spconv.learned_mask import MaskEstimator
from cad_spconv.macs import count_macs
from cad_apps.train_mask import build_model, evaluate_sparse, feature_channels
from tests.support.counters import fvcore_conv_linear
from tests.support.inputs import synthetic_items

adapters = pytest.importorskip("adapters")
if not hasattr(adapters, "convert"):
    pytest.skip("adapters.convert is not available yet", allow_module_level=True)

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


def test_evaluate_sparse_with_learned_mask():
    torch.manual_seed(3)
    model = build_model("fcn_tiny", 3).eval()
    estimator = MaskEstimator(feature_channels(model, 8))
    items = synthetic_items(3, size=(41, 57))
    with torch.no_grad():  # centre the decision so that both occur
        feats = features_before_adaptive(model, torch.stack([i["image"] for i in items]), 8)
        logits = estimator.logits(feats)
        estimator[7].bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    cad = adapters.convert(model, finest_stride=8, coarsest_stride=16)
    result = evaluate_sparse(cad, estimator, items, 3, progress=False)
    assert result["images"] == 3
    macs, finest, kept = [], [], []
    for item in items:
        image = item["image"][None]
        r = count_macs(cad, image, estimator)
        macs.append(r["total"])
        kept.append(float(cad.last_plan.level_fractions()[0, 0]))
        grid = cad.last_plan.grid
        finest.append(count_macs(cad, image, torch.ones(1, 1, *grid, dtype=torch.bool))["total"])
    assert result["macs_per_image"] == sum(macs) / 3
    assert result["vs_finest"] == sum(macs) / sum(finest)
    assert result["kept_fraction"] == pytest.approx(sum(kept) / 3, abs=1e-15)
    assert 0 < result["kept_fraction"] < 1
    assert 0 <= result["miou"] <= 1


def test_cli_train_mask_evaluates_the_sparse_network(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train-mask", "--synthetic", "--model", "fcn_tiny", "--iters", "2",
                     "--batch-size", "2", "--crop-size", "48", "--out", out, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "sparse evaluation on 2 images" in printed
    with open(os.path.join(out, "eval.json")) as f:
        result = json.load(f)
    assert result["images"] == 2 and set(result["parts_per_image"]) >= {"dense", "sparse", "head", "mask"}
    assert 0 < result["vs_finest"]
