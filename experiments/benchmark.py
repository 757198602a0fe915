"""The benchmark suites behind BENCHMARKS.md.

    python -m experiments.benchmark cpu       # DeepLabV3-ResNet101 backbone, 512x1024, 2 threads
    python -m experiments.benchmark targets   # the CPU targets: float32 / bfloat16, thresholds
                                              # 0.15 / 0.35 / 0.95, batch 1 and 4, nothing /
                                              # everything kept, whole models (dense / sparse head)
    python -m experiments.benchmark compiled  # the targets against compiled dense networks
                                              # (--compile-dense: CAD folded, dense stages
                                              # compiled, as cad[auto,compiled])
    python -m experiments.benchmark ops       # one 3x3 conv after the adaptive step, per engine
    python -m experiments.benchmark gpu       # 1024x2048, batch 1 and 4, fp32 (TF32 on / off)
                                              # / fp16 / bf16, every engine
    python -m experiments.benchmark cpu --dry-run   # print the commands only
    python -m experiments.benchmark report    # the targets table from experiments/results/
    python -m experiments.benchmark targets --results experiments/results/epyc-avx2
                                              # results of one machine in a folder of their own

Each suite runs ``cad-spconv bench`` (``cad_apps/bench``) in a fresh process per result with
the settings below, writes JSON under ``experiments/results/`` and appends a table headed by
the exact command to ``BENCHMARKS.md``. Pass ``--no-markdown`` to leave BENCHMARKS.md alone and
``--reps N`` to change the number of timed runs per frame (the nothing / everything kept
results time one frame N times per frame given). A result file that exists in ``--results``
is not replaced (it may hold another machine's numbers): the suite refuses before any run;
give each machine a folder of its own or pass ``--overwrite``. Frames: the three Cityscapes
frames in ``../shared/data/cityscapes_frames`` (``--frames DIR`` to use others).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_FRAMES = os.path.join(ROOT, "..", "shared", "data", "cityscapes_frames")


def suites(frames: list[str], reps: int) -> dict[str, list[tuple[str, list[str]]]]:
    """Suite name -> [(result name, bench arguments)]."""
    edge = ["--images", *frames, "--threshold", "0.35", "--dilation", "11"]
    common = ["--reps", str(reps), "--warmup", "1"]
    cpu = ["--device", "cpu", "--threads", "2"]
    out = {
        "cpu": [("cpu_deeplabv3_resnet101_512x1024",
                 ["--model", "deeplabv3_resnet101", "--size", "512", "1024", *edge, *cpu,
                  "--engine", "auto", *common])],
        "ops": [("cpu_conv3x3_256_512x1024",
                 ["--model", "conv3x3", "--channels", "256", "--size", "512", "1024", *edge, *cpu,
                  "--engine", "lattice,torch,spconv", *common]),
                ("cpu_conv3x3_512_512x1024",
                 ["--model", "conv3x3", "--channels", "512", "--size", "512", "1024", *edge, *cpu,
                  "--engine", "lattice,torch", *common])],
        "targets": [],
        "compiled": [],
        "gpu": [],
    }
    # nothing / everything kept: one frame (the mask does not matter), timed as often as the
    # other settings' frames together, so that its median rests on as many runs
    one = ["--images", frames[0], "--reps", str(reps * len(frames)), "--warmup", "1"]
    for dtype in ("float32", "bfloat16"):
        d = ["--dtype", dtype]
        net = ["--model", "deeplabv3_resnet101", "--size", "512", "1024", *cpu, *d]
        run = [*net, *common]
        for thr in ("0.15", "0.35", "0.95"):
            out["targets"].append((f"cpu_{dtype}_b1_edge{thr}",
                                   [*run, "--images", *frames, "--threshold", thr]))
        out["targets"].append((f"cpu_{dtype}_b4_edge0.35",
                               [*run, "--images", *frames, "--threshold", "0.35", "--batch", "4"]))
        for keep in ("none", "all"):
            out["targets"].append((f"cpu_{dtype}_b1_keep_{keep}", [*net, *one, "--keep", keep]))
        # nothing kept with CAD's densified output in a kept buffer, as a video loop would:
        # fresh pages for it under glibc are 2-4 % of dense 16 (BENCHMARKS.md)
        out["targets"].append((f"cpu_{dtype}_b1_keep_none_reuse_output",
                               [*net, *one, "--keep", "none", "--reuse-output"]))
        out["targets"].append((f"cpu_{dtype}_b1_model_edge0.35",
                               [*run, *edge, "--scope", "model"]))
        out["targets"].append((f"cpu_{dtype}_b1_model_sparse_head_edge0.35",
                               [*run, *edge, "--scope", "model", "--sparse-head"]))
        if dtype == "bfloat16":  # oneDNN's bfloat16 ASPP convs slowed 4-14x with their
            # dilation (adapters/dilated.py): the whole models again with both sides' dense
            # dilated convs as im2col GEMMs, the faster dense configuration
            for head in ([], ["--sparse-head"]):
                name = "model_sparse_head" if head else "model"
                out["targets"].append((f"cpu_{dtype}_b1_{name}_edge0.35_im2col_dilated",
                                       [*run, *edge, "--scope", "model", *head,
                                        "--im2col-dilated"]))
    # the targets against the dense networks compiled (torch.compile, weights frozen), CAD
    # alike (batch norms folded, its dense stages compiled: cad[auto,compiled]); the fastest
    # dense configuration is always a compiled channels-last one, so NCHW is left out
    compiled = ["--compile-dense", "--fold-bn", "--dense-format", "channels_last"]
    for dtype in ("bfloat16", "float32"):
        net = ["--model", "deeplabv3_resnet101", "--size", "512", "1024", *cpu, "--dtype", dtype,
               *compiled]
        for thr in ("0.15", "0.35", "0.95"):
            out["compiled"].append((f"cpu_{dtype}_b1_edge{thr}_compiled",
                                    [*net, *common, "--images", *frames, "--threshold", thr]))
        out["compiled"].append((f"cpu_{dtype}_b4_edge0.35_compiled",
                                [*net, *common, "--images", *frames, "--threshold", "0.35",
                                 "--batch", "4"]))
        for keep in ("none", "all"):
            out["compiled"].append((f"cpu_{dtype}_b1_keep_{keep}_compiled",
                                    [*net, *one, "--keep", keep]))
        out["compiled"].append((f"cpu_{dtype}_b1_keep_none_reuse_output_compiled",
                                [*net, *one, "--keep", "none", "--reuse-output"]))
        # the whole models (dense head at stride 8); not with --im2col-dilated, which the bench
        # refuses with --compile-dense (inductor picks its own route for the dilated convs)
        for head in ([], ["--sparse-head"]):
            name = "model_sparse_head" if head else "model"
            out["compiled"].append((f"cpu_{dtype}_b1_{name}_edge0.35_compiled",
                                    [*net, *common, *edge, "--scope", "model", *head]))
    # batch 1: every engine ("auto" is "torch" on CUDA); batch 4: auto, tuned and spconv's
    # implicit GEMM (lattice and spconv ran 1.8-3x slower than torch at batch 1, BENCHMARKS.md).
    # float32 with TF32 (the cuDNN default) and without, after the three dtypes
    base = ["--model", "deeplabv3_resnet101", "--size", "1024", "2048", "--images", *frames,
            "--dilation", "11", "--device", "cuda", *common]
    gpu = [*base, "--threshold", "0.35"]
    engines = {1: "auto,lattice,spconv,spconv-igemm,tuned", 4: "auto,spconv-igemm,tuned"}
    for batch in (1, 4):
        run = [*gpu, "--engine", engines[batch], "--batch", str(batch)]
        for dtype in ("float32", "float16", "bfloat16"):
            out["gpu"].append((f"gpu_deeplabv3_resnet101_1024x2048_b{batch}_{dtype}",
                               [*run, "--dtype", dtype]))
        out["gpu"].append((f"gpu_deeplabv3_resnet101_1024x2048_b{batch}_float32_tf32off",
                           [*run, "--dtype", "float32", "--tf32", "off"]))
    # not in the first GPU run (2026-12-04): the other ends and batch norm folded on both sides
    for dtype in ("float16", "float32"):
        out["gpu"].append((f"gpu_deeplabv3_resnet101_1024x2048_b1_{dtype}_edge0.95",
                           [*base, "--threshold", "0.95", "--engine", "auto,tuned",
                            "--dtype", dtype]))
        out["gpu"].append((f"gpu_deeplabv3_resnet101_1024x2048_b1_{dtype}_keep_none",
                           [*gpu, "--engine", "auto", "--dtype", dtype, "--keep", "none"]))
    out["gpu"].append(("gpu_deeplabv3_resnet101_1024x2048_b1_float16_fold_bn",
                       [*gpu, "--engine", "auto,tuned", "--dtype", "float16", "--fold-bn"]))
    return out


#: the targets of issue 14 (BENCHMARKS.md, "The CPU targets")
MIN_EFF, NOTHING_KEPT_VS_DENSE_16, ALL_KEPT_VS_DENSE_8 = 0.9, 1.05, 1.10


def verdict(cfg: dict, cad: dict, peaks: list) -> tuple[str, bool, bool]:
    """(setting, speed target met, memory target met) of one targets result: ``cfg`` its
    config, ``cad`` its summary of the CAD engine, ``peaks`` (dense 8's, CAD's) peak per
    input. Edges: eff >= 0.9 and CAD faster than dense stride 8; nothing kept: <= 1.05 x dense
    stride 16; all kept: <= 1.10 x dense stride 8; memory: CAD's peak <= dense 8's, every
    input."""
    if cfg.get("keep") == "none":
        setting = "nothing kept"
    elif cfg.get("keep") == "all":
        setting = "all kept"
    else:
        setting = f"edge {cfg['threshold']:g}" + (
            "" if cfg.get("scope") != "model" else
            (", whole model, sparse head" if cfg.get("sparse_head") else ", whole model"))
    if cfg.get("reuse_output"):  # not the default run: say so wherever the verdict shows
        setting += ", output buffer reused"
    if cfg.get("im2col_dilated"):
        setting += ", dilated convs as im2col GEMMs"
    if cfg.get("compile_dense"):
        setting += ", compiled (CAD: batch norms folded, dense stages compiled)"
    return setting, speed_met(cfg, cad), all(c <= d for d, c in peaks)


def compared_engine(cfg: dict, summary: dict) -> str:
    """The CAD engine a result's verdict is about: its first engine, or where the dense
    networks were also compiled (``--compile-dense``) its compiled form (``<engine>,compiled``,
    the configuration comparable with them)."""
    engines = list(summary["cad"])
    if cfg.get("compile_dense"):
        return next((e for e in engines if e.endswith(",compiled")), engines[0])
    return engines[0]


def target_ratio(cfg: dict, ratios: dict) -> float:
    """The ratio a setting's speed target bounds: nothing kept's CAD / dense 16, else CAD /
    dense 8 (``ratios``: a summary's or :func:`~cad_apps.bench.report.paired_ratios`')."""
    return ratios["vs_dense_coarse" if cfg.get("keep") == "none" else "vs_dense_fine"]


def speed_met(cfg: dict, cad: dict) -> bool:
    """Whether the ratios ``cad`` (``vs_dense_fine``, ``vs_dense_coarse``, ``eff``) meet the
    setting's speed target."""
    ratio = target_ratio(cfg, cad)
    if cfg.get("keep") == "none":
        return ratio <= NOTHING_KEPT_VS_DENSE_16
    if cfg.get("keep") == "all":
        return ratio <= ALL_KEPT_VS_DENSE_8
    return cad["eff"] >= MIN_EFF and ratio < 1


def report(results_dir: str) -> str:
    """The CPU targets as a markdown table, from the ``targets`` suite's result files, headed by
    the machine(s) they were measured on."""
    import json

    from cad_apps.bench import report as bench_report

    machines, commits = set(), collections.Counter()
    rows = ["| result | dtype | batch | setting | MAC fraction | dense 8 best [ms] | CAD [ms] | "
            "CAD / dense 8 | eff | vs dense 16 | peak MiB dense 8 / CAD, resident set (live "
            "tensors) | runs' spread | paired | target |",
            "|" + "---|" * 14]
    paths = [p for dtype in ("float32", "bfloat16")
             for p in sorted(glob.glob(os.path.join(results_dir, f"cpu_{dtype}_b*_*.json")))
             if not p.endswith("_memory.json")]
    for path in paths:
        with open(path) as f:
            r = json.load(f)
        cfg, s = r["config"], r["summary"]
        env = r["environment"]
        machines.add(f"{env['cpu']} ({', '.join(env.get('cpu_flags') or ['flags not recorded'])}"
                     f"), torch {env['torch']}, {env['threads']} threads"
                     + bench_report.recorded_settings(env))
        source = env.get("source")  # recorded from 2026-12-06 12:36
        commits[(source["commit"][:7] + (" with uncommitted changes" if source["modified"]
                                         else "")) if source else "commit not recorded"] += 1
        engine = compared_engine(cfg, s)
        c = s["cad"][engine]
        per = r["inputs"]
        if os.path.exists(path[:-5] + "_memory.json"):  # the memory pass, if it ran
            with open(path[:-5] + "_memory.json") as f:
                per = json.load(f)["inputs"]
        # per input, the dense variant the timed run found fastest (not the memory pass's
        # single run's pick: a format flipped by one noisy run would change the comparison)
        fastest = [min((n for n, e in v["variants"].items() if e["kind"] == "dense_fine"),
                       key=lambda n, v=v: v["variants"][n]["seconds"]) for v in r["inputs"]]

        def peaks(key, *more):
            """(dense, CAD) per input: ``key``, or with ``more`` the sum of those keys, where
            either side has it"""
            out = []
            for k, v in enumerate(per):
                dense = v["variants"][fastest[k]] if len(per) == len(fastest) else min(
                    (e for e in v["variants"].values() if e["kind"] == "dense_fine"),
                    key=lambda e: e["seconds"])
                cad = v["variants"].get(f"cad[{engine}]") or next(
                    e for e in v["variants"].values() if e["kind"] == "cad")
                if more:
                    both = [sum(e.get(k, 0) for k in (key, *more)) for e in (dense, cad)]
                    if any(both):
                        out.append(tuple(both))
                elif dense.get(key) and cad.get(key):
                    out.append((dense[key], cad[key]))
            return out
        rss, tensors = peaks("peak_bytes"), peaks("peak_tensor_bytes")
        # what each side holds between runs (in both peaks): a compiled graph's frozen
        # weights, the engines' caches, a reused output buffer
        kept = peaks("kept_state_bytes", "engine_cache_bytes", "output_buffer_bytes")
        peak = " ; ".join(f"{a / 2 ** 20:.0f} / {b / 2 ** 20:.0f}" for a, b in rss)
        if tensors:
            peak += " (tensors " + " ; ".join(f"{a / 2 ** 20:.0f} / {b / 2 ** 20:.0f}"
                                               for a, b in tensors) + ")"
        if kept:
            peak += ", of which held between runs " + " ; ".join(
                f"{a / 2 ** 20:.0f} / {b / 2 ** 20:.0f}" for a, b in kept)
        name = os.path.basename(path)[:-5]
        setting, ok, memory_ok = verdict(cfg, c, tensors or rss)
        # the largest max / min of one variant's timed runs: above NOISY_SPREAD the machine
        # was busy and the verdict may flip in a rerun
        spread = bench_report.timing_spread(r["inputs"])
        spread = "n/a" if spread is None else f"{spread[0]:.2f}" + (
            " (noisy)" if spread[0] > bench_report.NOISY_SPREAD else "")
        # the same ratio, paired by round (recomputed: results before 2026-12-06 19:50 lack it)
        paired = bench_report.paired_ratios(r["inputs"], engine)
        target = "met" if ok else "missed"
        if paired is None:
            paired_cell = "n/a"
        else:
            paired_cell = f"{target_ratio(cfg, paired):.3f}"
            paired_ok = speed_met(cfg, {**paired, "eff": c["mac_fraction"]
                                        / paired["vs_dense_fine"]})
            if paired_ok != ok:
                target += f" (paired: {'met' if paired_ok else 'missed'})"
        rows.append(f"| {name} | {cfg['dtype']} | {cfg['batch']} | {setting} | "
                    f"{c['mac_fraction']:.3f} | {1e3 * s['dense_fine_seconds']:.0f} | "
                    f"{1e3 * c['seconds']:.0f} | {c['vs_dense_fine']:.3f} | {c['eff']:.2f} | "
                    f"{c['vs_dense_coarse']:.3f} | {peak or 'n/a'} | {spread} | {paired_cell} | "
                    f"{target}{'' if memory_ok else ', memory missed'} |")
    if not paths:
        return f"no targets results in {results_dir}"
    code = ", ".join(f"{name} ({n} result{'s' if n > 1 else ''})" for name, n in commits.items())
    return "\n".join([f"Measured on: {'; '.join(sorted(machines))}.", f"Code: {code}.", "",
                      *rows])


def _selected(args, chosen, frames):
    """``(suite, result name, bench arguments)`` of the results this command runs."""
    from cad_apps.bench.report import native_bfloat16

    for suite in chosen:
        for name, bench_args in suites(frames, args.reps)[suite]:
            if args.only and args.only not in name:
                continue
            if suite == "targets" and "bfloat16" in name and not native_bfloat16():
                print(f"skipping {name}: this CPU has no native bfloat16 (AVX512-BF16 or AMX); "
                      "emulated bfloat16 is not a speed setting", flush=True)
                continue
            if args.memory_pass:
                name += "_memory"
                bench_args = [*bench_args, "--reps", "1"]
            yield suite, name, bench_args


def _refuse_existing(parser, args, chosen, frames) -> None:
    """Refuse, before any run, result files that exist in ``--results`` (they may hold
    another machine's measurements, which a run would replace without a word)."""
    import json

    existing = [p for p in _result_paths(args, chosen, frames) if os.path.exists(p)]
    if not existing:
        return
    machines = set()
    for p in existing:
        try:
            with open(p) as f:
                machines.add(json.load(f)["environment"]["cpu"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    parser.error(f"{len(existing)} result file(s) exist: {', '.join(existing)}"
                 + (f" (measured on {'; '.join(sorted(machines))})" if machines else "")
                 + "; give this machine a new --results folder of its own (e.g. --results "
                 f"{os.path.join(os.path.dirname(os.path.normpath(args.results)), 'MACHINE')}), "
                 "or pass --overwrite to replace them")


def _refuse_busy(parser, args, chosen, frames) -> None:
    """Refuse, before any run, a result file that another run writes now (bench holds its
    ``--json``'s lock for the whole run): found at its turn, it would fail after hours."""
    from cad_apps.io import OutputBusyError, check_not_busy

    for path in _result_paths(args, chosen, frames):
        try:
            check_not_busy(path, "--results")
        except OutputBusyError as e:
            parser.error(str(e))


def _result_paths(args, chosen, frames) -> list[str]:
    """The result files the selected runs write, in ``--results``."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the skip notes come with the run
        return [os.path.join(args.results, f"{name}.json")
                for _, name, _ in _selected(args, chosen, frames)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=("cpu", "targets", "compiled", "ops", "gpu", "all",
                                          "report"))
    parser.add_argument("--only", default=None, help="run only the results whose name "
                        "contains this text")
    parser.add_argument("--memory-pass", action="store_true",
                        help="one timed run per variant, results as <name>_memory.json: the "
                             "memory columns of the report (the times come from the full run)")
    parser.add_argument("--frames", default=DEFAULT_FRAMES, help="folder of RGB frames")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-markdown", action="store_true")
    parser.add_argument("--results", default=os.path.join("experiments", "results"),
                        help="folder of the result JSON files, relative to the project root "
                             "(default: experiments/results)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace result files that exist in --results (default: refuse, "
                             "before any run: they may hold another machine's measurements; "
                             "give each machine a --results folder of its own)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.suite == "report":
        print(report(os.path.join(ROOT, args.results)))
        return 0
    chosen = (args.suite,)
    if args.suite == "all":
        import torch

        chosen = ("cpu", "ops") + (("gpu",) if torch.cuda.is_available() else ())
    if args.only:
        names = [name for suite in chosen for name, _ in suites(["FRAME"], args.reps)[suite]]
        if not any(args.only in name for name in names):
            parser.error(f"--only {args.only!r} matches no result of {', '.join(chosen)}; "
                         f"the results are: {', '.join(names)}")
    frames = sorted(glob.glob(os.path.join(args.frames, "*.png")))
    if not frames:
        parser.error(f"no PNG frames in --frames {args.frames}: give a folder of Cityscapes "
                     "frames (e.g. ../shared/data/cityscapes_frames)")
    frames = [os.path.relpath(f, ROOT) for f in frames]
    os.chdir(ROOT)
    if not (args.dry_run or args.overwrite):
        _refuse_existing(parser, args, chosen, frames)
    if not args.dry_run:
        _refuse_busy(parser, args, chosen, frames)
    import subprocess

    if not args.dry_run:
        os.makedirs(args.results, exist_ok=True)
    failed = []
    for _, name, bench_args in _selected(args, chosen, frames):
        full = ["bench", *bench_args, "--json", os.path.join(args.results, f"{name}.json"),
                "--label", name]
        if not args.no_markdown:
            full += ["--markdown", "BENCHMARKS.md"]
        command = "cad-spconv " + shlex.join(full)
        print(command, flush=True)
        if args.dry_run:
            continue
        # one process per result: no caches, heap or tuned choices carried over; a failed
        # result (out of memory, a bad frame) is reported at the end, the rest still run
        done = subprocess.run([sys.executable, "-m", "cad_apps.cli", *full])
        if done.returncode:
            print(f"{name}: failed (exit code {done.returncode}); going on", flush=True)
            failed.append(name)
    if failed:
        print(f"{len(failed)} result(s) failed: {', '.join(failed)} (their output is above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
