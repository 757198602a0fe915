"""The paper's published segmentation checkpoints, run as published: each layout (built in
``tests/support/published.py`` from a written description) loads strictly into the right
model; ``--dense 16`` reproduces the stride-16 network; the edge and learned models under
``semantics="reference"`` equal an independent dense emulation of the reference rules
(float64, random weights and batch-norm statistics, per-image masks)."""
import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3

from adapters import convert
from adapters.builders import segmentation_model
from cad_apps.checkpoints import (CheckpointError, CheckpointMismatchError,
                                  build_segmentation_model, read_checkpoint)
from cad_apps.data import CityscapesSegmentation, make_synthetic_cityscapes
from cad_apps.eval import EvalConfig, evaluate
from cad_spconv import masks
from cad_spconv.learned_mask import MaskEstimator
from tests.support import emulation as emu
from tests.support import published

NAME = "deeplabv3_resnet50"
SIZE = (48, 72)   # finest grid 6x9: 4x4-cell blocks clipped at the border


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    return emu.prepare(segmentation_model(NAME, num_classes=19))


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("published")
    torch.manual_seed(6)
    est = MaskEstimator(512)
    with torch.no_grad():
        for p in est.parameters():
            p.mul_(0.1)
    return {
        "os8": published.save(d / "best_deeplabv3_resnet50_cityscapes_os8_seed1.pth",
                              published.baseline_state(model)),
        "os16": published.save(d / "best_deeplabv3_resnet50_cityscapes_os16_seed1.pth",
                               published.baseline_state(model)),
        "edge": published.save(
            d / "best_deeplabv3_batch_ap_resnet50_cityscapes_os8_modeedges_os16till8_seed2_"
                "trimapwidth11_threshold0.15.pth", published.edge_state(model)),
        "learned": published.save(
            d / "best_deeplabv3_ad_resnet50_cityscapes_modeend2end_seed0_default_tau1.0_"
                "lowresactive0.5_w_downsample_shared_andbatchnorm_shared.pth",
            published.learned_state(model, est)),
        "estimator": est.eval(),
    }


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, num_images=2, size=SIZE, seed=4)
    return str(root)


def images(seed=2):
    return torch.randn(2, 3, *SIZE, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def _same_weights(a, b):
    sb = b.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, sb[k]), k


@pytest.mark.parametrize("key,stride,layout", [("os8", 8, "reference"), ("os16", 16, "reference"),
                                               ("edge", 8, "reference-edge"),
                                               ("learned", 8, "reference-learned")])
def test_each_layout_loads_strictly_into_the_inferred_model(files, model, key, stride, layout):
    built, info = build_segmentation_model(checkpoint=files[key])
    assert info.format == layout and info.model == NAME and info.trained_output_stride == stride
    assert info.metadata["best_score"] == 0.7 and not info.has_aux
    _same_weights(built.double(), model)
    assert (info.estimator is not None) == (key == "learned")
    rates = [b[0].dilation[0] for b in list(built.classifier[0].convs)[1:-1]]
    assert rates == ([6, 12, 18] if stride == 16 else [12, 24, 36])
    layer3_stride = built.backbone.layer3[0].conv2.stride[0]
    assert layer3_stride == (2 if stride == 16 else 1)


def test_learned_layout_uses_the_low_res_statistics_and_the_estimator(files):
    state = torch.load(files["learned"], weights_only=False)["model_state"]
    _, info = read_checkpoint(files["learned"])
    built, _ = build_segmentation_model(checkpoint=files["learned"])
    low = state["backbone.layer3_low_res.2.bn2.running_mean"]
    high = state["backbone.layer3_high_res.2.bn2.running_mean"]
    assert not torch.equal(low, high)
    assert torch.equal(built.backbone.layer3[2].bn2.running_mean, low)
    for k, v in files["estimator"].state_dict().items():
        assert torch.equal(info.estimator[k], v)


def stride16_reference(model):
    """An independent stride-16 DeepLabV3: torchvision's parts at [F, F, T], ASPP 6/12/18."""
    trunk = tvm.resnet50(replace_stride_with_dilation=[False, False, True])
    ref = DeepLabV3(IntermediateLayerGetter(trunk, {"layer4": "out"}),
                    DeepLabHead(2048, 19, [6, 12, 18]), None)
    ref.load_state_dict(model.state_dict())
    return ref.double().eval()


def test_dense_16_reproduces_the_published_stride_16_model(files, model, cityscapes, tmp_path):
    cfg = EvalConfig(data_root=cityscapes, out=str(tmp_path / "os16.json"),
                     checkpoint=files["os16"], dense=16, dtype="float64", device="cpu",
                     num_workers=0, progress=False, timing=False, warmup=0)
    result = evaluate(cfg)
    ref = stride16_reference(model)
    ds = CityscapesSegmentation(cityscapes)
    for i, name in enumerate(ds.ids):
        item = ds[i]
        x = item["image"][None].double()
        with torch.no_grad():
            pred = ref(x)["out"].argmax(1)[0]
        t = item["target"]
        keep = t != 255
        counts = np.bincount((t[keep] * 19 + pred[keep]).numpy(), minlength=361).reshape(19, 19)
        got = np.zeros((19, 19), np.int64)
        for a, b, n in result["images"][name]["confusion"]:
            got[a, b] = n
        assert np.array_equal(got, counts), name
        rec = result["images"][name]
        assert rec["level0_share"] is None and rec["macs"]["total"] == rec["macs_dense_coarsest"]
    assert result["environment"]["model"] == NAME and result["config"]["dense"] == 16
    with pytest.raises(ValueError, match="takes no mask"):
        evaluate(EvalConfig(data_root=cityscapes, out=str(tmp_path / "x.json"), dense=16,
                            mask="edge:0.35", device="cpu"))
    for extra, named in ((dict(sparse_head=True), "--sparse-head"),
                         (dict(semantics="reference"), "--semantics reference"),
                         (dict(finest_stride=4), "--finest-stride 4"),
                         (dict(dilation=5), "--dilation 5")):
        with pytest.raises(ValueError, match=f"{named} set.* the content-adaptive one"):
            evaluate(EvalConfig(data_root=cityscapes, out=str(tmp_path / "x.json"), dense=16,
                                device="cpu", **extra))


def reference_blocks_by_hand(keep: np.ndarray, stride: int, block: int) -> np.ndarray:
    B, H, W = keep.shape
    h, w = math.ceil(H / stride), math.ceil(W / stride)
    cells = keep[:, ::stride, ::stride]
    out = np.zeros((B, h, w), bool)
    for b in range(B):
        for y in range(0, h, block):
            for x in range(0, w, block):
                out[b, y:y + block, x:x + block] = cells[b, y:y + block, x:x + block].any()
    return out


@pytest.mark.parametrize("shape", [(2, 48, 72), (1, 70, 101), (3, 9, 17)])
def test_reference_edge_blocks_match_a_hand_written_rule(shape):
    keep = torch.rand(*shape, generator=torch.Generator().manual_seed(1)) < 0.01
    got = masks.reference_blocks(keep[:, None], 8, 4)[:, 0].numpy()
    assert np.array_equal(got, reference_blocks_by_hand(keep.numpy(), 8, 4))


@pytest.mark.parametrize("semantics", ["reference", "paper"])
def test_edge_model_matches_the_emulation_of_its_semantics(files, semantics):
    """The edge checkpoint converted 8 -> 16 with the reference's edge rule (4x4 blocks of
    stride-8 cells): backbone and logits equal the emulated network of that semantics."""
    built, _ = build_segmentation_model(checkpoint=files["edge"])
    built = built.double()
    cad = convert(built, 8, 16, semantics=semantics).eval()
    x = images() * 0.01  # flat but for one step per image, at different places
    x[0, :, 5:20, 8:30] += 1.0
    x[1, :, 30:, 40:] += 1.0
    keep = masks.reference_blocks(masks.edge(x, 0.15, 11), 8, 4)
    with torch.no_grad():
        out = cad(x, keep)["out"]
        levels = cad.last_plan.levels.numpy()
        assert len(np.unique(levels)) == 2 and not (levels[0] == levels[1]).all()
        _, want = emu.segmentation(built, x, levels, 8, 16, False, semantics=semantics)
    emu.assert_rel(out, want["out"])


def test_learned_model_matches_the_emulation_of_the_reference_rules(files):
    built, info = build_segmentation_model(checkpoint=files["learned"])
    built = built.double()
    from cad_apps.eval import estimator_from_state
    est = estimator_from_state(info.estimator, 2, info.source).double()
    cad = convert(built, 8, 16, semantics="reference").eval()
    x = images(3)
    with torch.no_grad():
        feats = cad.forward_features(x, est)  # the estimator decides the plan
        levels = cad.last_plan.levels.numpy()
        out = cad(x, est)["out"]
        _, want = emu.segmentation(built, x, levels, 8, 16, False, semantics="reference")
    assert feats.plan.semantics == "reference"
    emu.assert_rel(out, want["out"])


def test_learned_mask_from_the_checkpoint_in_eval(files, cityscapes, tmp_path):
    cfg = EvalConfig(data_root=cityscapes, out=str(tmp_path / "learned.json"),
                     checkpoint=files["learned"], mask="learned", semantics="reference",
                     dtype="float64", device="cpu", num_workers=0, progress=False,
                     timing=False, warmup=0)
    result = evaluate(cfg)
    for rec in result["images"].values():
        assert rec["macs"]["mask"] > 0 and rec["level0_share"] is not None
    assert result["config"]["mask"] == "learned"
    with pytest.raises(ValueError, match="holds none"):
        evaluate(EvalConfig(data_root=cityscapes, out=str(tmp_path / "l2.json"),
                            checkpoint=files["os8"], mask="learned", device="cpu",
                            num_workers=0, progress=False))
    # a train-mask checkpoint says which strides its estimator was trained for: others refused
    other = tmp_path / "best_deeplabv3_ad_resnet50_cityscapes_os8_8to32.pth"
    from cad_apps.checkpoints import load_weights_only
    torch.save(dict(load_weights_only(files["learned"]),
                    meta={"finest_stride": 8, "coarsest_stride": 32}), other)
    with pytest.raises(ValueError, match=r"trained for strides 8->32, this run uses 8->16; pass "
                                         r"--finest-stride 8 --coarsest-stride 32"):
        evaluate(dataclasses.replace(cfg, checkpoint=str(other),
                                     out=str(tmp_path / "l3.json")))


def test_deeplabv3plus_reference_layout_is_inferred(tmp_path):
    torch.manual_seed(0)
    v3p = segmentation_model("deeplabv3plus_resnet50", num_classes=19)
    path = published.save(tmp_path / "best_deeplabv3plus_resnet50_cityscapes_os8.pth",
                          v3p.state_dict())
    built, info = build_segmentation_model(checkpoint=path)
    assert info.model == "deeplabv3plus_resnet50" and info.format == "reference"
    _same_weights(built, v3p)


def test_bad_files_and_wrong_models_get_clear_errors(files, tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        build_segmentation_model(checkpoint=str(empty))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(open(files["os8"], "rb").read()[:5000])
    with pytest.raises(CheckpointError, match="truncated"):
        build_segmentation_model(checkpoint=str(cut))
    with pytest.raises(CheckpointMismatchError, match="holds a deeplabv3_resnet50.*--model"):
        build_segmentation_model("fcn_resnet50", checkpoint=files["os8"])


def stride8_reference(model):
    """An independent output-stride-8 DeepLabV3 for stride-16 weights: torchvision's parts at
    [F, T, T], ASPP 12/24/36 and the 3x3 conv after ASPP dilated by 2 (the paper code's
    classifier_dilation)."""
    trunk = tvm.resnet50(replace_stride_with_dilation=[False, True, True])
    head = DeepLabHead(2048, 19, [12, 24, 36])
    head[1].dilation, head[1].padding = (2, 2), (2, 2)
    ref = DeepLabV3(IntermediateLayerGetter(trunk, {"layer4": "out"}), head, None)
    ref.load_state_dict(model.state_dict())
    return ref.double().eval()


def test_os16_weights_run_at_stride_8_with_the_reference_classifier_dilation(files, model):
    """An OS16-trained model at output stride 8: the backbone at stride 8 (every conv's
    stride, dilation and padding as torchvision's at [F, T, T]), ASPP 12/24/36, its 3x3 conv
    dilated by 2; its output equals the independent stride-8 model's (float64)."""
    built, _ = build_segmentation_model(checkpoint=files["os16"], output_stride=8)
    built = built.double()
    ref = stride8_reference(model)
    assert built.classifier[1].dilation == (2, 2)
    assert [b[0].dilation[0] for b in list(built.classifier[0].convs)[1:-1]] == [12, 24, 36]
    assert built.backbone.layer3[0].conv2.stride == (1, 1)
    ref_modules = dict(ref.named_modules())
    convs = [(n, m) for n, m in built.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == sum(isinstance(m, torch.nn.Conv2d) for m in ref_modules.values())
    for name, conv in convs:
        other = ref_modules[name]
        assert (conv.stride, conv.dilation, conv.padding) == \
            (other.stride, other.dilation, other.padding), name
    x = images()
    with torch.no_grad():
        assert built.backbone(x)["out"].shape[-2:] == (math.ceil(SIZE[0] / 8),
                                                         math.ceil(SIZE[1] / 8))
        got = built(x)["out"]
        want = ref(x)["out"]
    assert got.shape == (2, 19, *SIZE)
    emu.assert_rel(got, want)


def test_paper_counts_of_the_dense_baselines_equal_ptflops(files, cityscapes, tmp_path):
    """macs_paper_ptflops of --dense S is what ptflops (module hooks, as the paper's copy)
    counts for the backbone at stride S."""
    ptflops = pytest.importorskip("ptflops", reason="ptflops not installed (extra 'test')")
    for stride, key in ((16, "os16"), (8, "os8")):
        cfg = EvalConfig(data_root=cityscapes, out=str(tmp_path / f"d{stride}.json"),
                         checkpoint=files[key], dense=stride, device="cpu", num_workers=0,
                         progress=False, timing=False, warmup=0, limit=1)
        rec = next(iter(evaluate(cfg)["images"].values()))
        built, _ = build_segmentation_model(checkpoint=files[key], output_stride=stride)
        want, _ = ptflops.get_model_complexity_info(
            built.backbone, (3, *SIZE), as_strings=False, print_per_layer_stat=False,
            backend_specific_config={"count_functional": False})
        assert rec["macs_paper_ptflops"] == want
