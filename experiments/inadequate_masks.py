"""Inadequate masks (paper Sec. 4.3 / Fig. 6, here on segmentation): the edge mask against the
same budget at random places (``shuffled-edge``), its inverse (``inverted-edge``, keeps flat
regions) and uniformly random masks. Bad masks cost as much or more without the gain.

    python -m experiments.inadequate_masks --data-root R --checkpoint P --out runs/inadequate

Writes ``<out>/inadequate_masks.json`` and ``<out>/inadequate_masks.png``.
"""
from __future__ import annotations

import sys

from experiments.common import base_parser, dense_points, finish, point, run_setting


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0])
    p.add_argument("--thresholds", type=float, nargs="*", default=[0.35, 0.95])
    p.add_argument("--random-fractions", type=float, nargs="*", default=[0.25, 0.5])
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    points = dense_points(args)
    for t in args.thresholds:
        for kind in ("edge", "shuffled-edge", "inverted-edge"):
            points.append(point(run_setting(args, f"{kind}:{t:g}"), f"{kind} {t:g}", kind))
    for f in args.random_fractions:
        points.append(point(run_setting(args, f"random:{f:g}"), f"random {f:g}", "random"))
    return finish(args, "inadequate_masks", points,
                  f"{args.model}: adequate vs inadequate masks")

if __name__ == "__main__":
    sys.exit(main())
