"""What the experiment scripts share: arguments, one evaluation per mask setting, plots.

Every setting is a ``cad-spconv eval`` run (:func:`cad_apps.eval.evaluate`) writing its own
JSON under ``<out>/runs/``, so an interrupted experiment resumes where it stopped and any point of
a plot can be inspected image by image.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
from typing import Sequence

from cad_apps.eval import (LimitLoweredError, add_setting_arguments, config_from_args, evaluate,
                           parse_mask)
from cad_apps.io import write_json_atomic

__all__ = ["base_parser", "run_setting", "point", "dense_points", "write_report", "plot_tradeoff",
           "setting_label", "learned_labels", "lattice_split_only"]


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


def base_parser(description: str) -> argparse.ArgumentParser:
    """``cad-spconv eval``'s setting options (one definition), plus the output folder."""
    p = argparse.ArgumentParser(description=description)
    add_setting_arguments(p)
    p.add_argument("--out", required=True, help="output folder (JSON, PNG, per-setting runs)")
    p.add_argument("--title", help="plot title (default: model and strides)")
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
            raise SystemExit(f"the estimators {other} and {paths[i]} would share the result file "
                             f"runs/{label}.json; give them folders or files of other names")
    return labels


def run_setting(args, mask: str, label: str | None = None) -> dict:
    """Evaluate one mask setting (resuming ``<out>/runs/<label>.json``, by default
    :func:`setting_label`); returns the results."""
    cfg = dataclasses.replace(
        config_from_args(args), mask=mask,
        out=os.path.join(args.out, "runs", (label or setting_label(mask)) + ".json"))
    try:
        result = evaluate(cfg)
    except LimitLoweredError as e:  # the baselines' files are shared by the scripts of one --out
        raise SystemExit(f"{e}\n(experiments sharing --out share these files: give them all "
                         "the same --limit, or this one another --out)") from None
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
    report = {"experiment": experiment,
              "config": {k: getattr(args, k) for k in (
                  "data_root", "split", "model", "checkpoint", "finest_stride", "coarsest_stride",
                  "dilation", "sparse_head", "dtype", "limit")},
              "points": list(points), **extra}
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


def dense_points(args) -> list[dict]:
    """The two baselines through the same path: nothing kept and everything kept."""
    return [point(run_setting(args, "none"), f"stride {args.coarsest_stride} (none kept)", "dense"),
            point(run_setting(args, "all"), f"stride {args.finest_stride} (all kept)", "dense")]


def finish(args, experiment: str, points: Sequence[dict], title: str) -> int:
    """Write ``<experiment>.json`` and ``<experiment>.png`` under ``args.out`` and print one
    line per point."""
    path = os.path.join(args.out, f"{experiment}.json")
    write_report(path, experiment, args, points)
    plot_tradeoff(os.path.join(args.out, f"{experiment}.png"), points, title, args)
    for p in points:
        miou = p["miou"] if p["miou"] is None else round(p["miou"], 4)
        print(f"{p['label']:>28}: mIoU {miou}  {p['macs_per_image'] / 1e9:.2f} GMA "
              f"({p['macs_fraction_of_finest']:.1%} of stride {args.finest_stride})  kept "
              f"{p['level0_share']:.1%}")
    print(f"wrote {path} and {experiment}.png")
    return 0
