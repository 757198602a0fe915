"""`cad-spconv bench` end to end on tiny inputs: it runs, its counts and checks are right and it
writes JSON and markdown. No timing is asserted (timings belong in BENCHMARKS.md)."""
import json
import os
import re
import statistics

import pytest
import torch
import torchvision

from cad_apps import bench
from cad_apps.cli import build_parser


def run_bench(tmp_path, *extra):
    out = tmp_path / "r.json"
    md = tmp_path / "B.md"
    argv = ["bench", "--reps", "1", "--warmup", "1", "--threads", "1", "--no-memory",
            "--json", str(out), "--markdown", str(md), *extra]
    args = build_parser("bench").parse_args(argv)
    assert bench.main(args, command="cad-spconv " + " ".join(argv)) == 0
    return json.loads(out.read_text()), md.read_text()


def test_conv3x3_counts_guarantee_and_report(tmp_path):
    report, md = run_bench(tmp_path, "--model", "conv3x3", "--channels", "8", "--size", "72",
                           "88", "--engine", "lattice,torch", "--random-keep", "0.4")
    assert len(report["inputs"]) == 3
    for res in report["inputs"]:
        v = res["variants"]
        fine = v["dense8[nchw]"]["macs"]
        assert fine == 9 * 8 * 8 * 9 * 11  # 9x11 finest grid
        assert v["dense16[nchw]"]["macs"] == 9 * 8 * 8 * 5 * 6
        for e in ("lattice", "torch"):
            cad = v[f"cad[{e}]"]
            assert v["dense16[nchw]"]["macs"] < cad["macs"] < fine
            assert cad["geometry_seconds"] > 0 and cad["rulebooks"] == 1
            assert cad["guarantee2_rel_error"] < 1e-5  # checked for every engine
        assert res["guarantee2_rel_error"] < 1e-5
        assert res["failed"] == {}
    assert set(report["summary"]["cad"]) == {"lattice", "torch"}
    assert "cad-spconv bench" in md and "| **all** | lattice |" in md
    # each random input has its own mask (one mask for all would repeat one sample)
    fractions = {res["summary"]["cad"]["lattice"]["mac_fraction"] for res in report["inputs"]}
    assert len(fractions) == 3


@pytest.mark.parametrize("extra", [[], ["--fold-bn", "--engine", "auto,tuned"]])
def test_resnet_backbone_runs_and_matches_mac_counter(tmp_path, extra):
    from adapters import fold_batchnorm
    from cad_spconv.macs import count_macs
    from torchvision.models import resnet50

    report, _ = run_bench(tmp_path, "--model", "resnet50", "--size", "96", "80",
                          "--dense-format", "channels_last", *extra)
    res = report["inputs"][0]
    dense = resnet50(replace_stride_with_dilation=[False, True, True]).eval()
    if extra:
        dense = fold_batchnorm(dense)
    expected = count_macs(dense, torch.zeros(1, 3, 96, 80))["total"] - 2048 * 1000  # no fc
    assert res["variants"]["dense8[channels_last]"]["macs"] == expected
    for engine in report["config"]["engines"]:
        s = res["summary"]["cad"][engine]
        assert 0 < s["mac_fraction"] <= 1
    assert res["guarantee2_rel_error"] < 1e-4
    if extra:  # every tuned layer shape is reported with its candidates' times
        assert report["tuned"] and all(c["engine"] in c["seconds"] for c in report["tuned"])


def test_compiled_for_inference_freezes_weights_and_keeps_the_values():
    """The compiled dense candidate: the eager values (float32, batch norm folded by inductor's
    freezing), the weights frozen at the first call, and the process's inductor settings
    untouched."""
    import torch._inductor.config as inductor_config
    from torch import nn

    from adapters import compiled_for_inference

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()).eval()
    net[1].running_mean.uniform_(-1, 1), net[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 11, 13).contiguous(memory_format=torch.channels_last)
    freezing = inductor_config.freezing  # TORCHINDUCTOR_FREEZING may set it
    run = compiled_for_inference(net)
    with torch.no_grad():
        eager = net(x)
        assert torch.allclose(run(x), eager, rtol=1e-4, atol=1e-5)
        net[0].weight.zero_()  # frozen: the compiled copy keeps the weights of its first call
        assert torch.allclose(run(x), eager, rtol=1e-4, atol=1e-5)
    assert inductor_config.freezing == freezing


@pytest.mark.slow
def test_compiled_dense_variants_run_in_the_bench(tmp_path):
    report, md = run_bench(tmp_path, "--model", "resnet18", "--size", "64", "48",
                           "--dense-format", "channels_last", "--compile-dense")
    v = report["inputs"][0]["variants"]
    for s in (8, 16):
        eager, compiled = v[f"dense{s}[channels_last]"], v[f"dense{s}[channels_last,compiled]"]
        assert compiled["kind"] == eager["kind"] and compiled["macs"] == eager["macs"]
        assert compiled["format"] == "channels_last, torch.compile"
    # CAD with its dense stages compiled (batch norms folded): the same MACs, reported as an
    # engine of its own
    assert v["cad[auto,compiled]"]["macs"] == v["cad[auto]"]["macs"]
    assert "auto,compiled" in report["summary"]["cad"]
    assert report["config"]["compile_dense"] is True


@pytest.mark.slow
def test_a_compiled_networks_frozen_weights_count_in_its_peak(tmp_path, monkeypatch):
    """A compiled dense network keeps its weights frozen and prepacked beside the module's
    own: that copy is charged to it (about its weights' bytes), the eager networks hold
    nothing between runs, eager CAD next to nothing, and CAD with its dense stages compiled
    holds theirs."""
    from cad_apps.bench import measure

    monkeypatch.setattr(measure, "_tensor_peak", lambda fn, args: 1000)
    monkeypatch.setattr(measure, "_peak_memory", lambda fn, args, device: 2000)
    out = tmp_path / "r.json"
    args = build_parser("bench").parse_args([
        "bench", "--reps", "1", "--threads", "1", "--json", str(out), "--model", "resnet18",
        "--size", "64", "48", "--dense-format", "channels_last", "--compile-dense",
        "--no-float32-baseline"])
    assert bench.main(args) == 0
    weights = sum(p.numel() * 4 for p in torchvision.models.resnet18().parameters())
    fc = 512 * 1000 * 4 + 1000 * 4  # the bench's networks end at layer4
    for res in json.loads(out.read_text())["inputs"]:
        v = res["variants"]
        for s in (8, 16):
            assert "kept_state_bytes" not in v[f"dense{s}[channels_last]"]
            held = v[f"dense{s}[channels_last,compiled]"]["kept_state_bytes"]
            assert 0.9 * (weights - fc) < held < 1.3 * (weights - fc)
            assert v[f"dense{s}[channels_last,compiled]"]["peak_tensor_bytes"] == 1000 + held
        # eager CAD: only its batch norms' kept scale and shift (a few KiB)
        assert v["cad[auto]"].get("kept_state_bytes", 0) < 1e-3 * weights
        assert 0 < v["cad[auto,compiled]"]["kept_state_bytes"] < 0.1 * weights


def test_reused_output_buffers_are_counted_and_checked(tmp_path, monkeypatch):
    """--reuse-output: CAD densifies into one kept buffer (Guarantee 2 still checked on it), and
    the buffer's bytes count in CAD's peak memory; a whole model cannot take it."""
    import cad_spconv.engines
    from cad_apps.bench import measure

    # what a run allocates, fixed: the peaks then show exactly what is added to CAD's
    monkeypatch.setattr(measure, "_tensor_peak", lambda fn, args: 1000)
    monkeypatch.setattr(measure, "_peak_memory", lambda fn, args, device: 2000)
    # and what the warm-ups leave held, none (run alone, this test saw 6 KiB of zero vectors
    # of 256 and 512 channels held, the batch norms' kept shifts; in the suite, none)
    monkeypatch.setattr(measure, "_state_held", lambda variant, refs: 0)
    # CAD's runs use kept caches (the dense ones none): 30 bytes of them. The lattice engine's
    # own route keeps workspaces; the fused kernel (on by default on CPUs with AVX512-BF16,
    # float32 too) keeps none, so it is off here
    monkeypatch.setattr(cad_spconv.engines, "held_bytes", lambda keys, device: 30 if keys else 0)
    monkeypatch.setitem(cad_spconv.engines.fused._state, "mode", "off")
    out = tmp_path / "r.json"
    args = build_parser("bench").parse_args([
        "bench", "--reps", "1", "--threads", "1", "--json", str(out), "--model", "resnet18",
        "--size", "64", "48", "--dense-format", "channels_last", "--reuse-output"])
    assert bench.main(args) == 0  # with the memory passes
    for res in json.loads(out.read_text())["inputs"]:
        cad = res["variants"]["cad[auto]"]
        buffer = 512 * 8 * 6 * 4  # resnet18's layer4 at stride 8, float32
        assert cad["output_buffer_bytes"] == buffer and cad["engine_cache_bytes"] == 30
        assert (cad["peak_tensor_bytes"], cad["peak_bytes"]) == (1030 + buffer, 2030 + buffer)
        assert res["variants"]["dense8[channels_last]"]["peak_tensor_bytes"] == 1000
        assert res["guarantee2_rel_error"] < 1e-5
    args = build_parser("bench").parse_args(["bench", "--model", "resnet18", "--scope", "model",
                                             "--reuse-output"])
    with pytest.raises(SystemExit, match="leave it out with --scope model"):
        bench.main(args)


def test_tensors_a_warm_up_leaves_held_are_found_and_charged_once():
    """What a variant's warm-ups leave held (a compiled graph's frozen, prepacked weights) is
    found through the garbage collector and charged once per storage, while still held; what
    is charged elsewhere (an engine's kept cache) is left out."""
    from cad_apps.bench import measure

    before = measure._held_tensors()
    kept = torch.ones(1000, dtype=torch.float64)
    view = kept[10:]  # the same storage: counted once
    dropped = torch.ones(500)
    other = torch.ones(3, dtype=torch.bfloat16)
    new = {k: r for k, r in measure._held_tensors().items() if k not in before}
    assert (kept.data_ptr(), 8000) in new and (dropped.data_ptr(), 2000) in new
    del dropped
    assert measure._kept_state_bytes(new, exclude=set()) == 8000 + 6
    assert measure._kept_state_bytes(new, exclude={other.data_ptr()}) == 8000
    del kept
    assert view.untyped_storage().nbytes() == 8000  # the view holds it
    assert measure._kept_state_bytes(new, exclude=set()) == 8000 + 6
    del view
    assert measure._kept_state_bytes(new, exclude=set()) == 6
    # meta tensors (a compiler's fake ones) hold no memory
    meta = torch.empty(1 << 20, device="meta")
    assert not any(k[1] == meta.nbytes for k in measure._held_tensors() if k not in before)


def test_a_variant_densifies_into_its_kept_buffer():
    """The first densified result that is not a view of the features becomes the buffer; every
    later result of that shape is that buffer, filled anew; a view is never kept."""
    from cad_apps.bench.variants import Variant
    from cad_spconv import CADTensor, LevelPlan

    v = Variant("cad", "cad", None, None, None, reuse_output=True)
    levels = torch.ones(2, 9, 7, dtype=torch.long)
    levels[1, :4] = 0  # the images of the batch differ: a gather, not an upsampling
    plan = LevelPlan.from_level_map(levels, 1)
    first = CADTensor(torch.randn(plan.num_sites(1), 3), plan, 1)
    kept = v.densify(first)
    assert v.kept_output_bytes() == kept.numel() * 4
    second = CADTensor(torch.randn(plan.num_sites(1), 3), plan, 1)
    assert v.densify(second) is kept
    torch.testing.assert_close(kept, second.dense(), rtol=0, atol=0)
    flat = LevelPlan.from_level_map(torch.zeros(1, 5, 6, dtype=torch.long), 1)
    view = v.densify(CADTensor(torch.randn(30, 3), flat, 1))  # the features' own NHWC map
    assert v.kept_output_bytes() == kept.numel() * 4 and view.shape == (1, 3, 5, 6)


def test_profile_reports_ops_per_variant(tmp_path, capsys):
    """--profile N: one profiled forward per variant, its N most expensive ops by self time, the
    rest and the total, in the JSON and as a table."""
    report, _ = run_bench(tmp_path, "--model", "conv3x3", "--channels", "8", "--size", "72",
                          "88", "--engine", "lattice", "--random-keep", "0.4", "--profile", "3")
    for res in report["inputs"]:
        for name, entry in res["variants"].items():
            prof = entry["profile_ms"]
            ops = [op for op in prof if not op.startswith("(")]
            assert len(ops) == 3 and all(prof[op] >= 0 for op in ops)
            assert prof["(total)"] == pytest.approx(sum(prof[op] for op in ops) + prof["(other)"])
    out = capsys.readouterr().out
    assert "| op | dense16[nchw] |" in out and "| (total) |" in out


@pytest.mark.parametrize("argv,message", [
    (["--engine", "fast"], "unknown engine"),
    (["--dtype", "float16"], "float16"),
    (["--coarsest-stride", "24"], "power of two"),
    (["--images", "/no/such.png"], "image not found"),
    (["--profile", "-1"], "--profile"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--channels", "0"], "--channels must be >= 1"),
    (["--sparse-head"], "leave out --sparse-head"),
    (["--model", "resnet18", "--sparse-head"], "add --scope model"),
    (["--scope", "model", "--fold-bn"], "leave out --scope model, --fold-bn"),
    (["--im2col-dilated"], "leave out --im2col-dilated"),
    (["--model", "deeplabv3_resnet50", "--im2col-dilated"], "--scope model and a segmentation"),
    (["--model", "resnet18", "--scope", "model", "--im2col-dilated"], "a segmentation --model"),
    (["--engine", "torch,lattice,torch"], "names torch more than once"),
    (["--warmup", "0"], "--warmup must be >= 1"),
    (["--reuse-output"], "leave it out with --model conv3x3"),
    (["--compile-dense"], "leave out --compile-dense"),
    (["--model", "deeplabv3_resnet50", "--scope", "model", "--im2col-dilated", "--compile-dense"],
     "give one of them"),
    (["--images", "/no/such.png", "--threshold", "nan"], "threshold must be finite"),
    (["--images", "/no/such.png", "--dilation", "4"], "dilation must be an odd"),
    (["--json", "{tmp}", "--reps", "1"], "--json .* is a directory"),
    (["--json", "{tmp}/b.md", "--markdown", "{tmp}/b.md"], "name the same file"),
])
def test_bad_arguments_are_refused(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    args = build_parser("bench").parse_args(["bench", "--model", "conv3x3", *argv])
    with pytest.raises(SystemExit, match=message):
        bench.main(args)


def test_a_model_the_strides_do_not_fit_is_a_message_not_a_traceback():
    args = build_parser("bench").parse_args(["bench", "--model", "resnet18", "--finest-stride", "2",
                                             "--size", "32", "32", "--reps", "1", "--no-memory"])
    with pytest.raises(SystemExit, match="bench: a ResNet's output stride must be one of"):
        bench.main(args)


def test_benchmark_suite_report_and_machine_folders(tmp_path, monkeypatch, capsys):
    """``experiments.benchmark``: a targets result (here a tiny ResNet-50 run under a target's
    name) makes a row of the report, headed by the machine with its instruction-set flags; a
    dry run writes into ``--results``; bfloat16 targets are skipped, with the reason, on a CPU
    without native bfloat16."""
    from cad_apps.bench import report as bench_report
    from cad_apps.distributed import cpu_name
    from experiments import benchmark

    results = tmp_path / "machine"
    results.mkdir()
    for name in list(os.environ):  # the CI's own settings would change the header
        if name.startswith(bench_report._TUNING_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # an ISA-restricted run says so
    run_bench(tmp_path, "--model", "resnet50", "--size", "96", "80", "--threshold", "0.35")
    (tmp_path / "r.json").rename(results / "cpu_float32_b1_edge0.35.json")
    table = benchmark.report(str(results))
    flags = ", ".join(bench_report.cpu_flags() or ["flags not recorded"])
    assert table.startswith(f"Measured on: {cpu_name()} ({flags})")
    from cad_spconv.engines import fused
    assert table.split("\n")[0].endswith(  # and whether the AMX kernel could run
        f"threads, ONEDNN_MAX_CPU_ISA=AVX2, fused kernel {fused.describe()}.")
    source = bench_report.source_revision()  # the code that ran, second line
    assert table.split("\n")[1] == ("Code: commit not recorded (1 result)." if source is None else
                                    f"Code: {source['commit'][:7]}"
                                    f"{' with uncommitted changes' if source['modified'] else ''}"
                                    " (1 result).")
    row = next(line for line in table.splitlines() if line.startswith("| cpu_float32_b1_edge0.35"))
    assert "| float32 | 1 | edge 0.35 |" in row
    # one run per variant: no spread; the paired ratio is that one round's
    assert re.search(r"\| n/a \| \d+\.\d{3} \| (met|missed)", row), row
    assert benchmark.report(str(tmp_path / "empty")).startswith("no targets results")

    monkeypatch.setattr(bench_report, "native_bfloat16", lambda: False)
    monkeypatch.chdir(tmp_path)  # the suite changes into the project root; undone after
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "a.png").write_bytes(b"")
    (frames / "b.png").write_bytes(b"")
    assert benchmark.main(["targets", "--dry-run", "--no-markdown", "--frames", str(frames),
                           "--results", str(results), "--reps", "3"]) == 0
    out = capsys.readouterr().out
    commands = {line.split("--label ")[-1]: line for line in out.splitlines() if "--label" in line}
    assert "--reps 3 " in commands["cpu_float32_b1_edge0.15"]
    # nothing kept times one frame as often as the edge settings time their frames together
    assert "--reps 6 " in commands["cpu_float32_b1_keep_none"]
    assert "b.png" not in commands["cpu_float32_b1_keep_none"]
    assert "--reuse-output" not in commands["cpu_float32_b1_keep_none"]
    assert commands["cpu_float32_b1_keep_none_reuse_output"].replace(" --reuse-output", "") == (
        commands["cpu_float32_b1_keep_none"].replace("keep_none", "keep_none_reuse_output"))
    setting, _, _ = benchmark.verdict({"keep": "none", "reuse_output": True},
                                      {"vs_dense_coarse": 1.0}, [])
    assert setting == "nothing kept, output buffer reused"
    assert f"--json {results}/cpu_float32_b1_edge0.15.json" in out
    assert "skipping cpu_bfloat16_b1_edge0.15: this CPU has no native bfloat16" in out
    assert "--dtype bfloat16" not in out


def test_the_source_revision_is_this_checkouts_commit_or_none(monkeypatch):
    """Every bench result records the commit it ran at; without git (or outside a checkout)
    the record says nothing rather than failing the run."""
    import re
    import subprocess

    from cad_apps.bench import report as bench_report

    source = bench_report.source_revision()
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.exists(os.path.join(here, ".git")):
        head = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        assert source["commit"] == head and re.fullmatch("[0-9a-f]{40}", head)
        assert isinstance(source["modified"], bool)
    else:
        assert source is None

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert bench_report.source_revision() is None


@pytest.mark.parametrize("cfg,cad,peaks,want", [
    # nothing kept: against dense stride 16, at most 1.05x (dense 8 does not enter)
    ({"keep": "none"}, {"vs_dense_coarse": 1.05, "vs_dense_fine": 0.3}, [], (True, True)),
    ({"keep": "none"}, {"vs_dense_coarse": 1.0501, "vs_dense_fine": 0.3}, [], (False, True)),
    # all kept: against dense stride 8, at most 1.10x
    ({"keep": "all"}, {"vs_dense_fine": 1.10, "vs_dense_coarse": 3.5}, [], (True, True)),
    ({"keep": "all"}, {"vs_dense_fine": 1.1001, "vs_dense_coarse": 3.5}, [], (False, True)),
    # edges: eff >= 0.9 and faster than dense stride 8 (slower than dense 16 is expected)
    ({"threshold": 0.35}, {"eff": 0.9, "vs_dense_fine": 0.99, "vs_dense_coarse": 2.9}, [],
     (True, True)),
    ({"threshold": 0.35}, {"eff": 0.899, "vs_dense_fine": 0.8, "vs_dense_coarse": 2.9}, [],
     (False, True)),
    ({"threshold": 0.35}, {"eff": 1.2, "vs_dense_fine": 1.0, "vs_dense_coarse": 0.9}, [],
     (False, True)),
    # memory: CAD's peak at most dense 8's on every input
    ({"threshold": 0.35}, {"eff": 1.0, "vs_dense_fine": 0.8, "vs_dense_coarse": 2.0},
     [(100, 100), (100, 90)], (True, True)),
    ({"threshold": 0.35}, {"eff": 1.0, "vs_dense_fine": 0.8, "vs_dense_coarse": 2.0},
     [(100, 90), (100, 101)], (True, False)),
])
def test_target_rules_at_their_bounds(cfg, cad, peaks, want):
    """The met / missed rules of the targets report (issue 14) at and just past each bound."""
    from experiments import benchmark
    _, ok, memory_ok = benchmark.verdict(cfg, cad, peaks)
    assert (ok, memory_ok) == want


def test_the_allocator_settings_are_recorded(monkeypatch):
    """A preloaded allocator (tcmalloc, jemalloc) and glibc's tunables change what a CPU run
    measures: each result records them with the other tuning variables."""
    from cad_apps.bench import report as bench_report

    for name in list(os.environ):
        if name.startswith(bench_report._TUNING_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LD_PRELOAD", "libtcmalloc_minimal.so.4")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0")
    monkeypatch.setenv("MALLOC_CONF", "dirty_decay_ms:-1")
    monkeypatch.setenv("PATH_UNRELATED", "1")
    assert bench_report.tuning_env() == {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=0",
                                         "LD_PRELOAD": "libtcmalloc_minimal.so.4",
                                         "MALLOC_CONF": "dirty_decay_ms:-1"}


def test_noisy_timings_are_flagged_by_the_variants_the_ratios_use():
    """A run whose timings spread past ``NOISY_SPREAD`` (max / min of one variant's runs) gets a
    note in the printed and markdown reports; the slower dense format does not count."""
    from cad_apps.bench import report as bench_report

    def result(cad_runs, nchw_runs):
        return {"input": "frame.png", "variants": {
            "dense16[nchw]": {"kind": "dense_coarse", "seconds": 0.5, "samples": nchw_runs},
            "dense16[channels_last]": {"kind": "dense_coarse", "seconds": 0.4,
                                       "samples": [0.4, 0.41, 0.42]},
            "dense8[channels_last]": {"kind": "dense_fine", "seconds": 1.6,
                                      "samples": [1.5, 1.6, 1.7]},
            "cad[auto]": {"kind": "cad", "seconds": 1.0, "samples": cad_runs}}}

    steady = {"inputs": [result([0.9, 1.0, 1.1], [0.5, 0.5, 2.0])]}
    assert bench_report.timing_spread(steady["inputs"]) == (
        pytest.approx(1.1 / 0.9), "frame.png: cad[auto]")
    assert bench_report.noise_note(steady) is None
    busy = {"inputs": [result([0.9, 1.0, 1.9], [0.5, 0.5, 0.5])]}
    spread, name = bench_report.timing_spread(busy["inputs"])
    assert spread == pytest.approx(1.9 / 0.9) and name == "frame.png: cad[auto]"
    assert "the runs of frame.png: cad[auto] span 2.11x" in bench_report.noise_note(busy)
    assert bench_report.timing_spread([result([1.0], [0.5])]) is not None  # dense: 3 runs
    one_run = {"input": "f", "variants": {
        n: dict(e, samples=[e["seconds"]]) for n, e in result([1.0], [0.5])["variants"].items()}}
    assert bench_report.timing_spread([one_run]) is None


def _paired_result(name, cad_runs, dense16_runs, dense8_runs, mac_fraction=0.7):
    med = statistics.median
    return {"input": name, "variants": {
        "dense16[nchw]": {"kind": "dense_coarse", "seconds": 9.0, "samples": [9.0] * 5,
                          "macs": 300},
        "dense16[channels_last]": {"kind": "dense_coarse", "seconds": med(dense16_runs),
                                   "samples": dense16_runs, "macs": 300},
        "dense8[channels_last]": {"kind": "dense_fine", "seconds": med(dense8_runs),
                                  "samples": dense8_runs, "macs": 1000},
        "cad[auto]": {"kind": "cad", "seconds": med(cad_runs), "samples": cad_runs,
                      "macs": int(1000 * mac_fraction)}}}


def test_paired_ratios_pair_each_round_and_sum_the_inputs():
    """Round i's runs of CAD and of the dense network the ratio uses (the faster format) ran
    back to back: their ratio, summed over the inputs, and the median over rounds. A slow
    spell over rounds 0-1 that hit both, and dense 16's run in round 2, moves the ratio of
    medians to 0.5; the paired median stays at 1.0."""
    from cad_apps.bench import report as bench_report

    busy = _paired_result("a", [2.0, 2.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 1.0, 1.0],
                          [3.0] * 5)
    s = bench_report.summary([busy], ["auto"])["cad"]["auto"]
    assert s["vs_dense_coarse"] == 0.5
    assert s["paired"] == {"vs_dense_coarse": 1.0, "vs_dense_fine": pytest.approx(1 / 3)}
    assert busy["summary"]["cad"]["auto"]["paired"] == s["paired"]  # per input too
    # two inputs: round i's sums, (1 + 3) / (2 + 2) in every round
    two = bench_report.paired_ratios([
        _paired_result("a", [1.0] * 5, [2.0, 2.0, 2.0, 2.0, 1.0], [3.0] * 5),
        _paired_result("b", [3.0] * 5, [2.0, 2.0, 2.0, 2.0, 3.0], [6.0] * 5)], "auto")
    assert two["vs_dense_coarse"] == 1.0 and two["vs_dense_fine"] == pytest.approx(4 / 9)
    # nothing to pair: runs not recorded, run counts that differ between inputs, no such engine
    bare = {"input": "c", "variants": {n: {k: x for k, x in e.items() if k != "samples"}
                                       for n, e in busy["variants"].items()}}
    assert bench_report.paired_ratios([bare], "auto") is None
    short = _paired_result("d", [1.0] * 3, [1.0] * 3, [1.0] * 3)
    assert bench_report.paired_ratios([busy, short], "auto") is None
    assert bench_report.paired_ratios([busy], "lattice") is None


def test_the_targets_report_shows_the_paired_ratio_and_a_verdict_it_flips(tmp_path):
    """The targets table has the setting's ratio paired by round, and says so where the paired
    ratio and the ratio of medians give different verdicts."""
    from cad_apps.bench import report as bench_report
    from experiments import benchmark

    for name, keep, inp in (
            # by medians 1.0 / 1.0 (met); paired 2, 2, 0.5, 0.5, 1.11: 1.11 (missed)
            ("cpu_float32_b1_keep_none", "none", _paired_result(
                "a", [2.0, 2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0, 0.9], [3.0] * 5)),
            ("cpu_float32_b1_keep_all", "all", _paired_result(
                "a", [3.0] * 3, [1.0] * 3, [3.0] * 3))):
        summary = bench_report.summary([inp], ["auto"])
        (tmp_path / f"{name}.json").write_text(json.dumps({
            "config": {"keep": keep, "dtype": "float32", "batch": 1},
            "environment": {"cpu": "cpu", "torch": "2", "threads": 2},
            "inputs": [inp], "summary": summary}))
    rows = {line.split(" | ")[0][2:]: line.split(" | ")
            for line in benchmark.report(str(tmp_path)).splitlines()[3:]}
    assert rows["cpu_float32_b1_keep_none"][-2:] == ["1.111", "met (paired: missed) |"]
    assert rows["cpu_float32_b1_keep_all"][-2:] == ["1.000", "met |"]


def test_memory_pass_peaks_compare_with_the_timed_runs_dense_pick(tmp_path):
    """The memory columns from a memory pass (one run a variant) compare CAD with the dense
    format the full run found fastest, not the one its single run happened to favour."""
    from cad_apps.bench import report as bench_report
    from experiments import benchmark

    inp = _paired_result("a", [2.0] * 5, [1.0] * 5, [3.0] * 5)  # channels-last dense 8: 3 s
    inp["variants"]["dense8[nchw]"] = {"kind": "dense_fine", "seconds": 4.0,
                                       "samples": [4.0] * 5, "macs": 1000}
    (tmp_path / "cpu_float32_b1_edge0.35.json").write_text(json.dumps({
        "config": {"keep": None, "dtype": "float32", "batch": 1, "threshold": 0.35},
        "environment": {"cpu": "cpu", "torch": "2", "threads": 2},
        "inputs": [inp], "summary": bench_report.summary([inp], ["auto"])}))
    memory = json.loads(json.dumps(inp))
    memory["variants"]["dense8[nchw]"]["seconds"] = 2.5  # faster in the one run of the pass
    for name, mib in (("dense8[channels_last]", 100), ("dense8[nchw]", 300), ("cad[auto]", 200)):
        memory["variants"][name]["peak_tensor_bytes"] = mib << 20
        memory["variants"][name]["peak_bytes"] = mib << 20
    # what each side held between runs, part of those peaks: a compiled graph's frozen
    # weights, CAD's engine caches
    memory["variants"]["dense8[channels_last]"]["kept_state_bytes"] = 60 << 20
    memory["variants"]["dense8[nchw]"]["kept_state_bytes"] = 70 << 20
    memory["variants"]["cad[auto]"]["engine_cache_bytes"] = 30 << 20
    (tmp_path / "cpu_float32_b1_edge0.35_memory.json").write_text(json.dumps(
        {"inputs": [memory]}))
    row = next(line for line in benchmark.report(str(tmp_path)).splitlines()
               if line.startswith("| cpu_float32_b1_edge0.35 "))
    assert "(tensors 100 / 200), of which held between runs 60 / 30 |" in row
    assert "memory missed" in row


def test_ratios_are_against_the_fastest_dense_variant_of_the_dtype():
    """The summary's dense stride 8 / 16 are the faster memory format of each; eff and the
    ratios use them, not the NCHW float32 network (reported beside them)."""
    from cad_apps.bench import report as bench_report
    fine_macs = 1000
    variants = {
        "dense16[nchw]": {"kind": "dense_coarse", "seconds": 0.5, "macs": 300},
        "dense16[channels_last]": {"kind": "dense_coarse", "seconds": 0.4, "macs": 300},
        "dense8[nchw]": {"kind": "dense_fine", "seconds": 2.0, "macs": fine_macs},
        "dense8[channels_last]": {"kind": "dense_fine", "seconds": 1.6, "macs": fine_macs,
                                  "format": "channels_last"},
        "dense8[nchw,float32]": {"kind": "dense_reference", "seconds": 4.0, "macs": fine_macs},
        "cad[lattice]": {"kind": "cad", "seconds": 1.0, "macs": 700},
    }
    out = bench_report._input_summary({"variants": variants}, ["lattice"])
    assert (out["dense_fine_seconds"], out["dense_coarse_seconds"]) == (1.6, 0.4)
    assert out["dense_fine_format"] == "channels_last"
    c = out["cad"]["lattice"]
    assert c["mac_fraction"] == 0.7
    assert c["vs_dense_fine"] == 1.0 / 1.6 and c["vs_dense_coarse"] == 1.0 / 0.4
    assert c["eff"] == 1.6 * 0.7 / 1.0
    assert c["vs_dense_fine_nchw_float32"] == 1.0 / 4.0


@pytest.mark.parametrize("leave_out", [False, True])
def test_float32_baseline_is_optional(tmp_path, leave_out):
    """In bfloat16 the NCHW float32 dense network is timed beside the same-dtype baselines
    unless ``--no-float32-baseline``; the ratios to dense 8 are reported either way."""
    extra = ["--no-float32-baseline"] if leave_out else []
    report, _ = run_bench(tmp_path, "--model", "resnet18", "--size", "64", "48", "--dtype",
                          "bfloat16", "--dense-format", "channels_last", "--engine", "torch",
                          *extra)
    res = report["inputs"][0]
    assert ("dense8[nchw,float32]" in res["variants"]) is not leave_out
    assert ("vs_dense_fine_nchw_float32" in res["summary"]["cad"]["torch"]) is not leave_out
    assert res["summary"]["cad"]["torch"]["vs_dense_fine"] > 0


def test_a_whole_classifier_is_timed_and_written(tmp_path):
    """--scope model on a classifier: logits, not maps, so Guarantee 2 does not apply (it
    crashed after the timing and lost the run)."""
    report, _ = run_bench(tmp_path, "--model", "resnet18", "--scope", "model", "--size", "64",
                          "64")
    for res in report["inputs"]:
        assert "guarantee2_rel_error" not in res and res["failed"] == {}


def test_im2col_dilated_runs_in_every_variant(tmp_path, monkeypatch):
    """--im2col-dilated: the dense networks and CAD's dense head alike run their ASPP convs as
    im2col GEMMs (DeepLabV3: rates 12 / 24 / 36), the setting recorded with the result."""
    import adapters
    import adapters.dilated

    calls, swapped = [], []
    real, swap = adapters.dilated._im2col, adapters.im2col_dilated_convs
    monkeypatch.setattr(adapters.dilated, "_im2col",
                        lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    monkeypatch.setattr(adapters, "im2col_dilated_convs",
                        lambda m, *a, **k: swapped.append(swap(m, *a, **k)) or swapped[-1])
    report, _ = run_bench(tmp_path, "--model", "deeplabv3_resnet50", "--scope", "model",
                          "--size", "64", "64", "--dense-format", "channels_last",
                          "--im2col-dilated")
    assert report["config"]["im2col_dilated"] is True
    # dense 8, dense 16 and CAD, three ASPP convs each; the bfloat16 runs' float32 reference
    # (not here: float32) would stay on oneDNN
    assert sorted(type(m).__name__ for m in swapped) == ["CADSegmentation", "DeepLabV3",
                                                          "DeepLabV3"]
    assert all(m.im2col_convs == 3 for m in swapped)
    # dense 8 (8x8 map), dense 16 (4x4) and CAD's head at stride 8, three convs each
    assert {s[-2:] for s in calls} == {(8, 8), (4, 4)}
    assert len(calls) % 3 == 0 and len(calls) >= 9
    for res in report["inputs"]:
        assert res["failed"] == {}


def test_kept_engine_caches_are_charged_to_the_variant_that_keeps_them(tmp_path, monkeypatch):
    """With --im2col-dilated the NCHW dense networks keep a reordered copy of each ASPP weight
    (channels-last ones are read in place): those bytes count in their peaks, not in CAD's
    (float32: CAD keeps none; bfloat16 prepacked weights, ``test_epilogue.py``)."""
    from cad_apps.bench import measure

    monkeypatch.setattr(measure, "_tensor_peak", lambda fn, args: 1000)
    monkeypatch.setattr(measure, "_peak_memory", lambda fn, args, device: 2000)
    out = tmp_path / "r.json"
    args = build_parser("bench").parse_args([
        "bench", "--reps", "1", "--threads", "1", "--json", str(out), "--model",
        "deeplabv3_resnet50", "--scope", "model", "--size", "32", "32", "--im2col-dilated"])
    assert bench.main(args) == 0
    aspp = 3 * 256 * 2048 * 9 * 4  # three 3x3 convs, 2048 -> 256 channels, float32
    for res in json.loads(out.read_text())["inputs"]:
        v = res["variants"]
        for name in ("dense8[nchw]", "dense16[nchw]"):
            assert v[name]["engine_cache_bytes"] == aspp
            assert v[name]["peak_tensor_bytes"] == 1000 + aspp
        for name in ("dense8[channels_last]", "dense16[channels_last]"):
            assert "engine_cache_bytes" not in v[name] and v[name]["peak_tensor_bytes"] == 1000
        assert v["cad[auto]"]["engine_cache_bytes"] == 0
        assert v["cad[auto]"]["peak_tensor_bytes"] == 1000


def test_a_kept_cache_two_variants_use_is_charged_to_both(tmp_path, monkeypatch):
    """Op level, the CAD variants of two engines convolve one NCHW weight and read one kept
    reordered copy of it: each is charged it, not only the one warmed up first."""
    from cad_apps.bench import measure

    monkeypatch.setattr(measure, "_tensor_peak", lambda fn, args: 1000)
    monkeypatch.setattr(measure, "_peak_memory", lambda fn, args, device: 2000)
    out = tmp_path / "r.json"
    args = build_parser("bench").parse_args([
        "bench", "--reps", "1", "--threads", "1", "--json", str(out), "--model", "conv3x3",
        "--channels", "8", "--size", "48", "40", "--engine", "lattice,products",
        "--random-keep", "0.4"])
    assert bench.main(args) == 0
    krsc = 8 * 8 * 9 * 4  # the [C_out, kh, kw, C_in] copy, float32
    for res in json.loads(out.read_text())["inputs"]:
        v = res["variants"]
        for e in ("lattice", "products"):
            assert v[f"cad[{e}]"]["engine_cache_bytes"] >= krsc
        assert all("engine_cache_bytes" not in v[n] for n in v if n.startswith("dense"))


def test_a_failed_result_does_not_stop_the_suite(tmp_path, monkeypatch, capsys):
    """Each result runs in its own process; one that fails is reported and the rest still run
    (a multi-hour suite used to stop at the first failure)."""
    import subprocess

    from experiments import benchmark

    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1 if len(calls) == 1 else 0)

    monkeypatch.setattr(subprocess, "run", run)  # the suite imports it where it runs
    monkeypatch.chdir(tmp_path)
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "a.png").write_bytes(b"")
    assert benchmark.main(["ops", "--no-markdown", "--frames", str(frames),
                           "--results", str(tmp_path / "res")]) == 1
    assert len(calls) > 1
    captured = capsys.readouterr()
    first = calls[0][calls[0].index("--label") + 1]
    assert f"{first}: failed (exit code 1); going on" in captured.out
    assert f"1 result(s) failed: {first}" in captured.err


def _bench_args(tmp_path, *extra):
    return build_parser("bench").parse_args(
        ["bench", "--model", "conv3x3", "--channels", "4", "--size", "32", "32", "--reps", "1",
         "--no-memory", "--threads", "1", *extra])


def test_an_existing_file_that_is_not_a_bench_result_is_kept(tmp_path):
    """--json silently replaced any file (an eval result, say) and --markdown appended a table
    to whatever it named: refused before any work unless --overwrite / a .md path."""
    other = tmp_path / "r1.json"
    other.write_text('{"format": "cad-spconv-eval/2", "images": {}}\n')
    with pytest.raises(SystemExit, match=r"r1.json is not a cad-spconv bench result; choose "
                                         r"another --json, or pass --overwrite"):
        bench.main(_bench_args(tmp_path, "--json", str(other)))
    assert json.loads(other.read_text())["format"] == "cad-spconv-eval/2"
    with pytest.raises(SystemExit, match=r"--markdown .*r1m.json: this writes a MD file; give a "
                                         r"path ending in \.md"):
        bench.main(_bench_args(tmp_path, "--markdown", str(tmp_path / "r1m.json")))
    assert not (tmp_path / "r1m.json").exists()
    # its own output (also one written before reports had a "format") is replaced; with
    # --overwrite anything is
    report, _ = run_bench(tmp_path, "--model", "conv3x3", "--channels", "4", "--size", "32", "32")
    assert report["format"] == bench.FORMAT
    del report["format"]
    (tmp_path / "r.json").write_text(json.dumps(report))
    run_bench(tmp_path, "--model", "conv3x3", "--channels", "4", "--size", "32", "32")
    assert bench.main(_bench_args(tmp_path, "--json", str(other), "--overwrite")) == 0
    assert json.loads(other.read_text())["format"] == bench.FORMAT


def test_a_json_another_bench_writes_is_refused_and_kept(tmp_path, monkeypatch):
    """One writer per --json: bench holds its lock for the whole run, so a second bench into
    the same file is refused before any work (it replaced the first one's result at its end)."""
    from cad_apps.io import OutputLock

    out = tmp_path / "r.json"
    monkeypatch.setattr(bench, "_run", lambda *a: pytest.fail("ran although --json is busy"))
    with OutputLock(str(out)):
        with pytest.raises(SystemExit, match=r"^bench: --json .*r.json is being written by "
                                             r"another running process .*choose another --json"):
            bench.main(_bench_args(tmp_path, "--json", str(out)))
    assert not out.exists()
    monkeypatch.undo()
    assert bench.main(_bench_args(tmp_path, "--json", str(out))) == 0  # free again
    assert json.loads(out.read_text())["format"] == bench.FORMAT


def test_an_existing_json_is_read_and_parsed_once(tmp_path, monkeypatch):
    """_check_replaceable parsed a file twice (read_json, then json.load again for reports
    written before "format" existed): once now, with the same messages for each kind of file."""
    parses = []
    load = json.load
    monkeypatch.setattr(json, "load", lambda f, **kw: parses.append(f.name) or load(f, **kw))
    old = tmp_path / "old.json"  # a report from before FORMAT: replaceable
    old.write_text(json.dumps({k: {} for k in bench._REPORT_KEYS}))
    bench._check_replaceable(str(old))
    assert parses == [str(old)]
    new = tmp_path / "new.json"
    new.write_text(json.dumps({"format": bench.FORMAT}))
    bench._check_replaceable(str(new))
    assert parses == [str(old), str(new)]
    fix = r"; choose another --json, or pass --overwrite to replace it$"
    for text, message in (("{not json", r"bad.json is not valid JSON \(.*\)"),
                          (b"\xff\xfe", r"bad.json is not valid JSON \(.*\)"),
                          ('["a list"]', "bad.json is not a cad-spconv bench result"),
                          ('{"format": "cad-spconv-eval/2"}',
                           "bad.json is not a cad-spconv bench result")):
        bad = tmp_path / "bad.json"
        bad.write_bytes(text) if isinstance(text, bytes) else bad.write_text(text)
        parses.clear()
        with pytest.raises(SystemExit, match=r"^bench: --json .*" + message + fix):
            bench._check_replaceable(str(bad))
        assert len(parses) <= 1
    real_open = open

    def unreadable(path, *a, **k):
        if str(path) == str(bad):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", unreadable)
    with pytest.raises(SystemExit, match=r"bad.json exists and cannot be read \(Permission "
                                         r"denied\)" + fix):
        bench._check_replaceable(str(bad))


def test_the_fused_kernel_is_in_the_profile(monkeypatch):
    """The fused kernel is a pybind call, which torch's profiler does not see: a profile
    missed its time (BENCHMARKS.md, 2026-12-06 19:35, edge 0.15). It records itself as a range
    when a profiler runs; here a stand-in kernel that takes 20 ms."""
    import time
    import types

    from cad_apps.bench.measure import _profile
    from cad_spconv.engines import fused

    calls = []

    class Kernel:
        @staticmethod
        def gather_gemm(*args):
            calls.append(len(args))
            time.sleep(0.02)

    monkeypatch.setattr(fused, "_module", lambda: Kernel)
    monkeypatch.setattr(fused, "_kernel_index", lambda split: split.rest_index)
    monkeypatch.setattr(fused, "packed_filters", lambda weight: weight)
    split = types.SimpleNamespace(rest_index=torch.zeros(4, 9, dtype=torch.long),
                                  rest_rows=torch.arange(4))
    run = (lambda: fused.gather_gemm(torch.zeros(4, 32), torch.zeros(32, 32, 3, 3), split,
                                     torch.zeros(4, 32)))
    run()  # no profiler: the plain call
    ms = _profile(run, (), torch.device("cpu"), 5)
    assert calls == [9, 9]
    assert ms[fused.PROFILER_NAME] >= 15, ms


def test_tensor_peak_sees_replaced_state_freed():
    """State a run replaces was allocated by the run before: its free must count, or the peak
    of every later moment of the run is too high by its size (a converted model's merge maps
    at a dense head's peak)."""
    from cad_apps.bench.measure import _tensor_peak

    holder = {"state": torch.zeros(512)}  # allocated before any profile

    def run():
        holder["state"] = torch.zeros(512)  # 2048 bytes in, 2048 out
        tmp = torch.empty(1 << 18)  # the run's peak: 1 MiB above the level before it
        del tmp

    assert _tensor_peak(run, ()) == 1 << 20


def test_every_round_runs_each_variant_once_in_a_new_order():
    """A run slows the next one: in a fixed cycle one variant would always follow the 3 s
    float32 reference and carry its cost. Every round is a permutation of all variants, a
    variant's predecessors vary over the rounds, and a run times the same orders again."""
    from cad_apps.bench.measure import round_orders

    names = ["dense16[nchw]", "dense16[channels_last]", "dense8[nchw]",
             "dense8[channels_last]", "dense8[nchw,float32]", "cad[auto]"]
    orders = round_orders(names, 15)
    assert len(orders) == 15
    for order in orders:
        assert sorted(order) == sorted(names)
    stream = [v for order in orders for v in order]
    before = {n: {stream[i - 1] for i in range(1, len(stream)) if stream[i] == n} for n in names}
    assert all(len(p) >= 3 for p in before.values()), before
    assert len({tuple(o) for o in orders}) > 1
    assert round_orders(names, 15) == orders
    assert round_orders(names, 15, seed=1) != orders  # each input of a run its own orders
    assert round_orders(names, 0) == []
