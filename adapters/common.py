"""What every adapter shares: stride checks, keep masks, layer conversion, the model base class.

Conversion never copies a parameter: converted layers are new module shells that hold the
original ``Parameter`` and buffer objects, so ``cad.load_state_dict(model.state_dict())`` works
and training either one trains both.
"""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from cad_spconv.nn import CADBatchNorm2d, CADConv2d, CADPointwise, same_padding
from cad_spconv.plan import LevelPlan, make_plan, num_adaptive_steps, reduce_to_grid
from cad_spconv.tensor import CADTensor

__all__ = ["UnsupportedModelError", "SUPPORTED", "POINTWISE", "check_strides", "dense_conv",
           "cad_conv", "cad_layer", "check_plain_conv", "shell", "follow_mode", "keep_to_grid",
           "CADModel", "expect_type"]

SUPPORTED = ("torchvision ResNet / ResNeXt / Wide ResNet classifiers (BasicBlock, Bottleneck); "
             "torchvision FCN and DeepLabV3 with a ResNet backbone; DeepLabV3+ "
             "(adapters.DeepLabV3Plus); VGG-style feature stacks "
             "such as torchvision vgg16(...).features or vgg16_bn(...).features (or a prefix)")

# Elementwise modules: they act on every site alone, so they run unchanged on site features.
POINTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Sigmoid,
             nn.Tanh, nn.Identity, nn.Dropout)


class UnsupportedModelError(TypeError):
    """A model or sub-module that has no content-adaptive form; the message names its path."""


def expect_type(module: nn.Module, path: str, types, what: str):
    """Exact type check (a subclass may override ``forward``, which conversion would lose)."""
    types = types if isinstance(types, tuple) else (types,)
    if type(module) not in types:
        # fold_batchnorm leaves Identity where the batch norms were
        folded = (" It looks batch-norm folded: convert the model first, then fold the "
                  "converted one (adapters.fold_batchnorm)."
                  if type(module) is nn.Identity and nn.BatchNorm2d in types else "")
        raise UnsupportedModelError(
            f"cannot convert {path or 'the model'} ({type(module).__module__}."
            f"{type(module).__name__}): expected {what}.{folded} Supported: {SUPPORTED}")


def check_strides(finest: int, coarsest: int, finest_allowed: Sequence[int], coarsest_max: int,
                  family: str, where_steps: str) -> int:
    """Validate the stride pair for a family; returns ``L = log2(coarsest / finest)``."""
    num_levels = num_adaptive_steps(finest, coarsest)
    if finest not in finest_allowed:
        raise ValueError(f"{family}: finest_stride must be one of "
                         f"{', '.join(map(str, finest_allowed))} ({where_steps}), got {finest}")
    if coarsest > coarsest_max:
        raise ValueError(f"{family}: coarsest_stride can be at most {coarsest_max} (the stride of "
                         f"its last downsampling), got {coarsest}")
    return num_levels



# ---------------------------------------------------------------------- layer conversion
def dense_conv(conv: nn.Conv2d, stride: int, dilation: int) -> nn.Conv2d:
    """``conv`` with this stride and dilation (same padding): the module itself when it already
    has them, else a shell sharing its parameters."""
    pad = same_padding(conv.kernel_size, dilation)
    if (tuple(conv.stride) == (stride, stride) and tuple(conv.dilation) == (dilation, dilation)
            and tuple(conv.padding) == pad):
        return conv
    new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=stride,
                    padding=pad, dilation=dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode, device="meta")
    new.weight, new.bias = conv.weight, conv.bias
    new.train(conv.training)
    return new


def cad_conv(conv: nn.Conv2d, stride: int, dilation: int, engine: str, path: str = "") -> CADConv2d:
    """``conv`` on a multi-resolution tensor: ``dilation`` is its dilation in the coarsest-stride
    network, ``stride`` 2 makes it an adaptive downsampling step. Parameters are shared."""
    expect_type(conv, path, nn.Conv2d, "an nn.Conv2d")
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise UnsupportedModelError(f"cannot convert {path} ({conv}): content-adaptive convs need "
                                    "an odd kernel (same padding)")
    if conv.padding_mode != "zeros":
        raise UnsupportedModelError(f"cannot convert {path} ({conv}): only zero padding is "
                                    f"supported, got padding_mode={conv.padding_mode!r}")
    return CADConv2d.from_module(conv, dilation=dilation, stride=stride, engine=engine)


def check_plain_conv(conv: nn.Conv2d, path: str, where: str = "here",
                     strides: Sequence[int] = (1,)) -> None:
    """A conv of a plain stack keeps the grid: stride 1 (or one of ``strides`` on both axes,
    for the family's downsampling convs), isotropic dilation, same padding. The converted layer
    is rebuilt from these, so anything else would be replaced silently."""
    if conv.stride[0] != conv.stride[1] or conv.stride[0] not in strides:
        raise UnsupportedModelError(
            f"cannot convert {path} ({conv}): "
            + (f"a strided conv {where} is not supported (only the family's downsampling "
               "layers)" if tuple(strides) == (1,) else
               f"stride must be one of {', '.join(map(str, strides))} on both axes"))
    if conv.dilation[0] != conv.dilation[1]:
        raise UnsupportedModelError(f"cannot convert {path} ({conv}): anisotropic dilation")
    if conv.padding != "same" and tuple(conv.padding) != same_padding(conv.kernel_size,
                                                                      conv.dilation):
        raise UnsupportedModelError(f"cannot convert {path} ({conv}): only same padding "
                                    "(dilation * (k - 1) / 2) is supported")


def cad_layer(module: nn.Module, path: str, engine: str,
              dilation: Optional[int] = None) -> nn.Module:
    """A stride-1 layer of a plain stack (conv, batch norm, elementwise op) in CAD form.
    ``dilation``: the conv's dilation in the coarsest-stride network (default: its own)."""
    if type(module) is nn.Conv2d:
        check_plain_conv(module, path)
        d = module.dilation[0] if dilation is None else dilation
        return cad_conv(module, 1, d, engine, path)
    if type(module) is nn.BatchNorm2d:
        return CADBatchNorm2d.from_module(module)
    if type(module) in POINTWISE:
        return CADPointwise(module)
    raise UnsupportedModelError(
        f"cannot convert {path} ({type(module).__module__}.{type(module).__name__}): a layer here "
        "must be nn.Conv2d, nn.BatchNorm2d or an elementwise op ("
        + ", ".join(t.__name__ for t in POINTWISE) + f"). Supported models: {SUPPORTED}")


def follow_mode(cad: nn.Module, source: nn.Module) -> nn.Module:
    """The containers the adapter made take the source's train / eval mode, so a converted
    ``model.eval()`` is in eval mode. The layers it shares and the CAD layers wrapping a source
    layer (whose own parameters and buffers are all the source's) keep that layer's mode: a
    batch norm frozen with ``.eval()`` in a training model stays frozen."""
    shared = set(map(id, source.modules()))
    tensors = {id(t) for t in source.parameters()} | {id(t) for t in source.buffers()}
    for m in cad.modules():
        if id(m) in shared:
            continue
        own = list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        if own and all(id(t) in tensors for t in own):
            continue  # wraps a source layer: from_module gave it that layer's mode
        m.training = source.training
    return cad


def shell(module: nn.Module, children: dict[str, Optional[nn.Module]]) -> nn.Module:
    """A shallow copy of ``module`` (same class and forward, same parameter objects) with some
    children replaced; the original is left untouched."""
    new = copy.copy(module)
    for key, value in list(new.__dict__.items()):
        if isinstance(value, dict):  # children, parameters, buffers, hook tables: own copies
            new.__dict__[key] = type(value)(value)
    for name, child in children.items():
        new._modules[name] = child
    return new


# ---------------------------------------------------------------------- keep masks
def keep_to_grid(mask, grid: Sequence[int], image_size: Sequence[int], stride: int,
                 what: str = "keep mask"):
    """A bool mask at image resolution -> the finest grid, with the model's finest stride as the
    scale (a cell is kept if any pixel of its footprint ``[stride*i, stride*(i+1))`` is kept;
    pixels a floor-mode pool dropped are ignored). A mask at the finest grid passes; any other
    size is refused (a mask made for another image size or crop would be read at a guessed
    scale, misaligned). Non-bool input passes through to :func:`~cad_spconv.plan.make_plan`,
    which refuses it with the fix."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 2:
        return mask
    hw, grid, image_size = tuple(mask.shape[-2:]), tuple(grid), tuple(image_size)
    if hw == grid:
        return mask
    if hw != image_size:
        raise ValueError(
            f"{what} of size {hw[0]}x{hw[1]} is neither the image size {image_size[0]}x"
            f"{image_size[1]} nor the model's finest grid {grid[0]}x{grid[1]} (stride {stride}): "
            "compute the mask on these images, or give it at one of those two sizes")
    return reduce_to_grid(mask, grid, what, stride=stride)


class CADModel(nn.Module):
    """Base of converted models: strides, entering the multi-resolution form, parts.

    Attributes: ``finest_stride``, ``coarsest_stride``, ``num_levels`` (adaptive steps L) and
    ``last_plan`` (the :class:`~cad_spconv.plan.LevelPlan` of the last forward).
    """

    def __init__(self, finest_stride: int, coarsest_stride: int):
        super().__init__()
        self.num_levels = num_adaptive_steps(finest_stride, coarsest_stride)
        self.finest_stride = finest_stride
        self.coarsest_stride = coarsest_stride
        self.__dict__["_last_levels"] = None  # see last_plan
        #: tap anchor of coarse sites: "paper" (top-left) or "reference" (the paper code's
        #: centre cell); set by adapters.convert(..., semantics=...)
        self.semantics = "paper"
        # the keep module of the last forward, for parts(); kept out of the module tree
        self.__dict__["_keep_module"] = None

    def _enter(self, x: torch.Tensor, keep, images: torch.Tensor) -> CADTensor:
        """Dense map at the finest grid + keep -> step-0 multi-resolution tensor."""
        self.__dict__["_keep_module"] = None
        if callable(keep) and not isinstance(keep, (torch.Tensor, LevelPlan)):
            if isinstance(keep, nn.Module):
                self.__dict__["_keep_module"] = keep
            keep = keep(x)
        grid = x.shape[-2:]
        size = images.shape[-2:]
        if isinstance(keep, torch.Tensor):
            keep = keep_to_grid(keep, grid, size, self.finest_stride)
        elif isinstance(keep, (list, tuple)):
            keep = [keep_to_grid(m, grid, size, self.finest_stride, f"level mask {i}")
                    for i, m in enumerate(keep)]
        plan = make_plan(keep, grid, self.num_levels, batch_size=x.shape[0], device=x.device)
        if isinstance(keep, LevelPlan) and keep.semantics != self.semantics:
            raise ValueError(f"the plan has semantics={keep.semantics!r}, the model "
                             f"{self.semantics!r}; build the plan with "
                             f"plan.with_semantics({self.semantics!r}) or pass masks")
        plan = plan.with_semantics(self.semantics)
        # only the quadtree's merge bits are kept (a third of a byte per cell): the forward's
        # sites, owners and rulebooks are freed with its tensors (before a dense head's peak)
        self.__dict__["_last_levels"] = (plan.merge_maps(), plan.grid, plan.semantics)
        return CADTensor.from_dense(x, plan)

    @property
    def last_plan(self) -> Optional[LevelPlan]:
        """The :class:`~cad_spconv.plan.LevelPlan` of the last forward (``None`` before the
        first): its levels, a fresh plan whose geometry is rebuilt where read."""
        last = self.__dict__.get("_last_levels")
        return None if last is None else LevelPlan.from_merge_maps(*last)

    @staticmethod
    def _check_images(images):
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a [B, C, H, W] tensor, got "
                             + (str(tuple(images.shape)) if isinstance(images, torch.Tensor)
                                else type(images).__name__))

    def _mask_part(self) -> dict[str, nn.Module]:
        module = self.__dict__.get("_keep_module")
        return {"mask": module} if module is not None else {}

    def extra_repr(self) -> str:
        return (f"finest_stride={self.finest_stride}, coarsest_stride={self.coarsest_stride}, "
                + (f"semantics={self.semantics!r}, " if self.semantics != "paper" else "")
                + f"num_levels={self.num_levels}")

