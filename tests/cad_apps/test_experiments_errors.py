"""The experiment scripts on bad input: one line naming the problem and a fix the script
accepts, exit status 2, before any evaluation or file is written."""
import json
import os

import pytest

from cad_apps.data import make_synthetic_cityscapes
from experiments import inadequate_masks, oracle, overlays, tradeoff
from tests.cad_apps.test_experiments import COMMON


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    make_synthetic_cityscapes(root, num_images=1, size=(40, 56), seed=3)
    return root


def _argv(root, out):
    return ["--data-root", str(root), "--out", str(out)] + COMMON


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.mark.parametrize("script", [tradeoff, oracle, inadequate_masks])
def test_missing_data_root_is_one_line_before_any_file(script, tmp_path, capsys):
    out = tmp_path / "out"
    argv = _argv(tmp_path / "nosuch", out) + (["--thresholds"] if script is not oracle else [])
    assert script.main(argv) == 2
    _one_line_error(capsys, "does not exist")
    assert not out.exists()


def test_overlays_input_errors(root, tmp_path, capsys):
    out = tmp_path / "out"
    assert overlays.main(_argv(tmp_path / "nosuch", out) + ["--masks", "all"]) == 2
    _one_line_error(capsys, "does not exist")
    with pytest.raises(SystemExit) as e:
        overlays.main(_argv(root, out) + ["--masks", "all", "--num-images", "0"])
    assert e.value.code == 2
    assert "--num-images must be >= 1" in capsys.readouterr().err
    assert overlays.main(_argv(root, out) + ["--masks", f"learned:{tmp_path / 'no.pt'}"]) == 2
    _one_line_error(capsys, "no such file")
    assert not out.exists()


def test_settings_mismatch_names_a_fix_the_script_takes(root, tmp_path, capsys):
    argv = _argv(root, tmp_path)
    assert tradeoff.main(argv + ["--thresholds"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()}
    capsys.readouterr()
    other = [a if a != "3" else "5" for a in argv]  # --dilation 5
    assert tradeoff.main(other + ["--thresholds", "0.5"]) == 2
    _one_line_error(capsys, "other settings", "--overwrite")
    # refused before any work: no file touched, none added
    assert {p.name: p.read_bytes() for p in (tmp_path / "runs").iterdir()} == before
    # the advice is accepted
    assert tradeoff.main(other + ["--thresholds", "--overwrite"]) == 0
    run = json.loads((tmp_path / "runs" / "all.json").read_text())
    assert run["config"]["dilation"] == 5


def test_dense_is_refused_and_not_offered(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        tradeoff.main(_argv(root, tmp_path) + ["--dense", "8"])
    assert e.value.code == 2
    assert "cad-spconv eval --dense" in capsys.readouterr().err
    assert "--dense" not in tradeoff.build_parser().format_help()
    assert "--overwrite" in tradeoff.build_parser().format_help()
    assert "--overwrite" not in overlays.build_parser().format_help()


@pytest.mark.parametrize("script, extra, words", [
    (inadequate_masks, ["--random-fractions", "0.5", "1.5"], ["--random-fractions", "<= 1"]),
    (inadequate_masks, ["--thresholds", "-1"], ["--thresholds", ">= 0"]),
    (tradeoff, ["--thresholds", "nan"], ["--thresholds", ">= 0"]),
    (tradeoff, ["--thresholds", "x"], ["--thresholds", "'x' is not a number"]),
])
def test_bad_mask_values_are_refused_before_any_evaluation(script, extra, words, root, tmp_path,
                                                           capsys):
    with pytest.raises(SystemExit) as e:
        script.main(_argv(root, tmp_path / "out") + extra)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (tmp_path / "out").exists()


def test_missing_learned_file_is_refused_before_any_evaluation(root, tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "rho0.5.pth"
    assert tradeoff.main(_argv(root, out) + ["--thresholds", "0.35", "--learned",
                                              str(missing)]) == 2
    _one_line_error(capsys, f"--learned {missing}", "no such file")
    assert not out.exists()


def test_a_result_file_another_run_writes_is_refused_before_any_evaluation(root, tmp_path,
                                                                           capsys):
    """A setting whose runs/ file another live process was writing was found at its turn, after
    the settings before it had been evaluated (hours, on Cityscapes): refused before the first,
    naming the file and the fix."""
    from cad_apps.io import OutputLock
    from experiments.common import setting_label

    out = tmp_path / "out"
    busy = out / "runs" / f"{setting_label('edge:0.5')}.json"  # the last setting
    with OutputLock(str(busy)):
        assert tradeoff.main(_argv(root, out) + ["--thresholds", "0.5"]) == 2
    # no setting was evaluated (the baselines before it were)
    assert sorted(p.name for p in (out / "runs").iterdir()) == [busy.name + ".lock"]
    _one_line_error(capsys, "--thresholds 0.5", str(busy), "being written by another running "
                    "process", "wait for it to finish or choose another --out")


# --------------------------------------------------------------------------- provenance
def _has_provenance(report, name, *settings):
    assert report["command"].startswith(f"python -m experiments.{name} ")
    env = report["environment"]
    assert env["cpu"] and env["torch"] and "cpu_flags" in env and env["fused_gather"]
    assert "source" in env  # the commit it ran at (None outside a git checkout)
    for key in settings:
        assert key in report["config"], key


def test_reports_record_settings_command_and_machine(root, tmp_path, capsys):
    import torch

    argv = _argv(root, tmp_path)
    assert tradeoff.main(argv + ["--thresholds"]) == 0
    report = json.loads((tmp_path / "tradeoff.json").read_text())
    _has_provenance(report, "tradeoff", "semantics", "seed", "dilation", "thresholds", "learned")
    assert report["config"]["dilation"] == 3 and "--dilation 3" in report["command"]
    assert report["environment"]["torch"] == torch.__version__
    assert overlays.main(argv + ["--masks", "all", "--num-images", "1"]) == 0
    _has_provenance(json.loads((tmp_path / "overlays.json").read_text()), "overlays", "masks",
                    "num_images", "seed", "checkpoint")


def test_semantics_report_records_its_settings(tmp_path):
    from PIL import Image

    from experiments import semantics

    frame = tmp_path / "f.png"
    Image.new("RGB", (64, 32), (40, 90, 200)).save(frame)
    assert semantics.main(["--images", str(frame), "--size", "32", "64", "--dilation", "3",
                           "--seed", "2", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "semantics.json").read_text())
    _has_provenance(report, "semantics", "dilation", "seed", "images")
    assert (report["config"]["dilation"], report["config"]["seed"]) == (3, 2)


def test_a_rerun_with_fewer_settings_names_the_points_it_leaves_out(root, tmp_path, capsys):
    argv = _argv(root, tmp_path)
    assert inadequate_masks.main(argv + ["--thresholds", "--random-fractions", "0.5",
                                         "0.25"]) == 0
    capsys.readouterr()
    assert inadequate_masks.main(argv + ["--thresholds", "--random-fractions", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "leaves them out" in out and "random:0.25" in out
    report = json.loads((tmp_path / "inadequate_masks.json").read_text())
    assert report["left_out_of_earlier_report"] == ["random:0.25"]
    assert (tmp_path / "runs" / "random_0.25.json").exists()
    # named again by the next run, until a command names the setting again
    assert inadequate_masks.main(argv + ["--thresholds", "--random-fractions", "0.5"]) == 0
    assert "random:0.25" in capsys.readouterr().out
    assert inadequate_masks.main(argv + ["--thresholds", "--random-fractions", "0.25"]) == 0
    report = json.loads((tmp_path / "inadequate_masks.json").read_text())
    assert report["left_out_of_earlier_report"] == ["random:0.5"]
    assert "named on the terminal" in inadequate_masks.build_parser().format_help()


def test_left_out_points_of_other_settings_are_named_as_such(root, tmp_path, capsys):
    """After --overwrite with other settings, an earlier point cannot simply be named again
    (it would be refused as written with other settings): the note says so."""
    argv = _argv(root, tmp_path)
    assert tradeoff.main(argv + ["--thresholds", "0.5"]) == 0
    other = [a if a != "3" else "5" for a in argv]  # --dilation 5
    capsys.readouterr()
    assert tradeoff.main(other + ["--thresholds", "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "edge:0.5 were computed with other settings: naming them again needs --overwrite" in out


# --------------------------------------------------------------------------- benchmark suites
@pytest.fixture
def suite(tmp_path, monkeypatch):
    """``experiments.benchmark`` with its bench processes recorded, not run."""
    import subprocess

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd)
                        or subprocess.CompletedProcess(cmd, 0))
    monkeypatch.chdir(tmp_path)  # the suite changes into the project root; undone after
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "a.png").write_bytes(b"")
    results = tmp_path / "results"
    results.mkdir()
    return ["--no-markdown", "--frames", str(frames), "--results", str(results)], results, calls


def test_benchmark_refuses_to_replace_a_result_without_overwrite(suite, capsys):
    from experiments import benchmark

    argv, results, calls = suite
    old = results / "cpu_deeplabv3_resnet101_512x1024.json"
    old.write_text(json.dumps({"environment": {"cpu": "Another CPU"}}))
    with pytest.raises(SystemExit) as e:
        benchmark.main(["cpu", *argv])
    assert e.value.code == 2 and calls == []
    err = capsys.readouterr().err
    assert str(old) in err and "Another CPU" in err and "--overwrite" in err
    assert benchmark.main(["cpu", *argv, "--overwrite"]) == 0 and len(calls) == 1
    assert benchmark.main(["ops", *argv]) == 0 and len(calls) == 3  # new files: no refusal


def test_benchmark_refuses_a_result_another_bench_writes_before_any_run(suite, capsys):
    """bench holds its --json's lock for the whole run: a suite that would write the same
    result is refused before its first run (at its turn it would have failed after hours),
    with --overwrite too."""
    from cad_apps.io import OutputLock
    from experiments import benchmark

    argv, results, calls = suite
    busy = results / "cpu_conv3x3_512_512x1024.json"  # the last of the ops suite
    for extra in ([], ["--overwrite"]):
        with OutputLock(str(busy)):
            with pytest.raises(SystemExit) as e:
                benchmark.main(["ops", *argv, *extra])
        assert e.value.code == 2 and calls == []
        err = capsys.readouterr().err
        assert (f"--results {busy} is being written by another running process" in err
                and "choose another --results" in err), err
    assert benchmark.main(["ops", *argv]) == 0 and len(calls) == 2


@pytest.mark.parametrize("extra, words", [
    (["--only", "nosuch"], ["--only 'nosuch' matches no result", "cpu_conv3x3_256_512x1024"]),
    (["--reps", "0"], ["--reps must be >= 1"]),
])
def test_benchmark_refuses_options_that_select_or_time_nothing(suite, capsys, extra, words):
    from experiments import benchmark

    argv, _, calls = suite
    with pytest.raises(SystemExit) as e:
        benchmark.main(["ops", *argv, *extra])
    assert e.value.code == 2 and calls == []
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


# --------------------------------------------------------------------------- keypoints
def test_keypoints_synthetic_set_of_other_settings_is_refused(tmp_path, capsys):
    import os

    from experiments import keypoints

    def args(*extra):
        return ["--synthetic", "--random-weights", "--out", str(tmp_path), *extra]

    root = keypoints.synthetic_root(keypoints.build_parser().parse_args(
        args("--synthetic-size", "48", "64")))
    assert keypoints.synthetic_root(keypoints.build_parser().parse_args(
        args("--synthetic-size", "48", "64"))) == root  # the same settings: reused
    # another size (or seed) would reuse the first set and give identical numbers
    assert keypoints.main(args("--synthetic-size", "64", "96")) == 2
    _one_line_error(capsys, "other settings", "synthetic_size: [48, 64] in the folder vs "
                    "[64, 96] now", "another --out")
    assert keypoints.main(args("--synthetic-size", "48", "64", "--seed", "1")) == 2
    _one_line_error(capsys, "seed: 0 in the folder vs 1 now")
    os.remove(root + ".settings.json")  # an older or interrupted set: settings unknown
    assert keypoints.main(args("--synthetic-size", "48", "64")) == 2
    _one_line_error(capsys, "not recorded", "another --out")


def test_keypoints_synthetic_set_is_known_by_its_scenes_bytes(tmp_path):
    """The same scene bytes reached by another path (another checkout) reuse the set; other
    bytes at the same path are refused."""
    import shutil

    import numpy as np
    from PIL import Image

    from experiments import keypoints

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    img = (np.random.default_rng(0).uniform(size=(60, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "a" / "s.png")
    shutil.copy(tmp_path / "a" / "s.png", tmp_path / "b" / "s.png")

    def parse(scene):
        return keypoints.build_parser().parse_args([
            "--synthetic", "--random-weights", "--out", str(tmp_path / "out"),
            "--synthetic-size", "48", "64", "--scenes", str(scene)])

    root = keypoints.synthetic_root(parse(tmp_path / "a" / "s.png"))
    assert keypoints.synthetic_root(parse(tmp_path / "b" / "s.png")) == root
    Image.fromarray(255 - img).save(tmp_path / "b" / "s.png")
    with pytest.raises(ValueError, match="scenes_sha256"):
        keypoints.synthetic_root(parse(tmp_path / "b" / "s.png"))


# --------------------------------------------------------------------------- timing tables
@pytest.mark.parametrize("module, mode", [("gemm_routes", []), ("dense_phases", ["layers"]),
                                          ("products_first", ["layers"]),
                                          ("half_batch_norm", []), ("half_batch_norm", ["--model"]),
                                          ("row_moves", ["scatter"]), ("row_moves", ["gather"]),
                                          ("fresh_memory", []), ("host_noise", []),
                                          ("dilated_convs", [])])
def test_timing_scripts_refuse_zero_reps(module, mode, capsys):
    import importlib

    script = importlib.import_module(f"experiments.{module}")
    with pytest.raises(SystemExit) as e:
        script.main([*mode, "--reps", "0"])
    assert e.value.code == 2 and "--reps must be >= 1, got 0" in capsys.readouterr().err


def test_dilated_convs_refuses_autocast_where_it_changes_nothing(capsys):
    from experiments import dilated_convs

    with pytest.raises(SystemExit) as e:
        dilated_convs.main(["--autocast", "--dtype", "float32"])
    assert e.value.code == 2 and "give --dtype bfloat16 or float16" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        dilated_convs.main(["--autocast", "--pairs", "0"])
    assert e.value.code == 2 and "--pairs 0 skips it" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        dilated_convs.main(["--dtype", "float16"])
    assert e.value.code == 2 and "add --pairs 0, or --autocast" in capsys.readouterr().err


def test_fused_gather_gemm_refuses_sites_without_the_backbone(capsys):
    """``--sites`` compares two routes of the whole backbone; alone it would be ignored; and
    ``--grid`` is not the backbone and has no mask."""
    from experiments import fused_gather_gemm

    with pytest.raises(SystemExit) as e:
        fused_gather_gemm.main(["--sites"])
    assert e.value.code == 2 and "give --backbone too" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # two measurements: one would be dropped silently
        fused_gather_gemm.main(["--grid", "--backbone"])
    assert e.value.code == 2 and "two different measurements" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the grid has no mask: a threshold would be unused
        fused_gather_gemm.main(["--grid", "--threshold", "0.15"])
    assert e.value.code == 2 and "leave out --threshold" in capsys.readouterr().err


def test_compiled_dense_refuses_bad_pairs_and_sizes(capsys):
    from experiments import compiled_dense

    with pytest.raises(SystemExit) as e:
        compiled_dense.main(["--pairs", "0"])
    assert e.value.code == 2 and "--pairs must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        compiled_dense.main(["--size", "16", "64"])
    assert e.value.code == 2 and "--size must be at least 32x32" in capsys.readouterr().err


@pytest.mark.parametrize("module, mode, small, dtype", [
    ("gemm_routes", [], {"SHAPES": [(8, 16, 4)]}, "float32"),
    ("dense_phases", ["layers"], {"LAYERS": [(8, 8, 1)], "KEPT": (0.5,)}, "float32"),
    ("half_batch_norm", [], {"SHAPES": [(8, 4)]}, "bfloat16"),
    ("row_moves", ["scatter"], {"SCATTER_SHAPES": [(8, 4, 4)]}, "bfloat16"),
    ("fresh_memory", [], {"SHAPE": (1, 4, 3, 5)}, "bfloat16"),
    ("dilated_convs", ["--pairs", "0", "--size", "24", "40"], {"CHANNELS": (8, 4)}, "bfloat16"),
])
def test_timing_tables_are_headed_by_command_and_machine(module, mode, small, dtype, monkeypatch,
                                                         capsys):
    import importlib

    import torch

    from cad_apps.bench.report import cpu_flags
    from cad_apps.distributed import cpu_name

    script = importlib.import_module(f"experiments.{module}")
    for name, value in small.items():  # tiny shapes: the header is what is checked
        monkeypatch.setattr(script, name, value)
    threads = torch.get_num_threads()
    try:
        assert script.main([*mode, "--reps", "1", "--threads", "1", "--dtype", dtype]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (f"command: python -m experiments.{module} "
                        + " ".join([*mode, "--reps", "1", "--threads", "1", "--dtype", dtype]))
    assert lines[1].startswith(f"machine: {cpu_name()} (")
    assert ", ".join(cpu_flags()) in lines[1] and f"torch {torch.__version__}" in lines[1]
    assert "1 threads" in lines[1]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_host_noise_prints_each_cpu_and_flags_a_busy_one(monkeypatch, capsys):
    """``experiments.host_noise``: one row per CPU of the process, headed by the command and the
    machine; with ``--max-ratio`` status 1 where a CPU's median / minimum exceeds it; the
    process's CPUs and thread count restored after."""
    import torch

    from experiments import host_noise

    monkeypatch.setattr(host_noise, "SHAPE", (8, 16, 4))
    cpus, threads = os.sched_getaffinity(0), torch.get_num_threads()
    assert host_noise.main(["--reps", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "command: python -m experiments.host_noise --reps 3"
    assert out[1].startswith("machine: ")
    rows = [line.split("|") for line in out if line[:2] == "| " and line[2].isdigit()]
    assert [int(r[1]) for r in rows] == sorted(cpus)
    assert all(1 <= float(r[5]) for r in rows)
    assert os.sched_getaffinity(0) == cpus and torch.get_num_threads() == threads
    monkeypatch.setattr(host_noise, "_pinned_times", lambda cpu, a, b, reps: [1.0, 2.0, 2.0])
    assert host_noise.main(["--reps", "3", "--max-ratio", "1.5"]) == 1  # median 2x the min
    assert "busy: a CPU's median / min is 2.00, above --max-ratio 1.5" in capsys.readouterr().out
    assert host_noise.main(["--reps", "3", "--max-ratio", "2.5"]) == 0
    with pytest.raises(SystemExit) as e:
        host_noise.main(["--max-ratio", "0.5"])
    assert e.value.code == 2 and "--max-ratio must be >= 1" in capsys.readouterr().err


# --------------------------------------------------------------------------- smaller scripts
def _no_model(monkeypatch):
    """Make building a segmentation model fail the test: input checks must come first."""
    import cad_apps.checkpoints as checkpoints

    def refuse(*a, **k):
        raise AssertionError("a model was built before the inputs were checked")
    monkeypatch.setattr(checkpoints, "build_segmentation_model", refuse)


def test_synthetic_model_checks_its_output_first_and_writes_atomically(root, tmp_path,
                                                                      monkeypatch, capsys):
    from experiments import synthetic_model

    argv = ["--data-root", str(root), "--split", "val", "--model", "deeplabv3_resnet50",
            "--iterations", "1"]
    (tmp_path / "taken").mkdir()
    with monkeypatch.context() as m:
        _no_model(m)
        assert synthetic_model.main(argv + ["--out", str(tmp_path / "taken")]) == 2
        _one_line_error(capsys, "is a directory")
        assert synthetic_model.main(argv + ["--out", str(tmp_path / "x.pth"), "--limit",
                                            "1"]) == 2  # one image: no batch statistics
        _one_line_error(capsys, "need at least 2 images")


def test_synthetic_model_writes_into_a_new_folder_atomically(tmp_path, monkeypatch, capsys):
    import torch

    from experiments import synthetic_model

    data = tmp_path / "data"
    make_synthetic_cityscapes(data, "train", num_images=2, size=(40, 56), seed=4)
    out = tmp_path / "new" / "synthetic.pth"
    argv = ["--data-root", str(data), "--model", "deeplabv3_resnet50", "--iterations", "1",
            "--out", str(out)]
    assert synthetic_model.main(argv) == 0
    assert out.is_file() and not [p for p in os.listdir(out.parent) if ".tmp." in p]
    before = out.read_bytes()
    save = torch.save

    def crash_midway(obj, f, *args, **kwargs):  # half a file, then the process dies
        save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        synthetic_model.main(argv)
    assert out.read_bytes() == before  # the previous model, whole


def test_semantics_checks_its_images_before_building_models(tmp_path, monkeypatch, capsys):
    from experiments import semantics

    _no_model(monkeypatch)
    missing = tmp_path / "missing.png"
    assert semantics.main(["--images", str(missing), "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys, f"--images {missing}: no such file")
    assert "truncated download" not in err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    assert semantics.main(["--images", str(tmp_path / "bad.png"), "--out", str(tmp_path)]) == 2
    _one_line_error(capsys, "cannot read the image")
    assert not (tmp_path / "semantics.json").exists()


# --------------------------------------------------------------------------- one definition
def test_timing_scripts_use_the_bench_timer_and_median(monkeypatch):
    """gemm_routes, fresh_memory, host_noise (through experiments.common.timed_ms) and
    products_first' layers time single calls with the bench's timer, and they and dense_phases
    take the bench's median (cad_apps.bench.measure); overlays takes
    level fractions from the plan (LevelPlan.level_fractions): no copies to drift apart.
    (dense_phases and products_first' batch / head keep their own perf_counter loops, CPU
    only.)"""
    from cad_apps.bench import measure
    from experiments import (common, dense_phases, fresh_memory, gemm_routes, host_noise,
                             overlays, products_first)

    for script in (gemm_routes, dense_phases, products_first, fresh_memory, host_noise):
        assert script._median is measure._median and not hasattr(script, "statistics")
    for script in (gemm_routes, fresh_memory, host_noise):
        assert script.timed_ms is common.timed_ms
    assert products_first._time_once is measure._time_once
    timer = []  # common.timed_ms reads measure's timer at call time
    monkeypatch.setattr(measure, "_time_once", lambda fn, args, device: timer.append(1) or 0.0)
    assert common.timed_ms(lambda: None, 4) == [0.0] * 4 and len(timer) == 4
    monkeypatch.undo()
    assert not hasattr(products_first, "_timed") and not hasattr(overlays, "_fractions")
    calls = []
    assert gemm_routes.median_ms(lambda: calls.append(1), 5) >= 0 and len(calls) == 3 + 5


def test_options_valid_for_every_setting_are_not_refused_by_the_default_mask(root, tmp_path,
                                                                           capsys):
    """Under --semantics reference edge masks are defined for 8 -> 16 only; the oracle and
    random masks at 8 -> 32 are fine and ran before the up-front checks came (those checked
    the shared options under the default edge mask and refused them)."""
    argv = _argv(root, tmp_path / "o") + ["--semantics", "reference", "--coarsest-stride", "32"]
    assert oracle.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "o" / "oracle.json").exists()
    assert inadequate_masks.main(argv + ["--thresholds", "--random-fractions", "0.5"]) == 0
    # an edge mask there is still refused, before any work, naming the option
    assert tradeoff.main(_argv(root, tmp_path / "t") + ["--semantics", "reference",
                                                         "--coarsest-stride", "32",
                                                         "--thresholds", "0.35"]) == 2
    _one_line_error(capsys, "--semantics reference")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("keep, reuse", [("none", []), ("all", []), ("none", ["--reuse-output"])])
def test_paired_times_cad_against_the_dense_network_it_equals(keep, reuse, capsys):
    """``experiments.paired`` on a tiny odd-sized input: one table row, headed by the command
    and the machine, and the stride of the dense network the keep setting equals."""
    import torch

    from experiments import paired

    threads = torch.get_num_threads()
    try:
        assert paired.main(["--keep", keep, "--size", "33", "47", "--pairs", "2",
                            "--threads", "1", "--dtype", "float32", *reuse]) == 0
    finally:
        torch.set_num_threads(threads)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("command: python -m experiments.paired --keep")
    assert lines[2] == (f"float32, {'nothing' if keep == 'none' else 'everything'} kept, 33x47, "
                        f"2 pairs; dense: stride {16 if keep == 'none' else 8}"
                        + ("; CAD's output buffer reused" if reuse else ""))
    assert len(lines) == 6 and lines[-1].count("|") == 6


@pytest.mark.parametrize("argv, message", [(["--pairs", "0"], "--pairs must be >= 1, got 0"),
                                           (["--size", "8", "64"], "--size must be at least")])
def test_paired_refuses_what_it_cannot_time(argv, message, capsys):
    from experiments import paired

    with pytest.raises(SystemExit) as e:
        paired.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_epilogue_experiment_times_both_routes(capsys, monkeypatch):
    """``experiments.epilogue model`` on a tiny input with random-block masks: one row per
    frame, fused against unfused; ``ops`` one row per shape (shapes made small here)."""
    import torch

    from experiments import epilogue

    threads = torch.get_num_threads()
    monkeypatch.setattr(epilogue, "OP_SHAPES", ((40, 16, 8), (40, 8, 16)))
    try:
        assert epilogue.main(["model", "--size", "33", "47", "--pairs", "1", "--threads", "1",
                              "--dtype", "float32"]) == 0
        model = capsys.readouterr().out.splitlines()
        assert epilogue.main(["ops", "--reps", "1", "--threads", "1", "--dtype", "float32"]) == 0
        ops = capsys.readouterr().out.splitlines()
    finally:
        torch.set_num_threads(threads)
    assert model[0].startswith("command: python -m experiments.epilogue model")
    assert len(model) == 2 + 2 + 3 and all(row.count("|") == 7 for row in model[-3:])
    assert len(ops) == 2 + 2 + 2 and all(row.count("|") == 8 for row in ops[-2:])


def test_epilogue_experiment_refuses_what_it_cannot_time(capsys):
    from experiments import epilogue

    for argv, message in ((["ops", "--reps", "0"], "--pairs and --reps must be >= 1"),
                          (["model", "--size", "8", "64"], "--size must be at least")):
        with pytest.raises(SystemExit) as e:
            epilogue.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_the_compiled_suite_compares_cad_compiled_with_compiled_dense_networks(suite, capsys):
    """``experiments.benchmark compiled``: every target setting with ``--compile-dense
    --fold-bn`` (channels-last dense only), named ``..._compiled``; its verdicts are about
    CAD's compiled form, ``cad[auto,compiled]``."""
    from experiments import benchmark

    argv, _, calls = suite
    assert benchmark.main(["compiled", *argv, "--only", "float32"]) == 0
    names = [c[c.index("--label") + 1] for c in calls]
    assert names == ["cpu_float32_b1_edge0.15_compiled", "cpu_float32_b1_edge0.35_compiled",
                     "cpu_float32_b1_edge0.95_compiled", "cpu_float32_b4_edge0.35_compiled",
                     "cpu_float32_b1_keep_none_compiled", "cpu_float32_b1_keep_all_compiled",
                     "cpu_float32_b1_keep_none_reuse_output_compiled",
                     "cpu_float32_b1_model_edge0.35_compiled",
                     "cpu_float32_b1_model_sparse_head_edge0.35_compiled"]
    for c in calls:
        assert c[c.index("--dense-format") + 1] == "channels_last"
        assert "--compile-dense" in c and "--fold-bn" in c
    whole = [c for c in calls if "model" in c[c.index("--label") + 1]]
    assert all(c[c.index("--scope") + 1] == "model" for c in whole)
    assert ["--sparse-head" in c for c in whole] == [False, True]
    summary = {"cad": {"auto": {}, "auto,compiled": {}}}
    assert benchmark.compared_engine({"compile_dense": True}, summary) == "auto,compiled"
    assert benchmark.compared_engine({"compile_dense": False}, summary) == "auto"
    setting, _, _ = benchmark.verdict({"keep": "all", "compile_dense": True},
                                      {"vs_dense_fine": 1.0}, [])
    assert setting == "all kept, compiled (CAD: batch norms folded, dense stages compiled)"
