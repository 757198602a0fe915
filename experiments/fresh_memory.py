"""What a fresh large tensor costs under the process's allocator (BENCHMARKS.md).

    python -m experiments.fresh_memory [--threads 2] [--reps 40] [--dtype bfloat16]
    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python -m experiments.fresh_memory

With nothing kept, the converted DeepLabV3-ResNet101 backbone (512x1024, 8->16) ends with its
stride-16 map (2048 channels, 32x64) densified onto the stride-8 grid: a nearest upsampling
into a fresh 32 MiB tensor (bfloat16), which dense stride 16 does not make. glibc's malloc
serves a block that large (above its mmap threshold, at most 32 MiB on 64-bit) with a fresh
``mmap`` and unmaps it on free, so every forward faults its pages in and the kernel zeroes
them; a caching allocator (tcmalloc, jemalloc: ``LD_PRELOAD``) hands the freed pages back.
The table times, under the allocator this process runs with (the header names the settings:
``LD_PRELOAD``, ``MALLOC_*``, ``GLIBC_TUNABLES``, ``THP_MEM_ALLOC_ENABLE``), median and min of
``--reps`` calls after 3 warm-ups:

- ``dense()``: ``CADTensor.dense()`` of the nothing-kept tensor (the densification);
- ``dense(out=kept)``: the same upsampling into a buffer allocated once (the copy alone);
- ``fresh + first touch``: ``torch.empty`` of the output's size, one write per element;
- ``clone of the stride-16 map``: 8 MiB, the size of dense stride 16's output.
"""
from __future__ import annotations

import torch

from cad_apps.bench.measure import _median
from experiments.common import ExperimentParser, table_header, timed_ms

# the nothing-kept tensor at the backbone's end: batch, channels, stride-16 grid (512x1024)
SHAPE = (1, 2048, 32, 64)


def _times(fn, reps: int) -> tuple[float, float]:
    """(median, min) ms of ``reps`` calls after 3 warm-ups, each result released at once."""
    t = timed_ms(fn, reps)
    return _median(t), min(t)


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.fresh_memory",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    torch.set_num_threads(args.threads)
    print(table_header(args))

    from cad_spconv.plan import make_plan
    from cad_spconv.tensor import CADTensor

    dtype = getattr(torch, args.dtype)
    B, C, h, w = SHAPE
    plan = make_plan(torch.zeros(B, 1, 2 * h, 2 * w, dtype=torch.bool), (2 * h, 2 * w), 1)
    cells = torch.randn(B * h * w, C, generator=torch.Generator().manual_seed(0)).to(dtype)
    x = CADTensor(cells, plan, 1)
    grid_map = cells.view(B, h, w, C).permute(0, 3, 1, 2)  # NCHW, channels-last strides
    kept = torch.empty_like(x.dense())  # the upsampled map: channels-last strides
    size = kept.numel() * kept.element_size()
    routes = {
        "dense()": lambda: x.dense(),
        "dense(out=kept)": lambda: x.dense(out=kept),
        "fresh + first touch": lambda: torch.empty(kept.shape, dtype=dtype).fill_(0),
        "clone of the stride-16 map": lambda: grid_map.clone(memory_format=torch.channels_last),
    }
    print(f"{args.dtype}, output {tuple(kept.shape)} = {size / 2 ** 20:.0f} MiB; ms per call")
    print("| route | median | min |")
    print("|---|---|---|")
    for name, fn in routes.items():
        med, low = _times(fn, args.reps)
        print(f"| {name} | {med:.2f} | {low:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
