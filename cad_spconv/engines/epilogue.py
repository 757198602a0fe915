"""A conv's epilogue: ``relu(conv(x) + residual)``, fused into the conv where oneDNN can.

In a ResNet block whose batch norms are folded into its convs (``adapters.fold_batchnorm``)
every conv is followed by a ReLU, and the last by the residual add and a ReLU. Op by op those
are passes over a fresh feature matrix, memory-bound; with AMX the bfloat16 GEMMs are so fast
that they cost about as much as the GEMMs (Intel AMX Xeon, 2 threads, 20000 x 256 -> 1024:
GEMM 13 ms, ``relu_`` of its output 10 ms). oneDNN applies them as post-ops of the conv
(``torch.ops.mkldnn._convolution_pointwise``, the op inductor's frozen graphs call): on that
Xeon ``relu(conv(x) + residual)`` of a 1x1 conv took 0.36-0.87 of ``addmm`` + ``add_`` +
``relu_`` in bfloat16 on five of six layer shapes, 1.16 on 1500 x 2048 -> 512
(``python -m experiments.epilogue ops``, BENCHMARKS.md). That op has
no autograd formula and no float64, so it runs only where :func:`fuses` says; elsewhere the
epilogue follows the conv in place (:func:`apply`), the values of the unfused ops.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import gemm
from .layouts import tracks_grad, weight_layout

__all__ = ["fuses", "apply", "conv_map", "fused_rows", "prepacked"]

_ONEDNN = torch.backends.mkldnn.is_available()


def _dtypes() -> tuple:
    bf16 = _ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_FUSED_DTYPES = _dtypes()


def fuses(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
          residual: Optional[torch.Tensor] = None, groups: int = 1) -> bool:
    """Whether oneDNN runs the conv ``x`` (an NCHW map) with its epilogue: CPU tensors of one
    dtype, float32 (or bfloat16 where oneDNN has it), no autograd recording, no autocast (its
    casts belong to ``F.conv2d``). With a residual also no groups and an input that is
    channels-last and not also NCHW-contiguous (a map of one cell per image is both): else
    torch fuses nothing and adds in a fallback that has no bfloat16 (an internal assert in
    torch 2.14.1)."""
    if residual is not None and (groups != 1 or x.is_contiguous()
                                 or not x.is_contiguous(memory_format=torch.channels_last)):
        return False
    dtype = x.dtype
    if not (_ONEDNN and x.device.type == "cpu" and dtype in _FUSED_DTYPES
            and weight.dtype == dtype and weight.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu")):
        return False
    if bias is not None and (bias.dtype != dtype or bias.device.type != "cpu"):
        return False
    if residual is not None and (residual.dtype != dtype or residual.device.type != "cpu"):
        return False
    return not (torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual)))


def apply(out: torch.Tensor, relu: bool, residual: Optional[torch.Tensor],
          residual_inplace: bool = False) -> torch.Tensor:
    """The epilogue after an unfused conv, in place on its fresh output (as torchvision's
    ``out += identity; relu(out)``; autograd allows both on a conv's output).
    ``residual_inplace`` (the caller's residual, read by nothing else): without autograd the
    sum goes into ``residual`` instead (returned; the same values, the add commutes), so that
    a block's result stays in its shortcut's buffer as where the conv fuses it
    (:func:`conv_map`): a buffer given room for the densified map keeps it."""
    if residual is not None:
        if (residual_inplace and residual.dtype == out.dtype
                and not tracks_grad(out, residual, None)):
            residual += out
            out = residual
        else:
            out += residual
    return torch.relu_(out) if relu else out


def conv_map(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             stride: int, padding: tuple[int, int], dilation: tuple[int, int], groups: int,
             relu: bool = False, residual: Optional[torch.Tensor] = None,
             residual_inplace: bool = False, prepack: bool = True) -> torch.Tensor:
    """``relu(F.conv2d(x, ...) + residual)`` on NCHW maps (``residual`` shaped like the
    output; ``relu`` and ``residual`` optional). ``prepack``: where oneDNN runs it in
    bfloat16 on a CPU with AMX, with the weight in oneDNN's own layout, kept
    (:func:`prepacked`); for maps (grids, phase grids), not the feature matrices of
    :func:`fused_rows` (a number of rows per mask). ``residual_inplace``: where oneDNN fuses,
    the result is written into ``residual`` itself (returned), as inductor's frozen graphs do:
    no fresh output to allocate (page faults: a fresh 13 MB output took the fused conv from
    2.3 to 5.0 ms on an AMX Xeon) nor to write besides the residual; elsewhere, without
    autograd, the sum is added into ``residual`` after the conv (:func:`apply`)."""
    if not fuses(x, weight, bias, residual, groups):
        return apply(F.conv2d(x, weight, bias, stride, padding, dilation, groups), relu,
                     residual, residual_inplace)
    unary = "relu" if relu else "none"
    pad, dil, step = list(padding), list(dilation), [stride, stride]
    if prepack and x.dtype == torch.bfloat16 and gemm.CPU_AMX:  # see prepacked
        weight = prepacked(weight, pad, step, dil, groups, list(x.shape))
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, pad, step, dil, groups,
                                                       unary, [], "")
    if residual_inplace:
        return torch.ops.mkldnn._convolution_pointwise_(
            residual, x, weight, bias, pad, step, dil, groups, "add", 1.0,
            unary if relu else None, [], "")
    return torch.ops.mkldnn._convolution_pointwise(
        x, residual, weight, bias, pad, step, dil, groups, "add", 1.0,
        unary if relu else None, [], "")


def fused_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               groups: int, relu: bool = False, residual: Optional[torch.Tensor] = None,
               residual_inplace: bool = False) -> Optional[torch.Tensor]:
    """A 1x1 conv on a feature matrix ``x [N, C_in]`` with its epilogue (``residual
    [N, C_out]``; ``residual_inplace`` as :func:`conv_map`'s) as oneDNN's 1x1 conv with
    post-ops, on channels-last views (no copies): ``[N, C_out]``; ``None`` where oneDNN would
    not fuse them (:func:`fuses`), for the caller's own GEMM route."""
    n = x.shape[0]
    xm = _as_map(x)
    if residual is not None and not residual.is_contiguous():
        residual, residual_inplace = residual.contiguous(), False
    rm = None if residual is None else _as_map(residual)
    if not fuses(xm, weight, bias, rm, groups):
        return None
    y = conv_map(xm, weight, bias, 1, (0, 0), (1, 1), groups, relu, rm, residual_inplace,
                 prepack=False)
    if residual_inplace and rm is not None:
        return residual  # y is its map
    return y.permute(0, 2, 3, 1).reshape(n, -1)


def prepacked(weight: torch.Tensor, padding: list, stride: list, dilation: list, groups: int,
              input_shape: list) -> torch.Tensor:
    """``weight`` reordered into the blocked layout oneDNN's conv reads
    (``torch.ops.mkldnn._reorder_convolution_weight``, as inductor's frozen graphs prepack
    theirs), kept per weight until it changes (:func:`~.layouts.weight_layout`): unpacked,
    every call reorders it (a 3x3 256 -> 256 conv on a 32 x 64 lattice in bfloat16 took 1.73 ms
    unpacked, 0.83 ms prepacked, on an AMX Xeon, 2 threads). One copy per weight and stride,
    built for the first input shape and dilation it meets: packed for a 32 x 64 map, a
    64 x 128 one ran in 3.40 ms (3.17 packed for it, 3.75 unpacked), the same values (a
    layout oneDNN's kernel does not take, it reorders itself). bfloat16 only: in float32 the
    convs are 5-8x slower and the reorder a small part of them (the 32 x 64 conv 7.13 against
    6.67 ms, 64 x 128 29.0 against 28.6), while the copy costs as much memory as every weight
    it packs (a DeepLabV3-ResNet101 backbone's live tensors went from 112 to 206-285 MiB).
    AMX only (``gemm.CPU_AMX``): on an AMD EPYC with AVX512-BF16 the bfloat16 convs took the
    same time either way (3x3, 2 threads: 256 -> 256 on 32 x 64 and 64 x 128 maps 5.6 and
    21.5 ms unpacked, 1.00 and 0.98 of the prepacked time; 512 -> 512 at dilation 2, 0.99;
    BENCHMARKS.md, 2026-12-07 17:24), and the copies were 40 MiB of the backbone's memory.
    Only for :func:`conv_map`'s oneDNN op: the result is no NCHW weight."""
    tag = ("onednn-conv", tuple(stride), groups)
    return weight_layout(weight, tag, lambda w: torch.ops.mkldnn._reorder_convolution_weight(
        w, padding, stride, dilation, groups, input_shape))


def _as_map(rows: torch.Tensor) -> torch.Tensor:
    """A row-major ``[N, C]`` matrix as the channels-last map ``[1, C, N, 1]`` (a view)."""
    return rows.contiguous().view(1, rows.shape[0], 1, rows.shape[1]).permute(0, 3, 1, 2)
