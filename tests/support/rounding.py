"""Rounding-error bounds of a conv computed in floating point, for the exactness tests.

A conv output is ``y = b + sum_i x_i w_i``: ``n`` terms, the ``C_in / groups * kh * kw``
products and the bias where there is one. When
the engine computes it from the same (already rounded) ``x``, ``w``, ``b`` as the float64
reference ``want``, summing in a format of unit roundoff ``u_acc`` and rounding to the output
dtype (unit roundoff ``u``) ``roundings`` times, the error of every output element is at most

    |got - want| <= gamma(n, u_acc) * S + (roundings - 1) * u * S + u * |want|

with ``S = |b| + sum_i |x_i w_i|`` (the conv of ``|x|`` and ``|w|`` plus ``|b|``) and
``gamma(m, u) = m u / (1 - m u)``, whatever the order of the additions (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1). The last rounding is that
of the output; each earlier one rounds a partial result no larger than ``S`` (a GEMM's output
before the bias is added to it, a product before the sum of the taps). The float64
reference's own error (``gamma(n, 2**-53) * S``) is added, and a margin of 1 % covers the
second-order terms; both are far below what a wrong tap, a dropped bias or a narrower
accumulator would add.

So a test states the route it claims (the accumulator and how often a result is rounded), and
a route that rounds more often or sums in half precision fails it where a fixed tolerance of
a few per cent of the largest output would pass.
"""
from __future__ import annotations

import torch

from . import dense_reference as ref

#: second-order terms and the float64 reference's own rounding, both far below 1 %
MARGIN = 1.01


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next float of ``dtype`` (round to nearest)."""
    return torch.finfo(dtype).eps / 2


def gamma(m: int, u: float) -> float:
    """Higham's ``gamma_m``: the relative error bound of a sum of ``m`` rounded terms."""
    if m * u >= 1:
        raise ValueError(f"gamma({m}, {u}) is unbounded: {m} terms are too many for this format")
    return m * u / (1 - m * u)


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The accumulator the tests claim for ``dtype``'s convs and GEMMs: float32 for bfloat16
    and float16 (oneDNN and PyTorch's CPU kernels; cuDNN's and cuBLAS's with the reduced
    precision reductions the CUDA tests turn off, see ``conftest.py``), ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def conv_bound(size: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, terms: int, *,
               roundings: int = 1, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """The per-element bound above. ``size``: ``S``; ``terms``: ``n`` (the bias, where there
    is one, counts as a term); ``accumulate``: the accumulator's dtype (by default
    :func:`accumulator`'s)."""
    if roundings < 1:
        raise ValueError("the output is rounded at least once")
    u = unit_roundoff(dtype)
    u_acc = unit_roundoff(accumulate or accumulator(dtype))
    size, want = size.double(), want.double()
    engine = (gamma(terms, u_acc) + (roundings - 1) * u) * size + u * want.abs()
    return MARGIN * (engine + gamma(terms, unit_roundoff(torch.float64)) * size)


def engine_route(engine: str, dtype: torch.dtype, bias: bool) -> dict:
    """:func:`conv_bound`'s ``roundings`` and ``accumulate`` for the route of ``engine``: the
    output rounded once, once more where the bias is added to a rounded GEMM output (the torch
    engine's route), and once more where every tap's product is rounded before the taps are
    summed (the products engine's: CPU GEMMs have no wider output, ``products.py``; "auto" and
    "tuned" may hand a layer to it). spconv's native algorithm scatter-adds the taps' GEMM
    outputs in the dtype itself, so its sums are claimed in the dtype only."""
    roundings = 1 + bool(bias) + (engine in ("products", "auto", "tuned"))
    return dict(roundings=roundings, accumulate=dtype if engine.startswith("spconv") else None)


def conv_size(features, levels, step_in, stride, weight, bias=None, dilation=1, groups=1):
    """``S`` of every output site: the dense reference's conv of ``|x|`` and ``|w|``, plus
    ``|b|`` (float64)."""
    return ref.conv(features.double().abs(), levels, step_in, stride, weight.double().abs(),
                    None if bias is None else bias.double().abs(), dilation, groups)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = ""):
    """Every element of ``got`` within ``bound`` of the float64 ``want``; returns the largest
    ratio of error to bound (for reports). The message names the worst element."""
    assert got.shape == want.shape == bound.shape, (got.shape, want.shape, bound.shape)
    err = (got.double() - want.double()).abs()
    ratio = torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny),
                        (err > 0) * float("inf"))
    worst = int(ratio.flatten().argmax()) if ratio.numel() else 0
    if ratio.numel() and not bool((err <= bound).all()):
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.numel()} elements exceed the rounding "
            f"bound; worst at {at}: got {float(got[at])!r}, want {float(want[at])!r}, error "
            f"{float(err[at]):.3g} > bound {float(bound[at]):.3g} ({float(ratio[at]):.2f}x)")
    return float(ratio.flatten()[worst]) if ratio.numel() else 0.0
