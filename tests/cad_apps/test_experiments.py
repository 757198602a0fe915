"""The experiment scripts end to end on a tiny synthetic Cityscapes folder (random weights).

All scripts share one output folder, so the baselines (nothing / everything kept) are evaluated
once and resumed by the others, as they would be on the real dataset.
"""
import json
import os

import pytest
import torch
from PIL import Image

from cad_apps.data import make_synthetic_cityscapes
from experiments import inadequate_masks, oracle, overlays, synthetic_model, tradeoff

COMMON = ["--model", "deeplabv3_resnet50", "--device", "cpu", "--num-workers", "0", "--no-progress",
          "--no-timing", "--dilation", "3"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, num_images=2, size=(40, 56), seed=3)
    make_synthetic_cityscapes(root, "train", num_images=3, size=(40, 56), seed=4)
    out = tmp_path_factory.mktemp("experiments")
    return ["--data-root", str(root), "--out", str(out)] + COMMON, out


def _png(path):
    with Image.open(path) as im:
        assert im.size[0] > 100 and im.size[1] > 100
        im.load()


def test_tradeoff_curve(setup, tmp_path, capsys):
    from cad_spconv.learned_mask import MaskEstimator
    argv, out = setup
    torch.manual_seed(0)
    ckpt = tmp_path / "rho0.5.pth"
    torch.save(MaskEstimator(512).state_dict(), ckpt)
    assert tradeoff.main(argv + ["--thresholds", "0.35", "1.5", "--learned", str(ckpt)]) == 0
    report = json.loads((out / "tradeoff.json").read_text())
    pts = {p["mask"]: p for p in report["points"]}
    assert set(pts) == {"none", "all", "edge:0.35", "edge:1.5", f"learned:{ckpt}"}
    assert pts["all"]["macs_fraction_of_finest"] == 1.0 and pts["all"]["level0_share"] == 1.0
    assert pts["none"]["level0_share"] == 0.0
    assert pts["none"]["macs_per_image"] <= pts["edge:1.5"]["macs_per_image"] <= pts["all"]["macs_per_image"]
    assert pts[f"learned:{ckpt}"]["macs_parts_per_image"]["mask"] > 0
    # each point is the summary of its own resumable eval run
    run = json.loads((out / "runs" / "edge_1.5.json").read_text())
    s, p = run["summary"], pts["edge:1.5"]
    assert p["miou"] == s["miou"] and p["macs_per_image"] == s["macs_mean"]["total"]
    for key in ("macs_fraction_of_finest", "macs_fraction_of_coarsest", "num_images"):
        assert p[key] == s[key], key
    assert (p["level0_share"], p["time_per_image_s"]) == (s["level0_share_mean"],
                                                          s["time_per_image_s_median"])
    assert (p["dense_finest_macs_per_image"], p["dense_coarsest_macs_per_image"]) == (
        s["macs_dense_finest_mean"], s["macs_dense_coarsest_mean"])
    assert s["macs_fraction_of_finest"] != s["macs_fraction_of_coarsest"]  # told apart
    _png(out / "tradeoff.png")
    # two train-mask runs both write last.pt: their points get distinct files and labels
    for name in ("rho0.3", "rho0.6"):
        (tmp_path / name).mkdir()
        torch.save(MaskEstimator(512).state_dict(), tmp_path / name / "last.pt")
    both = [str(tmp_path / n / "last.pt") for n in ("rho0.3", "rho0.6")]
    assert tradeoff.main(argv + ["--thresholds", "--learned", *both]) == 0
    report = json.loads((out / "tradeoff.json").read_text())
    labels = {p["mask"]: p["label"] for p in report["points"]}
    assert [labels[f"learned:{c}"] for c in both] == ["rho0.3_last", "rho0.6_last"]
    assert {"learned_rho0.3_last.json", "learned_rho0.6_last.json"} <= set(
        os.listdir(out / "runs"))
    # settings whose files would collide are refused before any work
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "rho0.3").mkdir()
    torch.save(MaskEstimator(512).state_dict(), tmp_path / "x" / "rho0.3" / "last.pt")
    assert tradeoff.main(argv + ["--thresholds", "--learned", both[0],
                                 str(tmp_path / "x" / "rho0.3" / "last.pt")]) == 2
    assert "would share the result file" in capsys.readouterr().err


def test_oracle_experiment(setup):
    argv, out = setup
    assert oracle.main(argv) == 0
    report = json.loads((out / "oracle.json").read_text())
    assert [p["mask"] for p in report["points"]] == ["none", "all", "oracle"]
    fr = report["oracle_macs_fraction_of_finest_per_image"]
    assert len(fr) == 2 and all(0 < f <= 1 for f in fr)
    _png(out / "oracle.png")


def test_inadequate_masks(setup):
    argv, out = setup
    assert inadequate_masks.main(argv + ["--thresholds", "1.5", "--random-fractions", "0.5"]) == 0
    report = json.loads((out / "inadequate_masks.json").read_text())
    pts = {p["mask"]: p for p in report["points"]}
    assert {"edge:1.5", "shuffled-edge:1.5", "inverted-edge:1.5", "random:0.5"} <= set(pts)
    _png(out / "inadequate_masks.png")


def test_overlays(setup, capsys):
    argv, out = setup
    assert overlays.main(argv + ["--masks", "edge:1.5", "all", "--num-images", "2"]) == 0
    report = json.loads((out / "overlays.json").read_text())
    assert len(report["images"]) == 2
    assert report["masks"]["all"]["level0_share_mean"] == 1.0
    assert 0 < report["masks"]["edge:1.5"]["level0_share_mean"] < 1
    _png(out / "overlays.png")
    capsys.readouterr()
    with pytest.raises(SystemExit):  # --limit would be ignored: --num-images says how many
        overlays.main(argv + ["--masks", "all", "--limit", "1"])
    assert "--limit does not apply" in capsys.readouterr().err


def test_scripts_run_from_the_command_line(setup):
    import subprocess
    import sys
    from tests.support.inputs import REPO
    proc = subprocess.run([sys.executable, "-m", "experiments.tradeoff", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--thresholds" in proc.stdout


def test_synthetic_model_makes_predictions_that_are_not_noise(setup, tmp_path):
    from cad_apps.checkpoints import build_segmentation_model
    from cad_apps.eval import EvalConfig, evaluate
    argv, _ = setup
    root = argv[argv.index("--data-root") + 1]
    ckpt = tmp_path / "synthetic.pth"
    assert synthetic_model.main(["--data-root", root, "--model", "deeplabv3_resnet50",
                                 "--iterations", "30", "--out", str(ckpt)]) == 0
    _, info = build_segmentation_model("deeplabv3_resnet50", ckpt)
    assert info.format == "reference" and info.num_classes == 19

    def miou(checkpoint):
        cfg = EvalConfig(data_root=root, out=str(tmp_path / f"{checkpoint is None}.json"),
                         split="train", model="deeplabv3_resnet50", checkpoint=checkpoint,
                         mask="all", device="cpu", num_workers=0, progress=False, timing=False)
        return evaluate(cfg)["summary"]["miou"]
    probe, random = miou(str(ckpt)), miou(None)
    assert probe > 0.2 and probe > 10 * random


@pytest.mark.parametrize("argv, message", [
    (["--engines", "torch,torch"], "two different engines"),
    (["--engines", "torch"], "two different engines"),
    (["--engines", "lattice,nosuch"], "unknown engine 'nosuch'"),
])
def test_products_first_refuses_bad_engines(argv, message, capsys):
    from experiments import products_first

    with pytest.raises(SystemExit):
        products_first.main(["layers", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_products_first_says_when_there_is_no_cuda(capsys):
    from experiments import products_first

    with pytest.raises(SystemExit):
        products_first.main(["layers", "--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_scripts_sharing_an_out_folder_need_one_limit(setup, tmp_path, capsys):
    """The baselines' result files are shared by the scripts of one --out: a lower --limit
    would pool images it does not ask for, so it is refused with advice that fits scripts."""
    argv, _ = setup
    i = argv.index("--out")
    argv = argv[:i + 1] + [str(tmp_path)] + argv[i + 2:]
    assert tradeoff.main(argv + ["--thresholds"]) == 0
    capsys.readouterr()
    assert oracle.main(argv + ["--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert "give them all the same --limit, or this one another" in err
    assert len(err.strip().splitlines()) == 1
