"""Is a ``torch.compile``d dense network the faster baseline? (BENCHMARKS.md, issue 14)

    python -m experiments.compiled_dense [--dtype float32|bfloat16] [--strides 8 16]
                                         [--pairs 6] [--threads 2] [--size 512 1024]

The targets compare CAD with the fastest dense configuration a user would run. A user can also
hand the dense backbone to ``torch.compile`` (inductor, with ``freezing`` on, as PyTorch
recommends for CPU inference: ``adapters.compiled_for_inference``, as
``cad-spconv bench --compile-dense`` times it). Per stride, the bench's dense
DeepLabV3-ResNet101 backbone (``dense<s>[channels_last]``, random weights, channels-last) is
timed eager, eager with batch norm folded (``--fold-bn``) and compiled, in strictly
alternating pairs against the compiled one on one random image: the median of the per-pair
ratios. The compile time (the first call) and the largest relative error of the compiled
output against the eager one are printed too.
"""
from __future__ import annotations

import statistics
import time

import torch

from experiments.common import ExperimentParser, paired_ratio, table_header


def _stride(args, stride: int):
    from experiments.common import bench_variants, paired_ms

    base = ["--model", "deeplabv3_resnet101", "--dtype", args.dtype, "--engine", "auto",
            "--dense-format", "channels_last", "--no-float32-baseline", "--seed",
            str(args.seed), "--size", *map(str, args.size)]
    images = torch.randn(1, 3, *args.size, generator=torch.Generator().manual_seed(args.seed))
    name = f"dense{stride}[channels_last]"

    def run(v):
        state = v.setup(images, None)
        return lambda: v.run(*state)

    variants = bench_variants(base + ["--compile-dense"])[2]  # one set of weights for both
    runs = {"eager": run(variants[name])}
    runs["eager, batch norm folded"] = run(bench_variants(base + ["--fold-bn"])[2][name])
    compiled = run(variants[f"dense{stride}[channels_last,compiled]"])
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = compiled()
        compile_s = time.perf_counter() - t0
        ref = runs["eager"]().double()
        err = float((out.double() - ref).abs().max() / ref.abs().max())
    print(f"\n{name}: compile (first call) {compile_s:.0f} s; compiled vs eager: max |error| "
          f"{err:.2g} of max |eager|")
    print("| eager variant | eager median [ms] | compiled median [ms] | compiled / eager, "
          "median of the pair ratios |")
    print("|---|---|---|---|")
    for label, eager in runs.items():
        eager_ms, compiled_ms = paired_ms(eager, compiled, args.pairs)
        ratio = paired_ratio(compiled_ms, eager_ms)
        print(f"| {label} | {statistics.median(eager_ms):.0f} | "
              f"{statistics.median(compiled_ms):.0f} | {ratio:.3f} |")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.compiled_dense",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--strides", type=int, nargs="+", default=(8, 16), choices=(8, 16))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error(f"--pairs must be >= 1, got {args.pairs}")
    if min(args.size) < 32:
        parser.error(f"--size must be at least 32x32, got {args.size}")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    for s in args.strides:
        _stride(args, s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
