"""Measuring: wall / process clock or CUDA events, peak memory, geometry replay, profiles, and
one input's full measurement (:func:`bench_input`)."""
from __future__ import annotations

import math
import os
import sys
import threading
import time

__all__ = ["math_flags", "set_math_flags", "sync", "bench_input", "round_orders"]


def math_flags() -> dict:
    import torch

    flags = {"cudnn_tf32": torch.backends.cudnn.allow_tf32,
             "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
             "cudnn_benchmark": torch.backends.cudnn.benchmark}
    from cad_spconv.backend import spconv_status

    if spconv_status()[0]:  # a run may import spconv and set its flag: snapshot it first
        from spconv import constants

        flags["spconv_tf32"] = constants.SPCONV_ALLOW_TF32
    return flags


def set_math_flags(cudnn_tf32: bool, matmul_tf32: bool, cudnn_benchmark: bool,
                    spconv_tf32: bool | None = None):
    import torch

    torch.backends.cudnn.allow_tf32 = cudnn_tf32
    torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if spconv_tf32 is not None:
        from cad_spconv.backend import spconv_status

        if spconv_status()[0]:
            from spconv import constants

            constants.SPCONV_ALLOW_TF32 = spconv_tf32


def sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn, args, device, clock=time.perf_counter) -> float:
    import torch

    if device.type == "cuda":
        with torch.cuda.device(device):  # events record on the current device's stream
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn(*args)
    return clock() - t0


def _median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


class _RssSampler:
    """Peak resident set size above the level at start, sampled every ~0.5 ms (CPU runs)."""

    def __init__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        return False

    @property
    def delta(self) -> int:
        return self.peak - self.base


def _release_free_heap():
    """Give freed heap memory back to the OS (glibc ``malloc_trim``), where available."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_memory(fn, args, device):
    """Bytes a run needs above what was allocated before it (``None`` where unmeasurable)."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        out = fn(*args)
        torch.cuda.synchronize(device)
        del out
        return torch.cuda.max_memory_allocated(device) - base
    if not os.path.exists("/proc/self/statm"):
        return None
    _release_free_heap()  # else the run reuses freed pages and the RSS does not grow
    with _RssSampler() as sampler:
        out = fn(*args)
        del out
    return sampler.delta


def _held_tensors() -> dict:
    """The CPU tensor storages Python objects hold now, found through the garbage collector
    (which tracks every tensor object): ``{(data_ptr, bytes): weak references to the tensors
    on it}``. A compiled graph's frozen weights are Python attributes of its modules, so they
    show; fake and meta tensors (a compiler's) have no storage here and do not."""
    import gc
    import weakref

    import torch

    gc.collect()
    held = {}
    for obj in gc.get_objects():
        # type(), not isinstance: that reads __class__, which deprecated objects warn on
        if not issubclass(type(obj), torch.Tensor) or obj.device.type != "cpu":
            continue
        try:
            if obj.layout == torch._mkldnn:  # an opaque oneDNN tensor: no storage to share
                key = ("mkldnn", id(obj), obj.numel() * obj.element_size())
            else:
                s = obj.untyped_storage()
                if s.device.type != "cpu" or not s.data_ptr():
                    continue
                key = (s.data_ptr(), s.nbytes())
            held.setdefault(key, []).append(weakref.ref(obj))
        except (RuntimeError, NotImplementedError, TypeError):  # no storage (wrapper tensors)
            continue
    return held


def _kept_state_bytes(refs: dict, exclude) -> int:
    """Bytes of the storages among ``refs`` (new entries of :func:`_held_tensors`) that are
    still held, but those whose ``data_ptr`` is in ``exclude`` (charged elsewhere)."""
    seen = {}
    for key, tensors in refs.items():
        t = next((t for t in (ref() for ref in tensors) if t is not None), None)
        if t is None:
            continue
        if key[0] == "mkldnn":
            seen[key] = key[2]
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _tensor_peak(fn, args) -> int:
    """CPU: the peak of the bytes held by live tensors during one run, above the level before
    it, from the profiler's allocation events (what the allocator was asked for, free of the
    heap's fragmentation that the resident-set peak also shows).

    The run is the second of two in one profile: the profiler records no free of a block
    allocated before it started, so state a run replaces (a converted model's merge maps of
    the last plan, kept for ``last_plan``) would count as new bytes if the run that allocated
    it was not in view (2048 bytes of a 512x1024 frame's, at a dense head's peak)."""
    import gc

    from torch.profiler import ProfilerActivity, profile, record_function

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn(*args)
        del out
        with record_function(_MEASURED_RUN):
            out = fn(*args)
            del out
    events = list(prof.profiler.kineto_results.events())
    mark = next(e for e in events if e.name() == _MEASURED_RUN)
    memory = sorted((e for e in events if e.name() == "[memory]"
                     and e.device_type().name == "CPU"), key=lambda e: e.start_ns())
    live = base = peak = 0
    for e in memory:
        live += e.nbytes()
        if e.start_ns() < mark.start_ns():
            base = peak = live  # the level before the measured run
        elif e.start_ns() <= mark.end_ns():
            peak = max(peak, live)
    return peak - base


_MEASURED_RUN = "cad_bench.measured_run"


def _state_held(variant, refs: dict) -> int:
    """Bytes of the tensors ``variant``'s warm-ups left held (``refs``) that it still holds:
    not the geometry the bench itself keeps for the replay (``variant.last``), not what is
    charged on its own: the engines' kept caches (``held_bytes``) and the output buffers of
    ``--reuse-output``."""
    from cad_spconv.engines import kept_tensors

    last, variant.last = variant.last, None
    try:
        charged = kept_tensors() + list((variant.kept_outputs or {}).values())
        exclude = {t.untyped_storage().data_ptr() for t in charged}
        return _kept_state_bytes(refs, exclude)
    finally:
        variant.last = last


def _replay_geometry(plan, books, engine, device, plans: bool = True):
    """Rebuild the geometry one CAD forward builds: the level plan from the keep mask, every
    step's sites / owners / areas (where the forward builds them, ``plans``; else on ``plan``
    as it is, its geometry kept), and every rulebook with what its engine reads (for
    ``tuned``: what the engines it picked for that rulebook read)."""
    from cad_spconv.engines import prepare, tuned_engines
    from cad_spconv.plan import LevelPlan

    def run():
        fresh = (LevelPlan(plan.levels.clone(), plan.num_levels, validate=False) if plans
                 else plan)
        for step in range(fresh.num_levels + 1):
            fresh.geometry(step)
        for key, book in books:
            fresh_book = key.build(fresh)
            for e in (tuned_engines(book) or ["auto"]) if engine == "tuned" else [engine]:
                prepare(fresh_book, e, device, like=book)
    return run


def _plan_seconds(keep, grid, num_levels, device):
    """Seconds to turn the keep mask into a level plan (reduction to the grid + quadtree)."""
    from cad_spconv.plan import make_plan

    return lambda: make_plan(keep, grid, num_levels, device=device)


def bench_input(args, bench, images, keep, device, dtype, order_seed: int = 0) -> dict:
    import torch

    from cad_spconv.engines import cache_use, held_bytes
    from cad_spconv.tensor import CADTensor

    clock = time.process_time if args.clock == "process" else time.perf_counter
    states = {v.name: v.setup(images, keep) for v in bench["variants"]}
    outputs, failed = {}, {}
    # the engines' kept entries (weight layouts; workspaces of runs outside a workspace scope)
    # each variant's warm-ups read or built, over the inputs so far: what they hold is part of
    # what its forward needs, charged to it (an entry two variants use, to both)
    used = bench.setdefault("cache_use", {})
    # and the other tensors its warm-ups left held (a compiled graph's frozen, prepacked
    # weights: the dense networks' too), charged to it the same way, where still held
    state = bench.setdefault("kept_state", {})
    cpu_state = device.type == "cpu" and not args.no_memory
    for v in bench["variants"]:
        try:
            before = _held_tensors() if cpu_state else {}
            with cache_use() as keys:
                for _ in range(args.warmup):
                    outputs[v.name] = v.run(*states[v.name])
            used.setdefault(v.name, set()).update(keys)
            if cpu_state:
                state.setdefault(v.name, {}).update(
                    (k, ref) for k, ref in _held_tensors().items() if k not in before)
        except Exception as exc:  # e.g. an engine without this dtype: report, go on
            if v.kind != "cad":
                raise
            failed[v.name] = f"{type(exc).__name__}: {exc}"
            print(f"bench: {v.name} failed and is left out: {failed[v.name]}", file=sys.stderr)
    variants = [v for v in bench["variants"] if v.name not in failed]
    if not any(v.kind == "cad" for v in variants):
        raise SystemExit("bench: every CAD variant failed: " + "; ".join(failed.values()))
    # Guarantee 2 for every CAD variant (CAD at the coarse sites == dense coarsest stride),
    # then drop the outputs before timing
    coarse_out = outputs[next(v.name for v in variants if v.kind == "dense_coarse")]
    step = args.coarsest_stride // args.finest_stride
    guarantee2 = {v.name: _guarantee2_error(outputs[v.name], coarse_out, step, CADTensor)
                  for v in variants if v.kind == "cad"}
    outputs.clear()
    del coarse_out
    samples = {v.name: [] for v in variants}
    for order in round_orders(variants, args.reps, order_seed):  # other orders per input
        for v in order:
            samples[v.name].append(_time_once(v.run, states[v.name], device, clock))
    res = {"variants": {}, "failed": failed}
    for v in variants:
        entry = {"kind": v.kind, "seconds": _median(samples[v.name]),
                 "samples": samples[v.name], "macs": int(v.macs(images, keep))}
        if v.fmt:
            entry["format"] = v.fmt
        if v.engine:
            entry["engine"] = v.engine
        if guarantee2.get(v.name, "n/a") != "n/a":
            entry["guarantee2_rel_error"] = guarantee2[v.name]
        res["variants"][v.name] = entry
    if not args.no_memory:
        for v in variants:
            entry = res["variants"][v.name]
            v.capture = False  # the geometry of the timed runs stays in v.last for the replay
            entry["peak_bytes"] = _peak_memory(v.run, states[v.name], device)
            if device.type == "cpu":
                entry["peak_tensor_bytes"] = _tensor_peak(v.run, states[v.name])
            held = _state_held(v, state.get(v.name, {})) if cpu_state else 0
            if held and entry["peak_bytes"] is not None:
                entry["kept_state_bytes"] = held
                entry["peak_bytes"] += held
                if "peak_tensor_bytes" in entry:
                    entry["peak_tensor_bytes"] += held
            kept = held_bytes(used.get(v.name, ()), device)
            if entry["peak_bytes"] is None or not (kept or v.kind == "cad"):
                continue
            entry["engine_cache_bytes"] = kept  # the kept caches its runs use
            if v.kept_outputs is not None:  # --reuse-output: the buffer is CAD's output
                entry["output_buffer_bytes"] = v.kept_output_bytes()
                kept += entry["output_buffer_bytes"]
            entry["peak_bytes"] += kept
            if "peak_tensor_bytes" in entry:
                entry["peak_tensor_bytes"] += kept
    # geometry share, per CAD variant: replay exactly what its last timed forward built
    for v in variants:
        v.capture = True
        if v.kind != "cad" or v.last is None:
            continue
        plan, cache = v.last
        replay = _replay_geometry(plan, cache.items(), v.engine, device, v.plans)
        n = max(3, args.reps)
        entry = res["variants"][v.name]
        entry["geometry_seconds"] = _median([_time_once(replay, (), device, clock)
                                             for _ in range(n)])
        if v.plans:  # the keep mask -> level plan, part of the forward
            planning = _plan_seconds(keep, plan.grid, plan.num_levels, device)
            entry["geometry_seconds"] += _median([_time_once(planning, (), device, clock)
                                                  for _ in range(n)])
        entry["rulebooks"] = len(cache)
        entry["level_fractions"] = plan.level_fractions().mean(0).tolist()
    if args.profile:
        for v in variants:
            res["variants"][v.name]["profile_ms"] = _profile(v.run, states[v.name], device,
                                                             args.profile)
    checked = [e for e in guarantee2.values() if e != "n/a"]
    if checked:  # the input's figure: the worst engine's (None if any was not comparable)
        res["guarantee2_rel_error"] = None if None in checked else max(checked)
    del torch
    return res


def round_orders(variants, rounds: int, seed: int = 0) -> list:
    """The order of the variants in each timing round: a fresh random one every round, from
    ``seed`` (the bench passes the input's index: each input its own orders, every run the
    same ones). A run slows the one after it (a heavy run, as the 3 s float32 dense stride-8
    one, took 3-5 % off the next run's speed on the AMX Xeon, BENCHMARKS.md); in a
    fixed cycle each variant would always follow the same one, and the ratios would carry that
    neighbour's cost instead of averaging over all of them."""
    import random

    rng = random.Random(seed)
    return [rng.sample(list(variants), len(variants)) for _ in range(rounds)]


def _guarantee2_error(cad_out, coarse_out, step: int, cad_tensor):
    """Relative error of CAD's output sampled at the coarse sites against the dense coarsest
    network's; ``None`` where it is not finite (a float16 overflow), ``"n/a"`` where the
    outputs are no maps of that grid (a whole classifier's logits, heads at other strides)."""
    dense_cad = cad_out.dense() if isinstance(cad_out, cad_tensor) else cad_out
    if dense_cad.dim() != 4 or coarse_out.dim() != 4:
        return "n/a"
    sampled = dense_cad[:, :, ::step, ::step].float()
    ref = coarse_out.float()
    if sampled.shape != ref.shape:
        return "n/a"
    err = float((sampled - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    # an overflow (float16) gives NaN, which JSON cannot hold: None says "not comparable"
    return err if math.isfinite(err) else None


def _profile(fn, args, device, top: int) -> dict:
    """Self time per op (ms) of one profiled run: the ``top`` most expensive ops and the rest
    summed as ``"(other)"``, plus ``"(total)"``. On CUDA, device time, and the host's self time
    of all ops as ``"(host total)"``: a host total above the device total means the run waits
    on Python and launches, not on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    sync(device)
    with profile(activities=activities) as prof:
        fn(*args)
        sync(device)
    per_op, host_ms = {}, 0.0
    for event in prof.key_averages():
        host_ms += event.self_cpu_time_total / 1e3
        us = (getattr(event, "self_device_time_total", None) if device.type == "cuda"
              else event.self_cpu_time_total)
        if us:
            per_op[event.key] = per_op.get(event.key, 0.0) + us / 1e3
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1])
    out = dict(ranked[:top])
    out["(other)"] = sum(ms for _, ms in ranked[top:])
    out["(total)"] = sum(per_op.values())
    if device.type == "cuda":
        out["(host total)"] = host_ms
    return out
