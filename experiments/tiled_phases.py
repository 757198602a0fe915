"""Tiled off-lattice phases against the lattice engine (BENCHMARKS.md, the AMX Xeon).

    python -m experiments.tiled_phases [--threshold 0.35] [--tiles 4 8] [--reps 30]
        [--dtype bfloat16] [--threads 2]

The lattice engine computes the output sites of a stride-1 conv at step 1 that lie off the
stride-16 lattice by im2col (every tap of every site, ``9 x C_in`` elements) and a GEMM, or a
whole phase (the cells at one offset from the lattice) as a dense conv. A tiled phase cuts each
phase grid into ``T x T`` tiles, gathers only the tiles that hold sites, each with its halo
(``(T + 2h)^2`` cells filled through the owner map, ``h`` the dilation on the phase grid, zero
outside the grid), and runs one dense conv on all of them as a batch: its gather moves
``(T + 2h)^2 / (T^2 * coverage)`` input rows per site instead of 9, but every cell of a tile
is computed.

This measures it on the edge masks of the frames in ``../shared/data/cityscapes_frames/``
(512x1024, 8 -> 16) for the 3x3 convs of DeepLabV3-ResNet101's layer3 and layer4 (256 and 512
channels, dilation 1 and 2 at stride 16), random features and weights: the tiles' coverage
(sites / tile cells), the input rows gathered per site, and the tiled conv's time over the
lattice engine's (both compute the lattice part as one dense conv), the median of the paired
ratios of ``--reps`` runs taking turns. Each tiled conv is first checked against the engine in
float64.
"""
from __future__ import annotations

import glob
import statistics
import time

import torch
import torch.nn.functional as F

from cad_spconv.engines import sparse_conv
from cad_spconv.engines.lattice import lattice_conv
from cad_spconv.engines.layouts import tracks_grad
from cad_spconv.rulebook import ConvRulebook, conv_rulebook
from experiments.common import ExperimentParser, table_header

FRAMES = "../shared/data/cityscapes_frames/*.png"
# (channels, dilation at the coarsest stride): the 3x3 convs of layer3 and layer4
LAYERS = ((256, 1), (512, 2))


def tile_phases(book: ConvRulebook, size: int) -> dict:
    """The off-lattice output sites of ``book`` (stride 1 at step ``t >= 1``) in tiles of
    ``size x size`` cells of their phase grids: ``rows`` (the output rows), ``index`` (the
    input row of every halo-padded tile cell, raster order over ``[tiles, th, tw]``, a cell
    outside the grid pointing at a row of its own image), ``outside`` (those cells' flat
    positions, to zero), ``shape`` ``(tiles, th, tw)``, ``positions`` (each site's flat
    position in the tiles' conv output ``[tiles, size, size]``) and ``dilation``."""
    plan, t = book.plan, book.step_in
    if t == 0 or book.step_out != t:
        raise ValueError("tiled phases need a stride-1 conv at step >= 1")
    s = 2 ** t
    H, W = plan.grid
    geo = plan.geometry(t)
    coords = geo.coords
    rows = (((coords[:, 1] | coords[:, 2]) & (s - 1)) != 0).nonzero()[:, 0]
    image, y, x = coords[rows].unbind(1)
    a, b, py, px = y & (s - 1), x & (s - 1), y >> t, x >> t
    grid = (-(-H // s), -(-W // s))  # the largest phase grid
    ny, nx = -(-grid[0] // size), -(-grid[1] // size)  # tiles across it
    key = ((image * s * s + a * s + b) * ny + py // size) * nx + px // size
    tiles, tile_of_site = torch.unique(key, return_inverse=True)
    tx, ty, phase = tiles % nx, tiles // nx % ny, tiles // (nx * ny)
    timage, ta, tb = phase // (s * s), phase % (s * s) // s, phase % s
    (kh, kw), (dh, dw) = book.kernel_size, book.dilation
    hy, hx = dh * (kh // 2), dw * (kw // 2)
    cy = ta[:, None] + s * (ty[:, None] * size + torch.arange(-hy, size + hy))  # finest rows
    cx = tb[:, None] + s * (tx[:, None] * size + torch.arange(-hx, size + hx))
    inside = ((cy >= 0) & (cy < H))[:, :, None] & ((cx >= 0) & (cx < W))[:, None, :]
    index = geo.owner[timage[:, None, None], cy.clamp(0, H - 1)[:, :, None],
                      cx.clamp(0, W - 1)[:, None, :]]
    positions = (tile_of_site * size + py % size) * size + px % size
    return {"rows": rows, "index": index.reshape(-1),
            "outside": (~inside).reshape(-1).nonzero()[:, 0], "shape": tuple(index.shape),
            "positions": positions, "dilation": (dh, dw)}


def tiled_conv(features: torch.Tensor, weight: torch.Tensor, book: ConvRulebook,
               tiles: dict) -> torch.Tensor:
    """The conv of ``book`` (3x3-style, no bias): the lattice as the lattice engine runs it
    (:func:`~cad_spconv.engines.lattice.lattice_conv`), the off-lattice sites through
    ``tiles`` (:func:`tile_phases`)."""
    c_in, c_out = features.shape[1], weight.shape[0]
    split = book.lattice(0.0)  # no phase dense: only its lattice part is read here
    out = lattice_conv(features, weight, None, book, split, 1,
                       scratch=not tracks_grad(features, weight, None))
    cells = features.index_select(0, tiles["index"])
    cells.index_fill_(0, tiles["outside"], 0)  # a fill: 0 * inf would be NaN
    cells = cells.view(*tiles["shape"], c_in).permute(0, 3, 1, 2)
    z = F.conv2d(cells, weight, None, 1, 0, tiles["dilation"])
    z = z.permute(0, 2, 3, 1).reshape(-1, c_out)
    out.index_copy_(0, tiles["rows"], z.index_select(0, tiles["positions"]))
    return out


def edge_plans(threshold: float):
    """``(file name, plan)`` of each frame in ``FRAMES``: its edge mask at ``threshold``
    (reference detector, dilation 11) at 512x1024: kept cells at stride 8, the rest at 16."""
    from adapters.common import keep_to_grid
    from cad_apps.data import read_image
    from cad_spconv.images import normalize
    from cad_spconv.masks import edge
    from cad_spconv.plan import make_plan

    for path in sorted(glob.glob(FRAMES)):
        rgb = torch.from_numpy(read_image(path, "RGB").copy()).permute(2, 0, 1)
        image = F.interpolate(normalize(rgb)[None], size=(512, 1024), mode="bilinear",
                              align_corners=False)
        keep = keep_to_grid(edge(image, threshold, 11), (64, 128), (512, 1024), 8)
        yield path.rsplit("/", 1)[-1], make_plan(keep, (64, 128), 1)


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.tiled_phases",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument("--tiles", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.reps < 1 or min(args.tiles) < 1:
        parser.error("--reps and --tiles must be >= 1")
    if not glob.glob(FRAMES):
        parser.error(f"needs the Cityscapes frames in {FRAMES}; none found")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(table_header(args))
    print(f"{args.dtype}, edge {args.threshold}")
    print("| frame | C | dilation | off-lattice sites | T | tiles | coverage | rows gathered "
          "per site | lattice engine [ms] | tiled / engine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, plan in edge_plans(args.threshold):
        for channels, dilation in LAYERS:
            book = conv_rulebook(plan, (3, 3), (dilation, dilation), 1, 1)
            f64 = torch.randn(plan.num_sites(1), channels, generator=gen, dtype=torch.float64)
            w64 = torch.randn(channels, channels, 3, 3, generator=gen, dtype=torch.float64)
            f64 = f64 / channels ** 0.5
            features = f64.to(dtype)
            weight = w64.to(dtype).contiguous(memory_format=torch.channels_last)
            engine = sparse_conv(f64, w64, None, book, 1, "lattice")
            runs = {"engine": lambda: sparse_conv(features, weight, None, book, 1, "lattice")}
            tiled = {}
            for size in args.tiles:
                tiles = tiled[size] = tile_phases(book, size)
                torch.testing.assert_close(tiled_conv(f64, w64, book, tiles), engine)
                runs[size] = (lambda tiles=tiles: tiled_conv(features, weight, book, tiles))
            samples = {k: [] for k in runs}
            with torch.inference_mode():
                for rep in range(args.reps + 1):
                    for k, run in runs.items():
                        start = time.perf_counter()
                        run()
                        if rep:
                            samples[k].append(time.perf_counter() - start)
            ms = 1e3 * statistics.median(samples["engine"])
            for size, tiles in tiled.items():
                sites, count = tiles["rows"].numel(), tiles["shape"][0]
                ratio = statistics.median(a / b for a, b in zip(samples[size],
                                                                samples["engine"]))
                print(f"| {name} | {channels} | {dilation} | {sites} | {size} | {count} | "
                      f"{sites / (count * size * size):.2f} | "
                      f"{tiles['index'].numel() / sites:.2f} | {ms:.1f} | {ratio:.3f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
