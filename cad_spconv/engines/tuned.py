"""Engine ``"tuned"``: time every registered engine that can run a layer shape, keep the fastest.

Like ``torch.backends.cudnn.benchmark``: the first call for a device, dtype and layer shape runs
each candidate (one warm-up, then :data:`TUNE_REPS` rounds in turn, so a change of machine load
hits all of them) and keeps the fastest for later calls. The candidates compute the same
values to within rounding (they pass the same exactness tests, with float32 sums for half
precision), so the choice changes speed only: engines that sum half-precision convs in the
dtype itself (``Engine.sums_half_in_dtype``, spconv's) are candidates for float32 and float64
layers only.
"""
from __future__ import annotations

import statistics
import time

import torch

from ..rulebook import ConvRulebook, Rulebook
from .base import registered
from .layouts import tracks_grad

__all__ = ["TUNE_REPS", "tuned_conv", "tuned_choices", "tuned_engines", "clear_tuned",
           "candidates"]

#: timed runs per candidate engine when tuning a layer shape (after one warm-up run)
TUNE_REPS = 3

_tuned: dict = {}  # layer key -> (engine, {candidate: median seconds})
_KEY_NAMES = ("device", "dtype", "autograd", "weight_shape", "groups", "dilation",
              "adaptive_step", "planned", "semantics", "num_out_log2")


def _tune_key(features, weight, book: Rulebook, groups: int) -> tuple:
    """What the speed of a layer and the engines that can run it depend on: device, dtype,
    autograd, weight shape, groups, kernel geometry, whether it is an adaptive step, the
    plan's semantics (the lattice engine runs only the paper's), and the output size to within
    a factor of 2 (one tuning per size class, not per image)."""
    planned = isinstance(book, ConvRulebook)
    return (str(features.device), features.dtype, tracks_grad(features, weight, None),
            tuple(weight.shape), groups, book.dilation if planned else None,
            book.step_out - book.step_in, planned, book.plan.semantics if planned else None,
            max(1, book.num_out).bit_length())


def candidates(features, weight, groups: int, book: Rulebook) -> list[str]:
    """The registered engines that can run this call, in registration order (for half
    precision, those that sum it in float32)."""
    half = features.dtype in (torch.float16, torch.bfloat16)
    return [name for name, engine in registered().items()
            if not (half and engine.sums_half_in_dtype)
            and engine.supports(features, weight, groups, book)]


def _runs(book: Rulebook) -> set:
    """The engines tuned layers ran on ``book`` (kept on the rulebook)."""
    return book.derived("tuned-runs", set)


def tuned_conv(features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
    engines = registered()
    key = _tune_key(features, weight, book, groups)
    known = _tuned.get(key)
    if known is not None and engines[known[0]].supports(features, weight, groups, book):
        _runs(book).add(known[0])
        return engines[known[0]].conv(features, weight, bias, book, groups)
    names = candidates(features, weight, groups, book)
    outs = {name: engines[name].conv(features, weight, bias, book, groups)  # warm-up, geometry
            for name in names}
    samples = {name: [] for name in names}
    for _ in range(TUNE_REPS):
        for name in names:
            if features.is_cuda:
                torch.cuda.synchronize(features.device)
            start = time.perf_counter()
            outs[name] = engines[name].conv(features, weight, bias, book, groups)
            if features.is_cuda:
                torch.cuda.synchronize(features.device)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(s) for name, s in samples.items()}
    engine = min(names, key=times.get)  # ties: the first candidate
    _tuned[key] = (engine, times)
    _runs(book).add(engine)
    return outs[engine]  # engines return fresh tensors (no workspace escapes a call)


def tuned_engines(book: Rulebook) -> list[str]:
    """The engines that ``engine="tuned"`` layers ran on ``book`` (sorted; empty if none)."""
    return sorted(book._derived.get("tuned-runs", ()))


def tuned_choices() -> list[dict]:
    """What ``engine="tuned"`` chose so far: one entry per layer key with the median time of
    every candidate (seconds)."""
    return [dict(zip(_KEY_NAMES, key), engine=engine, seconds=dict(times))
            for key, (engine, times) in _tuned.items()]


def clear_tuned() -> None:
    """Forget every tuned choice (the next call of each layer shape times the engines again)."""
    _tuned.clear()
