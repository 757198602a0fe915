"""``cad-spconv keypoints extract / evaluate`` end to end on a tiny HPatches-format set (real
Cityscapes frames with known homographies and brightness changes where available), plus the
descriptor sampling and the MMA against independent brute-force computations."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from cad_apps.cli import main as cli
from cad_apps.io import OutputBusyError, OutputLock
from cad_apps.keypoints.evaluate import mutual_nearest_neighbours, run_evaluate
from cad_apps.keypoints.extract import (ExtractConfig, feature_file_problem, run_extract,
                                        sample_descriptors)
from cad_apps.keypoints.hpatches import IMAGES
from tests.support.hpatches import make_hpatches
from tests.support.hpatches import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.support.inputs import REPO, file_version

SIZE = (48, 64)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hpatches")
    make_hpatches(root, image_size=SIZE, num_scenes=1, seed=0)
    return str(root)


@pytest.fixture(scope="module")
def extracted(data_root, tmp_path_factory):
    """Two folders written through the command line: dense stride 8 and adaptive 4 -> 8."""
    out = tmp_path_factory.mktemp("features")
    base = ["keypoints", "extract", "--data-root", data_root, "--random-weights", "--seed", "1",
            "--no-progress"]
    assert cli(base + ["--finest-stride", "8", "--out", str(out / "os8")]) == 0
    assert cli(base + ["--finest-stride", "4", "--dilations", "11", "--out", str(out / "a4")]) == 0
    return out


# ---------------------------------------------------------------------------- sampling
def test_descriptor_sampling_takes_the_nearest_align_corners_cell():
    """Brute force: cell i of h' sits at pixel i * (h - 1) / (h' - 1); take the nearest."""
    rng = np.random.default_rng(0)
    for h, w, s in [(48, 64, 8), (48, 64, 4), (40, 24, 2), (16, 8, 8), (32, 32, 1)]:
        hf, wf = h // s, w // s
        feats = torch.from_numpy(rng.normal(size=(5, hf, wf)))
        xy = np.concatenate([np.stack([rng.integers(0, w, 50), rng.integers(0, h, 50)], 1),
                             [[0, 0], [w - 1, h - 1]]])
        got = sample_descriptors(feats, xy, (h, w), np.float64)
        for (x, y), d in zip(xy, got):
            iy = int(np.argmin([abs(y - i * (h - 1) / (hf - 1)) if hf > 1 else 0 for i in range(hf)]))
            ix = int(np.argmin([abs(x - j * (w - 1) / (wf - 1)) if wf > 1 else 0 for j in range(wf)]))
            np.testing.assert_array_equal(d, feats[:, iy, ix].numpy())


def test_sampling_differs_from_floor_division():
    """Not the stride-8 cell floor(y / 8): y = 7 of 64 rows is nearest to cell 1 (at 9 px)."""
    feats = torch.arange(8.0).view(1, 8, 1).expand(1, 8, 2)
    assert sample_descriptors(feats, np.array([[0, 7]]), (64, 16), np.float64)[0, 0] == 1.0


# ---------------------------------------------------------------------------- MMA
def _brute_force_mma(data_root, folder, normalize=False, thresholds=range(1, 16)):
    """Loops only: best partner by scanning, mutual check, projection of each point."""
    from cad_apps.keypoints.hpatches import list_sequences, read_homography

    acc = {"i": [], "v": []}
    for seq in list_sequences(data_root):
        z1 = np.load(os.path.join(folder, seq.name, "1.npz"))
        for k in range(2, 7):
            zk = np.load(os.path.join(folder, seq.name, f"{k}.npz"))
            a, b = z1["descriptors"].astype(np.float64), zk["descriptors"].astype(np.float64)
            if normalize:
                a = np.array([row / np.sqrt(np.sum(row * row)) for row in a])
                b = np.array([row / np.sqrt(np.sum(row * row)) for row in b])
            hom = read_homography(os.path.join(data_root, seq.name, f"H_1_{k}"))
            dists = []
            for i in range(len(a)):
                sims = [float(np.dot(a[i], b[j])) for j in range(len(b))]
                j = max(range(len(b)), key=lambda t: (sims[t], -t))
                back = [float(np.dot(a[t], b[j])) for t in range(len(a))]
                if max(range(len(a)), key=lambda t: (back[t], -t)) != i:
                    continue
                x, y = z1["keypoints"][i, :2].astype(np.float64)
                p = hom @ np.array([x, y, 1.0])
                q = zk["keypoints"][j, :2].astype(np.float64)
                dists.append(np.hypot(p[0] / p[2] - q[0], p[1] / p[2] - q[1]))
            acc[seq.kind].append([np.mean(np.array(dists) <= t) if dists else 0.0 for t in thresholds])
    out = {g: np.mean(v, axis=0) for g, v in acc.items() if v}
    out["all"] = np.mean(acc["i"] + acc["v"], axis=0)
    return out


@pytest.mark.parametrize("normalize", [False, True])
def test_mma_matches_a_brute_force_computation(data_root, extracted, tmp_path, normalize):
    report = run_evaluate(data_root, [str(extracted / "os8"), str(extracted / "a4")],
                          str(tmp_path / "res.json"), normalize=normalize)
    for name in ("os8", "a4"):
        expected = _brute_force_mma(data_root, str(extracted / name), normalize)
        got = report["features"][name]["mma"]
        for g in ("i", "v", "all"):
            np.testing.assert_allclose(got[g], expected[g], rtol=0, atol=1e-12)
        assert report["features"][name]["num_pairs"] == {"i": 5, "v": 5, "all": 10}
    # the synthetic set is not trivial: some matches, not all correct at 1 px
    m = report["features"]["a4"]["mma"]["all"]
    assert 0 < m[0] < 1 and m[0] <= m[2] <= m[14]
    if normalize:  # cosine matching finds more mutual matches than raw dot products here
        assert report["descriptors"] == "l2-normalised"
        raw = run_evaluate(data_root, [str(extracted / "a4")], str(tmp_path / "raw.json"))
        assert (report["features"]["a4"]["num_matches_mean"]["all"]
                > raw["features"]["a4"]["num_matches_mean"]["all"])


def test_mma_over_all_pairs_weights_every_pair_and_reads_3px(data_root, extracted, tmp_path):
    """"all" is the mean over every pair, not of the two groups' means (here the groups differ
    in size: a viewpoint sequence copied under a second name), and the headline MMA@3 is the
    3 px entry of each curve."""
    root, feats = tmp_path / "hpatches", tmp_path / "feats"
    shutil.copytree(data_root, root)
    shutil.copytree(extracted / "a4", feats)
    v = next(n for n in sorted(os.listdir(root)) if n.startswith("v_"))
    shutil.copytree(root / v, root / f"{v}_copy")
    shutil.copytree(feats / v, feats / f"{v}_copy")
    report = run_evaluate(str(root), [str(feats)], str(tmp_path / "res.json"))
    got = report["features"]["feats"]
    expected = _brute_force_mma(str(root), str(feats))
    assert got["num_pairs"] == {"i": 5, "v": 10, "all": 15}
    assert not np.allclose(expected["all"], (expected["i"] + expected["v"]) / 2)  # it matters
    for g in ("i", "v", "all"):
        np.testing.assert_allclose(got["mma"][g], expected[g], rtol=0, atol=1e-12)
    # MMA@3 is read at the threshold 3, wherever it stands in the list (the curve of these
    # features moves from 1 to 2 and from 2 to 3 px; from 3 to 4 it is flat)
    from cad_apps.keypoints.evaluate import evaluate_folder
    from cad_apps.keypoints.hpatches import list_sequences
    for name in ("os8", "a4"):
        curves = _brute_force_mma(str(data_root), str(extracted / name))
        for thresholds in ((1, 2, 3, 4), (2, 15, 3, 1), (3, 1)):
            at3 = evaluate_folder(list_sequences(str(data_root)), str(extracted / name),
                                  thresholds)["mma@3"]
            for g in ("i", "v", "all"):
                assert at3[g] == pytest.approx(curves[g][2], abs=1e-12), (name, thresholds, g)


def test_mutual_nearest_neighbours_ties_and_empty():
    a = np.array([[1.0, 0], [1.0, 0], [0, 1.0]])
    b = np.array([[1.0, 0], [0, 2.0]])
    np.testing.assert_array_equal(mutual_nearest_neighbours(a, b), [[0, 0], [2, 1]])
    assert mutual_nearest_neighbours(a[:0], b).shape == (0, 2)


def test_mma_on_perfect_features_is_one(data_root, tmp_path):
    """Keypoints of image k = exact projections of image 1's, descriptors one-hot: every
    match correct; a pair without matches scores 0."""
    from cad_apps.keypoints.extract import FORMAT
    from cad_apps.keypoints.hpatches import list_sequences, read_homography

    rng = np.random.default_rng(0)
    folder = tmp_path / "perfect"
    for seq in list_sequences(data_root):
        kp1 = np.stack([rng.uniform(5, 59, 20), rng.uniform(5, 43, 20), np.ones(20)], 1)
        for k in IMAGES:
            kp = kp1 if k == 1 else (read_homography(seq.homography(k)) @ kp1.T).T
            kp = kp / kp[:, 2:]
            desc = np.eye(20, dtype=np.float32)
            if seq.kind == "v" and k == 6:
                desc = np.zeros((0, 20), dtype=np.float32)
                kp = kp[:0]
            os.makedirs(folder / seq.name, exist_ok=True)
            np.savez(folder / seq.name / f"{k}.npz", keypoints=kp.astype(np.float32),
                     descriptors=desc, scores=np.ones(len(kp), np.float32))
    (folder / "summary.json").write_text(json.dumps({"format": FORMAT, "settings": {
        "finest_stride": 8, "dilations": [], "mask": "keypoints"}, "summary": {}}))
    r = run_evaluate(data_root, [str(folder)], str(tmp_path / "p.json"))["features"]["perfect"]
    assert r["mma"]["i"] == [1.0] * 15
    np.testing.assert_allclose(r["mma"]["v"][0], 0.8)  # 4 of 5 pairs perfect, one without matches
    assert r["mma@3"]["all"] == pytest.approx(0.9)


# ---------------------------------------------------------------------------- the commands
def test_extract_writes_the_documented_files(data_root, extracted):
    from cad_apps.keypoints.preprocess import caffe_tensor, prepare_image
    from cad_apps.keypoints.hpatches import read_image
    from cad_apps.keypoints.network import dense_at_stride, random_features
    from cad_spconv.macs import count_macs

    s = json.load(open(extracted / "os8" / "summary.json"))
    assert s["complete"] and s["summary"]["num_images"] == 12 and len(s["images"]) == 12
    assert s["settings"]["finest_stride"] == 8 and s["settings"]["weights"] == "random"
    z = np.load(extracted / "os8" / "v_synth0" / "3.npz")
    n = len(z["keypoints"])
    assert n > 10 and z["keypoints"].shape == (n, 3) and z["keypoints"].dtype == np.float32
    assert (z["keypoints"][:, 2] == 1).all() and z["scores"].shape == (n,)
    assert z["descriptors"].shape == (n, 512) and z["descriptors"].dtype == np.float32
    # multiply-adds per image: independent hand count of the VGG16 convs up to conv4_3
    convs = [(3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 2), (128, 256, 4), (256, 256, 4),
             (256, 256, 4), (256, 512, 8), (512, 512, 8), (512, 512, 8)]
    hand = sum(9 * ci * co * (SIZE[0] // st) * (SIZE[1] // st) for ci, co, st in convs)
    assert s["images"]["v_synth0/3"]["macs"] == hand == s["summary"]["macs_mean"]
    a4 = json.load(open(extracted / "a4" / "summary.json"))
    rec = a4["images"]["v_synth0/3"]
    assert hand < rec["macs"] < sum(9 * ci * co * (SIZE[0] // min(st, 4)) * (SIZE[1] // min(st, 4))
                                    for ci, co, st in convs)
    assert len(rec["level_fractions"]) == 2 and abs(sum(rec["level_fractions"]) - 1) < 1e-12
    # the descriptors are those of the dense stride-8 network on the preprocessed image
    rgb = read_image(os.path.join(data_root, "v_synth0", "3.ppm"))
    x = caffe_tensor(prepare_image(rgb).rgb)
    with torch.no_grad():
        feats = dense_at_stride(random_features(1), 8)(x)
    want = sample_descriptors(feats[0], z["keypoints"][:, :2].astype(np.int64), SIZE)
    np.testing.assert_array_equal(z["descriptors"], want)
    assert count_macs(dense_at_stride(random_features(1), 8), x)["total"] == hand


def test_evaluate_command_writes_results_and_plot(data_root, extracted, tmp_path, capsys):
    out = tmp_path / "res.json"
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features",
                str(extracted / "os8"), str(extracted / "a4"), "--out", str(out)]) == 0
    res = json.load(open(out))
    assert set(res["features"]) == {"os8", "a4"}
    assert res["features"]["a4"]["group"] == "adaptive 4->8"
    assert len(res["features"]["os8"]["mma"]["all"]) == 15
    png = tmp_path / "res.png"
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "MMA@3 all" in capsys.readouterr().out
    # a rerun replaces its own report and figure; nothing else is overwritten
    feats = ["keypoints", "evaluate", "--data-root", data_root, "--features",
             str(extracted / "os8"), str(extracted / "a4")]
    assert cli(feats + ["--out", str(out)]) == 0
    other = tmp_path / "someone.json"
    other.write_text('{"format": "cad-spconv-eval/1"}')
    summary = extracted / "os8" / "summary.json"
    before = summary.read_bytes()
    fake = tmp_path / "notes.pdf"
    fake.write_bytes(b"notes: someone's file named .pdf")
    for extra, message in ((["--out", str(other)], "not a keypoints evaluate report"),
                           (["--out", str(tmp_path / "r.png")], "is the JSON report"),
                           (["--out", str(out), "--plot", str(out)], "name the same file"),
                           (["--out", str(summary)], "not a keypoints evaluate report"),
                           (["--out", str(tmp_path / "x.json"), "--plot", str(other)],
                            "give a path ending in .png, .pdf, .svg"),
                           (["--out", str(tmp_path / "x.json"), "--plot", str(fake)],
                            "exists and is not a PDF")):
        capsys.readouterr()
        assert cli(feats + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert other.read_text() == '{"format": "cad-spconv-eval/1"}'
    assert summary.read_bytes() == before


def test_repeated_labels_never_drop_a_folder(data_root, extracted, tmp_path, capsys):
    """Labels a, "a (2)", a named the third folder "a (2)" too, replacing the second's results:
    every folder keeps an entry, a repeat taking the first free "(n)"."""
    os8, a4 = str(extracted / "os8"), str(extracted / "a4")
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", os8, a4, a4,
                os8, "--labels", "a", "a (2)", "a", "a", "--out", str(tmp_path / "r.json"),
                "--plot", str(tmp_path / "r.png")]) == 0
    feats = json.load(open(tmp_path / "r.json"))["features"]
    assert {k: v["folder"] for k, v in feats.items()} == {"a": os8, "a (2)": a4, "a (3)": a4,
                                                          "a (4)": os8}
    out = capsys.readouterr().out
    assert all(f"{k}: MMA@3" in out for k in feats)
    # default labels: the folder names
    for parent in ("x", "y"):
        shutil.copytree(extracted / "os8", tmp_path / parent / "os8")
    report = run_evaluate(data_root, [str(tmp_path / "x" / "os8"), str(tmp_path / "y" / "os8")],
                          str(tmp_path / "d.json"))
    assert list(report["features"]) == ["os8", "os8 (2)"]


def test_plot_format_follows_the_extension(data_root, extracted, tmp_path):
    """--plot fig.pdf wrote PNG bytes under any extension: the format is the extension's."""
    folders = [str(extracted / "os8"), str(extracted / "a4")]
    old = tmp_path / "old.pdf"  # earlier versions wrote PNG bytes under any --plot name
    old.write_bytes(b"\x89PNG\r\n\x1a\n")
    run_evaluate(data_root, folders, str(tmp_path / "r.json"), plot=str(old))
    assert old.read_bytes().startswith(b"%PDF-")
    for ext, magic in ((".pdf", b"%PDF-"), (".svg", b"<svg"), (".PNG", b"\x89PNG\r\n\x1a\n")):
        plot = tmp_path / f"fig{ext}"
        for _ in range(2):  # the second run replaces its own figure
            run_evaluate(data_root, folders, str(tmp_path / "r.json"), plot=str(plot))
            head = plot.read_bytes()[:1024]
            assert head.startswith(magic) if ext != ".svg" else magic in head, ext


def test_extract_is_deterministic_and_resumes(data_root, extracted, tmp_path):
    """Same settings, another folder: identical files. Then an interrupted run (one image's
    files gone, another's record gone) resumes by redoing just those, bit for bit."""
    out = tmp_path / "again"
    args = ["keypoints", "extract", "--data-root", data_root, "--random-weights", "--seed", "1",
            "--finest-stride", "4", "--dilations", "11", "--no-progress", "--out", str(out)]
    assert cli(args) == 0
    for seq in ("i_synth0", "v_synth0"):
        for k in IMAGES:
            a, b = np.load(out / seq / f"{k}.npz"), np.load(extracted / "a4" / seq / f"{k}.npz")
            for key in ("keypoints", "scores", "descriptors"):
                np.testing.assert_array_equal(a[key], b[key])
    os.remove(out / "v_synth0" / "5.npz")
    summary = json.load(open(out / "summary.json"))
    del summary["images"]["i_synth0/2"]
    (out / "summary.json").write_text(json.dumps(summary))
    before = {p: file_version(out / "v_synth0" / f"{p}.npz") for p in (1, 2)}
    old_i2 = np.load(out / "i_synth0" / "2.npz")["descriptors"]
    assert cli(args) == 0
    after = json.load(open(out / "summary.json"))
    assert after["complete"] and len(after["images"]) == 12
    assert {p: file_version(out / "v_synth0" / f"{p}.npz") for p in (1, 2)} == before
    np.testing.assert_array_equal(np.load(out / "v_synth0" / "5.npz")["descriptors"],
                                  np.load(extracted / "a4" / "v_synth0" / "5.npz")["descriptors"])
    np.testing.assert_array_equal(np.load(out / "i_synth0" / "2.npz")["descriptors"], old_i2)


def test_extract_refuses_to_resume_with_other_settings(data_root, extracted, capsys, tmp_path):
    base = ["keypoints", "extract", "--data-root", data_root, "--random-weights", "--seed", "1",
            "--finest-stride", "4", "--no-progress", "--out", str(extracted / "a4")]
    assert cli(base + ["--dilations", "13"]) == 2
    err = capsys.readouterr().err
    assert "cad-spconv keypoints extract: error:" in err
    assert "dilations: [11] in the folder vs [13] now" in err
    assert cli(base + ["--dilations", "11", "--semantics", "reference"]) == 2
    assert "semantics: 'paper' in the folder vs 'reference' now" in capsys.readouterr().err
    assert cli(base + ["--dilations", "11", "--mask", "random"]) == 2
    assert "mask: 'keypoints' in the folder vs 'random' now" in capsys.readouterr().err
    # another data root: its images are not the folder's, for extract and evaluate alike
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    base[3] = str(other)
    assert cli(base + ["--dilations", "11"]) == 2
    assert f"holds features of {os.path.abspath(data_root)}" in capsys.readouterr().err
    assert cli(["keypoints", "evaluate", "--data-root", str(other), "--features",
                str(extracted / "a4"), "--out", str(tmp_path / "r.json")]) == 0
    assert (f"note: a4 was extracted from {os.path.abspath(data_root)}, evaluated against "
            f"{os.path.abspath(other)}") in capsys.readouterr().out
    assert len(json.load(open(extracted / "a4" / "summary.json"))["images"]) == 12


def test_sequences_gone_from_the_data_root_are_not_pooled(data_root, extracted, tmp_path,
                                                          capsys):
    """extract kept the records of sequences no longer in --data-root (a summary of 12 images
    for 6 requested, "complete"), and evaluate took the multiply-adds from all records but the
    MMA from the sequences evaluated: extract refuses, evaluate averages what it evaluates."""
    root, out = tmp_path / "data", tmp_path / "feats"
    shutil.copytree(data_root, root)
    args = ["keypoints", "extract", "--data-root", str(root), "--random-weights", "--seed", "1",
            "--finest-stride", "8", "--no-progress", "--out", str(out)]
    assert cli(args) == 0
    shutil.rmtree(root / "v_synth0")
    before = (out / "summary.json").read_bytes()
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert (f"holds features of 1 sequence(s) no longer in --data-root {root}: v_synth0" in err
            and f"delete their folders in --out (e.g. {out / 'v_synth0'})" in err), err
    assert (out / "summary.json").read_bytes() == before
    shutil.rmtree(out / "v_synth0")  # the documented fix
    assert cli(args) == 0
    summary = json.load(open(out / "summary.json"))
    assert summary["complete"] and len(summary["images"]) == summary["num_images_requested"] == 6
    # evaluate on a subset of what a folder holds: multiply-adds of the images evaluated
    full = json.load(open(extracted / "a4" / "summary.json"))["images"]
    report = run_evaluate(str(root), [str(extracted / "a4")], str(tmp_path / "r.json"))
    macs = report["features"]["a4"]["macs_per_image"]
    assert macs == np.mean([r["macs"] for i, r in full.items() if i.startswith("i_synth0/")])
    assert macs != np.mean([r["macs"] for r in full.values()])


def test_extract_refuses_a_second_writer(data_root, tmp_path):
    out = tmp_path / "busy"
    cfg = ExtractConfig(data_root=data_root, out=str(out), finest_stride=8, random_weights=True,
                        progress=False)
    with OutputLock(str(out / "summary.json")):
        with pytest.raises(OutputBusyError, match="another running process"):
            run_extract(cfg)


def test_commands_report_bad_input(data_root, extracted, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(data_root, data)
    os.remove(data / "v_synth0" / "6.ppm")
    base = ["keypoints", "extract", "--random-weights", "--finest-stride", "8", "--no-progress"]
    assert cli(base + ["--data-root", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "v_synth0/6.ppm is missing" in capsys.readouterr().err
    assert not (tmp_path / "x" / "i_synth0").exists()  # checked before any work
    (data / "v_synth0" / "6.ppm").write_bytes(b"P6 garbage")  # undecodable: also before any work
    assert cli(base + ["--data-root", str(data), "--out", str(tmp_path / "x")]) == 2
    assert "v_synth0/6.ppm cannot be decoded" in capsys.readouterr().err
    assert not (tmp_path / "x" / "i_synth0").exists()
    shutil.copy(os.path.join(data_root, "v_synth0", "6.ppm"), data / "v_synth0" / "6.ppm")
    (data / "v_synth0" / "H_1_4").write_text("nonsense\n")
    assert cli(["keypoints", "evaluate", "--data-root", str(data), "--features",
                str(extracted / "os8"), "--out", str(tmp_path / "r.json")]) == 2
    assert "H_1_4 is malformed" in capsys.readouterr().err
    assert cli(base + ["--data-root", data_root, "--dilations", "11", "--out", str(tmp_path / "y")]) == 2
    assert "no adaptive levels: give no --dilations" in capsys.readouterr().err
    assert cli(base[:3] + ["--finest-stride", "1", "--dilations", "25", "11", "51",
                           "--data-root", data_root, "--out", str(tmp_path / "y")]) == 2
    assert "must\nnot decrease" in capsys.readouterr().err.replace("must not", "must\nnot")
    assert cli(base + ["--data-root", data_root, "--mask", "random", "--out", str(tmp_path / "y")]) == 2
    assert "give --dilations" in capsys.readouterr().err
    assert cli(base + ["--data-root", data_root, "--engine", "bogus", "--out", str(tmp_path / "y")]) == 2
    assert "unknown engine 'bogus'" in capsys.readouterr().err  # a dense run does not ignore it
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(tmp_path),
                "--out", str(tmp_path / "r.json")]) == 2
    assert "has no summary.json" in capsys.readouterr().err
    # weights that are not D2-Net's: a message (CheckpointMismatchError), not a traceback
    torch.save({"model": {"other.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    assert cli(base[:2] + ["--weights", str(tmp_path / "other.pth"), "--finest-stride", "8",
                           "--no-progress", "--data-root", data_root, "--out",
                           str(tmp_path / "z")]) == 2
    assert "not a D2-Net VGG16 checkpoint" in capsys.readouterr().err


def test_unreadable_weights_are_named_before_out_is_made(data_root, tmp_path, capsys):
    """An empty, garbage or truncated --weights file got advice about weights_only=False and
    left an --out holding only summary.json.lock: the checks of eval's --checkpoint, before
    --out is made."""
    whole = tmp_path / "whole.pth"
    torch.save({"model": {"a": torch.zeros(1000)}}, whole)
    files = {"empty": (b"", "is empty (0 bytes): the download or copy did not finish; fetch "
                            "the file again"),
             "garbage": (b"\xf4\x06 not a checkpoint", "is not a PyTorch checkpoint"),
             "truncated": (whole.read_bytes()[:600], "the file is truncated or not a PyTorch "
                                                     "checkpoint; fetch it again")}
    for name, (content, message) in files.items():
        path = tmp_path / f"{name}.pth"
        path.write_bytes(content)
        out = tmp_path / f"out_{name}"
        assert cli(["keypoints", "extract", "--data-root", data_root, "--weights", str(path),
                    "--finest-stride", "8", "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "error: --weights: " in err and message in err, err
        assert "weights_only=False" not in err and not out.exists()


def test_max_sum_edges_is_checked_as_an_option(data_root, tmp_path, capsys):
    """--max-sum-edges 0 said "image of 64x96 pixels is too small": the option is named,
    before --out is made; a budget that shrinks one image too far says so too."""
    from cad_apps.keypoints.preprocess import prepare_image

    for value in ("0", "-5", "15"):
        out = tmp_path / f"out{value}"
        assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights",
                    "--finest-stride", "8", "--no-progress", "--max-sum-edges", value,
                    "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"--max-sum-edges must be >= 16 (height + width after resizing; each side needs " \
               f"8 pixels), got {value}" in err, err
        assert not out.exists()
    with pytest.raises(ValueError, match=r"image of 8x400 pixels, 0x19 after resizing to "
                                         r"max_sum_edges 20 \(raise --max-sum-edges\)"):
        prepare_image(np.zeros((8, 400, 3), dtype=np.uint8), max_sum_edges=20)


@pytest.mark.parametrize("mask", ["random", "inverted", "keypoints"])
def test_a_negative_seed_is_refused_before_any_work(data_root, tmp_path, capsys, mask):
    """--seed -1 with --mask random failed at the first image ("expected non-negative integer",
    no option named), leaving an --out with a lock; a seed numpy or torch cannot take is refused
    before --out is made."""
    for seed in ("-1", str(2 ** 64)):
        out = tmp_path / f"out{seed}"
        assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights",
                    "--seed", seed, "--finest-stride", "4", "--dilations", "11", "--mask", mask,
                    "--no-progress", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"error: --seed must be a non-negative integer below 2**64, got {seed}\n" in err, err
        assert not out.exists()


def test_evaluate_refuses_incomplete_features(data_root, extracted, tmp_path, capsys):
    part = tmp_path / "part"
    shutil.copytree(extracted / "os8", part)
    os.remove(part / "i_synth0" / "4.npz")
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(part),
                "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "i_synth0/4.npz are missing" in err and "resume" in err


def _damage(path, how):
    """Damage one features file the ways a disk problem or a cut copy leaves it."""
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[:300])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "npy":  # a lone array, not an archive
        with open(path, "wb") as f:
            np.save(f, np.zeros((4, 3), np.float32))
    elif how == "no descriptors":
        with np.load(path) as z:
            arrays = {k: z[k] for k in ("keypoints", "scores")}
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        raise AssertionError(how)


def test_feature_file_problem_reads_headers_only(extracted, tmp_path):
    good = extracted / "os8" / "v_synth0" / "3.npz"
    assert feature_file_problem(str(good)) is None
    assert feature_file_problem(str(tmp_path / "none.npz")) == "missing"
    for how, reason in (("truncated", "BadZipFile"), ("empty", "BadZipFile"),
                        ("npy", "BadZipFile"), ("no descriptors", "no 'descriptors' array")):
        bad = tmp_path / f"{how}.npz"
        shutil.copy(good, bad)
        _damage(bad, how)
        assert reason in feature_file_problem(str(bad)), how
    with np.load(good) as z:
        arrays = dict(z)
    np.savez(tmp_path / "shapes.npz", **dict(arrays, scores=arrays["scores"][:-1]))
    assert "are not [N, 3] / [N] / [N, C]" in feature_file_problem(str(tmp_path / "shapes.npz"))
    # an array whose stored bytes are fewer than its header promises (zip directory intact)
    import zipfile
    with zipfile.ZipFile(good) as src:
        raw = {name: src.read(name) for name in src.namelist()}
    for name, cut in (("same.npz", 0), ("short.npz", 12)):
        with zipfile.ZipFile(tmp_path / name, "w") as zf:
            for member, data in raw.items():
                zf.writestr(member, data[:len(data) - cut] if member == "descriptors.npy" else data)
    assert feature_file_problem(str(tmp_path / "same.npz")) is None
    assert "descriptors: " in feature_file_problem(str(tmp_path / "short.npz"))
    assert "bytes stored" in feature_file_problem(str(tmp_path / "short.npz"))


@pytest.mark.parametrize("how", ["truncated", "empty", "npy", "no descriptors"])
def test_evaluate_reports_damaged_features(data_root, extracted, tmp_path, capsys, how):
    feats = tmp_path / "feats"
    shutil.copytree(extracted / "os8", feats)
    _damage(feats / "i_synth0" / "3.npz", how)
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(feats),
                "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"features {feats / 'i_synth0' / '3.npz'} are damaged" in err, err
    assert "re-extract it: rerun the `cad-spconv keypoints extract` command" in err
    assert not (tmp_path / "r.json").exists()


def test_an_interrupted_resume_does_not_claim_completeness(data_root, extracted, tmp_path,
                                                          monkeypatch):
    """A resume rewrote the old summary, "complete": true included, after every sequence: Ctrl-C
    during a later one left it on disk with images missing. complete follows the records."""
    from cad_apps.keypoints import extract

    out = tmp_path / "copy"
    shutil.copytree(extracted / "os8", out)
    for seq in ("i_synth0", "v_synth0"):
        os.remove(out / seq / "2.npz")
    read = extract.hpatches.read_image

    def interrupted(path):
        if "v_synth0" in path:
            raise KeyboardInterrupt
        return read(path)
    monkeypatch.setattr(extract.hpatches, "read_image", interrupted)
    cfg = ExtractConfig(data_root=data_root, out=str(out), finest_stride=8, random_weights=True,
                        seed=1, progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_extract(cfg)
    s = json.load(open(out / "summary.json"))
    assert "i_synth0/2" in s["images"] and len(s["images"]) == 11
    assert s["complete"] is False and s["summary"]["num_images"] == 11
    monkeypatch.setattr(extract.hpatches, "read_image", read)
    assert run_extract(cfg)["complete"] is True
    assert json.load(open(out / "summary.json"))["complete"] is True


def test_evaluate_reports_features_without_records(data_root, extracted, tmp_path, capsys):
    """Interrupted between an image's .npz and its record, a folder said "complete": evaluate
    reported extraction_complete true with the MMA over every pair and the multiply-adds over
    the records left. It reports the images without a record, and says so."""
    feats = tmp_path / "feats"
    shutil.copytree(extracted / "a4", feats)
    s = json.load(open(feats / "summary.json"))
    assert s["complete"]
    full = s["images"]
    del s["images"]["v_synth0/2"]
    (feats / "summary.json").write_text(json.dumps(s))
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(feats),
                "--out", str(tmp_path / "r.json")]) == 0
    r = json.load(open(tmp_path / "r.json"))["features"]["feats"]
    assert r["extraction_complete"] is False and r["images_without_record"] == 1
    assert r["macs_per_image"] == np.mean([v["macs"] for k, v in full.items() if k != "v_synth0/2"])
    out = capsys.readouterr().out
    assert (f"note: feats: 1 of the images evaluated have no record in {feats}/summary.json "
            "(an interrupted extraction)") in out
    full_report = run_evaluate(data_root, [str(extracted / "a4")], str(tmp_path / "f.json"))
    assert full_report["features"]["a4"]["extraction_complete"] is True
    assert full_report["features"]["a4"]["images_without_record"] == 0


def test_a_resume_on_another_setup_does_not_pool_times(data_root, extracted, tmp_path, capsys):
    """A resume under another engine (or device) pooled its times with the first run's, and the
    summary named only the last setup: every record names the setup that timed it, and times of
    several setups are given per setup, not pooled."""
    out = tmp_path / "copy"
    shutil.copytree(extracted / "a4", out)
    first = json.load(open(out / "summary.json"))
    from cad_apps.distributed import cpu_name, device_name

    setup = f"{device_name(torch.device('cpu'))}, engine auto"
    assert cpu_name() in setup  # another CPU model is another setup
    assert {r["timed_on"] for r in first["images"].values()} == {setup}
    assert first["summary"]["timed_on"] == setup and "timings_by_setup" not in first["summary"]
    os.remove(out / "i_synth0" / "3.npz")
    assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights", "--seed",
                "1", "--finest-stride", "4", "--dilations", "11", "--engine", "torch",
                "--no-progress", "--out", str(out)]) == 0
    assert "network times of 2 setups, not pooled" in capsys.readouterr().out
    s = json.load(open(out / "summary.json"))
    other = setup.replace("auto", "torch")
    assert s["images"]["i_synth0/3"]["timed_on"] == other
    times = s["summary"]["timings_by_setup"]
    assert {k: v["num_images"] for k, v in times.items()} == {setup: 11, other: 1}
    assert times[other]["time_per_image_s_median"] == s["images"]["i_synth0/3"]["time_s"]
    assert s["summary"]["time_per_image_s_median"] is None and s["summary"]["timed_on"] is None
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(out),
                "--out", str(tmp_path / "r.json")]) == 0
    assert f"note: copy: its images were timed on 2 setups ({setup}; {other})" in \
        capsys.readouterr().out
    r = json.load(open(tmp_path / "r.json"))["features"]["copy"]
    assert r["time_per_image_s_median"] is None and r["timings_by_setup"] == times


def test_records_without_a_setup_are_not_pooled_with_others():
    """Records of earlier versions name no setup: pooled among themselves, kept apart from
    records that name one."""
    from cad_apps.keypoints.extract import summarize

    rec = {"macs": 10, "macs_parts": {"dense": 10}, "time_s": 1.0, "sift_time_s": 0.5,
           "total_s": 2.0, "num_keypoints": 5}
    old = summarize({"s/1": rec, "s/2": dict(rec, time_s=3.0)})
    assert old["time_per_image_s_mean"] == 2.0 and old["timed_on"] == "not recorded"
    mixed = summarize({"s/1": rec, "s/2": dict(rec, time_s=3.0, timed_on="cuda (X)")})
    assert mixed["time_per_image_s_mean"] is None and mixed["sift_time_per_image_s_mean"] is None
    assert mixed["time_total_s"] == 4.0 and mixed["macs_mean"] == 10
    assert {k: v["time_per_image_s_mean"] for k, v in mixed["timings_by_setup"].items()} == {
        "cuda (X)": 3.0, "not recorded": 1.0}


def test_extract_resume_redoes_damaged_files(data_root, extracted, tmp_path, capsys):
    """A folder with damaged .npz files (records intact: a disk problem, a cut copy) resumes by
    extracting just those again, bit for bit; evaluate then reads it."""
    out = tmp_path / "copy"
    shutil.copytree(extracted / "os8", out)
    damaged = {("i_synth0", 3): "truncated", ("v_synth0", 1): "empty",
               ("v_synth0", 6): "no descriptors"}
    for (seq, k), how in damaged.items():
        _damage(out / seq / f"{k}.npz", how)
    kept = {(seq, k): file_version(out / seq / f"{k}.npz")
            for seq in ("i_synth0", "v_synth0") for k in IMAGES if (seq, k) not in damaged}
    assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights", "--seed",
                "1", "--finest-stride", "8", "--no-progress", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "3 damaged features file(s) will be extracted again" in err
    assert f"{out / 'v_synth0' / '1.npz'} (" in err
    for seq, k in kept:
        assert file_version(out / seq / f"{k}.npz") == kept[(seq, k)]
    for seq, k in damaged:
        assert feature_file_problem(str(out / seq / f"{k}.npz")) is None
        with np.load(out / seq / f"{k}.npz") as a, \
                np.load(extracted / "os8" / seq / f"{k}.npz") as b:
            for key in ("keypoints", "scores", "descriptors"):
                np.testing.assert_array_equal(a[key], b[key])
    s = json.load(open(out / "summary.json"))
    assert s["complete"] and len(s["images"]) == 12
    assert cli(["keypoints", "evaluate", "--data-root", data_root, "--features", str(out),
                "--out", str(tmp_path / "r.json")]) == 0


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo' is not a device; use cpu, cuda or cuda:N"),
    ("mps", "--device mps: only cpu and cuda are supported"),
    ("cuda:99", "--device cuda:99"),
])
def test_extract_reports_a_bad_device(data_root, tmp_path, capsys, device, message):
    out = tmp_path / "x"
    assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights",
                "--finest-stride", "8", "--no-progress", "--device", device,
                "--out", str(out)]) == 2
    assert f"cad-spconv keypoints extract: error: {message}" in capsys.readouterr().err
    assert not out.exists()  # checked before any work


def test_extract_without_opencv_says_how_to_get_it(data_root, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)  # as if OpenCV were not installed
    out = tmp_path / "x"
    assert cli(["keypoints", "extract", "--data-root", data_root, "--random-weights",
                "--finest-stride", "8", "--no-progress", "--device", "cpu",
                "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "needs OpenCV" in err and "pip install 'cad-spconv[sift]'" in err
    assert not out.exists()  # checked before any work


@pytest.mark.parametrize("mask", ["random", "inverted"])
def test_ablation_masks_match_the_keypoint_budget(data_root, tmp_path, mask):
    from tests.support.hpatches import thin_vgg

    common = dict(data_root=data_root, finest_stride=2, dilations=(5, 9), random_weights=True,
                  seed=4, progress=False)
    stack = thin_vgg(scale=32, dtype=torch.float32)
    kp = run_extract(ExtractConfig(out=str(tmp_path / "kp"), **common), stack=stack)
    ab = run_extract(ExtractConfig(out=str(tmp_path / mask), mask=mask, **common), stack=stack)
    for image_id, rec in kp["images"].items():
        other = ab["images"][image_id]
        assert other["macs"] == rec["macs"]
        np.testing.assert_allclose(other["level_fractions"], rec["level_fractions"], rtol=0, atol=1e-15)
    assert ab["settings"]["mask"] == mask and ab["settings"]["seed"] == 4


def torchrun_extract(data_root, out):
    """``cad-spconv keypoints extract`` (dense stride 8, random weights) under
    ``torchrun --nproc_per_node=2`` on CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cad_apps.cli", "keypoints", "extract", "--data-root", str(data_root),
           "--random-weights", "--seed", "1", "--finest-stride", "8", "--device", "cpu",
           "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_torchrun_shards_sequences_and_matches_one_process(data_root, extracted, tmp_path):
    out = tmp_path / "ddp"
    res = torchrun_extract(data_root, out)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.load(open(out / "summary.json"))
    assert s["complete"] and s["environment"]["world_size"] == 2 and len(s["images"]) == 12
    for seq in ("i_synth0", "v_synth0"):
        for k in IMAGES:
            np.testing.assert_array_equal(np.load(out / seq / f"{k}.npz")["descriptors"],
                                          np.load(extracted / "os8" / seq / f"{k}.npz")["descriptors"])


def test_torchrun_an_input_error_on_one_rank_stops_every_rank_with_its_message(data_root, tmp_path):
    """A bad image in rank 1's sequence (it decodes, so the setup check passes it, but it is too
    small for the network): both ranks print its one-line message and exit with 2 (rank 0 no
    longer fails inside gloo with a traceback, losing its records), and the summary holds the
    records of both ranks' finished images, rank 1's before the bad one included."""
    import re

    import cv2

    root = tmp_path / "hp"
    shutil.copytree(data_root, root)  # rank 0 takes i_synth0, rank 1 v_synth0
    assert cv2.imwrite(str(root / "v_synth0" / "3.ppm"), np.zeros((4, 4, 3), np.uint8))
    out = tmp_path / "out"
    res = torchrun_extract(root, out)
    assert res.returncode != 0
    message = ("cad-spconv keypoints extract: error: image of 4x4 pixels is too small: the "
               "network needs at least 8x8 pixels after resizing (stride 8)")
    assert res.stderr.count(message) == 2, res.stderr[-3000:]
    assert "gloo" not in res.stderr and "[rank" not in res.stderr, res.stderr[-3000:]
    assert set(re.findall(r"exitcode\s*:\s*(\d+)", res.stderr)) == {"2"}  # torchrun's report
    s = json.load(open(out / "summary.json"))
    done = [f"i_synth0/{k}" for k in IMAGES] + ["v_synth0/1", "v_synth0/2"]
    assert list(s["images"]) == done and not s["complete"]
    assert all(feature_file_problem(str(out / f"{i}.npz")) is None for i in done)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_extraction_matches_cpu_in_float64(data_root, tmp_path):
    from tests.support.hpatches import thin_vgg

    outs = {}
    for device in ("cpu", "cuda"):
        cfg = ExtractConfig(data_root=data_root, out=str(tmp_path / device), finest_stride=1,
                            dilations=(5, 9, 17), random_weights=True, device=device,
                            dtype="float64", progress=False)
        outs[device] = run_extract(cfg, stack=thin_vgg())
    for image_id in outs["cpu"]["images"]:
        seq, k = image_id.split("/")
        a = np.load(tmp_path / "cpu" / seq / f"{k}.npz")["descriptors"]
        b = np.load(tmp_path / "cuda" / seq / f"{k}.npz")["descriptors"]
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert outs["cpu"]["images"][image_id]["macs"] == outs["cuda"]["images"][image_id]["macs"]


def test_evaluate_notes_high_resolution_sequences(data_root, extracted, tmp_path, capsys):
    """D2-Net's benchmark (the paper's numbers) leaves out 8 high-resolution sequences."""
    data, feats = tmp_path / "data", tmp_path / "feats"
    shutil.copytree(data_root, data)
    shutil.copytree(extracted / "os8", feats)
    os.rename(data / "i_synth0", data / "i_dc")
    os.rename(feats / "i_synth0", feats / "i_dc")
    assert cli(["keypoints", "evaluate", "--data-root", str(data), "--features", str(feats),
                "--out", str(tmp_path / "r.json")]) == 0
    assert "note: 1 high-resolution sequences are included" in capsys.readouterr().out
    assert json.load(open(tmp_path / "r.json"))["high_resolution_sequences"] == ["i_dc"]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_rank_extracts_its_whole_shard(tmp_path, monkeypatch, world):
    """Three sequences over 1-3 ranks: each rank runs as many steps as the largest shard has
    sequences (a floor would stop rank 0 before its last sequence on an uneven split)."""
    from cad_apps.distributed import Dist
    from cad_apps.keypoints import extract

    monkeypatch.setattr(extract.hpatches, "read_image", lambda path: path)
    monkeypatch.setattr(extract, "_save_npz", lambda path, arrays: None)
    monkeypatch.setattr(extract, "write_json_atomic", lambda path, obj: None)
    monkeypatch.setattr(extract, "summarize", lambda images: {})
    todo = [(f"s{i}", f"folder{i}", [1, 2]) for i in range(3)]
    cfg = ExtractConfig(data_root=str(tmp_path), out=str(tmp_path / "out"), finest_stride=8,
                        random_weights=True, progress=False)
    for rank in range(world):
        done = []
        summary = {"images": {}, "num_images_requested": 6}
        extract._loop(cfg, str(tmp_path), Dist(rank=rank, world=world), lambda rgb, name, k:
                      (done.append(f"{name}/{k}") or {}, {}), summary, todo, "s.json")
        assert done == [f"s{i}/{k}" for i in range(rank, 3, world) for k in (1, 2)]


def test_an_interrupted_feature_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """Feature files are written atomically: Ctrl-C in the middle of a rewrite leaves the
    complete old file (which evaluate may be reading), not a torn one."""
    from cad_apps.keypoints import extract

    path = str(tmp_path / "seq" / "1.npz")
    good = {"keypoints": np.ones((3, 3)), "scores": np.ones(3),
            "descriptors": np.ones((3, 4), np.float32)}
    extract._save_npz(path, good)

    def torn(f, **arrays):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt
    monkeypatch.setattr(extract.np, "savez", torn)
    with pytest.raises(KeyboardInterrupt):
        extract._save_npz(path, {k: v * 2 for k, v in good.items()})
    assert feature_file_problem(path) is None
    with np.load(path) as z:
        assert np.array_equal(z["descriptors"], good["descriptors"])
    assert os.listdir(tmp_path / "seq") == ["1.npz"]
