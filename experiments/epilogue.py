"""What fusing the ReLUs and residual adds into the convs gains (BENCHMARKS.md, issue 14).

    python -m experiments.epilogue ops [--dtype bfloat16] [--reps 30]
    python -m experiments.epilogue model [--dtype bfloat16] [--keep edge|none|all]
                                         [--images F ...] [--threshold 0.35] [--pairs 6]

``ops``: a ResNet bottleneck's 1x1 convs on feature matrices of CAD's sizes (rows x C_in ->
C_out), their epilogue as separate passes (``torch.addmm``, then ``add_`` / ``relu_``, the
unfused route on an AMX Xeon) against oneDNN's conv with the epilogue as post-ops
(``cad_spconv.engines.epilogue.fused_rows``): medians in ms.

``model``: the bench's CAD DeepLabV3-ResNet101 backbone (8->16, random weights) with its batch
norms folded (``--fold-bn``), run as the library runs it (epilogues fused, each block's result
written into its shortcut, the grid convs' weights prepacked) and with
``cad_spconv.engines.epilogue.fuses`` patched to refuse (all three off: the separate ops of
PyTorch's own routes), in strictly alternating pairs, per
frame (the bench's inputs and masks: edge masks of ``--images`` at ``--threshold``, random
blocks without images, or nothing / everything kept): the median of the per-pair ratios
fused / unfused.
"""
from __future__ import annotations

import statistics

import torch

from experiments.common import ExperimentParser, paired_ratio, table_header, timed_ms

#: (rows, C_in, C_out): conv1 and conv3 of layer3's and layer4's bottlenecks at the site counts
#: of a 512x1024 frame's edge mask (about 6000 sites at step 0, 1500 at step 1) and of all kept
OP_SHAPES = ((6000, 1024, 256), (6000, 256, 1024), (1500, 2048, 512), (1500, 512, 2048),
             (8192, 1024, 256), (8192, 256, 1024))


def _ops(args, dtype):
    from cad_spconv.engines import epilogue

    print("| rows x C_in -> C_out | conv1: addmm + relu_ | fused | ratio | conv3: addmm + add_ "
          "+ relu_ | fused | ratio |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        for n, c_in, c_out in OP_SHAPES:
            x = torch.randn(n, c_in, generator=gen).to(dtype)
            w = (torch.randn(c_out, c_in, 1, 1, generator=gen) / c_in ** 0.5).to(dtype)
            b = torch.randn(c_out, generator=gen).to(dtype)
            res = torch.randn(n, c_out, generator=gen).to(dtype)
            w2 = w.view(c_out, c_in)
            times = [statistics.median(timed_ms(f, args.reps)) for f in (
                lambda: torch.addmm(b, x, w2.t()).relu_(),
                lambda: epilogue.fused_rows(x, w, b, 1, relu=True),
                lambda: torch.addmm(b, x, w2.t()).add_(res).relu_(),
                lambda: epilogue.fused_rows(x, w, b, 1, relu=True, residual=res))]
            print(f"| {n} x {c_in} -> {c_out} | {times[0]:.2f} | {times[1]:.2f} | "
                  f"{times[1] / times[0]:.2f} | {times[2]:.2f} | {times[3]:.2f} | "
                  f"{times[3] / times[2]:.2f} |")


def _model(args):
    from cad_apps.bench import _inputs, _masks
    from cad_spconv.engines import epilogue
    from experiments.common import bench_variants, paired_ms

    bench_args, _, variants = bench_variants(
        ["--model", "deeplabv3_resnet101", "--dtype", args.dtype, "--engine", "auto",
         "--no-float32-baseline", "--fold-bn", "--seed", str(args.seed),
         "--size", *map(str, args.size), "--keep", "mask" if args.keep == "edge" else args.keep,
         "--threshold", str(args.threshold)] + (["--images", *args.images] if args.images else []))
    batches, names = _inputs(bench_args)
    keeps, _ = _masks(bench_args, batches, torch.device("cpu"))
    cad = variants["cad[auto]"]
    real = epilogue.fuses

    def refuse(*a, **k):
        return False

    print("| frame | kept pixels | fused [ms] | unfused [ms] | fused / unfused, median of the "
          "pair ratios | max abs difference / max abs |")
    print("|---|---|---|---|---|---|")
    for name, images, keep in zip(names, batches, keeps):
        state = cad.setup(images, keep)

        def fused():
            return cad.run(*state)

        def unfused():
            epilogue.fuses = refuse
            try:
                return cad.run(*state)
            finally:
                epilogue.fuses = real

        with torch.inference_mode():
            a, b = fused().double(), unfused().double()
            err = float((a - b).abs().max() / b.abs().max())
        fused_ms, unfused_ms = paired_ms(fused, unfused, args.pairs)
        ratio = paired_ratio(fused_ms, unfused_ms)
        print(f"| {name} | {float(keep.float().mean()):.2f} | {statistics.median(fused_ms):.0f} | "
              f"{statistics.median(unfused_ms):.0f} | {ratio:.3f} | {err:.2g} |")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.epilogue",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("ops", "model"))
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--keep", default="edge", choices=("edge", "none", "all"),
                        help="edge: masks of --images (random blocks without images)")
    parser.add_argument("--images", nargs="+", default=())
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.reps < 1:
        parser.error("--pairs and --reps must be >= 1")
    if min(args.size) < 16:
        parser.error(f"--size must be at least 16x16 (the coarsest stride), got {args.size}")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    if args.part == "ops":
        _ops(args, getattr(torch, args.dtype))
    else:
        _model(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
