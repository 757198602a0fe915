"""Gathered vs dense off-lattice phases of the lattice engine's stride-1 convs (BENCHMARKS.md).

    python -m experiments.dense_phases layers [--threads 2] [--reps 5] [--dtype bfloat16]
    python -m experiments.dense_phases network [--threshold 0.35] [--sparse-head] [--reps 5]
        [--dtype bfloat16]

At step 1 (the stride-16 part of a ResNet converted 8->16) a stride-1 conv's output sites off
the stride-16 lattice fall into three phases (cells at offsets (0, 1), (1, 0), (1, 1) from it),
each reading only cells of its own phase. The lattice engine computes a phase's sites either
by gather + GEMM (every tap of every site) or by one dense conv over the whole phase grid,
filled through the owner map (padded taps skipped by oneDNN, cells that are not sites computed
too); ``cad_spconv.engines.lattice.gather_cost`` decides per layer. This times one conv on a
64x128 grid (a 512x1024 image at stride 8) with random 8x8-cell blocks kept (about the given
share of cells), for the layer shapes of DeepLabV3-ResNet101: the 3x3 convs of layer3 and
layer4 and the ASPP's three 3x3 convs (rates 12 / 24 / 36 at stride 8). Columns: every phase
gathered, every phase dense, and what the engine's rule picks (phases dense of 3); median of
``--reps`` after one warm-up, the three taking turns; then the dense network's conv of the same
layer on the whole map (stride 8, channels-last) and the share of its taps inside the map.

``network``: DeepLabV3-ResNet101 at 512x1024 on the three frames of
``../shared/data/cityscapes_frames/`` with edge masks (the bench's variants, random weights),
in one process: the dense stride-8 network (channels-last) against CAD with every phase
gathered and CAD with the engine's rule, taking turns; per frame and summed, as fractions of
the dense network's time. The backbone, or with ``--sparse-head`` the whole model with the head
on the multi-resolution tensor (whose ASPP 3x3 convs run on the products engine in every CAD
column: ``lattice.products_pay``).
"""
from __future__ import annotations

import glob
import time

import torch

from cad_apps.bench.measure import _median
from experiments.common import ExperimentParser, table_header

# (C_in, C_out, dilation on the step-1 lattice): layer3, layer4, ASPP rates 12 / 24 / 36
LAYERS = [(256, 256, 2), (512, 512, 4), (2048, 256, 6), (2048, 256, 12), (2048, 256, 18)]
KEPT = (0.3, 0.6, 0.9)
FRAMES = "../shared/data/cityscapes_frames/*.png"  # network mode: the three real frames


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.dense_phases",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("layers", "network"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threshold", type=float, default=0.35, help="network: edge threshold")
    parser.add_argument("--sparse-head", action="store_true", help="network: the whole model, "
                        "its head on the multi-resolution tensor")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.mode == "network" and not glob.glob(FRAMES):
        parser.error(f"network needs the Cityscapes frames in {FRAMES}; none found")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(table_header(args))
    return (_layers if args.mode == "layers" else _network)(args)


def _rules():
    import cad_spconv.engines.lattice as lattice

    rule = lattice.gather_cost
    return lattice, rule, {"gathered": lambda *a: 0.0, "dense": lambda *a: float("inf"),
                           "rule": rule}


def _dense_conv_ms(c_in, c_out, dilation, grid, dtype, gen, reps) -> float:
    """The dense network's 3x3 conv at stride 8 (taps ``dilation`` cells apart, channels-last,
    same padding): what the CAD layer replaces."""
    import torch.nn.functional as F

    x = torch.randn(1, c_in, *grid, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    samples = []
    with torch.inference_mode():
        for rep in range(reps + 1):
            start = time.perf_counter()
            F.conv2d(x, w, None, 1, dilation, dilation)
            if rep:
                samples.append(time.perf_counter() - start)
    return 1e3 * _median(samples)


def _taps_inside(dilation: int, grid) -> float:
    """Share of a dense 3x3 conv's taps that read the map, not its zero padding (oneDNN skips
    the others, while a multiply-add count includes them)."""
    share = 1.0
    for size in grid:
        pos = torch.arange(size)
        inside = sum(((pos + o * dilation >= 0) & (pos + o * dilation < size)).sum().item()
                     for o in (-1, 0, 1))
        share *= inside / (3 * size)
    return share


def _layers(args) -> int:
    from .common import lattice_split_only

    # the lattice split itself, also for the ASPP's shapes (which the engine now hands to the
    # products engine: experiments.products_first)
    with lattice_split_only():
        return _split_layers(args)


def _split_layers(args) -> int:
    from cad_spconv import CADTensor, LevelPlan, conv_rulebook, functional as CF

    dtype = getattr(torch, args.dtype)
    lattice, rule, costs = _rules()
    gen = torch.Generator().manual_seed(0)
    H, W = 64, 128
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}; ms")
    print("| kept cells | C_in | C_out | dilation | gathered | dense phases | gathered / dense "
          "| rule (dense phases) | dense 8 conv (taps inside) |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense8 = {}  # the dense network's conv of each layer on the whole 64x128 map
    try:
        for share in KEPT:
            blocks = torch.rand(1, H // 8, W // 8, generator=gen) < share
            keep = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)
            plan = LevelPlan.from_keep(keep, (H, W), 1)
            kept = float(plan.level_fractions()[0, 0])
            for c_in, c_out, d in LAYERS:
                feats = torch.randn(plan.num_sites(1), c_in, generator=gen).to(dtype)
                w = torch.randn(c_out, c_in, 3, 3, generator=gen).to(dtype).contiguous(
                    memory_format=torch.channels_last)
                samples = {name: [] for name in costs}
                with torch.inference_mode():
                    for rep in range(args.reps + 1):
                        for name, cost in costs.items():
                            lattice.gather_cost = cost
                            x = CADTensor(feats, plan, 1)  # its own rulebook cache
                            CF.conv2d(x, w, None, 1, d, 1, "lattice")  # builds the split
                            start = time.perf_counter()
                            CF.conv2d(x, w, None, 1, d, 1, "lattice")
                            if rep:
                                samples[name].append(time.perf_counter() - start)
                ms = {name: 1e3 * _median(s) for name, s in samples.items()}
                if (c_in, c_out, d) not in dense8:
                    dense8[c_in, c_out, d] = _dense_conv_ms(c_in, c_out, 2 * d, (H, W), dtype,
                                                            gen, args.reps)
                book = conv_rulebook(plan, (3, 3), (d, d), 1, 1)
                chosen = len(book.lattice(rule(9, c_in, lattice.onednn_route(feats, chunk=True)),
                                          lattice._reads_inside_rows(feats, 1)).phases)
                print(f"| {kept:.2f} | {c_in} | {c_out} | {d} | {ms['gathered']:.1f} | "
                      f"{ms['dense']:.1f} | {ms['gathered'] / ms['dense']:.2f} | "
                      f"{ms['rule']:.1f} ({chosen}) | {dense8[c_in, c_out, d]:.1f} "
                      f"({_taps_inside(2 * d, (H, W)):.0%}) |", flush=True)
    finally:
        lattice.gather_cost = rule
    return 0


def _network(args) -> int:
    from cad_apps.bench import _inputs, _masks
    from experiments.common import bench_variants

    frames = sorted(glob.glob(FRAMES))
    scope = ["--scope", "model", "--sparse-head"] if args.sparse_head else ["--scope", "backbone"]
    b, cfg, variants = bench_variants(
        ["--dtype", args.dtype, "--threads", str(args.threads), "--threshold",
         str(args.threshold), "--engine", "lattice", "--dense-format", "channels_last", *scope,
         "--images", *frames])
    batches, names = _inputs(b)
    keeps, _ = _masks(b, batches, cfg["device"])
    lattice, rule, costs = _rules()
    runs = {"dense 8": (variants["dense8[channels_last]"], rule),
            "CAD, phases gathered": (variants["cad[lattice]"], costs["gathered"]),
            "CAD, engine's rule": (variants["cad[lattice]"], rule)}
    total = dict.fromkeys(runs, 0.0)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, edge "
          f"{args.threshold}, {'whole model, sparse head' if args.sparse_head else 'backbone'}")
    print("| frame | " + " | ".join(f"{k} [ms]" for k in runs) + " | fractions of dense 8 |")
    print("|---|" + "---|" * (len(runs) + 1))
    try:
        for images, keep, name in zip(batches, keeps, names):
            states = {k: v.setup(images, keep) for k, (v, _) in runs.items()}
            samples = {k: [] for k in runs}
            with torch.inference_mode():
                for rep in range(args.reps + 1):
                    for k, (v, cost) in runs.items():
                        lattice.gather_cost = cost
                        start = time.perf_counter()
                        v.run(*states[k])
                        if rep:
                            samples[k].append(time.perf_counter() - start)
            ms = {k: 1e3 * _median(s) for k, s in samples.items()}
            for k in runs:
                total[k] += ms[k]
            print(f"| {name} | " + " | ".join(f"{ms[k]:.0f}" for k in runs) + " | " +
                  " / ".join(f"{ms[k] / ms['dense 8']:.3f}" for k in runs) + " |", flush=True)
    finally:
        lattice.gather_cost = rule
    print("| sum | " + " | ".join(f"{total[k]:.0f}" for k in runs) + " | " +
          " / ".join(f"{total[k] / total['dense 8']:.3f}" for k in runs) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
