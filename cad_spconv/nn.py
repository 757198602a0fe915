"""Modules on :class:`~cad_spconv.tensor.CADTensor`, mirroring ``torch.nn``.

Each module subclasses its ``torch.nn`` counterpart, so parameter names, shapes and
``state_dict`` keys are the same and adapters can swap them in while keeping the weights
(``from_module`` shares the original parameters instead of copying them).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.modules.utils import _pair

from . import functional as CF
from .engines import check_engine, conv_dtype, weights_epoch
from .tensor import CADTensor

__all__ = ["CADConv2d", "CADBatchNorm2d", "CADPointwise", "CADMaxPool2d",
           "CADAdaptiveAvgPool2d", "Densify", "same_padding", "GridBlock", "block_on_grid",
           "on_grid", "hooked"]


def _expect_cad(x, module: nn.Module):
    if not isinstance(x, CADTensor):
        raise TypeError(f"{type(module).__name__} expects a CADTensor, got {type(x).__name__}; "
                        "enter with CADTensor.from_dense(x, keep, num_levels)")


def same_padding(kernel_size, dilation) -> tuple[int, int]:
    """The padding that keeps the grid: ``dilation * (k - 1) // 2`` per axis (the conv rule's)."""
    kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
    dy, dx = (dilation, dilation) if isinstance(dilation, int) else dilation
    return dy * (kh - 1) // 2, dx * (kw - 1) // 2


class CADConv2d(nn.Conv2d):
    """``nn.Conv2d`` on a multi-resolution tensor (same padding, stride 1 or 2).

    ``dilation`` is the layer's dilation in the coarsest-stride network; at step ``t`` its taps
    are ``dilation * 2**t`` apart on the finest grid. Stride 2 is an adaptive downsampling step.
    ``engine``: one of :data:`cad_spconv.engines.ENGINES` (see
    :func:`cad_spconv.engines.describe`).
    """

    def __init__(self, *args, engine: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.engine = engine
        self._validate()

    def _validate(self):
        kh, kw = self.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"CADConv2d needs an odd kernel size, got {kh}x{kw}")
        if min(self.dilation) < 1:
            raise ValueError(f"CADConv2d dilation must be >= 1, got {self.dilation}")
        same = same_padding(self.kernel_size, self.dilation)
        if self.padding != "same" and tuple(self.padding) != same:
            raise ValueError(f"CADConv2d needs same padding dilation*(k-1)/2 = {same}, got "
                             f"{self.padding}")
        if self.stride[0] != self.stride[1] or self.stride[0] not in (1, 2):
            raise ValueError(f"CADConv2d stride must be 1 or 2, got {self.stride}")
        if self.padding_mode != "zeros":
            raise ValueError(f"CADConv2d supports zero padding only, got {self.padding_mode!r}")
        check_engine(self.engine)

    @classmethod
    def from_module(cls, conv: nn.Conv2d, dilation=None, stride=None,
                    engine: str = "auto") -> "CADConv2d":
        """Wrap ``conv``'s parameters (shared, not copied) and its train/eval mode.
        ``dilation`` overrides the conv's own (the adapter passes the dilation of the
        coarsest-stride network); ``stride`` overrides its stride (2: an adaptive step).
        ``conv`` must have same padding for its own dilation (the only padding the conv rule
        has): anything else is refused rather than replaced."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"CADConv2d.from_module wraps an nn.Conv2d, got {type(conv).__name__}")
        same = same_padding(conv.kernel_size, conv.dilation)
        if conv.padding != "same" and tuple(conv.padding) != same:
            raise ValueError(f"CADConv2d.from_module needs a conv with same padding {same} (the "
                             f"conv rule pads by dilation * (k - 1) // 2), got padding "
                             f"{conv.padding!r}; a conv without it has no content-adaptive form")
        d = conv.dilation if dilation is None else (
            (dilation, dilation) if isinstance(dilation, int) else tuple(dilation))
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size,
                  stride=conv.stride if stride is None else stride,
                  padding=same_padding(conv.kernel_size, d), dilation=d,
                  groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device="meta", engine=engine)
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    @property
    def macs_per_site(self) -> int:
        """Multiply-adds per output site: ``kh * kw * C_in / groups * C_out``."""
        kh, kw = self.kernel_size
        return kh * kw * (self.in_channels // self.groups) * self.out_channels

    def forward(self, x: CADTensor, *, relu: bool = False,
                residual: Optional[CADTensor] = None, residual_inplace: bool = False,
                out: Optional[torch.Tensor] = None) -> CADTensor:
        """The conv; with ``relu`` / ``residual``, ``relu(conv(x) + residual)``, fused into
        the conv where oneDNN can (:func:`cad_spconv.functional.conv2d`, also for
        ``residual_inplace`` and ``out``)."""
        _expect_cad(x, self)
        return CF.conv2d(x, self.weight, self.bias, self.stride, self.dilation, self.groups,
                         self.engine, relu=relu, residual=residual,
                         residual_inplace=residual_inplace, out=out)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", engine={self.engine!r}"


class CADBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` per site; training mode normalizes over the sites of the batch (so,
    as in torchvision, one image's NaN / Inf reaches every image through the statistics).

    ``inplace = True`` (set by the converted ResNet blocks, whose batch norms read a conv's
    fresh output) normalizes in place in eval mode without autograd: see
    :func:`cad_spconv.functional.batch_norm`."""

    inplace = False

    @classmethod
    def from_module(cls, bn: nn.BatchNorm2d, inplace: bool = False) -> "CADBatchNorm2d":
        """Wrap ``bn``: the same parameters, and its buffer table itself, so that running
        statistics stay one set through ``.to()`` / ``.cuda()`` / ``.double()`` of either
        module (a buffer registered on one, e.g. a pruning mask, is registered on both)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device="meta")
        new.inplace = inplace
        # the parameters themselves (a move or cast changes them in place); the buffer table
        # itself, not only its tensors: a move or cast replaces buffers in the table, and both
        # modules must see the new ones. (Parameters stay in each module's own table, so that
        # pruning or parametrizing the converted layer leaves the source as it is.)
        new.weight, new.bias = bn.weight, bn.bias
        new.__dict__["_buffers"] = bn._buffers
        new.__dict__["_non_persistent_buffers_set"] = bn._non_persistent_buffers_set
        new.train(bn.training)
        return new

    def forward(self, x: CADTensor) -> CADTensor:
        _expect_cad(x, self)
        return x.replace_feature(self.normalize(x.features))

    def normalize(self, f: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on a feature matrix ``[sites, C]`` (with ``inplace``, possibly
        ``f`` itself, normalized in place)."""
        if f.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got a tensor with "
                             f"{f.shape[1]} channels")
        # parameters and buffers read from their tables: Module.__getattr__ costs ~1 us a name,
        # and a ResNet-101 forward normalizes 104 times
        params, buffers, training = self._parameters, self._buffers, self.training
        mean, var = buffers.get("running_mean"), buffers.get("running_var")
        factor = 0.0 if self.momentum is None else self.momentum
        counted = buffers.get("num_batches_tracked")
        if training and self.track_running_stats and counted is not None:
            counted.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(counted)
        use_batch = training or mean is None
        if training and not self.track_running_stats:
            mean = var = None
        weight, bias = params.get("weight"), params.get("bias")
        return CF.batch_norm_features(
            f, mean, var, weight, bias, use_batch, factor, self.eps, inplace=self.inplace,
            scale_shift=(lambda: self._scale_shift(mean, var, weight, bias, counted))
            if self.inplace and not use_batch else None)

    def _scale_shift(self, mean, var, weight, bias, counted):
        """``CF.eval_scale_shift`` of the statistics and parameters and whether the scale is
        finite (``CF.batch_norm``'s ``scale_shift``), kept until one of them is
        replaced, moved or changed in place (a version counter or ``weights_epoch`` moves): its
        ~7 small ops cost more than the normalization itself on a small map. ``None`` where a
        tensor has no version counter (an inference tensor). ``counted``: the
        ``num_batches_tracked`` buffer.

        A training-mode forward updates the running statistics inside the batch-norm kernel,
        which moves no version counter; it also counts the batch in ``num_batches_tracked``
        (``add_``, which does), in this module or in the torch one it shares buffers with. A
        direct ``F.batch_norm(..., training=True)`` on these buffers counts nothing: call
        ``cad_spconv.clear_caches()`` after one."""
        tensors = (mean, var, weight, bias)
        try:
            # the version moves with in-place changes, the storage with model.to(...)
            versions = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)
                             for t in (mean, var, weight, bias, counted))
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        key = (versions, self.eps, torch.is_inference_mode_enabled(), weights_epoch())
        kept = self.__dict__.get("_kept_scale_shift")
        # the tensors themselves are held, so an id is never reused while kept
        if (kept is not None and kept[1] == key and kept[0][0] is mean and kept[0][1] is var
                and kept[0][2] is weight and kept[0][3] is bias):
            return kept[2]
        scale, shift = CF.eval_scale_shift(*tensors, self.eps)
        value = (scale, shift, bool(torch.isfinite(scale).all()))
        self.__dict__["_kept_scale_shift"] = (tensors, key, value)
        return value


class CADPointwise(nn.Module):
    """Applies an elementwise module (ReLU, GELU, Dropout, ...) to every site."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: CADTensor) -> CADTensor:
        _expect_cad(x, self)
        return CF.pointwise(x, self.module)


class CADMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d``: 2x2 window with stride 2 (VGG) or odd window with same padding.

    At the border a step's grid has ``ceil(H / 2)`` rows (blocks are clipped, every cell has an
    owner): the 2x2 pool acts as ``ceil_mode=True`` on odd sizes, an odd window as floor mode
    does with same padding. ``ceil_mode=True`` with an odd window (a row / column more on even
    sizes) is refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError("CADMaxPool2d does not return indices")
        odd = all(k % 2 == 1 for k in _pair(self.kernel_size))
        if self.ceil_mode and odd and _pair(self.stride) != (1, 1):
            raise ValueError(f"CADMaxPool2d with an odd window and stride "
                             f"{_pair(self.stride)} has ceil(H / 2) output rows, what "
                             f"ceil_mode=False gives with same padding; ceil_mode=True would add "
                             f"a row / column on even sizes: use ceil_mode=False")

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> "CADMaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                   ceil_mode=pool.ceil_mode)

    def forward(self, x: CADTensor) -> CADTensor:
        _expect_cad(x, self)
        return CF.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)


class CADAdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """Global average pool (``output_size=1``), area-weighted; returns dense ``[B, C, 1, 1]``."""

    def __init__(self, output_size=1):
        super().__init__(output_size)
        if output_size not in (1, (1, 1)):
            raise ValueError(f"CADAdaptiveAvgPool2d supports output_size=1 only, got {output_size}")

    def forward(self, x: CADTensor) -> torch.Tensor:
        _expect_cad(x, self)
        return CF.global_avg_pool(x)[:, :, None, None]


class Densify(nn.Module):
    """Leave the multi-resolution form: owner fill onto the finest grid (or the step's grid)."""

    def __init__(self, grid: str = "finest"):
        super().__init__()
        self.grid = grid

    def forward(self, x: CADTensor) -> torch.Tensor:
        _expect_cad(x, self)
        return x.dense(grid=self.grid)

    def extra_repr(self) -> str:
        return f"grid={self.grid!r}"


# ---------------------------------------------------------------------- blocks on grid maps
class GridBlock(NamedTuple):
    """How a block runs as the dense block of its grid (:func:`block_on_grid`)."""
    map: torch.Tensor  # the input's features as an NCHW map (a view, channels-last strides)
    scale_in: int  # tap scale of the convs that read the input sites: 2**(step - c_in)
    scale_out: int  # tap scale of the convs that read the output sites
    down: bool  # the strided convs halve the map (the output grid is the next coarser one)
    step_out: int


def block_on_grid(x: CADTensor, stride: int,
                  layers: Optional[Sequence[nn.Module]]) -> Optional[GridBlock]:
    """Where a block made of ``layers`` (its convs, norms, activations and containers; the
    first one reads ``x``), which takes ``x`` to the step after ``stride``, can run as the
    dense block of the grid: the sites on both sides are all the cells of one grid each
    (:func:`~cad_spconv.functional.grid_levels`: nothing kept up to the output's step, or
    everything kept), every layer is a CAD conv (engine ``"auto"``, the features' dtype and
    device), an eval-mode CAD batch norm, a CAD ReLU, ``nn.ReLU``, ``nn.Identity`` (a folded
    norm) or ``nn.Sequential``, and none has hooks (a hook, e.g.
    :class:`~cad_spconv.macs.MacCounter`'s, sees its layer's call as usual). Else ``None``: the
    block runs op by op, with the same results.

    Why: op by op, each layer wraps and unwraps a :class:`CADTensor` and checks its input;
    with the caches cold after a large conv that costs ~0.4 ms per ResNet bottleneck on a
    2-core Xeon (11 ms per DeepLabV3-ResNet101 backbone forward with nothing kept); a block
    run on the map costs what torchvision's does."""
    if not layers or _global_hooks():
        return None
    step_out = CF._step_out(x, stride)
    levels = CF.grid_levels(x, step_out)
    if levels is None or not _run_on_grid(layers, x.features):
        return None
    c_in, c_out = levels
    return GridBlock(CF.to_grid_map(x, c_in), 2 ** (x.step - c_in), 2 ** (step_out - c_out),
                     c_out > c_in, step_out)


def on_grid(layer: nn.Module, y: torch.Tensor, scale: int = 1, down: bool = False, *,
            relu: bool = False, residual: Optional[torch.Tensor] = None,
            residual_inplace: bool = False) -> torch.Tensor:
    """``layer`` (accepted by :func:`block_on_grid`) on the map ``y`` of its sites: a conv's
    taps ``scale`` times its dilation apart, stride 2 where ``down``; a conv's ``relu`` /
    ``residual`` (a map) / ``residual_inplace`` as :meth:`CADConv2d.forward`'s."""
    kind = type(layer)
    # parameters and buffers read from their tables: Module.__getattr__ costs ~1 us a name
    if kind is CADConv2d:
        p = layer._parameters
        return CF.grid_conv2d(y, p["weight"], p["bias"], layer.dilation, layer.groups, scale,
                              down, relu, residual, residual_inplace)
    if kind is CADBatchNorm2d:  # on the feature matrix, as op by op: the same bits
        n, c, h, w = y.shape
        f = layer.normalize(y.permute(0, 2, 3, 1).reshape(-1, c))
        if f.data_ptr() == y.data_ptr():  # normalized in place, through a view of y
            return y
        return f.reshape(n, h, w, c).permute(0, 3, 1, 2)
    if kind is CADPointwise:
        layer = layer._modules["module"]
        kind = type(layer)
    if kind is nn.ReLU:  # nn.ReLU.forward, two Python frames less
        return torch.relu_(y) if layer.inplace else torch.relu(y)
    if kind is nn.Identity:
        return y
    raise TypeError(f"on_grid: {kind.__name__} is not a layer block_on_grid accepts")


def _run_on_grid(layers: Sequence[nn.Module], f: torch.Tensor) -> bool:
    """:func:`block_on_grid`'s conditions on the layers, for input features ``f``."""
    dtype, device = f.dtype, f.device
    cast = torch.is_autocast_enabled(device.type)
    for i, m in enumerate(layers):
        if _own_hooks(m):
            return False
        kind = type(m)
        if kind is CADConv2d:
            w, b = m._parameters["weight"], m._parameters["bias"]
            if m.engine != "auto" or w.device != device:
                return False
            if i == 0 and w.shape[1] * m.groups != f.shape[1]:
                return False  # op by op: the conv's clear error
            if (conv_dtype(f, w, b) is None if cast else
                    w.dtype != dtype or (b is not None and b.dtype != dtype)):
                return False
        elif kind is CADBatchNorm2d:  # eval mode: running statistics, nothing to update
            if m.training or m._buffers.get("running_mean") is None:
                return False
        elif kind is CADPointwise:
            inner = m._modules["module"]
            if type(inner) is not nn.ReLU or not _run_on_grid((inner,), f):
                return False
        elif kind is not nn.ReLU and kind is not nn.Identity and kind is not nn.Sequential:
            return False
    return True


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` would run hooks (its own, or torch's global ones): a block
    that skips a layer's call (a fused or grid path) must not skip those."""
    return _own_hooks(module) or _global_hooks()


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _global_hooks() -> bool:
    """Whether module hooks are registered for every module (torch's global tables)."""
    m = _torch_module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks)
