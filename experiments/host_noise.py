"""Is this machine quiet enough to benchmark? (BENCHMARKS.md)

    python -m experiments.host_noise [--reps 40] [--max-ratio 1.3]

Times a 1-thread GEMM (512x1024 by 1024x2048; bfloat16 where the CPU has native bfloat16, else
float32) pinned on each CPU of the process in turn, and prints per CPU the minimum, the median
and median / minimum. The dev VMs share their host: on a quiet one the median was within 15 % of
the minimum (Intel AMX Xeon, 2026-12-06 19:38) and one bench run's ratios held; on a busy one
it was 1.2-5x (16:45 the same day), one variant's runs spread up to 8x and the bench's verdicts
flipped both ways. Run it before a suite. ``--max-ratio R`` exits with status 1 where a CPU's
median / minimum exceeds R (for a script that waits for a quiet spell); without it, status 0.
"""
from __future__ import annotations

import os

import torch

from cad_apps.bench.measure import _median
from experiments.common import ExperimentParser, table_header, timed_ms

#: the GEMM: (M, K, N)
SHAPE = (512, 1024, 2048)


def _pinned_times(cpu, a, b, reps: int) -> list[float]:
    """ms of ``reps`` products ``a @ b`` on ``cpu`` alone, after 3 warm-ups."""
    os.sched_setaffinity(0, {cpu})
    return timed_ms(lambda: torch.mm(a, b), reps)


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.host_noise",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--max-ratio", type=float, default=None,
                        help="exit 1 where a CPU's median / minimum exceeds this")
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    if args.max_ratio is not None and not args.max_ratio >= 1:
        parser.error(f"--max-ratio must be >= 1 (a median is never below the minimum), got "
                     f"{args.max_ratio}")
    if not hasattr(os, "sched_setaffinity"):
        parser.error("needs os.sched_setaffinity (Linux) to pin the GEMM on each CPU")
    from cad_apps.bench.report import native_bfloat16

    threads = torch.get_num_threads()
    print(table_header(args))
    dtype = torch.bfloat16 if native_bfloat16() else torch.float32
    m, k, n = SHAPE
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    cpus = sorted(os.sched_getaffinity(0))
    print(f"{dtype}, {m}x{k} by {k}x{n}, 1 thread pinned per CPU, {args.reps} runs; ms")
    print("| CPU | min | median | max | median / min |")
    print("|---|---|---|---|---|")
    worst = 1.0
    torch.set_num_threads(1)
    try:
        for cpu in cpus:
            t = _pinned_times(cpu, a, b, args.reps)
            median = _median(t)
            ratio = median / min(t)
            worst = max(worst, ratio)
            print(f"| {cpu} | {min(t):.2f} | {median:.2f} | {max(t):.2f} | "
                  f"{ratio:.2f} |")
    finally:
        os.sched_setaffinity(0, cpus)
        torch.set_num_threads(threads)
    if args.max_ratio is not None and worst > args.max_ratio:
        print(f"busy: a CPU's median / min is {worst:.2f}, above --max-ratio {args.max_ratio}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
