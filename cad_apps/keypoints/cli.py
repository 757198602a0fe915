"""``cad-spconv keypoints extract | evaluate``: the keypoint description study (paper Sec. 4.3).

Only argparse at import time; torch and friends load when a sub-command runs.
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["configure", "main"]

_EXTRACT = ("SIFT keypoints + D2-Net descriptors (dense at output stride F, or adaptive F -> 8 "
            "with --dilations) for every HPatches image: DIR/<sequence>/<k>.npz + DIR/summary.json")
_EVALUATE = ("mutual-nearest-neighbour matching of feature folders on HPatches: MMA@1..15 "
             "(illumination / viewpoint / all) and multiply-adds; MMA@3 vs multiply-adds plot")


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keypoints_command", metavar="{extract,evaluate}")
    sub.required = True
    ex = sub.add_parser("extract", help=_EXTRACT, description=_EXTRACT)
    ex.add_argument("--data-root", required=True,
                    help="HPatches sequences folder (<root>/<sequence>/{1..6}.ppm, H_1_{2..6})")
    w = ex.add_mutually_exclusive_group(required=True)
    w.add_argument("--weights", help="D2-Net checkpoint d2_tf.pth")
    w.add_argument("--random-weights", action="store_true",
                   help="random VGG16 weights (no download; for smoke runs and tests)")
    ex.add_argument("--seed", type=int, default=0,
                    help="seed of --random-weights and of random / inverted masks "
                         "(0 ... 2**64 - 1)")
    ex.add_argument("--finest-stride", type=int, required=True, choices=(1, 2, 4, 8),
                    help="output stride F of the descriptors (dense network at F without "
                         "--dilations; adaptive F -> 8 with them)")
    ex.add_argument("--dilations", type=int, nargs="+", default=[], metavar="D",
                    help="one odd square size per adaptive level, finest first (log2(8/F) values; "
                         "0 = level unconstrained), e.g. 25 51 51 for F = 1")
    ex.add_argument("--mask", default="keypoints", choices=("keypoints", "random", "inverted"),
                    help="keypoint plan, or the inadequate-mask ablation at its budget")
    ex.add_argument("--semantics", default="paper", choices=("paper", "reference"),
                    help="paper (default) or the paper code's behaviour (grey formula, mask "
                         "sampling, resize to multiples of 8, centre-anchored sites)")
    ex.add_argument("--num-keypoints", dest="num_points", type=int, default=512)
    ex.add_argument("--max-sum-edges", type=int, default=2800,
                    help="resize images whose height + width exceed this (area interpolation; "
                         "at least 16, default 2800 as D2-Net)")
    ex.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    ex.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    ex.add_argument("--engine", default="auto", help="conv engine of the adaptive layers")
    ex.add_argument("--no-progress", dest="progress", action="store_false")
    ex.add_argument("--out", required=True, help="output folder (resumed if it exists)")
    ex.set_defaults(_keypoints_main=_extract)

    ev = sub.add_parser("evaluate", help=_EVALUATE, description=_EVALUATE)
    ev.add_argument("--data-root", required=True, help="HPatches sequences folder")
    ev.add_argument("--features", nargs="+", required=True, metavar="DIR",
                    help="folders written by `cad-spconv keypoints extract`")
    ev.add_argument("--labels", nargs="+", metavar="NAME",
                    help="one name per folder (default: the folder names)")
    ev.add_argument("--out", required=True, help="results JSON")
    ev.add_argument("--plot", help="MMA@3 vs multiply-adds figure, .png, .pdf or .svg (the "
                    "format follows the extension; default with several folders: --out with "
                    ".png)")
    ev.add_argument("--title", help="plot title")
    ev.add_argument("--normalize", action="store_true",
                    help="L2-normalise descriptors before matching (cosine similarity; not the "
                         "paper's protocol, which matches raw dot products)")
    ev.set_defaults(_keypoints_main=_evaluate)


def _extract(args) -> int:
    from .extract import ExtractConfig, run_extract

    cfg = ExtractConfig(
        data_root=args.data_root, out=args.out, finest_stride=args.finest_stride,
        dilations=tuple(args.dilations), weights=args.weights, random_weights=args.random_weights,
        seed=args.seed, mask=args.mask, semantics=args.semantics, num_points=args.num_points,
        max_sum_edges=args.max_sum_edges, device=args.device, dtype=args.dtype, engine=args.engine,
        progress=args.progress)
    summary = run_extract(cfg)
    if summary is not None:
        s = summary["summary"]
        if s.get("num_images"):
            timing = (f"network {s['time_per_image_s_median'] * 1e3:.0f} ms per image (median)"
                      if s["time_per_image_s_median"] is not None else
                      f"network times of {len(s['timings_by_setup'])} setups, not pooled: see "
                      "timings_by_setup in summary.json")
            print(f"{s['num_images']} images in {args.out}: {s['macs_mean'] / 1e9:.3f} G "
                  f"multiply-adds per image, {s['num_keypoints_mean']:.0f} keypoints, {timing}")
    return 0


def _evaluate(args) -> int:
    from .evaluate import report_notes, run_evaluate

    report = run_evaluate(args.data_root, args.features, args.out, args.plot, args.labels,
                          args.title, args.normalize)
    for label, r in report["features"].items():
        m = r["mma@3"]
        fmt = lambda v: "  n/a " if v is None else f"{v:.4f}"  # noqa: E731
        macs = "n/a" if r["macs_per_image"] is None else f"{r['macs_per_image'] / 1e9:.3f} G"
        print(f"{label:>32}: MMA@3 all {fmt(m['all'])}  i {fmt(m['i'])}  v {fmt(m['v'])}  "
              f"multiply-adds {macs}")
    for note in report_notes(report):
        print(note)
    print(f"wrote {args.out}" + (f" and {report['plot']}" if "plot" in report else ""))
    return 0


def main(args) -> int:
    from ..eval import INPUT_ERRORS

    name = f"cad-spconv keypoints {args.keypoints_command}"
    try:
        return int(args._keypoints_main(args) or 0)
    # KeyError: a checkpoint that is not D2-Net's (CheckpointMismatchError)
    except INPUT_ERRORS as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
