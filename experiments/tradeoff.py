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

from experiments.common import (POINTS_EPILOG, Setting, base_parser, baselines, finish,
                                learned_labels, mask_value, reports_errors, run_points)


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0], "tradeoff", epilog=POINTS_EPILOG)
    p.add_argument("--thresholds", type=mask_value("edge"), nargs="*",
                   default=[0.15, 0.35, 0.95], help="edge thresholds (paper: 0.15 0.35 0.95)")
    p.add_argument("--learned", nargs="*", default=[], metavar="CKPT",
                   help="mask estimator checkpoints, one per budget")
    return p


@reports_errors("tradeoff")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = baselines(args)
    settings += [Setting(f"edge:{t:g}", f"edge {t:g}", "edge", f"--thresholds {t:g}")
                 for t in args.thresholds]
    # the plot's label: the file name, or folder and file where two runs share it
    settings += [Setting(f"learned:{ckpt}", label[len("learned_"):], "learned",
                         f"--learned {ckpt}", label)
                 for ckpt, label in zip(args.learned, learned_labels(args.learned))]
    points = run_points(args, settings)  # every setting checked before the first runs
    return finish(args, "tradeoff", points,
                  f"{args.model}, {args.finest_stride}->{args.coarsest_stride}: mIoU vs multiply-adds")

if __name__ == "__main__":
    sys.exit(main())
