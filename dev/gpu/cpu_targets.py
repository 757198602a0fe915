"""Issue 14's CPU target results on a many-core host (the GPU machine's AMX Xeon): the
``targets`` suite of ``experiments/benchmark.py``, filtered by name, several results at a time,
each in its own process pinned with ``taskset`` to its own physical cores (``--threads 2`` as
on a dev machine; hyperthread siblings left idle), so that a 16-core host measures in minutes
what a 2-core dev machine measures in an hour. The ratios are within one process as always;
the jobs share the memory bus and the last-level cache, which a dev machine does not (on the
H200's host, 2026-12-04, four side by side gave per-frame ratios from 0.64 to 1.14). The NCHW
float32 network, reported beside the targets' baselines, is left out (``--no-float32-baseline``).

    python dev/gpu/cpu_targets.py --filter bfloat16 --frames .carry/frames --reps 3 --jobs 4
    python dev/gpu/cpu_targets.py --filter 'bfloat16.*edge0.35' --jobs 2   # a regex

Results go to ``experiments/results/<name>.json`` (gpu_session's ``collect`` packs them).
"""
import argparse
import glob
import os
import re
import shlex
import subprocess
import sys
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from experiments.benchmark import suites  # noqa: E402

PIN = shutil.which("taskset") is not None  # else unpinned (said at the start)


def physical_cores() -> list[int]:
    """One logical CPU per physical core (the first sibling), of the CPUs this process may use;
    without ``lscpu``, every usable CPU (siblings not told apart)."""
    allowed = os.sched_getaffinity(0)
    if shutil.which("lscpu") is None:
        return sorted(allowed)
    seen, cpus = set(), []
    out = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        if line.startswith("#"):
            continue
        cpu, core, socket = (int(v) for v in line.split(",")[:3])
        if cpu in allowed and (core, socket) not in seen:
            seen.add((core, socket))
            cpus.append(cpu)
    return cpus


def slots_of(cores: list[int], jobs: int, threads: int) -> list[list[int]]:
    """At most ``jobs`` disjoint groups of ``threads`` cores each, in the order given."""
    groups = [cores[i:i + threads] for i in range(0, len(cores), threads)]
    return [g for g in groups if len(g) == threads][:jobs]


def longest_first(chosen: list) -> list:
    """The results with four frames a batch or the whole model first, so the pool ends
    together; the suite's order otherwise."""
    return sorted(chosen, key=lambda item: ("_b4_" in item[0], "model" in item[0]), reverse=True)


def with_threads(bench_args: list[str], threads: int) -> list[str]:
    """``bench_args`` with ``--threads`` set to ``threads`` (replaced where the suite gives it)."""
    args = list(bench_args)
    if "--threads" in args:
        args[args.index("--threads") + 1] = str(threads)
        return args
    return [*args, "--threads", str(threads)]


def worst(codes: list[int]) -> int:
    """One exit status for all jobs: 0 only if every job exited 0 (a job killed by a signal
    has a negative code)."""
    return max((abs(c) for c in codes), default=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="bfloat16",
                        help="regular expression searched in the result names")
    parser.add_argument("--frames", default=os.path.join(ROOT, ".carry", "frames"))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4, help="results at a time")
    parser.add_argument("--threads", type=int, default=2, help="cores per result")
    parser.add_argument("--results", default="experiments/results")
    args = parser.parse_args(argv)
    frames_dir = os.path.abspath(args.frames)  # before the chdir: relative to the caller
    os.chdir(ROOT)
    frames = sorted(glob.glob(os.path.join(frames_dir, "*.png")))
    if not frames:
        sys.exit(f"cpu_targets: no PNG frames in {frames_dir}")
    targets = suites(frames, args.reps)["targets"]
    chosen = [(n, a) for n, a in targets if re.search(args.filter, n)]
    if not chosen:
        sys.exit(f"cpu_targets: --filter {args.filter!r} matches none of "
                 f"{[n for n, _ in targets]}")
    chosen = longest_first(chosen)
    cores = physical_cores()
    slots = slots_of(cores, args.jobs, args.threads)
    if not slots:
        sys.exit(f"cpu_targets: fewer than {args.threads} physical cores here ({cores})")
    print(f"cpu_targets: {len(chosen)} results, {len(slots)} at a time on cores {slots}"
          f"{'' if PIN else ' (no taskset here: NOT pinned)'}", flush=True)
    free = list(range(len(slots)))
    t0 = time.time()

    def run(item):
        name, bench_args = item
        slot = free.pop()  # the pool has one worker per slot: never empty here
        try:
            # the NCHW float32 network is no target's baseline and took half of each run
            full = [*with_threads(bench_args, args.threads), "--no-float32-baseline",
                    "--json", os.path.join(args.results, f"{name}.json"), "--label", name]
            pin = ["taskset", "-c", ",".join(map(str, slots[slot]))] if PIN else []
            cmd = [*pin, sys.executable, "-m", "cad_apps.cli", "bench", *full]
            print(f"[{time.time() - t0:5.0f}s] start {name} on {slots[slot]}: "
                  f"cad-spconv bench {shlex.join(full)}", flush=True)
            done = subprocess.run(cmd, capture_output=True, text=True)
            # the summary rows; stderr's end only where it failed
            tail = [ln for ln in done.stdout.splitlines() if ln.startswith(("all", "input"))]
            if done.returncode:
                tail += done.stderr.strip().splitlines()[-8:]
            tail = "\n".join(tail)
            print(f"[{time.time() - t0:5.0f}s] {name}: rc={done.returncode}\n{tail}", flush=True)
            return done.returncode
        finally:
            free.append(slot)

    with ThreadPoolExecutor(len(slots)) as pool:
        codes = list(pool.map(run, chosen))
    return worst(codes)


if __name__ == "__main__":
    sys.exit(main())
