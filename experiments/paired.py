"""CAD against the dense network it equals, in strictly alternating pairs (BENCHMARKS.md).

    python -m experiments.paired [--keep none|all] [--dtype bfloat16] [--pairs 60]
                                 [--reuse-output]

With nothing kept the converted DeepLabV3-ResNet101 backbone (8->16, densified at stride 8)
equals dense stride 16, with everything kept dense stride 8 (both channels-last, 512x1024;
the bench's own variants: ``cad_apps.bench.variants.build_variants``, random weights with
tamed statistics). ``cad-spconv bench`` times five or
six variants in rotation, so a CAD run and the dense run it is compared with lie seconds apart;
on a busy shared host one variant's runs then spanned 2-8x and a ratio of medians moved by
several per cent between runs. Here the two run back to back, in turns, and the table gives the
median of the per-pair ratios next to the ratio of the medians: a slow drift of the host's
speed cancels in a pair.
"""
from __future__ import annotations

import statistics

import torch

from experiments.common import ExperimentParser, paired_ms, table_header


def _variants(args):
    """The bench's own dense variant (channels-last, at the stride the keep setting equals) and
    CAD variant, built as ``cad-spconv bench`` builds them (one set of tamed random weights)."""
    from experiments.common import bench_variants

    _, _, variants = bench_variants(
        ["--model", "deeplabv3_resnet101", "--dtype", args.dtype, "--engine", "auto",
         "--dense-format", "channels_last", "--no-float32-baseline", "--seed", str(args.seed),
         "--size", *map(str, args.size)] + (["--reuse-output"] if args.reuse_output else []))
    stride = 16 if args.keep == "none" else 8
    return variants[f"dense{stride}[channels_last]"], variants["cad[auto]"]


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.paired",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", default="none", choices=("none", "all"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--pairs", type=int, default=60)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-output", action="store_true",
                        help="CAD densifies into one buffer kept across runs (as cad-spconv "
                             "bench --reuse-output)")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16 (the coarsest stride), got {args.size}")
    torch.set_num_threads(args.threads)
    print(table_header(args))

    images = torch.randn(1, 3, *args.size)
    keep = torch.full((1, 1, *args.size), args.keep == "all", dtype=torch.bool)
    runs = {}
    for name, v in zip(("dense", "cad"), _variants(args)):
        v.capture = False  # no geometry replay here: hold no plan between runs
        runs[name] = (lambda v, state: lambda: v.run(*state))(v, v.setup(images, keep))
    times = dict(zip(("dense", "cad"), paired_ms(runs["dense"], runs["cad"], args.pairs)))
    ratios = [c / d for c, d in zip(times["cad"], times["dense"])]
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    median = {k: statistics.median(v) for k, v in times.items()}
    stride = 16 if args.keep == "none" else 8
    print(f"{args.dtype}, {'nothing' if args.keep == 'none' else 'everything'} kept, "
          f"{args.size[0]}x{args.size[1]}, {args.pairs} pairs; dense: stride {stride}"
          + ("; CAD's output buffer reused" if args.reuse_output else ""))
    print("| dense median [ms] | CAD median [ms] | ratio of medians | median of pair ratios "
          "(quartiles) | dense runs' spread (max / min) |")
    print("|---|---|---|---|---|")
    print(f"| {median['dense']:.0f} | {median['cad']:.0f} | {median['cad'] / median['dense']:.3f}"
          f" | {statistics.median(ratios):.3f} ({q[0]:.3f}-{q[2]:.3f}) | "
          f"{max(times['dense']) / min(times['dense']):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
