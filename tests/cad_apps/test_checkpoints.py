"""Checkpoint loading: the paper's DeepLabV3Plus-Pytorch format, torchvision files, clear errors.

The paper-format state dict is synthesised here: torchvision keys with the head moved under
``classifier.classifier.`` and wrapped as ``{"model_state": ..., "best_score": np.float64}``.
"""
import numpy as np
import pytest
import torch
from torchvision.models import get_model

from cad_apps.checkpoints import (CheckpointMismatchError, build_segmentation_model,
                                    read_checkpoint, resolve_checkpoint)

MODEL = "deeplabv3_resnet50"  # same head and key layout as resnet101, cheaper to build


def _paper_state(model):
    out = {}
    for k, v in model.state_dict().items():
        out["classifier.classifier." + k[len("classifier."):] if k.startswith("classifier.") else k] = v
    return out


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = get_model(MODEL, weights=None, weights_backbone=None, num_classes=19, aux_loss=False)
    with torch.no_grad():  # make BN statistics non-trivial so a wrong mapping would show
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
    return model.eval()


def test_paper_checkpoint_loads_into_torchvision(tmp_path, reference):
    path = tmp_path / "best_deeplabv3_resnet50_cityscapes_os16.pth"
    state = _paper_state(reference)
    assert any(k.startswith("classifier.classifier.4.") for k in state)
    torch.save({"model_state": state, "optimizer_state": {}, "cur_itrs": 30000,
                "best_score": np.float64(0.762)}, path)
    model, info = build_segmentation_model(MODEL, checkpoint=path)
    assert info.format == "reference" and info.num_classes == 19
    assert info.trained_output_stride == 16 and info.metadata["best_score"] == 0.762
    assert not info.has_aux and model.aux_classifier is None
    ref = reference.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    # built as trained: output stride 16, its ASPP rates
    assert model.backbone.layer3[0].conv2.stride == (2, 2)
    assert [b[0].dilation[0] for b in list(model.classifier[0].convs)[1:-1]] == [6, 12, 18]
    at8, _ = build_segmentation_model(MODEL, checkpoint=path, output_stride=8)
    x = torch.randn(1, 3, 33, 41)
    with torch.no_grad():  # at stride 8 (head dilated 2) it is not the reference's OS8 model
        assert at8.classifier[1].dilation == (2, 2)
        assert not torch.equal(at8(x)["out"], reference(x)["out"])


def test_dataparallel_prefix_is_stripped(tmp_path, reference):
    path = tmp_path / "dp_os8.pth"
    torch.save({"model_state": {"module." + k: v for k, v in _paper_state(reference).items()}}, path)
    model, info = build_segmentation_model(MODEL, checkpoint=path)
    assert info.trained_output_stride == 8
    assert torch.equal(model.classifier[4].weight, reference.classifier[4].weight)


def test_key_mismatch_names_missing_and_unexpected(tmp_path, reference):
    state = _paper_state(reference)
    del state["classifier.classifier.1.weight"]
    state["backbone.mask_estimator.0.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointMismatchError) as err:
        build_segmentation_model(MODEL, checkpoint=path)
    msg = str(err.value)
    assert "1 missing keys: classifier.1.weight" in msg
    assert "1 unexpected keys: backbone.mask_estimator.0.weight" in msg
    assert "not one of the layouts" in msg
    # a key missing alone (a layer the renaming missed would stay at its random init)
    del state["backbone.mask_estimator.0.weight"]
    torch.save({"model_state": state}, path)
    with pytest.raises(CheckpointMismatchError, match="1 missing keys: classifier.1.weight"):
        build_segmentation_model(MODEL, checkpoint=path)


def test_shape_mismatch_is_named(tmp_path, reference):
    state = _paper_state(reference)
    state["backbone.conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"backbone.conv1.weight: checkpoint \(64, 3, 3, 3\)"):
        build_segmentation_model(MODEL, checkpoint=path)


def test_plain_torchvision_state_dict_with_aux_head(tmp_path):
    torch.manual_seed(1)
    src = get_model(MODEL, weights=None, weights_backbone=None, num_classes=21, aux_loss=True)
    path = tmp_path / "tv.pth"
    torch.save(src.state_dict(), path)
    model, info = build_segmentation_model(MODEL, checkpoint=path)
    assert info.format == "state_dict" and info.num_classes == 21 and info.has_aux
    assert torch.equal(model.aux_classifier[4].weight, src.aux_classifier[4].weight)


def test_torchvision_weights_name_resolves_to_the_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="deeplabv3_resnet101_coco-586e9e4e.pth"):
        resolve_checkpoint("COCO_WITH_VOC_LABELS_V1", "deeplabv3_resnet101")
    (tmp_path / "checkpoints").mkdir()
    cached = tmp_path / "checkpoints" / "deeplabv3_resnet101_coco-586e9e4e.pth"
    cached.write_bytes(b"")
    assert resolve_checkpoint("DeepLabV3_ResNet101_Weights.COCO_WITH_VOC_LABELS_V1") == str(cached)
    assert resolve_checkpoint("DEFAULT", "deeplabv3_resnet101") == str(cached)
    with pytest.raises(FileNotFoundError, match="neither a file nor a torchvision weights name"):
        resolve_checkpoint("no_such_thing.pth", "deeplabv3_resnet101")
    with pytest.raises(FileNotFoundError, match="not a file.*weights name such as DEFAULT needs "
                                                "--model"):
        resolve_checkpoint("DEFAULT")


def test_unsafe_or_foreign_files_are_refused(tmp_path):
    path = tmp_path / "obj.pth"
    torch.save({"model_state": {"x": torch.zeros(1)}, "cls": CheckpointMismatchError("x")}, path)
    with pytest.raises(ValueError, match="weights-only"):
        read_checkpoint(path)
    path2 = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path2)
    with pytest.raises(ValueError, match="not a state dict"):
        read_checkpoint(path2)
    with pytest.raises(ValueError, match="unknown model"):
        build_segmentation_model("vgg16")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")  # used to raise IndexError inside the error handler
    with pytest.raises(ValueError, match="empty"):
        read_checkpoint(empty)
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")  # was reported as a weights-only failure
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint .*\(it starts with b'no'"):
        read_checkpoint(text)
    cut = tmp_path / "cut.pth"
    cut.write_bytes((tmp_path / "list.pth").read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated or not a PyTorch checkpoint"):
        read_checkpoint(cut)
    with pytest.raises(FileNotFoundError, match="is not a file: check the path"):
        read_checkpoint(tmp_path / "absent.pth")


def test_checkpoints_no_model_can_load_say_so_instead_of_asking_for_model(tmp_path):
    """An ImageNet classifier, or a segmentation model on a ResNet-18-like backbone (such as
    train-mask's fcn_tiny), used to get "pass it (--model ...)", which no --model fixes."""
    from torchvision.models import resnet18

    classifier = resnet18().state_dict()
    torch.save(classifier, tmp_path / "resnet18.pth")
    with pytest.raises(CheckpointMismatchError, match=r"resnet18.pth: not a segmentation "
                       r"checkpoint \(no backbone.\* keys; it holds bn1.bias, .*an ImageNet "
                       r"classifier\?\); pass the weights of a segmentation model"):
        build_segmentation_model(None, str(tmp_path / "resnet18.pth"))
    small = {f"backbone.{k}": v for k, v in classifier.items() if not k.startswith("fc.")}
    small["classifier.0.weight"] = torch.zeros(19, 512, 3, 3)
    torch.save(small, tmp_path / "fcn_resnet18.pth")
    with pytest.raises(CheckpointMismatchError, match=r"layer3 has 2 basic blocks; only "
                                                      r"ResNet-50 / 101 / 152 backbones"):
        build_segmentation_model(None, str(tmp_path / "fcn_resnet18.pth"))


def test_a_pickled_module_is_refused_in_one_plain_line_naming_its_class(tmp_path):
    """torch's weights-only message began with ANSI escape codes and an announcement of "two
    options" it did not give; the class that is not allowed is what the user needs."""
    path = tmp_path / "full.pth"
    torch.save(torch.nn.Conv2d(1, 1, 1), path)
    with pytest.raises(ValueError) as caught:
        read_checkpoint(path)
    message = str(caught.value)
    assert "\x1b" not in message and "two options" not in message and "\n" not in message
    assert (f"cannot read {path} as a weights-only checkpoint (it pickles a "
            "torch.nn.modules.conv.Conv2d, which is not plain data); re-save it as a plain "
            "state dict") in message
