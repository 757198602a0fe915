"""From an op call to an engine: checks, autocast, ``"auto"`` and ``"tuned"``."""
from __future__ import annotations

from typing import Optional

import torch

from ..rulebook import ConvRulebook, Rulebook
from . import epilogue
from .base import check_bias, get_engine, registered
from .layouts import tracks_grad, weight_layout
from .tuned import tuned_conv, tuned_engines

__all__ = ["engine_names", "check_engine", "select_engine", "prepare", "sparse_conv",
           "sparse_max", "empty_conv", "conv_dtype"]


def engine_names() -> tuple[str, ...]:
    """Every valid ``engine=`` value: ``"auto"``, ``"tuned"``, then the registered engines."""
    return ("auto", "tuned") + tuple(registered())


def check_engine(engine: str) -> str:
    if engine not in engine_names():
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(engine_names())}")
    return engine


def select_engine(device: torch.device, groups: int, book: Rulebook) -> str:
    """Engine that ``"auto"`` uses for a layer.

    On CPU, conv rulebooks of a plan go to ``"lattice"``: its dense part runs on the vendor
    conv and the rest is the same gather + GEMM as ``"torch"`` without the zero-row copy
    (BENCHMARKS.md: faster than ``"torch"`` and ``"spconv"`` at every layer width tried). On
    CUDA everything goes to ``"torch"``: on an H200, DeepLabV3-ResNet101 at 1024x2048 ran in
    0.57x (float32) and 0.52x (float16) of the all-lattice time (BENCHMARKS.md, GPU). Other
    rulebooks, and plans under the reference semantics (no Guarantee 2, so no lattice), go to
    ``"torch"`` everywhere.
    """
    del groups
    if (device.type == "cpu" and isinstance(book, ConvRulebook)
            and (book.plan.semantics == "paper" or book.num_taps == 1)):
        return "lattice"
    return "torch"


def prepare(book: Rulebook, engine: str = "auto", device=None, groups: int = 1,
            like: Optional[Rulebook] = None) -> str:
    """Build everything ``engine`` reads from ``book`` (what a first forward builds lazily), so
    geometry cost can be timed apart from compute; ``like``: a rulebook of the same geometry
    that forwards ran on, whose feature-dependent formats to build (``Engine.prepare``).
    Returns the engine actually used (for ``"tuned"``: the engines tuned layers ran on
    ``like``, else on ``book``, comma-separated)."""
    check_engine(engine)
    if engine == "tuned":
        ran = tuned_engines(like if like is not None else book)
        for name in ran:
            get_engine(name).prepare(book, like)
        return ",".join(ran) if ran else prepare(book, "auto", device, groups, like)
    if engine == "auto":
        engine = select_engine(torch.device(device or "cpu"), groups, book)
    get_engine(engine).prepare(book, like)
    return engine


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                book: Rulebook, groups: int = 1, engine: str = "auto", *, relu: bool = False,
                residual: Optional[torch.Tensor] = None,
                residual_inplace: bool = False,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Output features ``[N_out, C_out]`` of a conv described by ``book``; with ``relu`` /
    ``residual`` (``[N_out, C_out]``) its epilogue too, ``relu(conv + residual)``: fused into
    the conv by engines that can (:attr:`~.base.Engine.fuses_epilogue`, see :mod:`.epilogue`),
    else applied to the output in place. ``residual_inplace``: the result may be written into
    ``residual`` (fused: :func:`.epilogue.conv_map`; else :func:`.epilogue.apply`). ``out``
    (``[N_out, C_out]``): the tensor to return the result in, written by engines that can
    (:attr:`~.base.Engine.writes_out`), else copied into."""
    check_engine(engine)
    n_in, c_in = features.shape
    c_out, c_in_g, kh, kw = weight.shape
    if n_in != book.num_in:
        raise ValueError(f"features have {n_in} rows, the rulebook expects {book.num_in}")
    if c_in != c_in_g * groups:
        raise ValueError(f"features have {c_in} channels, the weight expects {c_in_g * groups} "
                         f"({c_in_g} x {groups} groups)")
    check_bias(bias, c_out)
    if residual is not None and (not isinstance(residual, torch.Tensor)
                                 or residual.shape != (book.num_out, c_out)):
        raise ValueError(f"residual must be the output's shape [{book.num_out}, {c_out}], got "
                         + (f"{tuple(residual.shape)}" if isinstance(residual, torch.Tensor)
                            else type(residual).__name__))
    if (kh, kw) != book.kernel_size:
        raise ValueError(f"weight kernel {kh}x{kw} does not match the rulebook's "
                         f"{book.kernel_size[0]}x{book.kernel_size[1]}")
    cast = _autocast_dtype(features.device)
    if cast is not None:  # as autocast does for F.conv2d (the GEMM paths would not cast)
        features, weight, bias = _autocast(features, weight, bias, cast)
    if weight.dtype != features.dtype or (bias is not None and bias.dtype != features.dtype):
        raise TypeError(f"features are {features.dtype}, the weight {weight.dtype}"
                        + ("" if bias is None else f" and the bias {bias.dtype}")
                        + "; give them one dtype (model.to(dtype)) or run under torch.autocast")
    if engine == "auto":
        engine = select_engine(features.device, groups, book)
    impl = None if engine == "tuned" else get_engine(engine)
    if impl is not None:
        impl.check(features, weight, groups, book)
    if book.num_out == 0:  # nothing to compute (an empty batch): no engine is asked
        y = epilogue.apply(empty_conv(features, weight, bias), relu, residual)
    elif impl is None:
        y = epilogue.apply(tuned_conv(features, weight, bias, book, groups), relu, residual,
                           residual_inplace)
    elif impl.fuses_epilogue and (relu or residual is not None):
        y = impl.conv(features, weight, bias, book, groups, relu=relu, residual=residual,
                      residual_inplace=residual_inplace)
    elif out is not None and impl.writes_out:
        y = impl.conv(features, weight, bias, book, groups, out=out)
    else:
        y = epilogue.apply(impl.conv(features, weight, bias, book, groups), relu, residual,
                           residual_inplace)
    return y if out is None or y is out else out.copy_(y)


def empty_conv(features: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> torch.Tensor:
    """The ``[0, C_out]`` output of a conv with no output sites (an empty batch), as
    ``F.conv2d`` gives for an empty batch: in the features' dtype and device, and part of the
    autograd graph of features, weight and bias (their gradients are zero, not missing)."""
    c_out = weight.shape[0]
    cols = features[:0, :1].expand(0, weight[0].numel())  # no element is read
    return torch.nn.functional.linear(cols, weight.reshape(c_out, -1), bias)


def sparse_max(features: torch.Tensor, book: Rulebook, engine: str = "auto") -> torch.Tensor:
    """Max over the taps of ``book`` (out-of-grid taps ignored). ``[N_out, C]``."""
    check_engine(engine)
    if engine in ("auto", "tuned"):
        engine = select_engine(features.device, 1, book)
    return get_engine(engine).max(features, book)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs convs in on ``device``, or ``None`` where it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _after_autocast(dtype: torch.dtype, cast: Optional[torch.dtype]) -> torch.dtype:
    """The dtype autocast (``cast``; ``None``: off) gives a conv input of ``dtype``."""
    return cast if cast is not None and dtype in _AUTOCAST_DTYPES else dtype


def conv_dtype(features: torch.Tensor, weight: torch.Tensor,
               bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The dtype a conv of these inputs computes in (autocast's where it is on for the
    features' device, as ``F.conv2d`` and :func:`sparse_conv` cast), or ``None`` where the
    inputs do not agree on one (:func:`sparse_conv` refuses them)."""
    cast = _autocast_dtype(features.device)
    if cast is None:  # the common case, on every conv call: no set to build
        dtype = features.dtype
        return dtype if weight.dtype == dtype and (bias is None or bias.dtype == dtype) else None
    dtypes = {_after_autocast(t.dtype, cast) for t in (features, weight, bias) if t is not None}
    return dtypes.pop() if len(dtypes) == 1 else None


def _autocast(features, weight, bias, cast: torch.dtype):
    """What autocast does to a conv's inputs: every float32 / float16 / bfloat16 tensor to
    ``cast`` (float64 is left alone). Without autograd the cast weight and bias are kept per
    parameter (:func:`~cad_spconv.engines.layouts.weight_layout`), so engines' own layout
    caches find the same tensor on every call."""
    track = tracks_grad(features, weight, bias)

    def to(t):
        if t is None or _after_autocast(t.dtype, cast) == t.dtype:
            return t
        if track or t is features:
            return t.to(cast)
        return weight_layout(t, ("autocast", cast), lambda w: w.to(cast))

    return to(features), to(weight), to(bias)
