"""Modules on :class:`~cad_spconv.tensor.CADTensor`, mirroring ``torch.nn``.

Each module subclasses its ``torch.nn`` counterpart, so parameter names, shapes and
``state_dict`` keys are the same and adapters can swap them in while keeping the weights
(``from_module`` shares the original parameters instead of copying them).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from . import functional as CF
from .engines import check_engine, weights_epoch
from .tensor import CADTensor

__all__ = ["CADConv2d", "CADBatchNorm2d", "CADPointwise", "CADMaxPool2d",
           "CADAdaptiveAvgPool2d", "Densify", "same_padding"]


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

    def forward(self, x: CADTensor) -> CADTensor:
        _expect_cad(x, self)
        return CF.conv2d(x, self.weight, self.bias, self.stride, self.dilation, self.groups,
                         self.engine)

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
        if x.features.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got a tensor with "
                             f"{x.features.shape[1]} channels")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        use_batch = self.training or self.running_mean is None
        return CF.batch_norm(
            x, self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight, self.bias, use_batch, factor, self.eps, inplace=self.inplace,
            scale_shift=self._scale_shift() if self.inplace and not use_batch else None)

    def _scale_shift(self):
        """``CF.eval_scale_shift`` of the statistics and parameters and whether the scale is
        finite (``CF.batch_norm``'s ``scale_shift``), kept until one of them is
        replaced, moved or changed in place (a version counter or ``weights_epoch`` moves): its
        ~7 small ops cost more than the normalization itself on a small map. ``None`` where a
        tensor has no version counter (an inference tensor).

        A training-mode forward updates the running statistics inside the batch-norm kernel,
        which moves no version counter; it also counts the batch in ``num_batches_tracked``
        (``add_``, which does), in this module or in the torch one it shares buffers with. A
        direct ``F.batch_norm(..., training=True)`` on these buffers counts nothing: call
        ``cad_spconv.clear_caches()`` after one."""
        tensors = (self.running_mean, self.running_var, self.weight, self.bias)
        try:
            # the version moves with in-place changes, the storage with model.to(...)
            versions = tuple(None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)
                             for t in tensors + (self.num_batches_tracked,))
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        key = (versions, self.eps, torch.is_inference_mode_enabled(), weights_epoch())
        kept = self.__dict__.get("_kept_scale_shift")
        # the tensors themselves are held, so an id is never reused while kept
        if (kept is not None and kept[1] == key
                and all(a is b for a, b in zip(kept[0], tensors))):
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
