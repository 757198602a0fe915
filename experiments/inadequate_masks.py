"""Inadequate masks (paper Sec. 4.3 / Fig. 6, here on segmentation): the edge mask against the
same budget at random places (``shuffled-edge``), its inverse (``inverted-edge``, keeps flat
regions) and uniformly random masks. Bad masks cost as much or more without the gain.

    python -m experiments.inadequate_masks --data-root R --checkpoint P --out runs/inadequate

Writes ``<out>/inadequate_masks.json`` and ``<out>/inadequate_masks.png``.
"""
from __future__ import annotations

import sys

from experiments.common import (POINTS_EPILOG, Setting, base_parser, baselines, finish,
                                mask_value, reports_errors, run_points)


def build_parser():
    p = base_parser(__doc__.split("\n\n")[0], "inadequate_masks", epilog=POINTS_EPILOG)
    p.add_argument("--thresholds", type=mask_value("edge"), nargs="*", default=[0.35, 0.95])
    p.add_argument("--random-fractions", type=mask_value("random"), nargs="*",
                   default=[0.25, 0.5])
    return p


@reports_errors("inadequate_masks")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = baselines(args)
    for t in args.thresholds:
        for kind in ("edge", "shuffled-edge", "inverted-edge"):
            settings.append(Setting(f"{kind}:{t:g}", f"{kind} {t:g}", kind, f"--thresholds {t:g}"))
    settings += [Setting(f"random:{f:g}", f"random {f:g}", "random", f"--random-fractions {f:g}")
                 for f in args.random_fractions]
    points = run_points(args, settings)  # every setting checked before the first runs
    return finish(args, "inadequate_masks", points,
                  f"{args.model}: adequate vs inadequate masks")

if __name__ == "__main__":
    sys.exit(main())
