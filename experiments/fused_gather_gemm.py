"""The fused gather + GEMM kernel against the lattice engine's own route (BENCHMARKS.md; AMX
and AVX512-BF16).

    python -m experiments.fused_gather_gemm [--threshold 0.35] [--reps 30] [--block-rows 64]
        [--threads 2] [--backbone]

The lattice engine gathers the im2col rows of the off-lattice sites of a 3x3 conv into chunks of
4M elements (8 MiB in bfloat16, beyond a core's L2), multiplies each chunk with ``torch.mm``
(oneDNN's AMX matmul on Intel Xeons) and scatters the result rows into place. The optional
kernel of :mod:`cad_spconv.engines.fused` does all three per block of ``--block-rows`` sites in
cache (that module says how). This measures it, on for the runs marked "fused" and off for the
others; it needs what the kernel needs (a C++ compiler, a CPU with AMX or AVX512-BF16), and
says so otherwise. The kernel's GEMM runs on AMX tiles where the CPU has them, else in
AVX512-BF16 registers.

Measured like ``experiments.tiled_phases``: the 3x3 convs of DeepLabV3-ResNet101's layer3 and
layer4 on the edge masks of the frames in ``../shared/data/cityscapes_frames/`` (random features
and weights), the lattice engine as it runs against the same engine with its gather + GEMM
swapped for the kernel (same lattice and phase parts), the median of the paired ratios of
``--reps`` runs taking turns. Each result is first checked against the engine in float64 on the
same bfloat16 inputs, within the rounding bound of a float32 sum rounded once to bfloat16.

``--backbone``: the whole DeepLabV3-ResNet101 backbone instead (random weights, converted
8 -> 16, bfloat16, channels-last, the output densified at stride 8 as the bench does), each
frame's edge mask, the engine and the fused kernel taking turns (the first of each pair
alternating): per frame the median of the paired ratios, and the ratio of the summed medians.
``--backbone --sites``: the kernel on both sides, computing every site of a mixed-level conv
(``lattice.FUSED_SITES``, the default) against the rest only, the lattice sites on a dense
conv ("engine" in the table is then the latter).
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
from experiments.common import ExperimentParser, paired_ratio, table_header
from experiments.tiled_phases import FRAMES, LAYERS, edge_plans

@contextlib.contextmanager
def fused_rest(block_rows: Optional[int], on: bool = True):
    """Within the scope the lattice engine runs its off-lattice rows on the library's fused
    kernel (:mod:`cad_spconv.engines.fused`) where it applies, ``block_rows`` sites per block
    (``None``: the library's choice per layer; ``on``), or on its own route (not ``on``; the
    kernel is on by default on AMX CPUs)."""
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
    """``got`` (bfloat16) against the engine in float64 on the same inputs: within one
    bfloat16 rounding of the result plus a float32 sum's error over the ``9 C`` products."""
    f, w = features.double(), weight.double()
    want = sparse_conv(f, w, None, book, 1, "lattice")
    mass = sparse_conv(f.abs(), w.abs(), None, book, 1, "lattice")
    terms = w[0].numel()
    bound = 2.0 ** -8 * want.abs() + terms * 2.0 ** -24 * mass * 1.01 + 1e-30
    err = (got.double() - want).abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"fused kernel off by {float((err / bound).max()):.2f}x the "
                             "rounding bound")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.fused_gather_gemm",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--block-rows", type=int, default=None,
                        help="sites per block of the kernel (a multiple of 32); default: the "
                             "library's choice per layer, fused.block_rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", action="store_true",
                        help="the whole backbone, engine against fused, instead of layers")
    parser.add_argument("--sites", action="store_true",
                        help="with --backbone: the kernel at every site against the rest only")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.sites and not args.backbone:
        parser.error("--sites compares two routes of the whole backbone: give --backbone too")
    if args.block_rows is not None and (args.block_rows < 32 or args.block_rows % 32):
        parser.error(f"--block-rows {args.block_rows}: the kernel takes sites 32 at a time "
                     "(two tiles of 16 on AMX); give a multiple of 32")
    if not glob.glob(FRAMES):
        parser.error(f"needs the Cityscapes frames in {FRAMES}; none found")
    try:
        fused.enable(True)  # built here, before any frame is read
    except fused.FusedKernelUnavailable as e:
        parser.error(str(e))
    torch.set_num_threads(args.threads)
    print(table_header(args))
    rows = "per layer (fused.block_rows)" if args.block_rows is None else args.block_rows
    print(f"bfloat16, edge {args.threshold}, {rows} rows per block")
    return (_backbone if args.backbone else _layers)(args)


def _backbone(args) -> int:
    import torchvision

    from adapters import convert_segmentation
    from cad_apps.bench.variants import _tamed
    from experiments.products_first import _frame

    torch.manual_seed(0)
    model = _tamed(torchvision.models.segmentation.deeplabv3_resnet101(  # the bench's model
        weights=None, weights_backbone=None, num_classes=19, aux_loss=False), 0).eval()
    cl = torch.channels_last
    cad = convert_segmentation(model, 8, 16).eval().to(torch.bfloat16).to(memory_format=cl)
    print("| frame | engine [ms] | fused [ms] | fused / engine, paired |")
    print("|---|---|---|---|")
    sums = {"engine": 0.0, "fused": 0.0}
    for path in sorted(glob.glob(FRAMES)):
        image, keep = _frame(path, ["--threshold", str(args.threshold),
                                    "--size", "512", "1024"])
        x = image.to(torch.bfloat16).contiguous(memory_format=cl)
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


def _layers(args) -> int:
    gen = torch.Generator().manual_seed(0)
    print("| frame | C | dilation | off-lattice sites | lattice engine [ms] | fused / engine |")
    print("|---|---|---|---|---|---|")
    for name, plan in edge_plans(args.threshold):
        for channels, dilation in LAYERS:
            book = conv_rulebook(plan, (3, 3), (dilation, dilation), 1, 1)
            features = (torch.randn(plan.num_sites(1), channels, generator=gen)
                        / channels ** 0.5).to(torch.bfloat16)
            weight = torch.randn(channels, channels, 3, 3, generator=gen).to(
                torch.bfloat16).contiguous(memory_format=torch.channels_last)
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
