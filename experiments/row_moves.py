"""What moving feature rows costs next to the dense conv (BENCHMARKS.md, the AMX Xeon).

    python -m experiments.row_moves gather [--channels 256] [--seconds 150] [--threads 2]
        [--dtype bfloat16] [--chunk-rows N ...]
    python -m experiments.row_moves scatter [--reps 30] [--threads 2] [--dtype bfloat16]

``gather``: a 3x3 conv (dilation 2) on a 64x128 channels-last map, as the dense network runs
it, against the lattice engine's route for the same outputs: ``torch.mm`` on the whole im2col
matrix (no gather), the same in the engine's chunks (4M elements each) and in chunks of
``--chunk-rows``, and the gather into the engine's chunks by ``index_select`` (random rows, 9
per output) before each. The variants take
turns, minimum of 4 calls each, in rounds for ``--seconds``; printed per round (this machine's
speed changes within minutes, and not alike for all of them) and as medians of the ratios to
the conv over all rounds and over the fast ones (conv within 1.5x of its fastest round).

``scatter``: writing rows into place in a larger matrix (``out[rows] = y``, sorted rows) with
``index_copy_``, with ``index_copy_`` on ``int64`` views of the rows (the lattice engine's
``_copy_rows``), and, for scale, an ``index_select`` of as many rows; median of ``--reps`` after
two warm-ups, variants in turn.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from cad_spconv.engines.lattice import _GATHER_CHUNK_ELEMENTS as CHUNK_ELEMENTS, _copy_rows
from experiments.common import ExperimentParser, table_header

# (rows of the output matrix, rows written, channels): the backbone's step-1 layers and the ASPP
SCATTER_SHAPES = [(8000, 5738, 256), (8000, 4000, 512), (2000, 1500, 2048), (8000, 1820, 256)]


def _in_turns(fns: dict, reps: int, best: bool = False) -> dict:
    """Per variant, the median (``best``: minimum) of ``reps`` calls, the variants in turn."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    pick = min if best else statistics.median
    return {k: 1e3 * pick(v) for k, v in times.items()}


def gather(args, dtype) -> None:
    c, (h, w) = args.channels, (64, 128)
    m, k = h * w, 9 * args.channels
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(1, c, h, w, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    weight = torch.randn(c, c, 3, 3, generator=gen).to(dtype).contiguous(
        memory_format=torch.channels_last)
    filters = weight.permute(0, 2, 3, 1).reshape(c, k)  # a view, as the engine reads it
    features = image.permute(0, 2, 3, 1).reshape(m, c)
    index = torch.randint(0, m, (m, 9), generator=gen)
    cols = torch.randn(m, k, generator=gen).to(dtype)
    rows = max(1, CHUNK_ELEMENTS // k)
    buf = torch.empty(rows * k, dtype=dtype)  # the gather's chunks only
    res = torch.empty(m, c, dtype=dtype)

    def chunks(gathered: bool, rows: int = rows):
        for s in range(0, m, rows):
            e = min(m, s + rows)
            block = cols[s:e]
            if gathered:
                block = torch.index_select(features, 0, index[s:e].reshape(-1),
                                           out=buf[:(e - s) * k].view(-1, c)).view(e - s, k)
            torch.mm(block, filters.t(), out=res[s:e])

    fns = {"conv": lambda: F.conv2d(image, weight, None, 1, 2, 2),
           "mm, whole": lambda: torch.mm(cols, filters.t()),
           "mm, chunks": lambda: chunks(False),
           "gather + mm, chunks": lambda: chunks(True)}
    for n in args.chunk_rows:  # the GEMM in chunks of other sizes
        fns[f"mm, {n}-row chunks"] = (lambda n=n: chunks(False, n))
    _in_turns(fns, 2)
    print(f"3x3 conv, {c} channels, dilation 2, 64x128 ({m} outputs, {rows} rows per chunk); "
          "ms of each round, then x conv")
    print("| s | conv [ms] | TMAC/s | " + " | ".join(list(fns)[1:]) + " |")
    print("|---" * (len(fns) + 2) + "|")
    rounds, start = [], time.time()
    with torch.inference_mode():
        while time.time() - start < args.seconds:
            r = _in_turns(fns, 4, best=True)
            rounds.append(r)
            print(f"| {time.time() - start:.0f} | {r['conv']:.2f} | "
                  f"{m * k * c / r['conv'] / 1e9:.2f} | "
                  + " | ".join(f"{r[n] / r['conv']:.2f}" for n in list(fns)[1:]) + " |",
                  flush=True)
            time.sleep(2)
    fastest = min(r["conv"] for r in rounds)
    for name, sel in (("all rounds", rounds),
                      ("fast rounds", [r for r in rounds if r["conv"] <= 1.5 * fastest])):
        print(f"{name} ({len(sel)}): conv {statistics.median(r['conv'] for r in sel):.2f} ms; "
              + ", ".join(f"{n} {statistics.median(r[n] / r['conv'] for r in sel):.2f}x"
                          for n in list(fns)[1:]))


def scatter(args, dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    print("| rows of out | rows written | channels | index_copy_ [ms] | as int64 words [ms] | "
          "words / index_copy_ | index_select [ms] |")
    print("|---|---|---|---|---|---|---|")
    for n_out, n, c in SCATTER_SHAPES:
        out = torch.zeros(n_out, c, dtype=dtype)
        y = torch.randn(n, c, generator=gen).to(dtype)
        rows = torch.randperm(n_out, generator=gen)[:n].sort().values
        order = torch.arange(n)
        want = torch.zeros_like(out).index_copy_(0, rows, y)
        _copy_rows(out, rows, y)
        assert torch.equal(out, want)
        fns = {"index_copy_": lambda: out.index_copy_(0, rows, y),
               "words": lambda: _copy_rows(out, rows, y),
               "index_select": lambda: torch.index_select(y, 0, order, out=out[:n])}
        _in_turns(fns, 2)
        r = _in_turns(fns, args.reps)
        print(f"| {n_out} | {n} | {c} | {r['index_copy_']:.3f} | {r['words']:.3f} | "
              f"{r['words'] / r['index_copy_']:.2f} | {r['index_select']:.3f} |", flush=True)


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.row_moves",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("gather", "scatter"))
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--chunk-rows", type=int, nargs="*", default=[],
                        help="gather: also the GEMM in chunks of these many rows")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.channels < 1 or args.seconds <= 0 or min(args.chunk_rows, default=1) < 1:
        parser.error("--channels, --seconds and --chunk-rows must be positive")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    (gather if args.mode == "gather" else scatter)(args, getattr(torch, args.dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
