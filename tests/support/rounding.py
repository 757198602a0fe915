"""Rounding-error bounds of a conv computed in floating point, for the exactness tests.

A conv output is ``y = b + sum_i x_i w_i``: ``n`` terms, the ``C_in / groups * kh * kw``
products and the bias where there is one. When the engine computes it from the same (already
rounded) ``x``, ``w``, ``b`` as the float64 reference ``want``, summing in a format of unit
roundoff ``u_acc`` and rounding to the output dtype (unit roundoff ``u``) ``roundings`` times,
the error of every output element is at most

    |got - want| <= gamma(n, u_acc) * S + (roundings - 1) * u * S + u * |want|

with ``S = |b| + sum_i |x_i w_i|`` (the conv of ``|x|`` and ``|w|`` plus ``|b|``) and
``gamma(m, u) = m u / (1 - m u)``, whatever the order of the additions (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., sections 2.2 and 3.1). The last rounding is that
of the output; each earlier one rounds partial results that together are no larger than ``S``
(a GEMM's output before the bias is added to it; every tap's GEMM output before the taps are
summed). Added to it: the float64 reference's own error (``gamma(n, 2**-53) * S``), an absolute
term for results in the subnormal range (half the smallest subnormal per rounding) and for
hardware that flushes subnormals in the accumulator (the smallest normal per term), and a
margin of 1 % for the second-order terms (at most about 0.6 % of the bound, for three
roundings in bfloat16).

That holds for direct sums, the routes of the CPU engines (oneDNN, PyTorch's kernels). cuDNN
picks its algorithm by heuristics (Winograd and FFT among them, whose errors this bound does
not cover), so for results on CUDA :func:`conv_bound` returns the fixed tolerances the CUDA
tests passed with on an H200 (2026-12-04) instead.

On random inputs the bound tells a wrong tap, a dropped bias or a sum in bfloat16 taken in
sequence from rounding; one rounding more than claimed, or a sum in the dtype taken in pairs,
can stay under it (their errors do not line up). ``test_rounding_bound.py`` shows the bound
rejecting them on inputs built for it, and ``test_half_precision_sums_keep_small_terms``
checks the engines' float32 sums exactly.

:class:`LayerCheck` applies the bounds inside a whole network, one layer at a time: a bound
carried through the layers (input errors through ``|w|``) was measured at 0.14 of the output
after three blocks of the test network in float32 and 1500 times it in bfloat16, too loose to
tell anything.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from cad_spconv.nn import CADBatchNorm2d, CADConv2d, CADMaxPool2d

from . import dense_reference as ref

#: the second-order terms, at most about 0.6 % of the bound
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
    """The accumulator the tests claim for ``dtype``'s convs and GEMMs on CPU: float32 for
    bfloat16 and float16 (oneDNN's and PyTorch's kernels), ``dtype`` otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def engine_route(engine: str, dtype: torch.dtype, bias: bool) -> dict:
    """:func:`conv_bound`'s ``roundings`` and ``accumulate`` for the route of ``engine``: the
    output rounded once; once more where the bias is added to a rounded GEMM output (the torch
    engine's route); once more where every tap's GEMM output is rounded before the taps are
    summed (the products engine's: CPU GEMMs have no wider output, ``products.py``; the
    lattice engine hands layers with ``C_in >= 4 C_out`` to it, and "auto" and "tuned" may
    run either). spconv's engines add the taps' GEMM outputs in the dtype itself (the
    registry's ``sums_half_in_dtype``), so their sums are claimed in the dtype only; "tuned"
    leaves them out of half-precision layers, so its sums are float32's there."""
    roundings = 1 + bool(bias) + (engine in ("products", "lattice", "auto", "tuned"))
    in_dtype = engine.startswith("spconv")
    return dict(roundings=roundings, accumulate=dtype if in_dtype else None)


def conv_bound(size: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, terms: int, *,
               roundings: int = 1, accumulate: torch.dtype | None = None) -> torch.Tensor:
    """The per-element bound above, for a result computed on ``want``'s device. ``size``:
    ``S``; ``terms``: ``n`` (the bias, where there is one, counts as a term); ``accumulate``:
    the accumulator's dtype (by default :func:`accumulator`'s)."""
    if roundings < 1:
        raise ValueError("the output is rounded at least once")
    size, want = size.double(), want.double()
    eps = torch.finfo(dtype).eps
    if want.is_cuda:  # cuDNN's algorithm is its heuristics' choice: the fixed tolerances
        if dtype in (torch.float32, torch.float64):
            rtol, atol = (1e-4, 1e-4) if dtype == torch.float32 else (1e-9, 1e-10)
            return atol + rtol * want.abs()
        return eps * (size + want.abs()) + 4 * eps * want.abs().max()
    u, acc = eps / 2, accumulate or accumulator(dtype)
    relative = (gamma(terms, unit_roundoff(acc)) + (roundings - 1) * u
                + gamma(terms, unit_roundoff(torch.float64))) * size + u * want.abs()
    tiny = roundings * torch.finfo(dtype).tiny * u + terms * torch.finfo(acc).tiny
    return MARGIN * (relative + tiny)


def conv_size(features, levels, step_in, stride, weight, bias=None, dilation=1, groups=1, *,
              rule=ref.conv):
    """``S`` of every output site: the dense reference's conv of ``|x|`` and ``|w|``, plus
    ``|b|`` (float64); ``rule``: the reference's conv rule (``ref.conv`` or
    ``ref.conv_reference_semantics``)."""
    return rule(features.double().abs(), levels, step_in, stride, weight.double().abs(),
                None if bias is None else bias.double().abs(), dilation, groups)


def assert_conv_within(got: torch.Tensor, features, levels, step_in, stride, weight, bias=None,
                       dilation=1, groups=1, *, engine: str, what: str = "",
                       rule=ref.conv) -> float:
    """A sparse conv's output ``got`` against the dense reference in float64 on the same
    (already rounded) inputs, within :func:`conv_bound` for ``engine``'s route in ``got``'s
    dtype; returns the largest ratio of error to bound."""
    want = rule(features.double(), levels, step_in, stride, weight.double(),
                None if bias is None else bias.double(), dilation, groups)
    size = conv_size(features, levels, step_in, stride, weight, bias, dilation, groups, rule=rule)
    terms = weight[0].numel() + (bias is not None)
    bound = conv_bound(size, want, got.dtype, terms,
                       **engine_route(engine, got.dtype, bias is not None))
    return assert_within(got, want, bound, what or engine)


def assert_within(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str = ""):
    """Every element of ``got`` within ``bound`` of the float64 ``want``; returns the largest
    ratio of error to bound (for reports). The message names the worst element."""
    assert got.shape == want.shape == bound.shape, (got.shape, want.shape, bound.shape)
    got, want, bound = got.detach(), want.detach(), bound.detach()
    err = (got.double() - want.double()).abs()
    inf = torch.full_like(err, float("inf"))
    ratio = torch.where(bound > 0, err / bound.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.where(err > 0, inf, torch.zeros_like(err)))
    worst = int(ratio.flatten().argmax()) if ratio.numel() else 0
    if ratio.numel() and not bool((err <= bound).all()):
        at = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))
        raise AssertionError(
            f"{what}: {int((err > bound).sum())} of {err.numel()} elements exceed the rounding "
            f"bound; worst at {at}: got {float(got[at])!r}, want {float(want[at])!r}, error "
            f"{float(err[at]):.3g} > bound {float(bound[at]):.3g} ({float(ratio[at]):.2f}x)")
    return float(ratio.flatten()[worst]) if ratio.numel() else 0.0


#: eval batch norm as ``x * scale + shift``, ``scale = weight / sqrt(var + eps)`` (eps rounded,
#: a sum, a root, a division or product) and ``shift = bias - mean * scale`` (two more), then
#: a product and a sum with ``x`` and the output's rounding: at most 9 roundings, none coarser
#: than the dtype's (PyTorch's kernels take half precision's in float32)
BATCH_NORM_ROUNDINGS = 9


def batch_norm_bound(x: torch.Tensor, bn: torch.nn.BatchNorm2d, dtype: torch.dtype):
    """Per-element bound on an eval batch norm computed in ``dtype`` from the same rounded
    ``x`` and parameters as the float64 result: ``gamma_9 (|x scale| + |mean scale| +
    |bias|)``. On CUDA (cuDNN's formula is not documented, ``rsqrtf`` may be 2 ulp off) the
    fixed tolerances of :func:`conv_bound` relative to the same terms instead."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = (bn.running_mean.double() * scale).abs()
    if bn.bias is not None:
        shift = shift + bn.bias.double().abs()
    size = x.double().abs() * scale.abs() + shift
    if x.is_cuda:
        rtol = 1e-4 if dtype in (torch.float32, torch.float64) else 4 * torch.finfo(dtype).eps
        return rtol * (1 + size)
    tiny = BATCH_NORM_ROUNDINGS * torch.finfo(dtype).tiny
    return MARGIN * (gamma(BATCH_NORM_ROUNDINGS, unit_roundoff(dtype))
                     * size + tiny)


class LayerCheck:
    """Checks every ``CADConv2d``, eval ``CADBatchNorm2d`` and ``CADMaxPool2d`` call of a
    network as it runs: its output against the float64 op on the input it was given (the dense
    reference through ``levels``, the level map [B, H, W] of the plan's grid), within
    :func:`conv_bound` for the conv's engine and :func:`batch_norm_bound`; pools exactly. Layer by layer, so the bounds stay those of
    one op: carried through a deep network, worst-case bounds grow by about ``sum |w|`` per
    conv and say nothing after two or three blocks.

    Use as a context manager around the forward pass; ``ratios`` holds ``(name, worst ratio
    of error to bound)`` per call, and a call outside its bound raises at once, naming the
    layer. Residual sums and activations are not checked here (a single rounding in the
    dtype; exact)."""

    def __init__(self, model: torch.nn.Module, levels):
        self.model, self.levels, self.ratios, self._hooks, self._inputs = model, levels, [], [], {}

    def __enter__(self):
        for name, m in self.model.named_modules():
            if isinstance(m, CADConv2d):
                self._hooks.append(m.register_forward_hook(self._conv_hook(name)))
            elif isinstance(m, CADBatchNorm2d):
                # batch norms may overwrite their input (``inplace``): keep a copy
                self._hooks.append(m.register_forward_pre_hook(self._keep_input))
                self._hooks.append(m.register_forward_hook(self._bn_hook(name)))
            elif isinstance(m, CADMaxPool2d):
                self._hooks.append(m.register_forward_hook(self._pool_hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._inputs.clear()

    def _keep_input(self, m, args):
        self._inputs[m] = args[0].features.clone()

    def _conv_hook(self, name):
        def hook(m, args, out):
            x = args[0]
            rule = ref.conv if x.plan.semantics == "paper" else ref.conv_reference_semantics
            self.ratios.append((name, assert_conv_within(
                out.features, x.features, self.levels, x.step, m.stride[0], m.weight, m.bias,
                m.dilation, m.groups, engine=m.engine, what=f"{name} ({m.engine})", rule=rule)))
        return hook

    def _bn_hook(self, name):
        def hook(m, args, out):
            x = self._inputs.pop(m)
            if m.training or m.running_mean is None:  # batch statistics
                return
            want = F.batch_norm(x.double(), m.running_mean.double(), m.running_var.double(),
                                None if m.weight is None else m.weight.double(),
                                None if m.bias is None else m.bias.double(), False, 0.0, m.eps)
            self.ratios.append((name, assert_within(out.features, want,
                                                    batch_norm_bound(x, m, out.features.dtype),
                                                    name)))
        return hook

    def _pool_hook(self, name):
        def hook(m, args, out):
            x = args[0]
            f, k, stride = x.features.double(), _pair(m.kernel_size), _pair(m.stride)[0]
            if k == (2, 2):
                want = ref.max_pool_2x2(f, self.levels, x.step)
            elif x.plan.semantics == "paper":
                want = ref.max_pool_overlap(f, self.levels, x.step, k, stride, _pair(m.dilation))
            else:
                want = ref.max_pool_overlap_reference_semantics(f, self.levels, x.step, k[0],
                                                                stride)
            # maxima of the same values: exact
            self.ratios.append((name, assert_within(out.features, want, torch.zeros_like(want),
                                                    name)))
        return hook
