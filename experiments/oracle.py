"""The oracle experiment (paper Sec. 4.1, Tab. 1): keep what the coarse model gets wrong and
the fine model gets right, dilated, against nothing kept (stride 16) and everything kept
(stride 8). The oracle needs ground truth, so it bounds what a mask can achieve.

    python -m experiments.oracle --data-root R --checkpoint P --out runs/oracle

Writes ``<out>/oracle.json`` and ``<out>/oracle.png`` (mIoU and multiply-adds per setting, and the
distribution of the oracle's per-image cost: the paper notes some images need < 50 %).
"""
from __future__ import annotations

import os
import sys

from experiments.common import (Setting, _pyplot, base_parser, baselines, check_settings, point,
                                reports_errors, run_setting, write_report)


@reports_errors("oracle")
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    settings = baselines(args)
    check_settings(args, [*settings, Setting("oracle", "oracle", "oracle", "the oracle mask")])
    points = [point(run_setting(args, s.mask, s.label), s.name, s.group) for s in settings]
    oracle = run_setting(args, "oracle")
    points.append(point(oracle, "oracle", "oracle"))
    per_image = sorted(r["macs_fraction_of_finest"] for r in oracle["images"].values())
    report = write_report(os.path.join(args.out, "oracle.json"), "oracle", args, points,
                          oracle_macs_fraction_of_finest_per_image=per_image)
    _plot(os.path.join(args.out, "oracle.png"), report, args)
    for p in points:
        print(f"{p['label']:>22}: mIoU {p['miou'] if p['miou'] is None else round(p['miou'], 4)}  "
              f"{p['macs_fraction_of_finest']:.1%} of stride {args.finest_stride} multiply-adds")
    print(f"wrote {os.path.join(args.out, 'oracle.json')} and oracle.png")
    return 0


def build_parser():
    return base_parser(__doc__.split("\n\n")[0], "oracle")


def _plot(path, report, args):
    plt = _pyplot()
    pts = report["points"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    labels = [p["label"] for p in pts]
    a.bar(labels, [p["miou"] or 0 for p in pts], color=["gray", "black", "tab:green"][:len(pts)])
    a.set_ylabel("mIoU")
    a2 = a.twinx()
    a2.plot(labels, [p["macs_fraction_of_finest"] for p in pts], "o-", color="tab:red")
    a2.set_ylabel(f"multiply-adds / dense stride {args.finest_stride}", color="tab:red")
    a.tick_params(axis="x", labelsize=7)
    frac = report["oracle_macs_fraction_of_finest_per_image"]
    b.hist(frac, bins=min(20, max(3, len(frac))), color="tab:green")
    b.axvline(0.5, color="gray", linestyle=":")
    b.set_xlabel(f"oracle multiply-adds / dense stride {args.finest_stride}, per image")
    b.set_ylabel("images")
    fig.suptitle(f"oracle experiment, {args.model}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
