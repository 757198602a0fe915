"""Multiply-adds vs mIoU: edge thresholds and learned-mask budgets against the baselines.

Paper Sec. 4.2 / Fig. 4 (DeepLabV3-ResNet101, Cityscapes val, 8 -> 16): edge masks at
thresholds 0.15 / 0.35 / 0.95 and learned masks trained for different budgets, against nothing
kept (stride 16) and everything kept (stride 8). Learned masks come from ``cad-spconv
train-mask`` (one estimator checkpoint per budget, passed with ``--learned``).

    python -m experiments.tradeoff --data-root R --checkpoint P --out runs/tradeoff \\
        --thresholds 0.15 0.35 0.95 --learned rho0.5.pth rho0.3.pth

Writes ``<out>/tradeoff.json`` (one point per setting) and ``<out>/tradeoff.png``.
"""
from __future__ import annotations

import os
import sys

from experiments.common import (base_parser, dense_points, plot_tradeoff, point, run_setting,
                                write_report)


def build_parser():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.15, 0.35, 0.95],
                   help="edge thresholds (paper: 0.15 0.35 0.95)")
    p.add_argument("--learned", nargs="*", default=[], metavar="CKPT",
                   help="mask estimator checkpoints, one per budget")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    points = dense_points(args)
    for t in args.thresholds:
        points.append(point(run_setting(args, f"edge:{t:g}"), f"edge {t:g}", "edge"))
    for ckpt in args.learned:
        label = os.path.splitext(os.path.basename(ckpt))[0]
        points.append(point(run_setting(args, f"learned:{ckpt}"), label, "learned"))
    write_report(os.path.join(args.out, "tradeoff.json"), "tradeoff", args, points)
    plot_tradeoff(os.path.join(args.out, "tradeoff.png"), points,
                  f"{args.model}, {args.finest_stride}->{args.coarsest_stride}: mIoU vs multiply-adds", args)
    for p in points:
        print(f"{p['label']:>28}: mIoU {p['miou'] if p['miou'] is None else round(p['miou'], 4)}  "
              f"{p['macs_per_image'] / 1e9:.2f} GMA ({p['macs_fraction_of_finest']:.1%} of stride "
              f"{args.finest_stride})  kept {p['kept_fraction']:.1%}")
    print(f"wrote {os.path.join(args.out, 'tradeoff.json')} and tradeoff.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
