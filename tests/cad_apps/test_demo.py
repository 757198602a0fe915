"""``cad-spconv demo``: DeepLabV3-ResNet101 converted, edge masks, exact multiply-adds, overlay."""
import re

import numpy as np
import pytest
from PIL import Image

from cad_apps.cli import main as cli
from cad_apps.eval import dense_macs


def test_demo_on_the_synthetic_scene(tmp_path, capsys):
    out = tmp_path / "overlay.png"
    assert cli(["demo", "--size", "48", "96", "--thresholds", "0.35", "0.95", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "48x96" in text
    # the per-threshold table: kept fraction, sites after the step, multiply-adds, saving
    rows = re.findall(r"^\s+(0\.35|0\.95)\s+([\d.]+)%\s+(\d+)\s+([\d.]+) G\s+(-?[\d.]+)%$", text, re.M)
    assert [r[0] for r in rows] == ["0.35", "0.95"]
    fine = dense_macs("deeplabv3_resnet101", 8, (48, 96))["total"]
    assert f"dense stride 8: {fine / 1e9:.1f} GMA" in text
    for _, kept, sites, _, saved in rows:
        assert 0 <= float(kept) <= 100 and 18 <= int(sites) <= 72  # 6x12 grid, 3x6 coarse
    # the one adaptive run: counted multiply-adds equal the plan's prediction (checked inside)
    assert "as the plan predicts" in text
    with Image.open(out) as im:
        assert im.size[0] > 200


def test_demo_runs_the_model_a_checkpoint_holds(tmp_path, capsys):
    """A DeepLabV3-ResNet-50 checkpoint with 5 classes: the demo converts that model and its
    exact count (checked inside against the plan) uses its own head."""
    import torch
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    path = tmp_path / "r50.pth"
    torch.save(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5).state_dict(),
               path)
    assert cli(["demo", "--size", "48", "96", "--thresholds", "0.35", "--checkpoint", str(path),
                "--out", str(tmp_path / "o.png")]) == 0
    text = capsys.readouterr().out
    assert text.startswith("deeplabv3_resnet50, weights from") and "as the plan predicts" in text
    fine = dense_macs("deeplabv3_resnet50", 8, (48, 96), 5)["total"]
    assert f"dense stride 8: {fine / 1e9:.1f} GMA" in text
    # weights trained at output stride 16 (the file name says so) run at stride 8, as the
    # dense network the adaptive one is compared with
    import cad_apps.checkpoints as ckpts
    built = []
    original = ckpts.build_segmentation_model

    def spy(*a, **k):
        model, info = original(*a, **k)
        built.append(model)
        return model, info
    os16 = tmp_path / "best_deeplabv3_resnet50_cityscapes_os16.pth"
    path.rename(os16)
    from unittest import mock
    with mock.patch.object(ckpts, "build_segmentation_model", spy):
        assert cli(["demo", "--size", "48", "96", "--thresholds", "0.35", "--checkpoint",
                    str(os16), "--out", str(tmp_path / "o.png")]) == 0
    assert built[0].backbone.layer3[0].conv2.stride == (1, 1)  # stride 8: layer3 dilated
    capsys.readouterr()
    # DeepLabV3+ (the paper code's layout): its head cannot be indexed for the class count
    from adapters.builders import segmentation_model
    torch.save(segmentation_model("deeplabv3plus_resnet50", 5).state_dict(), path)
    assert cli(["demo", "--size", "48", "96", "--thresholds", "0.35", "--checkpoint", str(path),
                "--out", str(tmp_path / "o.png")]) == 0
    assert "as the plan predicts" in capsys.readouterr().out
    # weights with an auxiliary head (torchvision's trained ones): the demo reads only "out",
    # so the count (checked against the plan inside) leaves the aux head out on both sides
    torch.save(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5,
                                  aux_loss=True).state_dict(), path)
    assert cli(["demo", "--size", "48", "96", "--thresholds", "0.35", "--checkpoint", str(path),
                "--out", str(tmp_path / "o.png")]) == 0
    assert f"dense stride 8: {fine / 1e9:.1f} GMA" in capsys.readouterr().out


def test_demo_with_an_image_file_and_errors(tmp_path, capsys):
    img = tmp_path / "in.png"
    rgb = np.zeros((40, 72, 3), np.uint8)
    rgb[10:30, 20:50] = 255
    Image.fromarray(rgb).save(img)
    out = tmp_path / "o.png"
    assert cli(["demo", "--image", str(img), "--thresholds", "0.35", "--out", str(out)]) == 0
    assert "40x72" in capsys.readouterr().out and out.exists()
    assert cli(["demo", "--image", str(img), "--size", "8", "8", "--out", str(out)]) == 2
    assert "at least 16 pixels" in capsys.readouterr().err
    assert cli(["demo", "--image", str(tmp_path / "missing.png"), "--out", str(out)]) == 2


def test_demo_and_bench_refuse_bad_arguments_with_messages(tmp_path, capsys):
    """Not an image, sizes below one block, a missing GPU: messages, not tracebacks."""
    import torch
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    assert cli(["demo", "--image", str(bad), "--device", "cpu", "--out", str(tmp_path / "o.png")]) == 2
    assert "cannot read the image" in capsys.readouterr().err
    assert cli(["demo", "--size", "0", "0", "--device", "cpu"]) == 2
    assert "at least 16 pixels" in capsys.readouterr().err
    # the overlay is a PNG: another extension, or a folder, is refused before any work
    assert cli(["demo", "--device", "cpu", "--out", str(tmp_path / "o.jpg")]) == 2
    assert "writes a PNG file; give a path ending in .png" in capsys.readouterr().err
    assert cli(["demo", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert f"e.g. {tmp_path / 'output.png'}" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli(["demo", "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
    for argv, msg in ((["--size", "0", "0"], "at least 16 pixels"),
                      (["--random-keep", "2"], "fraction in [0, 1]"),
                      (["--images", str(bad)], "cannot read the image"),
                      (["--device", "tpu"], "not a device")):
        with pytest.raises(SystemExit, match=re.escape(msg)):
            cli(["bench", "--model", "conv3x3", "--reps", "1", "--no-memory", *argv])


def test_a_weights_name_without_a_model_gets_advice_that_fits_the_command(tmp_path, capsys):
    """demo --checkpoint DEFAULT said the name "needs --model", a flag demo does not have."""
    from cad_apps.checkpoints import read_mask_estimator_file

    out = tmp_path / "o.png"
    assert cli(["demo", "--size", "48", "96", "--device", "cpu", "--checkpoint", "DEFAULT",
                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert ("'DEFAULT' is not a file: check the path (this command has no --model: give a "
            "torchvision weights name in full, e.g. DeepLabV3_ResNet101_Weights.DEFAULT)" in err
            and "needs --model" not in err), err
    assert not out.exists()
    # an estimator file has no torchvision weights name at all
    with pytest.raises(FileNotFoundError) as e:
        read_mask_estimator_file("DEFAULT")
    assert str(e.value) == "checkpoint 'DEFAULT' is not a file: check the path"


def test_negative_edge_thresholds_are_refused_as_eval_refuses_them(tmp_path, capsys):
    """demo --thresholds -1 / --threshold -3 ran (every cell kept); eval refuses --mask edge:-1."""
    out = tmp_path / "o.png"
    for argv, message in ((["--thresholds", "0.35", "-1"],
                           "--thresholds -1: the value must be >= 0"),
                          (["--threshold", "-3"], "--threshold -3: the value must be >= 0"),
                          (["--threshold", "nan"], "--threshold nan: the value must be >= 0")):
        assert cli(["demo", "--size", "48", "96", "--device", "cpu", "--out", str(out),
                    *argv]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()
    assert cli(["eval", "--data-root", str(tmp_path), "--mask", "edge:-1"]) == 2
    assert "--mask 'edge:-1': the value must be >= 0" in capsys.readouterr().err
