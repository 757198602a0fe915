"""Output strides of torchvision ResNets: the one home of the stride / dilation rules.

A torchvision ResNet reaches output stride 4 after its stem and doubles it at ``layer2``,
``layer3`` and ``layer4``. "Output stride s" replaces every downsampling past ``s`` by
dilation (DeepLab; torchvision's ``replace_stride_with_dilation``): the first block of such a
stage keeps the previous dilation on its (now stride-1) conv, later 3x3 convs take the doubled
one. Used by the adapters (which parts run dense), by the dense baselines (MAC counts, the
benchmark, ``--dense S``) and by the learned-mask training (one set of weights run at two
strides).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

__all__ = ["STEM", "STAGES", "CANONICAL_STRIDE", "OUTPUT_STRIDES", "dilation_flags",
           "check_output_stride", "set_output_stride", "output_stride", "stride_conv",
           "block_convs", "stage_layout", "layout_mismatches"]

STEM = ("conv1", "bn1", "relu", "maxpool")
STAGES = ("layer1", "layer2", "layer3", "layer4")
#: output stride after each top-level child of a torchvision ResNet with no dilation
CANONICAL_STRIDE = {"conv1": 2, "bn1": 2, "relu": 2, "maxpool": 4, "layer1": 4, "layer2": 8,
                    "layer3": 16, "layer4": 32}
OUTPUT_STRIDES = (4, 8, 16, 32)


def check_output_stride(stride: int) -> int:
    if isinstance(stride, bool) or stride not in OUTPUT_STRIDES:
        raise ValueError(f"a ResNet's output stride must be one of "
                         f"{', '.join(map(str, OUTPUT_STRIDES))}, got {stride!r}")
    return stride


def dilation_flags(stride: int) -> list[bool]:
    """torchvision's ``replace_stride_with_dilation`` for a ResNet ending at ``stride``
    (8, 16 or 32; torchvision cannot dilate ``layer2``)."""
    if isinstance(stride, bool) or stride not in (8, 16, 32):
        raise ValueError(f"torchvision builds ResNets at output stride 8, 16 or 32, got {stride!r}")
    return [8 > stride, 16 > stride, 32 > stride]


def block_convs(block: nn.Module) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """Names of a torchvision ResNet block's convs: (all of them, the one that carries the
    block's stride, its other 3x3 convs). A Bottleneck strides in ``conv2`` (ResNet v1.5), a
    BasicBlock in ``conv1``."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if type(block) is Bottleneck:
        return ("conv1", "conv2", "conv3"), "conv2", ()
    if type(block) is BasicBlock:
        return ("conv1", "conv2"), "conv1", ("conv2",)
    raise TypeError(f"expected torchvision ResNet blocks (BasicBlock / Bottleneck), got "
                    f"{type(block).__name__}")


def stride_conv(block: nn.Module) -> tuple[nn.Conv2d, list[nn.Conv2d]]:
    """(the conv that carries a block's stride, its other 3x3 convs): see :func:`block_convs`."""
    _, strided, others = block_convs(block)
    return getattr(block, strided), [getattr(block, name) for name in others]


def set_output_stride(backbone: nn.Module, stride: int) -> list:
    """Give a torchvision ResNet (or its ``IntermediateLayerGetter``) the strides and dilations
    of output stride ``stride`` (4 also dilates ``layer2``), in place.

    Bottleneck networks follow torchvision's ``replace_stride_with_dilation`` exactly; in
    BasicBlock networks the 3x3 conv after the removed stride takes the new dilation too (the
    rule of ``SEMANTICS.md``). Only conv attributes change, so parameters, buffers and
    ``state_dict`` stay. Returns what is needed to restore the previous settings
    (:func:`output_stride` does it for a ``with`` block)."""
    check_output_stride(stride)
    saved = []

    def setconv(conv: nn.Conv2d, new_stride=None, dilation=None):
        saved.append((conv, conv.stride, conv.dilation, conv.padding))
        if new_stride is not None:
            conv.stride = (new_stride, new_stride)
        if dilation is not None:
            k = conv.kernel_size[0]
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation * (k - 1) // 2, dilation * (k - 1) // 2)

    try:
        stages = {}
        for name in STAGES[1:]:
            stages[name] = getattr(backbone, name, None)
            if stages[name] is None:
                raise TypeError(f"expected a torchvision ResNet backbone with {name}; got "
                                f"{type(backbone).__name__}")
        dilated = {name: CANONICAL_STRIDE[name] > stride for name in stages}
        for _, conv, new_stride, dilation in stage_layout(stages, dilated):
            setconv(conv, new_stride, dilation)
    except BaseException:
        _restore(saved)
        raise
    return saved


def stage_layout(stages: dict, dilated: dict):
    """The rule, one conv at a time: ``(path, conv, stride, dilation)`` for every conv of
    ``layer2``-``layer4`` (``stages``: name -> the stage's blocks) that carries a stride or a
    dilation, with the stages ``dilated[name]`` dilated instead of strided (dilation ``None``:
    a 1x1 shortcut, where it means nothing)."""
    dilation = 1
    for name in STAGES[1:]:
        if name not in stages:
            break
        previous = dilation
        if dilated[name]:
            dilation *= 2
        step = 1 if dilated[name] else 2
        for i, block in enumerate(stages[name]):
            _, strided, others = block_convs(block)
            yield (f"{name}.{i}.{strided}", getattr(block, strided), step if i == 0 else 1,
                   previous if i == 0 else dilation)
            for other in others:
                yield f"{name}.{i}.{other}", getattr(block, other), 1, dilation
            if i == 0 and block.downsample is not None:
                yield f"{name}.{i}.downsample.0", block.downsample[0], step, None


def layout_mismatches(stages: dict) -> list[str]:
    """Where a given ResNet's convs differ from every layout torchvision builds (the standard
    strides, or any ``replace_stride_with_dilation``): one line per conv, empty if none. Each
    stage counts as dilated where its first block's strided conv has stride 1; ``layer1``
    never strides or dilates."""
    found = []

    def compare(path, conv, stride, dilation):
        if conv.stride != (stride, stride) or (dilation is not None
                                               and conv.dilation != (dilation, dilation)):
            want = f"stride {stride}" + ("" if dilation is None else f", dilation {dilation}")
            found.append(f"{path} has stride {conv.stride[0]}, dilation {conv.dilation[0]} "
                         f"where torchvision's layout has {want}")

    for i, block in enumerate(stages.get("layer1", ())):
        _, strided, others = block_convs(block)
        for conv in (strided, *others):
            compare(f"layer1.{i}.{conv}", getattr(block, conv), 1, 1)
        if block.downsample is not None:
            compare(f"layer1.{i}.downsample.0", block.downsample[0], 1, None)
    dilated = {name: stride_conv(stages[name][0])[0].stride == (1, 1)
               for name in STAGES[1:] if name in stages and len(stages[name])}
    for args in stage_layout(stages, dilated):
        compare(*args)
    return found


def _restore(saved: list):
    for conv, stride, dil, pad in reversed(saved):
        conv.stride, conv.dilation, conv.padding = stride, dil, pad


@contextlib.contextmanager
def output_stride(backbone: nn.Module, stride: int) -> Iterator[None]:
    """:func:`set_output_stride` for the duration of a ``with`` block (restored on exit): one
    set of weights runs as the dense finest- and coarsest-stride networks."""
    saved = set_output_stride(backbone, stride)
    try:
        yield
    finally:
        _restore(saved)
