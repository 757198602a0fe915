"""``python -m experiments.keypoints``: the Fig. 6 sweep end to end on a synthetic set (a thin
random VGG in place of VGG16 and one dilation setting per stride, so that it runs in seconds),
its resumption, and the settings table of the paper's code."""
import json
import os

import cv2
import pytest

from cad_apps.keypoints.hpatches import synthetic_scene, write_synthetic
from experiments import keypoints as exp
from tests.support.hpatches import thin_vgg
from tests.support.hpatches import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.inputs import file_version


def test_settings_table_is_the_reference_sweep():
    runs = exp.settings("paper", ablation=True)
    labels = [r[0] for r in runs]
    assert labels[:4] == ["dense_os8", "dense_os4", "dense_os2", "dense_os1"]
    assert "adaptive_os1_25_51_51" in labels and "adaptive_os2_19_35" in labels
    assert sum(r[1] == 4 and r[3] == "keypoints" and len(r[2]) == 1 for r in runs) == 6
    assert sum(r[1] == 2 and r[3] == "keypoints" and len(r[2]) == 2 for r in runs) == 18
    assert sum(r[1] == 1 and r[3] == "keypoints" and len(r[2]) == 3 for r in runs) == 10
    assert len(runs) == 4 + 34 + 20
    assert sum(r[3] == "random" for r in runs) == sum(r[3] == "inverted" for r in runs) == 10
    from cad_apps.keypoints.levels import check_dilations
    for _, stride, dil, _ in runs:  # every setting of the paper's code is a valid quadtree rule
        if dil:
            check_dilations(dil, stride)


def _quick_sweep_data(tmp_path, monkeypatch):
    """A one-scene synthetic HPatches folder and a quick sweep of thin random networks (a
    negative seed reaches the network only if the sweep fails to refuse it)."""
    import cad_apps.keypoints.network as network

    monkeypatch.setattr(network, "random_features",
                        lambda seed=0: thin_vgg(scale=32, seed=abs(seed)).float())
    monkeypatch.setattr(exp, "QUICK_SETTINGS", {4: [(11,)], 2: [(21, 21)], 1: [(9, 19, 35)]})
    data = tmp_path / "data"
    write_synthetic(str(data), [synthetic_scene((144, 192), 3)], image_size=(48, 64), kinds=("v",))
    return data


def test_sweep_writes_json_and_png_and_resumes(tmp_path, monkeypatch, capsys):
    data = _quick_sweep_data(tmp_path, monkeypatch)
    out = tmp_path / "sweep"
    args = ["--data-root", str(data), "--random-weights", "--settings", "quick",
            "--num-keypoints", "16", "--no-progress", "--out", str(out)]
    assert exp.main(args) == 0
    report = json.load(open(out / "keypoints.json"))
    feats = report["features"]
    assert len(feats) == 9 and (out / "keypoints.png").read_bytes()[:4] == b"\x89PNG"
    macs = {k: v["macs_per_image"] for k, v in feats.items()}
    assert macs["dense_os8"] < macs["adaptive_os4_11"] < macs["dense_os4"]
    assert macs["dense_os4"] < macs["adaptive_os2_21_21"] < macs["dense_os2"]
    assert macs["dense_os2"] < macs["dense_os1"] and macs["adaptive_os1_9_19_35"] < macs["dense_os1"]
    for mask in ("random", "inverted"):
        assert macs[f"{mask}_os1_9_19_35"] == macs["adaptive_os1_9_19_35"]
    assert feats["random_os1_9_19_35"]["group"] == "random 1->8"
    assert feats["adaptive_os2_21_21"]["group"] == "adaptive 2->8"
    stamp = file_version(out / "features" / "dense_os1" / "v_synth0" / "2.npz")
    assert exp.main(args) == 0  # resumes: nothing recomputed
    assert file_version(out / "features" / "dense_os1" / "v_synth0" / "2.npz") == stamp
    # evaluate's notes are printed as by `cad-spconv keypoints evaluate` (they were not): here
    # a folder whose records name two setups, as after a resume on another device
    summary = out / "features" / "dense_os8" / "summary.json"
    s = json.load(open(summary))
    s["images"]["v_synth0/2"]["timed_on"] = "cuda (X)"
    summary.write_text(json.dumps(s))
    capsys.readouterr()
    assert exp.main(args) == 0
    assert "note: dense_os8: its images were timed on 2 setups (" in capsys.readouterr().out


def test_synthetic_option_writes_an_hpatches_set_once(tmp_path):
    scene = tmp_path / "scene.png"
    cv2.imwrite(str(scene), synthetic_scene((144, 192), 3)[:, :, ::-1])
    args = exp.build_parser().parse_args(["--synthetic", "--scenes", str(scene), "--synthetic-size",
                                          "48", "64", "--random-weights", "--out", str(tmp_path / "o")])
    root = exp.synthetic_root(args)
    assert sorted(os.listdir(root)) == ["i_synth0", "v_synth0"]
    stamp = file_version(os.path.join(root, "v_synth0", "3.ppm"))
    assert exp.synthetic_root(args) == root
    assert file_version(os.path.join(root, "v_synth0", "3.ppm")) == stamp


def test_sweep_needs_data(tmp_path, capsys):
    assert exp.main(["--random-weights", "--out", str(tmp_path)]) == 2
    assert "exactly one of --data-root and --synthetic" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        exp.main(["--synthetic", "--out", str(tmp_path)])  # weights are required
    assert "one of the arguments --weights --random-weights is required" in capsys.readouterr().err


def test_sweep_reports_bad_weights_and_sizes_as_the_cli_does(tmp_path, capsys):
    """A checkpoint that is not D2-Net's (a KeyError) and --synthetic-size 0 0 ended in a
    traceback, -8 16 in an error naming no option: one line naming the option, exit 2, before
    any work."""
    import torch

    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    data = tmp_path / "data"
    write_synthetic(str(data), [synthetic_scene((144, 192), 3)], image_size=(48, 64), kinds=("v",))
    out = tmp_path / "sweep"
    assert exp.main(["--data-root", str(data), "--weights", str(tmp_path / "other.pth"),
                     "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("experiments.keypoints: error: --weights ") and "Traceback" not in err
    assert "not a D2-Net VGG16 checkpoint" in err and "d2_tf.pth" in err
    assert not out.exists()  # refused before any work
    scene = tmp_path / "scene.png"
    cv2.imwrite(str(scene), synthetic_scene((144, 192), 3)[:, :, ::-1])
    out = tmp_path / "sweep_synthetic"  # with --synthetic: before the set is written
    assert exp.main(["--synthetic", "--scenes", str(scene), "--synthetic-size", "48", "64",
                     "--weights", str(tmp_path / "other.pth"), "--no-progress",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("experiments.keypoints: error: --weights ") and "Traceback" not in err
    assert "not a D2-Net VGG16 checkpoint" in err and not out.exists()
    for size, scenes in ((["0", "0"], ["--scenes", str(scene)]), (["0", "0"], []),
                         (["-8", "16"], []), (["8", "7"], [])):
        out = tmp_path / f"syn{'_'.join(size)}{len(scenes)}"
        assert exp.main(["--synthetic", *scenes, "--synthetic-size", *size, "--random-weights",
                         "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert (f"experiments.keypoints: error: --synthetic-size must be two integers >= 8 "
                f"(height and width of the synthetic images; the network needs 8 pixels a "
                f"side), got {' '.join(size)}\n") == err, err
        assert not out.exists()


def test_sweep_checks_every_settings_options_before_the_first(tmp_path, monkeypatch, capsys):
    """A negative --seed failed only at the first ablation setting, after every dense and
    adaptive one had run (hours on HPatches): refused before any work, naming --seed."""
    data = _quick_sweep_data(tmp_path, monkeypatch)
    for extra in (["--data-root", str(data)], ["--synthetic"]):
        out = tmp_path / f"sweep{len(extra)}"
        assert exp.main([*extra, "--random-weights", "--seed", "-1", "--settings", "quick",
                         "--num-keypoints", "16", "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err == ("experiments.keypoints: error: --seed must be a non-negative integer "
                       "below 2**64, got -1\n"), err
        assert not out.exists()


def test_a_folder_another_run_extracts_into_is_refused_before_any_setting(tmp_path, monkeypatch,
                                                                          capsys):
    """A setting whose features folder another live process was extracting into was found at
    its turn, after the settings before it had run (hours, in the paper's sweep): refused before
    the first, naming the file and the fix."""
    from cad_apps.io import OutputLock

    data = _quick_sweep_data(tmp_path, monkeypatch)
    out = tmp_path / "sweep"
    last = exp.settings("quick", ablation=True)[-1][0]
    busy = out / "features" / last / "summary.json"
    with OutputLock(str(busy)):
        assert exp.main(["--data-root", str(data), "--random-weights", "--settings", "quick",
                         "--num-keypoints", "16", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"error: --out {busy} is being written by another running process" in err
            and "wait for it to finish or choose another --out" in err), err
    assert os.listdir(out / "features") == [last]  # no setting ran
