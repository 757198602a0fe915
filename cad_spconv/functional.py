"""Functional ops on :class:`~cad_spconv.tensor.CADTensor` (the rules of ``SEMANTICS.md``).

Geometry (rulebooks) comes from the tensor's cache; compute goes through :mod:`.engines`.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F

from .engines import check_bias, conv_dtype, epilogue, sparse_conv, sparse_max
from .rulebook import ConvKey, Pool2Key, Rulebook
from .tensor import CADTensor

__all__ = ["conv2d", "max_pool2d", "batch_norm", "batch_norm_features", "eval_scale_shift",
           "pointwise", "global_avg_pool", "conv_book", "grid_levels", "to_grid_map",
           "from_grid_map", "grid_conv2d"]

IntPair = Union[int, tuple[int, int]]


def _pair(v: IntPair, what: str) -> tuple[int, int]:
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v  # what modules pass, on every call
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{what} must be an int or a pair of ints, got {v!r}")


def _step_out(x: CADTensor, stride: IntPair) -> int:
    sy, sx = _pair(stride, "stride")
    if sy != sx or sy not in (1, 2):
        raise ValueError(f"stride must be 1 (same sites) or 2 (adaptive downsampling), got {stride}")
    if sy == 2 and x.step >= x.plan.num_levels:
        raise ValueError(f"a stride-2 layer at step {x.step}, but the plan has only "
                         f"{x.plan.num_levels} adaptive steps; convert with a larger coarsest stride "
                         "or build the plan with more levels")
    return x.step + (sy == 2)


def conv_book(x: CADTensor, kernel_size: IntPair, dilation: IntPair, stride: IntPair) -> Rulebook:
    """The (cached) rulebook of a conv with this geometry applied to ``x``."""
    kh, kw = _pair(kernel_size, "kernel_size")
    dil = _pair(dilation, "dilation")
    step_out = _step_out(x, stride)
    return x.cache.get(ConvKey((kh, kw), dil, x.step, step_out), x.plan)


def conv2d(x: CADTensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: IntPair = 1, dilation: IntPair = 1, groups: int = 1,
           engine: str = "auto", *, relu: bool = False,
           residual: Optional[CADTensor] = None, residual_inplace: bool = False,
           out: Optional[torch.Tensor] = None) -> CADTensor:
    """Conv with same padding. ``dilation`` is the layer's dilation in the coarsest-stride
    network; on the finest grid its taps are ``dilation * 2**step`` apart. Stride 2 is an
    adaptive downsampling step.

    Where the sites on both sides of the conv are all the cells of one grid each
    (:meth:`~cad_spconv.plan.LevelPlan.grid_level`: nothing kept up to here, as in every layer
    of an all-coarse batch, or everything kept), the features are NHWC maps and the conv is the
    dense conv of those grids (the "none kept" and "all kept" guarantees, layer by layer): with
    ``engine="auto"`` it runs as that, on channels-last views, without a rulebook (what the
    lattice engine computes, minus its per-call work).

    ``relu`` / ``residual`` (a tensor at the output's step, ``C_out`` channels): return
    ``relu(conv(x) + residual)`` instead, the end of a ResNet block whose batch norms are
    folded into its convs. On CPU in float32 / bfloat16 without autograd, oneDNN applies them
    in the conv's epilogue where the conv runs as one oneDNN conv (grid convs, 1x1 convs);
    elsewhere they follow the conv in place (:mod:`cad_spconv.engines.epilogue`).
    ``residual_inplace``: the result may be written into ``residual``'s features (a block's
    own shortcut that nothing else reads): where fused by the conv (no fresh output to
    allocate), elsewhere without autograd by the add after it (the block's result stays in its
    shortcut's buffer).

    ``out``: an ``[N_out, C_out]`` tensor of the conv's dtype and device that becomes the
    result's features (e.g. :func:`~cad_spconv.tensor.features_with_room`): written directly
    by the 1x1 convs of the ``"lattice"`` engine without autograd, elsewhere copied into."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise ValueError("weight must be a conv weight [C_out, C_in / groups, kh, kw], got "
                         + (f"shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                            else type(weight).__name__))
    dil = _pair(dilation, "dilation")
    if min(dil) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    check_bias(bias, weight.shape[0])
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    if residual is not None:
        _check_residual(x, residual, weight.shape[0], _step_out(x, stride))
    if out is not None:
        _check_out(x, out, weight, bias, _step_out(x, stride), residual)
    levels = _grid_levels(x, weight, bias, stride, groups, engine)
    if levels is not None:
        y = _grid_conv(x, weight, bias, levels, dil, groups, relu, residual, residual_inplace)
        return y if out is None else y.replace_feature(out.copy_(y.features))
    book = conv_book(x, weight.shape[-2:], dilation, stride)
    y = sparse_conv(x.features, weight, bias, book, groups, engine, relu=relu,
                    residual=None if residual is None else residual.features,
                    residual_inplace=residual_inplace, out=out)
    return x.replace_feature(y, book.step_out)


def _check_out(x: CADTensor, out, weight, bias, step_out: int, residual) -> None:
    want = (x.plan.num_sites(step_out), weight.shape[0])
    dtype = conv_dtype(x.features, weight, bias)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != want or (dtype is not None and out.dtype != dtype) \
            or out.device != x.features.device:
        raise ValueError(f"out must be a {list(want)} {dtype} tensor on {x.features.device} "
                         f"(the output's features), got {list(out.shape)} {out.dtype} on "
                         f"{out.device}")
    if out.numel():
        ptr = out.untyped_storage().data_ptr()
        for name, t in (("input", x), ("residual", residual)):
            if t is not None and t.features.untyped_storage().data_ptr() == ptr:
                raise ValueError(f"out shares memory with the {name}'s features, which the conv "
                                 "reads; pass a separate buffer")


def _check_residual(x: CADTensor, residual, c_out: int, step_out: int) -> None:
    if not isinstance(residual, CADTensor):
        raise TypeError(f"residual must be a CADTensor, got {type(residual).__name__}")
    if residual.plan is not x.plan or residual.step != step_out:
        raise ValueError(f"residual must be a tensor of the input's plan at the output's step "
                         f"{step_out} (the block's shortcut), got "
                         + ("another plan" if residual.plan is not x.plan
                            else f"step {residual.step}"))
    if residual.num_channels != c_out:
        raise ValueError(f"residual has {residual.num_channels} channels, the conv outputs "
                         f"{c_out}")


def _grid_levels(x: CADTensor, weight, bias, stride, groups, engine):
    """``(c_in, c_out, step_out)``, the grid levels of the input and output sites and the
    output step, where :func:`conv2d` runs as a dense conv; else ``None`` (so is input that the
    rulebook path refuses with a clear error)."""
    f = x.features
    if not (engine == "auto" and weight.dim() == 4 and weight.shape[-2] % 2 == 1
            and weight.shape[-1] % 2 == 1 and weight.shape[1] * groups == f.shape[1]
            and weight.device == f.device
            and conv_dtype(f, weight, bias) is not None):  # under autocast F.conv2d casts
        return None
    step_out = _step_out(x, stride)
    levels = grid_levels(x, step_out)
    return None if levels is None else levels + (step_out,)


def grid_levels(x: CADTensor, step_out: int) -> Optional[tuple[int, int]]:
    """``(c_in, c_out)`` where ``x``'s sites are all the cells of the ``2**c_in`` grid and the
    sites at ``step_out`` all those of the ``2**c_out`` grid (nothing kept up to there, or
    everything kept: :meth:`~cad_spconv.plan.LevelPlan.grid_level`), so that the ops between
    them are dense ops on NHWC maps (:func:`to_grid_map`); else ``None``."""
    plan = x.plan
    if plan.semantics != "paper" or x.features.shape[0] == 0:
        return None
    c_in, c_out = plan.grid_level(x.step), plan.grid_level(step_out)
    return None if c_in is None or c_out is None else (c_in, c_out)


def to_grid_map(x: CADTensor, c: int) -> torch.Tensor:
    """``x``'s features, the cells of the ``2**c`` grid in raster order (:func:`grid_levels`),
    as an NCHW map: a view, with channels-last strides."""
    (H, W), f, cell = x.plan.grid, x.features, 2 ** c
    return f.reshape(x.batch_size, -(-H // cell), -(-W // cell), f.shape[1]).permute(0, 3, 1, 2)


def from_grid_map(x: CADTensor, y: torch.Tensor, step: int) -> CADTensor:
    """The tensor at ``step`` (on ``x``'s plan) whose features are the cells of the NCHW map
    ``y`` (the grid of that step: :func:`grid_levels`)."""
    # a channels-last map is the feature matrix as it is; reshape copies otherwise
    return x.replace_feature(y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]), step)


def grid_conv2d(y: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                dilation: tuple[int, int], groups: int, scale: int,
                down: bool, relu: bool = False, residual: Optional[torch.Tensor] = None,
                residual_inplace: bool = False) -> torch.Tensor:
    """:func:`conv2d` on an NCHW map whose cells are the input sites (:func:`to_grid_map`):
    taps ``dilation * scale`` cells apart (``scale = 2**(step - c_in)``), stride 2 where the
    output grid is the next coarser one (``down``); ``relu`` / ``residual`` (a map shaped like
    the output) as :func:`conv2d`'s."""
    kh, kw = weight.shape[-2:]
    dy, dx = dilation[0] * scale, dilation[1] * scale
    pad = (dy * (kh // 2), dx * (kw // 2))
    # F.conv2d, or on CPU without autograd oneDNN's conv (the epilogue fused, bfloat16
    # weights prepacked)
    return epilogue.conv_map(y, weight, bias, 1 + down, pad, (dy, dx), groups, relu, residual,
                             residual_inplace)


def _grid_conv(x: CADTensor, weight, bias, levels, dilation: tuple[int, int],
               groups, relu: bool = False, residual: Optional[CADTensor] = None,
               residual_inplace: bool = False) -> CADTensor:
    """:func:`conv2d` where the input sites are the cells of the ``2**c_in`` grid and the
    output sites those of the ``2**c_out`` grid."""
    c_in, c_out, step_out = levels
    y = grid_conv2d(to_grid_map(x, c_in), weight, bias, dilation, groups,
                    2 ** (x.step - c_in), c_out > c_in, relu,
                    None if residual is None else to_grid_map(residual, c_out),
                    residual_inplace)
    return from_grid_map(x, y, step_out)


def max_pool2d(x: CADTensor, kernel_size: IntPair, stride: IntPair, padding: IntPair = 0,
               dilation: IntPair = 1) -> CADTensor:
    """Max pool: window = stride 2 (``2x2/2``: merged sites take the max of their children,
    kept sites pass through), or an odd window with same padding (the conv rule with max;
    out-of-grid taps ignored), stride 1 or 2."""
    if not x.features.is_floating_point():  # windows are padded with -inf
        raise TypeError(f"max_pool2d needs floating-point features, got {x.dtype}; convert with "
                        "x.replace_feature(x.features.float())")
    k = _pair(kernel_size, "kernel_size")
    s = _pair(stride, "stride")
    p = _pair(padding, "padding")
    d = _pair(dilation, "dilation")
    if k == (2, 2) and s == (2, 2) and p == (0, 0) and d == (1, 1):
        _step_out(x, 2)
        book = x.cache.get(Pool2Key(x.step), x.plan)
    elif k[0] % 2 == 1 and k[1] % 2 == 1 and p == (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2):
        book = conv_book(x, k, d, s)
    else:
        raise ValueError(f"unsupported max pool kernel={k}, stride={s}, padding={p}, dilation={d}: "
                         "supported are 2x2 window with stride 2, and odd windows with same "
                         "padding (dilation*(k-1)/2) and stride 1 or 2")
    return x.replace_feature(sparse_max(x.features, book), book.step_out)


def batch_norm(x: CADTensor, running_mean, running_var, weight=None, bias=None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               inplace: bool = False, scale_shift=None) -> CADTensor:
    """Batch norm per site; in training the statistics are taken over sites.

    Training mode mixes the images of the batch, as ``torch.nn.BatchNorm2d`` does: a NaN / Inf
    in one image makes the batch statistics, hence those channels of every image, non-finite.
    Eval mode (running statistics) keeps images independent, like every other op.

    ``inplace``: in eval mode, where autograd records nothing and the features have the
    statistics' dtype (or half precision with float32 statistics, as under autocast, where the
    result keeps the features' dtype as torch's batch norm does), overwrite ``x``'s features
    with the result (for features nobody else reads, such as a conv's fresh output: one
    feature matrix fewer at the memory peak); elsewhere it computes out of place as usual.
    On CPU with statistics of the features' dtype that is torch's batch-norm kernel, written
    into the features; elsewhere ``features * scale + shift``.
    ``scale_shift``: :func:`eval_scale_shift` of these arguments where the caller keeps it
    (``CADBatchNorm2d`` does, per parameter version), optionally with a third item: whether
    the scale is all finite (saves a check and a device sync per call); or a function that
    returns that, called only where the scale and shift are used.
    """
    return x.replace_feature(batch_norm_features(x.features, running_mean, running_var, weight,
                                                 bias, training, momentum, eps, inplace,
                                                 scale_shift))


def batch_norm_features(f: torch.Tensor, running_mean, running_var, weight=None, bias=None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                        inplace: bool = False, scale_shift=None) -> torch.Tensor:
    """:func:`batch_norm` on a feature matrix ``[sites, C]``: the normalized features (with
    ``inplace``, possibly ``f`` itself)."""
    if (inplace and not training and running_mean is not None and running_var is not None
            and (f.dtype == running_mean.dtype or (f.dtype in (torch.float16, torch.bfloat16)
                                                   and running_mean.dtype == torch.float32))
            and not (torch.is_grad_enabled() and (f.requires_grad or any(
                p is not None and p.requires_grad for p in (weight, bias))))):
        if _kernel_applies(f, running_mean, running_var, weight, bias):
            # torch's eval kernel with the statistics themselves, its output aliased onto the
            # features (elementwise, so safe): the dense batch norm's values, and no scale and
            # shift to look up (their cache key alone cost about as much as this call)
            empty = _unit_statistics(running_mean)[2]
            torch.native_batch_norm(f, weight, bias, running_mean, running_var, False, 0.0, eps,
                                    out=(f, empty, empty))
            return f
        if callable(scale_shift):
            scale_shift = scale_shift()
        kept = scale_shift or eval_scale_shift(running_mean, running_var, weight, bias, eps)
        scale, shift = kept[:2]
        # one pass over the features, as the dense batch norm makes (mul_ then add_ made two);
        # half-precision features take float32 scale and shift and are rounded once (on CPU
        # through torch's batch-norm kernel: a mixed-dtype addcmul runs unvectorized there)
        if _half_kernel_applies(f, scale, kept[2] if len(kept) > 2 else None):
            return _affine_half_on_cpu(f, scale, shift)
        return torch.addcmul(shift, f, scale, out=f)
    return F.batch_norm(f, running_mean, running_var, weight, bias, training, momentum, eps)


def _kernel_applies(f: torch.Tensor, *stats: Optional[torch.Tensor]) -> bool:
    """Whether torch's eval batch-norm kernel normalizes ``f`` in place with these statistics
    and parameters: contiguous CPU features (what the tests cover) of float32, float64 or
    bfloat16, and every statistic and parameter of the features' dtype (half
    features with float32 statistics, as under autocast, take :func:`_affine_half_on_cpu`)."""
    dtype = f.dtype
    if f.device.type != "cpu" or dtype not in _KERNEL_DTYPES or not f.is_contiguous():
        return False
    for t in stats:  # a loop, not all(<generator>): called by every batch norm of a forward
        if t is not None and (t.dtype != dtype or t.device.type != "cpu"):
            return False
    return True


_KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _half_kernel_applies(f: torch.Tensor, scale: torch.Tensor,
                         finite: Optional[bool] = None) -> bool:
    """Whether :func:`_affine_half_on_cpu` gives the mixed ``addcmul``'s values: contiguous
    half-precision CPU features (torch's strided kernel rounds differently), float32 scale
    (the kernel refuses other parameter dtypes) and a finite one (the kernel's shift is
    ``shift - 0 * scale``: NaN for an infinite scale, from a zero variance with eps 0;
    ``finite``: that, where the caller knows it)."""
    return (f.device.type == "cpu" and f.dtype in (torch.float16, torch.bfloat16)
            and scale.dtype == torch.float32 and f.is_contiguous()
            and (finite if finite is not None else bool(torch.isfinite(scale).all())))


def _affine_half_on_cpu(f: torch.Tensor, scale: torch.Tensor,
                        shift: torch.Tensor) -> torch.Tensor:
    """``f * scale + shift`` into ``f`` (contiguous half precision, CPU) with finite float32
    ``scale`` and ``shift``: computed in float32, rounded once to the half dtype.

    A CPU elementwise op mixing the two dtypes runs unvectorized (a mixed ``addcmul``: 43 ms
    against 2.0 ms in one dtype for 65536 x 256 bfloat16 on an AMD EPYC). torch's batch-norm
    kernel takes half-precision input with float32 parameters vectorized: run it as
    ``x * scale + shift`` (mean 0, variance 1 and eps 0 make its inverse std exactly 1) with
    the output aliased onto the input, which an eval batch norm, elementwise, allows (the
    same bits as the mixed ``addcmul`` on torch 2.4.1, the oldest supported, and 2.14.1).
    Figures: ``experiments.half_batch_norm``."""
    zeros, ones, empty = _unit_statistics(scale)
    # the binding, not torch.ops: the same kernel, 9 instead of 15 us a call
    torch.native_batch_norm(f, scale, shift, zeros, ones, False, 0.0, 0.0, out=(f, empty, empty))
    return f


_unit_stats: dict = {}


def _unit_statistics(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean 0 and variance 1 like ``scale``, and an empty tensor for the kernel's unused
    saved statistics: made once per size and device (small ops per call cost about as much as
    a batch norm on a small map). Eval mode only reads them. Inference-mode tensors apart: one
    cannot be an ``out=`` argument outside inference mode."""
    key = (scale.shape[0], scale.dtype, scale.device, torch.is_inference_mode_enabled())
    stats = _unit_stats.get(key)
    if stats is None:
        stats = _unit_stats[key] = (torch.zeros_like(scale), torch.ones_like(scale),
                                    scale.new_empty(0))
    return stats


def eval_scale_shift(running_mean, running_var, weight=None, bias=None,
                     eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``features * scale + shift``: the per-channel ``scale`` and
    ``shift`` (without autograd; each site stays independent). Half-precision statistics give
    float32 ones, as PyTorch's kernels compute them: in float16, ``mean * scale`` overflows
    for large means and ``var + eps`` may fall below the normal range."""
    if running_var.dtype in (torch.float16, torch.bfloat16):
        running_mean, running_var, weight, bias = (
            None if t is None else t.float() for t in (running_mean, running_var, weight, bias))
    with torch.no_grad():
        scale = torch.rsqrt(running_var + eps)
        if weight is not None:
            scale = scale * weight
        shift = -running_mean * scale
        if bias is not None:
            shift = shift + bias
    return scale, shift


def pointwise(x: CADTensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> CADTensor:
    """Apply an elementwise function (activation, dropout, ...) to every site."""
    return x.replace_feature(fn(x.features))


_CHUNK_ELEMENTS = 1 << 20  # 4 MiB of float32 per chunk: stays in cache between passes over it


def global_avg_pool(x: CADTensor) -> torch.Tensor:
    """Area-weighted mean over sites: ``[B, C]``, equal to the mean of ``x.dense()``."""
    if not (x.features.is_floating_point() or x.features.is_complex()):
        # a mean of integers would be truncated back to integers; torch refuses them too
        raise TypeError(f"global_avg_pool needs floating-point features, got {x.dtype}; "
                        "convert with x.replace_feature(x.features.float())")
    geo = x.plan.geometry(x.step)
    # half-precision sums over a whole image overflow (float16) or lose digits: float32 for them
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    f, images, area = x.features, geo.coords[:, 0], geo.area.to(acc)[:, None]
    sums = torch.zeros(x.batch_size, x.num_channels, dtype=acc, device=f.device)
    if torch.is_grad_enabled() and f.requires_grad:
        sums = sums.index_add(0, images, f.to(acc) * area)
    else:  # in row chunks: weighted copies of the whole feature matrix would top the memory peak
        rows = max(1, _CHUNK_ELEMENTS // max(1, x.num_channels))
        for start in range(0, f.shape[0], rows):
            part = f[start:start + rows].to(acc, copy=True).mul_(area[start:start + rows])
            sums.index_add_(0, images[start:start + rows], part)
    H, W = x.plan.grid
    return (sums / (H * W)).to(x.dtype)
