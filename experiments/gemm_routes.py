"""BLAS GEMM vs oneDNN for the GEMMs of the lattice engine on CPU (BENCHMARKS.md).

    python -m experiments.gemm_routes [--threads 2] [--reps 15] [--dtype bfloat16] [--chunks]

The lattice engine multiplies a feature (or im2col) matrix ``[M, K]`` by a weight ``[N, K]``
for every 1x1 conv and for the off-lattice rest of every 3x3 conv. This times the two routes it
could take on the layer shapes of DeepLabV3-ResNet101 converted 8->16 at 512x1024 (about 5700
sites per step-1 layer, 3700 off-lattice rows of a 3x3 conv): ``torch.mm`` (BLAS: MKL in the
PyPI wheels), with the weight as a contiguous ``[K, N]`` copy and as the transposed view of
``[N, K]`` that the engine keeps, and a 1x1 ``F.conv2d`` on channels-last views of the same
matrices (oneDNN, the library of the dense network's convs), and oneDNN's linear with a
prepacked weight where torch has that private op. Median of ``--reps`` after 3
warm-ups (``--dtype``, float32 by default); the ratio compares the transposed BLAS route with
oneDNN. The last column is the throughput of a dense 3x3 conv of the same widths on a 64x128
map (channels-last, the dense network's conv) for scale.

``--chunks`` times the im2col GEMMs as the gather runs them instead: the off-lattice rows in
chunks of the engine's budget (4M elements: 910 rows of a 512-channel 3x3 conv, 227 of the
ASPP's 2048-channel one), one GEMM per chunk with the same weight, on each route. oneDNN's 1x1
conv reorders its weight on every call; ``torch.mm`` has a small fixed cost. Which route wins
depends on the CPU: the engine's choice (``cad_spconv.engines.gemm.matmul_nk``) rests on this
table on an AVX-512 and an AVX2-only EPYC (BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cad_apps.bench.measure import _median
from experiments.common import ExperimentParser, table_header, timed_ms

# (M, K, N): 1x1 reduce / expand / square of layer3 and layer4, 3x3 im2col rests
SHAPES = [(5700, 1024, 256), (5700, 256, 1024), (5700, 256, 256), (5700, 2048, 512),
          (5700, 512, 2048), (5700, 1024, 512), (5700, 512, 512), (3700, 2304, 256),
          (3700, 4608, 512)]


def median_ms(fn, reps: int) -> float:
    """Median ms of ``reps`` calls of ``fn`` after 3 warm-ups (the bench's timer)."""
    return _median(timed_ms(fn, reps))


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.gemm_routes",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--chunks", action="store_true",
                        help="time the gather's im2col GEMMs chunk by chunk (see above)")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(table_header(args))
    if args.chunks:
        return _chunks(args, dtype, gen)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; ms (GFLOP/s)")
    print("| M | K | N | torch.mm, weight [K, N] | torch.mm, weight [N, K] transposed | "
          "oneDNN 1x1 conv | BLAS / oneDNN | oneDNN linear, prepacked weight | "
          "dense 3x3 conv (GFLOP/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
        w_kn = w.t().contiguous()
        out = torch.empty(m, n, dtype=dtype)
        blas_kn = median_ms(lambda: torch.mm(x, w_kn, out=out), args.reps)
        blas = median_ms(lambda: torch.mm(x, w.t(), out=out), args.reps)
        x_view = x.view(1, m, 1, k).permute(0, 3, 1, 2)  # [1, K, M, 1], channels-last
        onednn = median_ms(lambda: F.conv2d(x_view, w.view(n, k, 1, 1)), args.reps)
        gflop = 2 * m * k * n / 1e9
        packed = _packed_linear_ms(x, w, args.reps)
        packed = "n/a" if packed is None else f"{packed:.1f} ({gflop / packed * 1e3:.0f})"
        c_in = k // 9 if k in (2304, 4608) else k
        fmap = torch.randn(1, c_in, 64, 128, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last)
        taps = 3 if k in (2304, 4608) else 1
        wd = torch.randn(n, c_in, taps, taps, generator=gen).to(dtype)
        dense = median_ms(lambda: F.conv2d(fmap, wd, padding=taps // 2), args.reps)
        dflop = 2 * 64 * 128 * c_in * taps * taps * n / 1e9
        print(f"| {m} | {k} | {n} | {blas_kn:.1f} | {blas:.1f} ({gflop / blas * 1e3:.0f}) | "
              f"{onednn:.1f} ({gflop / onednn * 1e3:.0f}) | {blas / onednn:.2f} | {packed} | "
              f"{dflop / dense * 1e3:.0f} |")
    return 0


def _packed_linear_ms(x, w, reps: int, bounds=None):
    """oneDNN's linear with the weight reordered once for ``x``'s row count (the private op
    PyTorch's inductor uses; the engines do not: a packed copy of every weight costs memory),
    or ``None`` where this torch lacks it. ``bounds``: the row ranges of chunks, one call each,
    the weight reordered for the first chunk's rows."""
    bounds = bounds or [(0, x.shape[0])]
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, bounds[0][1] - bounds[0][0])
        run = torch.ops.mkldnn._linear_pointwise
        run(x[:1], packed, None, "none", [], "")
    except (AttributeError, RuntimeError):
        return None

    def chunks():
        for s, e in bounds:
            run(x[s:e], packed, None, "none", [], "")
    return median_ms(chunks, reps)


# (rows, K, N): the im2col rests of layer3 / layer4 3x3 convs and of an ASPP 3x3 conv
CHUNKED = [(3700, 2304, 256), (3700, 4608, 512), (3700, 18432, 256)]


def _chunks(args, dtype, gen) -> int:
    from cad_spconv.engines.lattice import _GATHER_CHUNK_ELEMENTS

    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; ms per layer, "
          f"chunks of {_GATHER_CHUNK_ELEMENTS} elements")
    print("| rows | K | N | rows per chunk | torch.mm | oneDNN 1x1 conv | torch.mm / oneDNN | "
          "oneDNN 1x1 conv, prepacked weight | oneDNN linear, prepacked weight |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m, k, n in CHUNKED:
        rows = max(1, _GATHER_CHUNK_ELEMENTS // k)
        x = torch.randn(m, k, generator=gen).to(dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        bounds = [(s, min(m, s + rows)) for s in range(0, m, rows)]

        def mm():
            for s, e in bounds:
                torch.mm(x[s:e], w.t(), out=out[s:e])

        def onednn():
            for s, e in bounds:
                F.conv2d(x[s:e].view(1, e - s, 1, k).permute(0, 3, 1, 2), w.view(n, k, 1, 1))

        a, b = median_ms(mm, args.reps), median_ms(onednn, args.reps)
        conv, linear = (_prepacked_conv_chunks_ms(x, w, bounds, args.reps),
                        _packed_linear_ms(x, w, args.reps, bounds))
        cells = " | ".join("n/a" if t is None else f"{t:.1f}" for t in (conv, linear))
        print(f"| {m} | {k} | {n} | {rows} | {a:.1f} | {b:.1f} | {a / b:.2f} | {cells} |")
    return 0


def _prepacked_conv_chunks_ms(x, w, bounds, reps: int):
    """ms of the chunks on oneDNN's 1x1 conv with the weight reordered once, for the first
    chunk's rows (the private ops inductor uses), or ``None`` where this torch lacks them."""
    n, k = w.shape
    rows = bounds[0][1] - bounds[0][0]
    try:
        conv = torch.ops.mkldnn._convolution_pointwise
        packed = torch.ops.mkldnn._reorder_convolution_weight(
            w.view(n, k, 1, 1), [0, 0], [1, 1], [1, 1], 1, [1, k, rows, 1])
    except (AttributeError, RuntimeError):
        return None

    def chunks():
        for s, e in bounds:
            conv(x[s:e].view(1, e - s, 1, k).permute(0, 3, 1, 2), packed, None, [0, 0],
                 [1, 1], [1, 1], 1, "none", [], "")
    return median_ms(chunks, reps)


if __name__ == "__main__":
    raise SystemExit(main())
