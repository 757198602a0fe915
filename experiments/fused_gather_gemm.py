"""The fused gather + GEMM kernel against the lattice engine's own route (BENCHMARKS.md; AMX
and AVX512-BF16).

    python -m experiments.fused_gather_gemm [--threshold 0.35] [--reps 30] [--block-rows 64]
        [--threads 2] [--dtype bfloat16|float32] [--backbone | --grid]

The lattice engine gathers the im2col rows of the off-lattice sites of a 3x3 conv into chunks of
4M elements (8 MiB in bfloat16, beyond a core's L2), multiplies each chunk with ``torch.mm``
(oneDNN's AMX matmul on Intel Xeons) and scatters the result rows into place. The optional
kernel of :mod:`cad_spconv.engines.fused` does all three per block of ``--block-rows`` sites in
cache (that module says how). This measures it, on for the runs marked "fused" and off for the
others; it needs what the kernel needs (a C++ compiler, a CPU with AMX or AVX512-BF16), and
says so otherwise. The kernel's bfloat16 GEMM runs on AMX tiles where the CPU has them, else
in AVX512-BF16 registers; its float32 GEMM (``--dtype float32``) in AVX-512 registers.

Measured like ``experiments.tiled_phases``: the 3x3 convs of DeepLabV3-ResNet101's layer3 and
layer4 on the edge masks of the frames in ``../shared/data/cityscapes_frames/`` (random features
and weights), the lattice engine as it runs against the same engine with its gather + GEMM
swapped for the kernel (same lattice and phase parts), the median of the paired ratios of
``--reps`` runs taking turns. Each result is first checked against the engine in float64 on the
same inputs, within the rounding bound of a float32 sum (rounded once to bfloat16 there).
``--dtype float32``: the kernel's float32 form (AVX-512 FMAs) against the engine's float32
route.

``--backbone``: the whole DeepLabV3-ResNet101 backbone instead (random weights, converted
8 -> 16, ``--dtype``, channels-last, the output densified at stride 8 as the bench does), each
frame's edge mask, the engine and the fused kernel taking turns (the first of each pair
alternating): per frame the median of the paired ratios, and the ratio of the summed medians.
``--backbone --sites``: the kernel on both sides, computing every site of a mixed-level conv
(``lattice.FUSED_SITES``, the default) against the rest only, the lattice sites on a dense
conv ("engine" in the table is then the latter).
``--grid``: the kernel's own rate, where no engine runs: a 3x3 conv (zero padding) computed at
every cell of a 64 x 64 grid, 256 and 512 channels, through the kernel against oneDNN's dense
conv of the same channels-last map (``F.conv2d``), both in turns (:func:`paired_ms`), with
GFLOP/s. Where 16 sites read 16 consecutive rows the kernel reads them in place, so this is
its GEMM with the least gathering: the rate an off-lattice site cannot beat. Timed as the
engine calls it, the filters repacked on each call (:func:`fused.packed_filters`).
"""
from __future__ import annotations

import contextlib
import glob
import statistics
import time
from typing import Optional

import torch

from cad_spconv.engines import fused, sparse_conv
from cad_spconv.rulebook import conv_rulebook
from experiments.common import ExperimentParser, paired_ms, paired_ratio, table_header
from experiments.tiled_phases import FRAMES, LAYERS, edge_plans

@contextlib.contextmanager
def fused_rest(block_rows: Optional[int], on: bool = True):
    """Within the scope the lattice engine runs its off-lattice rows on the library's fused
    kernel (:mod:`cad_spconv.engines.fused`) where it applies, ``block_rows`` sites per block
    (``None``: the library's choice per layer; ``on``), or on its own route (not ``on``; the
    kernel is on by default on CPUs with AMX or AVX512-BF16)."""
    state, rows = dict(fused._state), fused.BLOCK_ROWS
    fused.enable(on)
    fused.BLOCK_ROWS = block_rows
    try:
        yield
    finally:
        fused.BLOCK_ROWS = rows
        fused._state.update(state)


def check_within_rounding(got: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                          book) -> None:
    """``got`` (bfloat16 or float32) against the engine in float64 on the same inputs: within
    one rounding of the result to its type plus a float32 sum's error over the ``9 C``
    products."""
    f, w = features.double(), weight.double()
    _assert_rounded(got, sparse_conv(f, w, None, book, 1, "lattice"),
                    sparse_conv(f.abs(), w.abs(), None, book, 1, "lattice"), w[0].numel())


def _assert_rounded(got: torch.Tensor, want: torch.Tensor, mass: torch.Tensor,
                    terms: int) -> None:
    """``got`` within one rounding of ``want`` to ``got``'s type plus a float32 sum's error
    over ``terms`` products whose magnitudes sum to ``mass``."""
    unit = 2.0 ** -8 if got.dtype == torch.bfloat16 else 2.0 ** -24
    bound = unit * want.abs() + terms * 2.0 ** -24 * mass * 1.01 + 1e-30
    err = (got.double() - want).abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"fused kernel off by {float((err / bound).max()):.2f}x the "
                             "rounding bound")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.fused_gather_gemm",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=None,
                        help="the edge masks' threshold (default 0.35); not with --grid")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--block-rows", type=int, default=None,
                        help="sites per block of the kernel (a multiple of 32); default: the "
                             "library's choice per layer, fused.block_rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the features' and filters' type (float32: the kernel's AVX-512 "
                             "FMA form)")
    parser.add_argument("--backbone", action="store_true",
                        help="the whole backbone, engine against fused, instead of layers")
    parser.add_argument("--sites", action="store_true",
                        help="with --backbone: the kernel at every site against the rest only")
    parser.add_argument("--grid", action="store_true",
                        help="the kernel at every cell of a dense grid against oneDNN's conv")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.sites and not args.backbone:
        parser.error("--sites compares two routes of the whole backbone: give --backbone too")
    if args.grid and args.backbone:
        parser.error("--grid and --backbone are two different measurements: give one")
    if args.grid and args.threshold is not None:
        parser.error("--grid computes every cell of a grid, no mask: leave out --threshold")
    args.threshold = 0.35 if args.threshold is None else args.threshold
    if args.block_rows is not None and (args.block_rows < 32 or args.block_rows % 32):
        parser.error(f"--block-rows {args.block_rows}: the kernel takes sites 32 at a time "
                     "(two tiles of 16 on AMX); give a multiple of 32")
    if not args.grid and not glob.glob(FRAMES):
        parser.error(f"needs the Cityscapes frames in {FRAMES}; none found")
    try:
        fused.enable(True)  # built here, before any frame is read
    except fused.FusedKernelUnavailable as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    print(table_header(args))
    rows = "per layer (fused.block_rows)" if args.block_rows is None else args.block_rows
    where = "a dense grid" if args.grid else f"edge {args.threshold}"
    print(f"{args.dtype}, {where}, {rows} rows per block")
    args.dtype = getattr(torch, args.dtype)
    return (_backbone if args.backbone else _grid if args.grid else _layers)(args)


def _backbone(args) -> int:
    import torchvision

    from adapters import convert_segmentation
    from cad_apps.bench.variants import _tamed
    from experiments.products_first import _frame

    torch.manual_seed(0)
    model = _tamed(torchvision.models.segmentation.deeplabv3_resnet101(  # the bench's model
        weights=None, weights_backbone=None, num_classes=19, aux_loss=False), 0).eval()
    cl = torch.channels_last
    cad = convert_segmentation(model, 8, 16).eval().to(args.dtype).to(memory_format=cl)
    print("| frame | engine [ms] | fused [ms] | fused / engine, paired |")
    print("|---|---|---|---|")
    sums = {"engine": 0.0, "fused": 0.0}
    for path in sorted(glob.glob(FRAMES)):
        image, keep = _frame(path, ["--threshold", str(args.threshold),
                                    "--size", "512", "1024"])
        x = image.to(args.dtype).contiguous(memory_format=cl)
        samples = {"engine": [], "fused": []}
        with torch.inference_mode():
            for rep in range(args.reps + 1):
                for k in (("engine", "fused") if rep % 2 else ("fused", "engine")):
                    with _route(args, k == "fused"):
                        start = time.perf_counter()
                        cad.forward_features(x, keep).dense()
                        elapsed = time.perf_counter() - start
                    if rep:
                        samples[k].append(elapsed)
        ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
        for k in sums:
            sums[k] += ms[k]
        ratio = paired_ratio(samples["fused"], samples["engine"])
        print(f"| {path.rsplit('/', 1)[-1]} | {ms['engine']:.0f} | {ms['fused']:.0f} | "
              f"{ratio:.3f} |", flush=True)
    print(f"| sum | {sums['engine']:.0f} | {sums['fused']:.0f} | "
          f"{sums['fused'] / sums['engine']:.3f} (of the sums) |")
    return 0


@contextlib.contextmanager
def _route(args, fused_side: bool):
    """The scope of one side of ``--backbone``: the fused kernel on or off or, with
    ``--sites``, on at every site or for the rest only."""
    from cad_spconv.engines import lattice

    was = lattice.FUSED_SITES
    lattice.FUSED_SITES = fused_side if args.sites else was
    try:
        with fused_rest(args.block_rows, on=fused_side or args.sites):
            yield
    finally:
        lattice.FUSED_SITES = was


def _grid(args, size: int = 64) -> int:
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    # the 3x3 taps' rows of every cell of a size x size grid, -1 (the kernel's zero) outside
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    taps = [(y + dy, x + dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    index = torch.stack([torch.where((ty >= 0) & (ty < size) & (tx >= 0) & (tx < size),
                                     ty * size + tx, -1).flatten() for ty, tx in taps], 1)
    rows = torch.arange(size * size)
    print("| C | oneDNN conv [ms] | GFLOP/s | kernel [ms] | GFLOP/s | kernel / conv, paired |")
    print("|---|---|---|---|---|---|")
    for channels in (256, 512):
        image = torch.randn(1, channels, size, size, generator=gen).to(args.dtype)
        image = image.contiguous(memory_format=torch.channels_last)
        weight = (torch.randn(channels, channels, 3, 3, generator=gen) / (3 * channels ** 0.5)
                  ).to(args.dtype).contiguous(memory_format=torch.channels_last)
        features = image.permute(0, 2, 3, 1).reshape(-1, channels)  # a view: channels-last
        out = torch.empty(size * size, channels, dtype=args.dtype)
        kernel = lambda: fused._run(features, index, rows, weight, out, None, False)
        conv = lambda: F.conv2d(image, weight, None, 1, 1)
        with torch.inference_mode(), fused_rest(args.block_rows):
            kernel()
            check_within_rounding_dense(out, image, weight)
            ms_kernel, ms_conv = paired_ms(kernel, conv, args.reps)
        flop = 2 * size * size * 9 * channels * channels
        med = {k: statistics.median(v) for k, v in (("kernel", ms_kernel), ("conv", ms_conv))}
        print(f"| {channels} | {med['conv']:.2f} | {flop / med['conv'] / 1e6:.0f} | "
              f"{med['kernel']:.2f} | {flop / med['kernel'] / 1e6:.0f} | "
              f"{paired_ratio(ms_kernel, ms_conv):.3f} |", flush=True)
    return 0


def check_within_rounding_dense(got: torch.Tensor, image: torch.Tensor,
                                weight: torch.Tensor) -> None:
    """``got`` (the grid's cells' rows) against the float64 conv of the same map, as
    :func:`check_within_rounding`."""
    import torch.nn.functional as F

    i, w = image.double(), weight.double()
    rows = lambda y: y.permute(0, 2, 3, 1).reshape(got.shape)
    _assert_rounded(got, rows(F.conv2d(i, w, None, 1, 1)),
                    rows(F.conv2d(i.abs(), w.abs(), None, 1, 1)), w[0].numel())


def _layers(args) -> int:
    gen = torch.Generator().manual_seed(0)
    print("| frame | C | dilation | off-lattice sites | lattice engine [ms] | fused / engine |")
    print("|---|---|---|---|---|---|")
    for name, plan in edge_plans(args.threshold):
        for channels, dilation in LAYERS:
            book = conv_rulebook(plan, (3, 3), (dilation, dilation), 1, 1)
            features = (torch.randn(plan.num_sites(1), channels, generator=gen)
                        / channels ** 0.5).to(args.dtype)
            weight = torch.randn(channels, channels, 3, 3, generator=gen).to(
                args.dtype).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                engine = lambda: sparse_conv(features, weight, None, book, 1, "lattice")
                with fused_rest(args.block_rows, on=False):
                    engine()  # the split the engine runs
                with fused_rest(args.block_rows):
                    check_within_rounding(engine(), features, weight, book)
                samples = {"engine": [], "fused": []}
                for rep in range(args.reps + 1):
                    for k in samples:
                        with fused_rest(args.block_rows, on=k == "fused"):
                            start = time.perf_counter()
                            engine()
                            elapsed = time.perf_counter() - start
                        if rep:
                            samples[k].append(elapsed)
            split = book.lattice(*book.lattice_args()[-1])
            ratio = paired_ratio(samples["fused"], samples["engine"])
            print(f"| {name} | {channels} | {dilation} | {split.num_rest} | "
                  f"{1e3 * statistics.median(samples['engine']):.1f} | {ratio:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
