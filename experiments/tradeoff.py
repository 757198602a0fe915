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

import sys

from experiments.common import (base_parser, dense_points, finish, learned_labels, point,
                                run_setting)


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.15, 0.35, 0.95],
                   help="edge thresholds (paper: 0.15 0.35 0.95)")
    p.add_argument("--learned", nargs="*", default=[], metavar="CKPT",
                   help="mask estimator checkpoints, one per budget")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    labels = learned_labels(args.learned)  # checked before any work
    points = dense_points(args)
    for t in args.thresholds:
        points.append(point(run_setting(args, f"edge:{t:g}"), f"edge {t:g}", "edge"))
    for ckpt, label in zip(args.learned, labels):
        # the plot's label: the file name, or folder and file where two runs share it
        points.append(point(run_setting(args, f"learned:{ckpt}", label),
                            label[len("learned_"):], "learned"))
    return finish(args, "tradeoff", points,
                  f"{args.model}, {args.finest_stride}->{args.coarsest_stride}: mIoU vs multiply-adds")

if __name__ == "__main__":
    sys.exit(main())
