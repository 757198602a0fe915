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

from experiments.common import (base_parser, check_distinct_settings, dense_points, finish, point,
                                run_setting, setting_label)


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.15, 0.35, 0.95],
                   help="edge thresholds (paper: 0.15 0.35 0.95)")
    p.add_argument("--learned", nargs="*", default=[], metavar="CKPT",
                   help="mask estimator checkpoints, one per budget")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    learned = [f"learned:{ckpt}" for ckpt in args.learned]
    check_distinct_settings(learned)
    stems = [os.path.splitext(os.path.basename(c))[0] for c in args.learned]
    points = dense_points(args)
    for t in args.thresholds:
        points.append(point(run_setting(args, f"edge:{t:g}"), f"edge {t:g}", "edge"))
    for mask, stem in zip(learned, stems):
        # the file name, or folder and file where two runs share it (train-mask's last.pt)
        label = stem if stems.count(stem) == 1 else setting_label(mask)[len("learned_"):]
        points.append(point(run_setting(args, mask), label, "learned"))
    return finish(args, "tradeoff", points,
                  f"{args.model}, {args.finest_stride}->{args.coarsest_stride}: mIoU vs multiply-adds")

if __name__ == "__main__":
    sys.exit(main())
