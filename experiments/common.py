"""What the experiment scripts share: arguments, one evaluation per mask setting, plots.

Every setting is a ``cad-spconv eval`` run (:func:`cad_apps.eval.evaluate`) writing its own
JSON under ``<out>/runs/``, so an interrupted experiment resumes where it stopped and any point of
a plot can be inspected image by image.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import re
import shlex
import sys
from typing import Sequence

from cad_apps.eval import (INPUT_ERRORS, LimitLoweredError, add_setting_arguments,
                           config_from_args, evaluate, parse_mask)
from cad_apps.io import error_text, write_json_atomic

__all__ = ["base_parser", "run_setting", "run_points", "Setting", "baselines", "point",
           "write_report", "plot_tradeoff", "setting_label", "learned_labels",
           "lattice_split_only", "ExperimentError", "ExperimentParser", "reports_errors",
           "check_settings", "check_mask", "provenance", "table_header", "mask_value",
           "bench_variants", "paired_ms", "timed_ms", "INPUT_ERRORS", "POINTS_EPILOG"]


class ExperimentError(Exception):
    """Bad input to an experiment script: reported in one line, exit status 2
    (:func:`reports_errors`)."""


def reports_errors(name: str):
    """Decorate a script's ``main(argv)``: an :class:`ExperimentError` is printed as one line
    ``experiments.<name>: error: ...`` on stderr and ``main`` returns 2, as ``cad-spconv eval``
    does for bad input."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            try:
                return main(argv)
            except ExperimentError as e:
                print(f"experiments.{name}: error: {error_text(e)}", file=sys.stderr)
                return 2
        return run
    return wrap


class ExperimentParser(argparse.ArgumentParser):
    """An argument parser that also notes what :func:`provenance` records: the command line as
    given and the load average before any work (``args._command``, ``args._load_before``)."""

    def parse_args(self, args=None, namespace=None):
        from cad_apps.bench.report import loadavg

        argv = list(sys.argv[1:] if args is None else args)
        ns = super().parse_args(argv, namespace)
        ns._command = " ".join([self.prog, shlex.join(argv)]).strip()
        ns._load_before = loadavg()
        return ns


def provenance(args, device=None) -> dict:
    """What makes a report's numbers traceable: the command line, every setting it ran with
    (the defaults included) and the machine (:func:`cad_apps.bench.report.environment`: CPU
    model and flags, torch, threads, the GPU where ``device`` is one)."""
    import torch

    from cad_apps.bench.report import environment
    from cad_apps.distributed import resolve_device

    if device is None:
        device = resolve_device(getattr(args, "device", None))
    return {"command": getattr(args, "_command", None),
            "config": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "environment": environment(torch.device(device), getattr(args, "_load_before", None))}


def bench_variants(argv: Sequence[str]):
    """What ``cad-spconv bench`` with arguments ``argv`` would time, built as it builds them:
    (its parsed arguments, its device / dtype config, variant name -> ``Variant``), the random
    weights drawn after ``torch.manual_seed(--seed)`` as the bench draws them."""
    import torch

    from cad_apps.bench import _check_args, configure
    from cad_apps.bench.variants import build_variants

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(list(argv))
    cfg = _check_args(args)
    torch.manual_seed(args.seed)
    variants = build_variants(args, cfg["device"], cfg["dtype"])["variants"]
    return args, cfg, {v.name: v for v in variants}


def paired_ms(first, second, pairs: int) -> tuple[list[float], list[float]]:
    """ms of ``pairs`` rounds of two CPU runs back to back, in turns (``second`` leads the even
    rounds, ``first`` the odd ones), after one untimed run of each (rulebooks, weight layouts,
    the fused kernel), under ``torch.inference_mode``: a slow drift of the host's speed cancels
    in a round's ratio. Returns (``first``'s times, ``second``'s times)."""
    import torch

    from cad_apps.bench.measure import _time_once

    cpu = torch.device("cpu")
    times = ([], [])
    with torch.inference_mode():
        first()
        second()
        for i in range(pairs):
            for k in ((0, 1) if i % 2 else (1, 0)):
                times[k].append(1e3 * _time_once((first, second)[k], (), cpu))
    return times


def paired_ratio(first_ms, second_ms) -> float:
    """The median of the per-pair ratios ``first / second`` of two runs timed in pairs
    (:func:`paired_ms`): a slow drift of the host's speed cancels in each pair."""
    import statistics

    return statistics.median(a / b for a, b in zip(first_ms, second_ms))


def timed_ms(fn, reps: int, warmup: int = 3) -> list[float]:
    """ms of ``reps`` calls of ``fn`` on the CPU after ``warmup`` untimed ones, by the bench's
    timer (each result released before the next call)."""
    import torch

    from cad_apps.bench.measure import _time_once

    for _ in range(warmup):
        fn()
    cpu = torch.device("cpu")
    return [1e3 * _time_once(fn, (), cpu) for _ in range(reps)]


def table_header(args, device="cpu") -> str:
    """The lines heading a printed timing table (the tables go into BENCHMARKS.md): the command
    and the machine, from :func:`provenance` (CPU model and instruction-set flags, torch, threads,
    the GPU where ``device`` is one, the tuning environment variables that were set, the fused
    kernel's mode)."""
    from cad_apps.bench.report import recorded_settings

    env = provenance(args, device)["environment"]
    flags = ", ".join(env["cpu_flags"]) or "flags not recorded"
    where = (f"{env['gpu']}, " if env.get("gpu") else "") + (
        f"{env['cpu']} ({flags}; torch CPU capability {env['cpu_capability']}), "
        f"{env['threads']} threads")
    return (f"command: {getattr(args, '_command', None) or '(not recorded)'}\n"
            f"machine: {where}, torch {env['torch']}{recorded_settings(env)}")


def mask_value(kind: str):
    """An argparse ``type`` for the numbers of ``kind`` masks (edge thresholds, random
    fractions), checked as ``--mask`` checks them, so a bad one is refused before any work."""
    from cad_apps.eval.config import check_mask_value

    def parse(text: str) -> float:
        try:
            number = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        try:
            return check_mask_value(number, text, upper=1 if kind == "random" else None)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = f"{kind} value"
    return parse


@contextlib.contextmanager
def lattice_split_only():
    """The ``"lattice"`` engine without its hand-over to the products engine
    (``lattice.products_pay``), so that timings of the lattice split itself also cover the
    shapes the rule hands over (the ASPP's 2048 -> 256)."""
    import cad_spconv.engines.lattice as lattice

    pays = lattice.products_pay
    lattice.products_pay = lambda *a: False
    try:
        yield
    finally:
        lattice.products_pay = pays


class _Refused(argparse.Action):
    """An option of ``cad-spconv eval`` the scripts do not take: refused by name, not in --help."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string}: the experiment scripts compare masks of the "
                     "content-adaptive network; evaluate the plain network with "
                     f"`cad-spconv eval {option_string} S` instead")


#: the --help of the scripts whose report is a list of points (tradeoff, inadequate_masks)
POINTS_EPILOG = ("The report holds the settings of this command only. Points of an earlier run "
                 "into the same --out that this command leaves out are named on the terminal; "
                 "their results stay in <out>/runs/ and come back when the command names them "
                 "again.")


def base_parser(description: str, name: str, evaluates: bool = True,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """``cad-spconv eval``'s setting options (one definition), plus the output folder; with
    ``evaluates`` also ``--overwrite`` (start the settings' runs over). ``--dense`` (the plain
    network, no mask) is refused: the scripts compare mask settings."""
    p = ExperimentParser(prog=f"python -m experiments.{name}", description=description,
                         epilog=epilog, conflict_handler="resolve")
    add_setting_arguments(p)
    p.add_argument("--dense", dest="dense", default=None, nargs="?", action=_Refused,
                   help=argparse.SUPPRESS)
    p.add_argument("--out", required=True, help="output folder (JSON, PNG, per-setting runs)")
    p.add_argument("--title", help="plot title (default: model and strides)")
    if evaluates:
        p.add_argument("--overwrite", action="store_true",
                       help="evaluate every setting of this command again, replacing its file "
                            "in <out>/runs/ (default: resume it; the baselines' files are "
                            "shared by the scripts of one --out)")
    return p


def setting_label(mask: str, with_folder: bool = False) -> str:
    """File-system friendly name of a mask setting; a learned estimator's is its file name, or
    with ``with_folder`` its folder and file name (train-mask always writes ``OUT/last.pt``,
    so the file alone does not tell two runs apart: :func:`learned_labels`)."""
    spec = parse_mask(mask)
    if spec.kind == "learned" and spec.path:
        path = os.path.abspath(spec.path)
        stem = os.path.splitext(os.path.basename(path))[0]
        text = (f"learned_{os.path.basename(os.path.dirname(path))}_{stem}" if with_folder
                else f"learned_{stem}")
    else:
        text = str(spec)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def learned_labels(paths) -> list[str]:
    """The result-file labels of ``learned:PATH`` settings: by file name, or by folder and file
    name for files whose names repeat (two train-mask runs' ``last.pt``). Refuses, before any
    work, two paths that still share a label (the second would find the first's file)."""
    paths = [os.path.abspath(p) for p in paths]
    names = [os.path.basename(p) for p in paths]
    labels = [setting_label(f"learned:{p}", with_folder=names.count(n) > 1)
              for p, n in zip(paths, names)]
    for i, label in enumerate(labels):
        other = next((p for p, l in zip(paths[:i], labels) if l == label and p != paths[i]), None)
        if other:
            raise ExperimentError(f"the estimators {other} and {paths[i]} would share the result "
                                  f"file runs/{label}.json; give them folders or files of other "
                                  "names")
    return labels


@dataclasses.dataclass(frozen=True)
class Setting:
    """One point of an experiment: ``mask``, the point's ``name`` and ``group`` in the report and
    plot, the ``option`` that asked for it (named in error messages) and the result file's
    ``label`` (default :func:`setting_label`)."""

    mask: str
    name: str
    group: str
    option: str
    label: str | None = None


def baselines(args) -> list[Setting]:
    """The two baselines: nothing kept and everything kept."""
    return [Setting("none", f"stride {args.coarsest_stride} (none kept)", "dense",
                    "the nothing-kept baseline (mask none)"),
            Setting("all", f"stride {args.finest_stride} (all kept)", "dense",
                    "the everything-kept baseline (mask all)")]


def _setting_config(args, mask: str, label: str | None = None):
    return dataclasses.replace(
        config_from_args(args), mask=mask,
        out=os.path.join(args.out, "runs", (label or setting_label(mask)) + ".json"))


def check_mask(option: str, mask: str) -> None:
    """``mask`` parses, and a learned estimator's file exists; else :class:`ExperimentError`
    naming ``option``."""
    try:
        spec = parse_mask(mask)
    except ValueError as e:
        raise ExperimentError(f"{option}: {e}") from None
    if spec.kind == "learned" and spec.path and not os.path.isfile(spec.path):
        raise ExperimentError(f"{option} {mask}: no such file {spec.path}; give a mask "
                              "estimator checkpoint (written by `cad-spconv train-mask`)")


def _limit_lowered(e: LimitLoweredError) -> ExperimentError:
    # the baselines' files are shared by the scripts of one --out
    return ExperimentError(f"{e} (experiments sharing --out share these files: give them all "
                           "the same --limit, or this one another --out)")


def check_settings(args, settings: Sequence[Setting]) -> None:
    """Check every setting of a command before the first is evaluated: the shared options, the
    data root, each mask (a learned estimator's file exists) and each result file in
    ``<out>/runs/`` (one written with other settings, holding images beyond ``--limit`` or being
    written by another live process is refused, with a fix). Raises :class:`ExperimentError`."""
    from cad_apps.data import CityscapesSegmentation
    from cad_apps.distributed import resolve_device
    from cad_apps.eval.loop import check_images
    from cad_apps.eval.results import load_results
    from cad_apps.io import check_not_busy, check_output_path

    try:  # the shared options, under a mask every stride pair and semantics allows (each
        # setting's own mask is checked below: the default edge mask is not always one)
        resolve_device(dataclasses.replace(config_from_args(args), mask="none").check().device)
        check_output_path(args.out, folder=True)
        dataset = CityscapesSegmentation(args.data_root, args.split, limit=args.limit)
    except INPUT_ERRORS as e:
        raise ExperimentError(error_text(e)) from None
    for s in settings:
        check_mask(s.option, s.mask)
        try:
            cfg = _setting_config(args, s.mask, s.label).check()
            check_not_busy(cfg.out)  # another run writing it: refused now, not at its turn
            done = load_results(check_output_path(cfg.out), cfg)["images"]  # other settings:
            check_images(cfg.out, done, dataset.ids, cfg)  # refused; so is a lowered --limit
        except LimitLoweredError as e:
            raise _limit_lowered(e) from None
        except INPUT_ERRORS as e:
            raise ExperimentError(f"{s.option}: {error_text(e)}") from None


def run_points(args, settings: Sequence[Setting]) -> list[dict]:
    """:func:`check_settings`, then one :func:`point` per setting, in order."""
    check_settings(args, settings)
    return [point(run_setting(args, s.mask, s.label), s.name, s.group) for s in settings]


def run_setting(args, mask: str, label: str | None = None) -> dict:
    """Evaluate one mask setting (resuming ``<out>/runs/<label>.json``, by default
    :func:`setting_label`); returns the results. Bad input (the eval's errors) raises
    :class:`ExperimentError`."""
    try:
        result = evaluate(_setting_config(args, mask, label))
    except LimitLoweredError as e:
        raise _limit_lowered(e) from None
    except INPUT_ERRORS as e:
        raise ExperimentError(f"mask {mask}: {error_text(e)}") from None
    if result is None:
        raise RuntimeError("experiments run in one process; use `cad-spconv eval` under torchrun")
    return result


def point(result: dict, label: str, group: str) -> dict:
    """One row of an experiment report: the numbers a plot needs, from an eval result."""
    s = result["summary"]
    return {"label": label, "group": group, "mask": result["config"]["mask"],
            "miou": s["miou"], "macs_per_image": s["macs_mean"]["total"],
            "macs_parts_per_image": {k: v for k, v in s["macs_mean"].items() if k != "total"},
            "macs_fraction_of_finest": s["macs_fraction_of_finest"],
            "macs_fraction_of_coarsest": s["macs_fraction_of_coarsest"],
            "level0_share": s["level0_share_mean"],
            "time_per_image_s": s["time_per_image_s_median"],
            "dense_finest_macs_per_image": s["macs_dense_finest_mean"],
            "dense_coarsest_macs_per_image": s["macs_dense_coarsest_mean"],
            "num_images": s["num_images"]}


def write_report(path: str, experiment: str, args, points: Sequence[dict], **extra) -> dict:
    report = {"experiment": experiment, **provenance(args), "points": list(points), **extra}
    write_json_atomic(path, report)
    return report


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


GROUP_STYLE = {  # group -> (marker, colour, line)
    "dense": ("s", "black", False),
    "edge": ("o", "tab:blue", True),
    "learned": ("^", "tab:orange", True),
    "oracle": ("*", "tab:green", False),
    "shuffled-edge": ("x", "tab:red", True),
    "inverted-edge": ("v", "tab:purple", True),
    "random": ("D", "tab:gray", True),
}


def plot_tradeoff(path: str, points: Sequence[dict], title: str, args) -> None:
    """mIoU over multiply-adds per image (the paper's Fig. 4 / 6 layout)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    groups: dict[str, list[dict]] = {}
    for p in points:
        if p["miou"] is not None:
            groups.setdefault(p["group"], []).append(p)
    for group, pts in groups.items():
        marker, color, line = GROUP_STYLE.get(group, ("o", None, False))
        pts = sorted(pts, key=lambda p: p["macs_per_image"])
        xs = [p["macs_per_image"] / 1e9 for p in pts]
        ys = [p["miou"] for p in pts]
        ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if line and len(pts) > 1 else "",
                label=group, markersize=9 if marker == "*" else 6)
        for p, x, y in zip(pts, xs, ys):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if points:
        coarse = points[0]["dense_coarsest_macs_per_image"] / 1e9
        ax.axvline(coarse, color="gray", linestyle=":", linewidth=1)
        ax.annotate(f"dense stride {args.coarsest_stride} network", (coarse, ax.get_ylim()[0]),
                    rotation=90, fontsize=7, color="gray", xytext=(2, 4), textcoords="offset points")
    ax.set_xlabel("multiply-adds per image (G)")
    ax.set_ylabel("mIoU")
    ax.set_title(getattr(args, "title", None) or title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _left_out(path: str, points: Sequence[dict]) -> list[str]:
    """The masks of the points in the report at ``path`` (an earlier run's), and those it named
    as left out, that are not in ``points``."""
    import json

    try:
        with open(path) as f:
            report = json.load(f)
        earlier = [p["mask"] for p in report["points"]]
        earlier += [m for m in report.get("left_out_of_earlier_report", []) if m not in earlier]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none, or not a report
        return []
    now = {p["mask"] for p in points}
    return [m for m in earlier if m not in now]


def _resumable(args, mask: str) -> bool:
    """Whether ``runs/`` holds ``mask``'s result under this command's settings (naming the
    mask again resumes it rather than being refused)."""
    from cad_apps.eval.results import load_results

    try:
        cfg = dataclasses.replace(_setting_config(args, mask), overwrite=False).check()
        load_results(cfg.out, cfg)
    except INPUT_ERRORS:
        return False
    return True


def finish(args, experiment: str, points: Sequence[dict], title: str) -> int:
    """Write ``<experiment>.json`` and ``<experiment>.png`` under ``args.out`` and print one
    line per point."""
    path = os.path.join(args.out, f"{experiment}.json")
    left = _left_out(path, points)
    if left:
        stale = [m for m in left if not _resumable(args, m)]
        print(f"note: {path} of an earlier run also held {', '.join(left)}; this command leaves "
              f"them out (their results stay in {os.path.join(args.out, 'runs')}; name them "
              "again to include them" + (f"; {', '.join(stale)} were computed with other "
                                         "settings: naming them again needs --overwrite"
                                         if stale else "") + ")")
    write_report(path, experiment, args, points, left_out_of_earlier_report=left)
    plot_tradeoff(os.path.join(args.out, f"{experiment}.png"), points, title, args)
    for p in points:
        miou = p["miou"] if p["miou"] is None else round(p["miou"], 4)
        print(f"{p['label']:>28}: mIoU {miou}  {p['macs_per_image'] / 1e9:.2f} GMA "
              f"({p['macs_fraction_of_finest']:.1%} of stride {args.finest_stride})  kept "
              f"{p['level0_share']:.1%}")
    print(f"wrote {path} and {experiment}.png")
    return 0
