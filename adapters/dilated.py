"""Dense convs with large dilations as im2col GEMMs, for inference on CPU.

oneDNN's bfloat16 convolution (PyTorch 2.14.1 on an Intel Xeon with AMX) slows down with the
dilation where the input has many channels: the 3x3 convs of DeepLabV3's ASPP head (2048 -> 256
channels on the 64x128 map of a 512x1024 image) took 34 ms at dilation 1 and 203 / 412 / 485 ms
at the head's rates 12 / 24 / 36 (2 threads), while float32 convs did not slow down. Gathering
the taps of a band of output rows into one buffer (im2col) and multiplying it by the weight in
one GEMM costs the same at every dilation: 65-71 ms for each of those convs (twice oneDNN's
time at dilation 1 and 2, so only large dilations gain). Each output is still one sum over all
``k*k*C_in`` products, rounded once, as in the direct conv (``python -m
experiments.dilated_convs``; BENCHMARKS.md). In float16 (that Xeon has no AMX for it) oneDNN
did not slow down either, and the GEMMs took 0.77-0.88 of its time at every dilation, both
4-11x bfloat16's.

:func:`im2col_dilated_convs` puts :class:`Im2colConv2d` in place of such convs in a model (a
dense network, or the dense head of a converted one), which computes through the GEMMs also
under CPU autocast; ``cad-spconv bench --im2col-dilated`` does it in every variant alike,
``cad-spconv eval --im2col-dilated`` in the evaluated network (also under ``--dtype
bfloat16|float16``'s autocast).
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from cad_spconv.engines import conv_dtype
from cad_spconv.engines.layouts import krsc_filters, weight_layout
from cad_spconv.nn import same_padding

from .common import shell

__all__ = ["im2col_conv2d", "Im2colConv2d", "im2col_dilated_convs"]

#: output pixels per GEMM (the band's rows times the width) and the buffer's largest size: bands
#: of 4 rows (512 pixels, an 18 MiB bfloat16 buffer for the ASPP) ran 80 ms on the AMX Xeon
#: where 8 rows took 82 and 16 rows 102 (an ad-hoc probe of a padded first version of this
#: gather, at dilations 12 and 36)
BAND_PIXELS, MAX_BUFFER_BYTES = 512, 32 << 20


def im2col_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  dilation=(1, 1), band_rows: Optional[int] = None) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, 1, padding, dilation)`` with the padding that keeps the size
    (``dilation * (k // 2)``, zeros), an odd kernel and one group, as one GEMM per band of
    ``band_rows`` output rows (default: about 512 output pixels) over a buffer of the band's
    taps (zero where a tap falls outside the map; a tap row or column outside for the whole
    band is left out). ``x``: NCHW in any memory format; the result
    has its memory format. Channels-last weights are read in place; of others a copy is kept
    per weight (:func:`~cad_spconv.engines.layouts.krsc_filters`). Without autograd: use
    ``F.conv2d`` where gradients are needed."""
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"im2col_conv2d: expected a 4-d input and weight, got {x.dim()}-d and "
                         f"{weight.dim()}-d")
    C = x.shape[1]
    Cw, kh, kw = weight.shape[1:]
    if Cw != C:
        raise ValueError(f"im2col_conv2d: the weight takes {Cw} input channels, the input has "
                         f"{C} (grouped convs are not supported: use F.conv2d)")
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"im2col_conv2d: the kernel must be odd for same padding, got "
                         f"{kh}x{kw}")
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(f"im2col_conv2d: input, weight and bias must share one dtype, got "
                        f"{x.dtype}, {weight.dtype}"
                        + ("" if bias is None else f", {bias.dtype}"))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (x, weight, bias)):
        raise ValueError("im2col_conv2d computes without autograd (its GEMMs write into a "
                         "buffer); use F.conv2d where gradients are needed, or run it under "
                         "torch.no_grad() (Im2colConv2d falls back to F.conv2d by itself)")
    if band_rows is not None and band_rows < 1:
        raise ValueError(f"im2col_conv2d: band_rows must be >= 1, got {band_rows}")
    # [O, kh, kw, C], the buffer's column order
    return _im2col(x, krsc_filters(weight, cache=True), bias, dilation, band_rows)


def _im2col(x: torch.Tensor, filters: torch.Tensor, bias: Optional[torch.Tensor], dilation,
            band_rows: Optional[int]) -> torch.Tensor:
    """:func:`im2col_conv2d` on checked arguments, the weight as ``[O, kh, kw, C]`` filters."""
    N, C, H, W = x.shape
    O, kh, kw = filters.shape[:3]
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
    # taps outside the map for every output pixel add nothing, and are left out of the GEMM:
    # the tap columns once per call, the tap rows per band (both contiguous ranges)
    j_lo, j_hi = _taps_inside(kw, dw, 0, W, W)
    n_j = j_hi - j_lo
    if n_j < kw:
        filters = filters[:, :, j_lo:j_hi]
    wm = filters.reshape(O, kh * n_j * C)  # a view where every tap column is kept
    row_bytes = max(1, W * kh * n_j * C * x.element_size())
    rows = band_rows or max(1, min(-(-BAND_PIXELS // max(W, 1)), MAX_BUFFER_BYTES // row_bytes))
    rows = min(rows, max(H, 1))
    xn = x.permute(0, 2, 3, 1)
    out = x.new_empty(N, H, W, O)
    # the input's memory format (channels-last where only that layout is dense), as F.conv2d
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
           and not x.is_contiguous() else torch.contiguous_format)
    if out.numel() == 0:
        return out.permute(0, 3, 1, 2).contiguous(memory_format=fmt)
    buf = x.new_empty(rows * W * kh * n_j * C)
    for n in range(N):
        for y0 in range(0, H, rows):
            y1 = min(H, y0 + rows)
            i_lo, i_hi = _taps_inside(kh, dh, y0, y1, H)
            k = (i_hi - i_lo) * n_j * C
            band = buf[:(y1 - y0) * W * k].view(y1 - y0, W, i_hi - i_lo, n_j, C)
            for a, i in enumerate(range(i_lo, i_hi)):
                for b, j in enumerate(range(j_lo, j_hi)):
                    _gather_tap(band[:, :, a, b], xn[n], y0, y1, (i - kh // 2) * dh,
                                (j - kw // 2) * dw)
            cols = band.view((y1 - y0) * W, k)
            wk = wm[:, i_lo * n_j * C:i_hi * n_j * C].t()
            o = out[n, y0:y1].view((y1 - y0) * W, O)
            if bias is None:
                torch.mm(cols, wk, out=o)
            else:
                torch.addmm(bias, cols, wk, out=o)
    return out.permute(0, 3, 1, 2).contiguous(memory_format=fmt)


def _taps_inside(k: int, d: int, y0: int, y1: int, size: int) -> tuple[int, int]:
    """``[lo, hi)``: the taps of a ``k``-wide kernel, ``d`` apart and centred, that fall inside
    ``[0, size)`` for at least one output position in ``[y0, y1)`` (the centre always does)."""
    inside = [i for i in range(k) if -y1 < (i - k // 2) * d < size - y0]
    return inside[0], inside[-1] + 1


def _gather_tap(tap: torch.Tensor, xn: torch.Tensor, y0: int, y1: int, dy: int, dx: int):
    """Fill ``tap`` ([rows, W, C]: output rows ``y0..y1`` of one image) with the input pixels
    ``(dy, dx)`` away (``xn``: the image, HWC), zeros where they fall outside."""
    H, W = xn.shape[:2]
    ya, yb = max(y0, -dy), min(y1, H - dy)  # output rows whose tap lies inside the map
    xa, xb = max(0, -dx), min(W, W - dx)
    if ya >= yb or xa >= xb:
        tap.zero_()
        return
    # zero only the strips outside: the buffer holds the previous band's taps
    tap[:ya - y0].zero_()
    tap[yb - y0:].zero_()
    inner = tap[ya - y0:yb - y0]
    inner[:, :xa].zero_()
    inner[:, xb:].zero_()
    inner[:, xa:xb].copy_(xn[ya + dy:yb + dy, xa + dx:xb + dx])


class Im2colConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state dict) whose forward runs
    :func:`im2col_conv2d` where that computes it: on CPU, without autograd recording
    anything, input and parameters of one dtype, or under CPU autocast, which casts them to
    its dtype as it casts a conv's (the cast parameters kept until they change). Elsewhere
    ``nn.Conv2d.forward``.
    Made by :meth:`from_conv` or :func:`im2col_dilated_convs` from a conv that
    :func:`fits` accepts."""

    @staticmethod
    def fits(conv: nn.Module, min_dilation: int = 2) -> bool:
        """Whether ``conv`` is a plain ``nn.Conv2d`` this module computes: stride 1, one group,
        an odd kernel larger than 1x1, zero padding that keeps the size, and a dilation of at
        least ``min_dilation`` along an axis where the kernel is larger than 1."""
        if type(conv) is not nn.Conv2d:
            return False
        (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
        return (conv.stride == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
                and kh % 2 == 1 and kw % 2 == 1 and (kh, kw) != (1, 1)
                and conv.padding in (same_padding((kh, kw), (dh, dw)), "same")
                and max(d for k, d in ((kh, dh), (kw, dw)) if k > 1) >= min_dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "Im2colConv2d":
        """The module computing ``conv``: its parameter objects, and a copy of its hooks (handles
        taken before act on ``conv``)."""
        if not cls.fits(conv, min_dilation=1):
            raise ValueError(f"Im2colConv2d computes stride-1 single-group nn.Conv2d with an odd "
                             f"kernel larger than 1x1 and same zero padding, got {conv}")
        new = shell(conv, {})
        new._non_persistent_buffers_set = set(conv._non_persistent_buffers_set)
        new.__class__ = cls
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        params = (w,) if b is None else (w, b)
        # the dtype the conv computes in: autocast's where it is on (every float32 / half
        # tensor cast to it, as autocast casts a conv's; float64 left alone), else the one
        # dtype of input and parameters
        dtype = conv_dtype(x, w, b) if x.device.type == "cpu" else None
        if (dtype is None or x.dim() != 4 or x.shape[1] != w.shape[1]
                or any(p.device != x.device for p in params)
                or (torch.is_grad_enabled()
                    and any(t.requires_grad for t in (x,) + params))):
            return super().forward(x)  # torch's conv, its errors and its gradients
        return _im2col(x.to(dtype), _filters(w, dtype), None if b is None else _cast(b, dtype),
                       self.dilation, None)


def _filters(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` as ``[O, kh, kw, C]`` filters of ``dtype``, kept per weight until it changes
    (autocast casts a weight again in every autocast region)."""
    if weight.dtype == dtype:
        return krsc_filters(weight, cache=True)
    return weight_layout(weight, ("krsc", dtype), lambda w: krsc_filters(w.to(dtype)))


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, the cast kept per tensor until it changes (a bias)."""
    return t if t.dtype == dtype else weight_layout(t, ("cast", dtype), lambda v: v.to(dtype))


def im2col_dilated_convs(model: nn.Module, min_dilation: int = 6,
                         inplace: bool = False) -> nn.Module:
    """``model`` with every ``nn.Conv2d`` that :meth:`Im2colConv2d.fits` (dilation at least
    ``min_dilation``; default 6, where the measured slowdown began) replaced by an
    :class:`Im2colConv2d` with the same parameters. ``inplace=False`` (default) works on a deep
    copy; a converted model shares its dense modules with its source. ``result.im2col_convs``
    counts the replaced convs (a model that is itself such a conv is not replaced: swap it
    with :meth:`Im2colConv2d.from_conv`). Meant for inference in bfloat16 on CPU (see the
    module's docstring); CAD layers are left alone."""
    if min_dilation < 1:
        raise ValueError(f"im2col_dilated_convs: min_dilation must be >= 1, got {min_dilation}")
    if not inplace:
        model = copy.deepcopy(model)
    count = 0
    for owner in list(model.modules()):
        for name, child in list(owner._modules.items()):
            if Im2colConv2d.fits(child, min_dilation):
                owner._modules[name] = Im2colConv2d.from_conv(child)
                count += 1
    model.im2col_convs = getattr(model, "im2col_convs", 0) + count
    return model
