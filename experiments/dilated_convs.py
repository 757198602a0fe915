"""oneDNN's dilated convs against im2col GEMMs, and what that makes of the dense whole model
(BENCHMARKS.md; ``adapters/dilated.py``).

    python -m experiments.dilated_convs [--dtype bfloat16|float16|float32] [--threads 2]
                                        [--pairs 8] [--autocast]

1. One 3x3 conv of DeepLabV3's ASPP head (2048 -> 256 channels on the stride-8 map of a
   512x1024 image, channels-last, random weights) at dilations 1-36: ``F.conv2d`` (oneDNN)
   against :func:`adapters.dilated.im2col_conv2d`, median of ``--reps`` calls, and the largest
   error of each against the float64 conv of the same values.
2. The dense DeepLabV3-ResNet101 at stride 8 (the bench's own variant, ``--scope model``)
   as built, and with its dilated convs as im2col GEMMs (``--im2col-dilated``), in strictly
   alternating pairs on one random image: the median of the per-pair ratios. With
   ``--autocast`` the model keeps float32 weights and runs under ``--dtype``'s autocast, as
   ``cad-spconv eval --dtype bfloat16|float16 [--im2col-dilated]`` runs it.
"""
from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from cad_apps.bench.measure import _median
from experiments.common import ExperimentParser, table_header, timed_ms

DILATIONS = (1, 2, 6, 12, 24, 36)
CHANNELS = (2048, 256)  # the ASPP convs' input and output channels


def _conv_table(args, dtype):
    from adapters.dilated import im2col_conv2d

    gen = torch.Generator().manual_seed(args.seed)
    h, w = args.size[0] // 8, args.size[1] // 8
    cl = torch.channels_last
    c_in, c_out = CHANNELS
    x = torch.randn(1, c_in, h, w, generator=gen).to(dtype).contiguous(memory_format=cl)
    wt = (torch.randn(c_out, c_in, 3, 3, generator=gen) * 0.02).to(dtype).contiguous(
        memory_format=cl)
    print(f"\n1. One ASPP conv, {c_in} -> {c_out}, 3x3, {h}x{w} map, {args.dtype}, channels-last; "
          f"median of {args.reps} calls [ms]; max |error| against float64")
    print("| dilation | F.conv2d (oneDNN) | im2col GEMMs | oneDNN error | im2col error |")
    print("|---|---|---|---|---|")
    with torch.inference_mode():
        for d in DILATIONS:
            exact = F.conv2d(x.double(), wt.double(), None, 1, d, d)
            errs = [float((y.double() - exact).abs().max()) for y in (
                F.conv2d(x, wt, None, 1, d, d), im2col_conv2d(x, wt, None, (d, d)))]
            direct = _median(timed_ms(lambda: F.conv2d(x, wt, None, 1, d, d), args.reps))
            im2col = _median(timed_ms(lambda: im2col_conv2d(x, wt, None, (d, d)), args.reps))
            print(f"| {d} | {direct:.1f} | {im2col:.1f} | {errs[0]:.3g} | {errs[1]:.3g} |")


def _whole_model(args):
    from experiments.common import bench_variants, paired_ms

    weights = "float32" if args.autocast else args.dtype  # autocast: float32 weights, as eval
    base = ["--model", "deeplabv3_resnet101", "--scope", "model", "--dtype", weights,
            "--dense-format", "channels_last", "--no-float32-baseline", "--seed", str(args.seed),
            "--size", *map(str, args.size)]
    runs = {}
    images = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))

    def run(v, state):
        if not args.autocast:
            return lambda: v.run(*state)

        def under_autocast():
            with torch.autocast("cpu", dtype=getattr(torch, args.dtype)):
                return v.run(*state)
        return under_autocast

    for name, extra in (("oneDNN", []), ("im2col", ["--im2col-dilated"])):
        _, _, variants = bench_variants(base + extra)
        v = variants["dense8[channels_last]"]
        runs[name] = run(v, v.setup(images, None))
    times = dict(zip(runs, paired_ms(runs["oneDNN"], runs["im2col"], args.pairs)))
    ratios = [a / b for a, b in zip(times["im2col"], times["oneDNN"])]
    how = (f"float32 weights under {args.dtype} autocast" if args.autocast else args.dtype)
    print(f"\n2. Dense DeepLabV3-ResNet101 at stride 8, whole model, {args.size[0]}x"
          f"{args.size[1]}, {how}, channels-last, {args.pairs} pairs [ms]")
    print("| dilated convs | median | min |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.0f} | {min(t):.0f} |")
    print(f"\nim2col / oneDNN: median of the pair ratios {statistics.median(ratios):.3f}")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.dilated_convs",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--pairs", type=int, default=8, help="whole-model pairs (0: skip)")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--autocast", action="store_true",
                        help="part 2 with float32 weights under --dtype's autocast (as "
                             "cad-spconv eval runs bfloat16 and float16)")
    args = parser.parse_args(argv)
    if args.autocast and args.dtype == "float32":
        parser.error("--autocast runs part 2 under --dtype's autocast: give --dtype bfloat16 "
                     "or float16")
    if args.dtype == "float16" and args.pairs and not args.autocast:
        parser.error("part 2 runs the bench's float16 model, which it refuses on CPU (no fast "
                     "float16 convs): add --pairs 0, or --autocast for float32 weights under "
                     "float16 autocast")
    if args.autocast and not args.pairs:
        parser.error("--autocast sets how part 2 runs, and --pairs 0 skips it: drop one")
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.pairs < 0:
        parser.error(f"--pairs must be >= 0 (0: no whole-model pairs), got {args.pairs}")
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16, got {args.size}")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    _conv_table(args, getattr(torch, args.dtype))
    if args.pairs:
        _whole_model(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
