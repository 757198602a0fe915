"""torchvision ResNet / ResNeXt / Wide ResNet in content-adaptive form.

The adaptive downsampling steps are the strided residual stages (``layer2``..``layer4``, at
canonical strides 8, 16, 32). The stem and every stage up to ``finest_stride`` run densely with
the standard strides; each stage whose stride takes the network from ``finest_stride`` to
``coarsest_stride`` becomes an adaptive step (paper Sec. 3: its strided conv and the 1x1
shortcut merge blocks without kept cells); stages past ``coarsest_stride`` replace the stride
by dilation as in the coarsest-stride network (torchvision ``replace_stride_with_dilation``).

Dilation rule (``SEMANTICS.md``): a conv's dilation in the coarsest-stride network is
``max(1, s / coarsest_stride)`` where ``s`` is the canonical stride of its *input*. For a
Bottleneck this is torchvision's rule (the first block of a dilated stage keeps the previous
dilation in its strided 3x3 conv); for a BasicBlock the conv after a replaced stride is dilated
too (torchvision's BasicBlock refuses dilation, so no convention exists there).
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cad_spconv.engines import conv_dtype, workspace_scope
from cad_spconv import functional as CF
from cad_spconv.nn import (CADAdaptiveAvgPool2d, CADBatchNorm2d, CADPointwise, GridBlock,
                            block_on_grid, hooked, on_grid)
from cad_spconv.tensor import CADTensor, features_with_room

from .common import (CADModel, UnsupportedModelError, cad_conv, check_plain_conv, check_strides,
                     dense_conv, expect_type, follow_mode, shell)
from .output_stride import (CANONICAL_STRIDE, STAGES, STEM, block_convs, layout_mismatches,
                            stride_conv)

__all__ = ["CADResNet", "CADResNetFeatures", "CADBottleneck", "CADBasicBlock",
           "CADResNetBackbone", "convert_resnet"]

RESNET_FINEST = (4, 8, 16)
WHERE_STEPS = "the adaptive steps of a ResNet are its strided stages layer2..layer4"


# ---------------------------------------------------------------------- blocks
class CADBottleneck(nn.Module):
    """torchvision ``Bottleneck`` on a multi-resolution tensor (same child names and
    parameters). The stride sits on ``conv2`` (ResNet v1.5) and on the shortcut's 1x1 conv."""

    def __init__(self, block: Bottleneck, stride: int, dilation: int, engine: str, path: str):
        super().__init__()
        self.conv1 = cad_conv(block.conv1, 1, 1, engine, f"{path}.conv1")
        self.bn1 = CADBatchNorm2d.from_module(block.bn1, inplace=True)
        self.conv2 = cad_conv(block.conv2, stride, dilation, engine, f"{path}.conv2")
        self.bn2 = CADBatchNorm2d.from_module(block.bn2, inplace=True)
        self.conv3 = cad_conv(block.conv3, 1, 1, engine, f"{path}.conv3")
        self.bn3 = CADBatchNorm2d.from_module(block.bn3, inplace=True)
        self.relu = CADPointwise(block.relu)
        self.downsample = _cad_shortcut(block, stride, engine, path)

    def forward(self, x: CADTensor) -> CADTensor:
        layers = _block_layers(self)
        grid = block_on_grid(x, self.conv2.stride[0], layers)
        folded = _folded(self, layers)
        if grid is not None:
            return self._forward_on_grid(x, grid, folded)
        if folded:  # ReLUs and the residual add in the convs' epilogues
            if _goes_early(self, x):
                identity, own = _shortcut(self, x)
                out = self.conv1(x, relu=True)
                x.release()
                out = self.conv2(out, relu=True)
            else:
                out = self.conv1(x, relu=True)
                out = self.conv2(out, relu=True)
                identity, own = _shortcut(self, x)
            return self.conv3(out, relu=True, residual=identity, residual_inplace=own)
        # one op per statement, as torchvision: each input is released before the next output
        # is allocated (nested calls kept the conv2 path's features alive through bn3)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place, as torchvision: no extra feature matrix
        return self.relu(out)

    def _forward_on_grid(self, x: CADTensor, grid: GridBlock, folded: bool) -> CADTensor:
        """:meth:`forward` as the dense block on the grid's map (:func:`block_on_grid`)."""
        y, down = grid.map, grid.down
        if folded:
            out = on_grid(self.conv1, y, grid.scale_in, relu=True)
            out = on_grid(self.conv2, out, grid.scale_in, down, relu=True)
            identity, own = _shortcut_map(self, x, grid)
            out = on_grid(self.conv3, out, grid.scale_out, relu=True, residual=identity,
                          residual_inplace=own)
            return CF.from_grid_map(x, out, grid.step_out)
        out = on_grid(self.conv1, y, grid.scale_in)
        out = on_grid(self.bn1, out)
        out = on_grid(self.relu, out)
        out = on_grid(self.conv2, out, grid.scale_in, down)
        out = on_grid(self.bn2, out)
        out = on_grid(self.relu, out)
        out = on_grid(self.conv3, out, grid.scale_out)
        out = on_grid(self.bn3, out)
        out += y if self.downsample is None else _shortcut_on_grid(self.downsample, grid)
        out = on_grid(self.relu, out)
        return CF.from_grid_map(x, out, grid.step_out)


class CADBasicBlock(nn.Module):
    """torchvision ``BasicBlock`` on a multi-resolution tensor. ``dilation_in`` is the dilation
    of the strided ``conv1``; ``dilation_out`` that of ``conv2`` (after the stride)."""

    def __init__(self, block: BasicBlock, stride: int, dilation_in: int, dilation_out: int,
                 engine: str, path: str):
        super().__init__()
        self.conv1 = cad_conv(block.conv1, stride, dilation_in, engine, f"{path}.conv1")
        self.bn1 = CADBatchNorm2d.from_module(block.bn1, inplace=True)
        self.relu = CADPointwise(block.relu)
        self.conv2 = cad_conv(block.conv2, 1, dilation_out, engine, f"{path}.conv2")
        self.bn2 = CADBatchNorm2d.from_module(block.bn2, inplace=True)
        self.downsample = _cad_shortcut(block, stride, engine, path)

    def forward(self, x: CADTensor) -> CADTensor:
        layers = _block_layers(self)
        grid = block_on_grid(x, self.conv1.stride[0], layers)
        folded = _folded(self, layers)
        if grid is not None:
            return self._forward_on_grid(x, grid, folded)
        if folded:  # see CADBottleneck.forward
            if _goes_early(self, x):
                identity, own = _shortcut(self, x)
                out = self.conv1(x, relu=True)
                x.release()
            else:
                out = self.conv1(x, relu=True)
                identity, own = _shortcut(self, x)
            return self.conv2(out, relu=True, residual=identity, residual_inplace=own)
        out = self.conv1(x)  # one op per statement: see CADBottleneck.forward
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        identity = x if self.downsample is None else self.downsample(x)
        out += identity  # in place, as torchvision: no extra feature matrix
        return self.relu(out)

    def _forward_on_grid(self, x: CADTensor, grid: GridBlock, folded: bool) -> CADTensor:
        """:meth:`forward` as the dense block on the grid's map (:func:`block_on_grid`)."""
        y = grid.map
        if folded:
            out = on_grid(self.conv1, y, grid.scale_in, grid.down, relu=True)
            identity, own = _shortcut_map(self, x, grid)
            out = on_grid(self.conv2, out, grid.scale_out, relu=True, residual=identity,
                          residual_inplace=own)
            return CF.from_grid_map(x, out, grid.step_out)
        out = on_grid(self.conv1, y, grid.scale_in, grid.down)
        out = on_grid(self.bn1, out)
        out = on_grid(self.relu, out)
        out = on_grid(self.conv2, out, grid.scale_out)
        out = on_grid(self.bn2, out)
        out += y if self.downsample is None else _shortcut_on_grid(self.downsample, grid)
        out = on_grid(self.relu, out)
        return CF.from_grid_map(x, out, grid.step_out)


def _folded(block, layers: Optional[tuple]) -> bool:
    """Whether ``block`` (its :func:`_block_layers` are ``layers``) has its batch norms
    folded into its convs (``nn.Identity``, :func:`adapters.fold_batchnorm`) and a ReLU as its
    activation: then each ReLU and the residual add go into the epilogue of the conv before
    them (:meth:`~cad_spconv.nn.CADConv2d.forward`'s ``relu`` and ``residual``; fused by
    oneDNN on CPU in float32 / bfloat16 inference). Not where a layer is hooked (a MAC count,
    a debugging hook): each layer's call is seen as usual, op by op (in bfloat16 the epilogue
    is then rounded twice, not once)."""
    relu = block.relu
    if (layers is None or type(relu) is not CADPointwise
            or type(relu._modules["module"]) is not nn.ReLU):
        return False
    norms = [block._modules[n] for n in ("bn1", "bn2", "bn3") if n in block._modules]
    if block.downsample is not None:
        norms.append(block.downsample[1])
    return (all(type(m) is nn.Identity for m in norms)
            and not any(hooked(m) for m in layers + (relu._modules["module"],)))


def _shortcut(block, x: CADTensor) -> tuple[CADTensor, bool]:
    """A folded block's shortcut and whether its last conv may write its result into it:
    the downsample's fresh output (with room for the densified map where the caller asked,
    :func:`_run_blocks`), or the input where the caller handed it over (:func:`_hand_over`)."""
    if block.downsample is None:
        return x, x in _handed_over
    conv = block.downsample[0]
    dtype = conv_dtype(x.features, conv.weight, conv.bias)
    room = None
    if x in _room_asked and dtype is not None:
        room = features_with_room(x.plan, x.step + (conv.stride[0] == 2), conv.out_channels,
                                  dtype, x.features.device)
    return conv(x, out=room), True


def _shortcut_map(block, x: CADTensor, grid: GridBlock) -> tuple[torch.Tensor, bool]:
    """:func:`_shortcut` on the grid's map."""
    if block.downsample is None:
        return grid.map, x in _handed_over
    return on_grid(block.downsample[0], grid.map, grid.scale_in, grid.down), True


# the tensors handed over (by identity: an attribute would pass on to every tensor derived
# from one, replace_feature copies them)
_handed_over: "weakref.WeakSet[CADTensor]" = weakref.WeakSet()


def _goes_early(block, x: CADTensor) -> bool:
    """Whether a folded block's input goes before the block's second conv: handed over to it
    (:func:`_hand_over`) and read only by its downsample and conv1, which then run first, the
    input released right after them, not when the block returns (at layer4's first block of
    a DeepLabV3-ResNet101 in bfloat16 the peak held the 12.5-14 MiB feature matrix of layer3's
    output, conv2's output and the downsample's transients at once)."""
    return block.downsample is not None and x in _handed_over


def _hand_over(x: CADTensor) -> CADTensor:
    """Mark ``x`` as the next block's own: nothing else reads it afterwards, so the block may
    write its result into its features (its last conv's ``residual_inplace``)."""
    _handed_over.add(x)
    return x


# the stage inputs whose first block is asked to put its output's features in a buffer with
# room for their densified map (by identity, as _handed_over)
_room_asked: "weakref.WeakSet[CADTensor]" = weakref.WeakSet()


def _run_blocks(stage: nn.Module, held: list, room: bool = False, owned: bool = False):
    """``stage(x)`` for ``x = held.pop()`` (so that the caller holds no reference to the input
    while the stage runs: a finished stage input is freed as soon as the stage's first block
    lets it go, not after the stage). For an ``nn.Sequential`` without hooks, block by block,
    the output of each converted block handed over to the next one (:func:`_hand_over`): only
    this loop holds it (a converted block's output is never its input; another module's may
    be), unless a hook in the block that made it could have kept it.

    ``room``: the output will be densified (``dense(consume=True)``): a folded first block
    writes its shortcut, whose buffer the later blocks write their results into, into
    features with room for the map (:func:`~cad_spconv.tensor.features_with_room`).
    ``owned``: the caller keeps no other reference to the input (not a returned stage's
    output), so it is handed over to the first block too."""
    x = held.pop()
    if type(stage) is not nn.Sequential or hooked(stage):
        return stage(x)
    previous = None
    for block in stage:
        made_here = (type(previous) in (CADBottleneck, CADBasicBlock)
                     and not any(hooked(m) for m in previous.modules()))
        # (a hook on the block itself would be given the input it may overwrite)
        if (made_here or previous is None and owned and isinstance(x, CADTensor)) \
                and not hooked(block):
            x = _hand_over(x)
        asked = room and previous is None
        if asked:
            _room_asked.add(x)
        y = block(x)
        if asked:
            _room_asked.discard(x)
        x, previous = y, block
    return x


def _block_layers(block) -> Optional[tuple]:
    """The layers of a converted block, the conv that reads its input first (for
    :func:`block_on_grid`); ``None`` where the shortcut is not the converted conv + norm."""
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu")
    layers = tuple(block._modules[n] for n in names if n in block._modules)
    ds = block.downsample
    if ds is None:
        return layers
    if type(ds) is not nn.Sequential or len(ds) != 2:
        return None
    return layers + (ds, ds[0], ds[1])


def _shortcut_on_grid(ds: nn.Sequential, grid: GridBlock):
    return on_grid(ds[1], on_grid(ds[0], grid.map, grid.scale_in, grid.down))


def _cad_shortcut(block, stride: int, engine: str, path: str) -> Optional[nn.Sequential]:
    ds = block.downsample
    if ds is None:
        return None
    return nn.Sequential(cad_conv(ds[0], stride, 1, engine, f"{path}.downsample.0"),
                         CADBatchNorm2d.from_module(ds[1], inplace=True))


def _dense_block(block, stride: int):
    """The block with the standard stride and no dilation (a shell only if that differs)."""
    changes = {}
    names, strided, _ = block_convs(block)
    for name in names:
        conv = getattr(block, name)
        new = dense_conv(conv, stride if name == strided else 1, 1)
        if new is not conv:
            changes[name] = new
    if block.downsample is not None:
        conv = block.downsample[0]
        new = dense_conv(conv, stride, 1)
        if new is not conv:
            changes["downsample"] = shell(block.downsample, {"0": new})
    return shell(block, changes) if changes else block


# ---------------------------------------------------------------------- structure checks
def _check_block(block, path: str, first: bool):
    expect_type(block, path, (BasicBlock, Bottleneck), "a torchvision BasicBlock or Bottleneck")
    names, strided, _ = block_convs(block)
    bns = ("bn1", "bn2", "bn3") if type(block) is Bottleneck else ("bn1", "bn2")
    for name in names:
        expect_type(getattr(block, name), f"{path}.{name}", nn.Conv2d, "an nn.Conv2d")
        # the converted block sets each conv's stride and dilation anew: refuse what it would
        # replace (anisotropic strides or dilations, other padding; the whole layout is
        # checked by _check_layout); a Bottleneck strides in conv2 only (ResNet v1.5)
        check_plain_conv(getattr(block, name), f"{path}.{name}",
                         f"here (torchvision's {type(block).__name__} strides in {strided})",
                         strides=(1, 2) if name == strided else (1,))
    for name in bns:
        expect_type(getattr(block, name), f"{path}.{name}", nn.BatchNorm2d, "an nn.BatchNorm2d "
                    "(other norms, e.g. FrozenBatchNorm2d, are not supported)")
    expect_type(block.relu, f"{path}.relu", nn.ReLU, "an nn.ReLU")
    ds = block.downsample
    if ds is not None:
        expect_type(ds, f"{path}.downsample", nn.Sequential, "nn.Sequential(conv1x1, BatchNorm2d)")
        if len(ds) != 2:
            raise UnsupportedModelError(f"cannot convert {path}.downsample: expected "
                                        f"(conv1x1, BatchNorm2d), got {len(ds)} modules")
        expect_type(ds[0], f"{path}.downsample.0", nn.Conv2d, "a 1x1 nn.Conv2d")
        expect_type(ds[1], f"{path}.downsample.1", nn.BatchNorm2d, "an nn.BatchNorm2d")
        if ds[0].kernel_size != (1, 1):
            raise UnsupportedModelError(f"cannot convert {path}.downsample.0: expected a 1x1 conv, "
                                        f"got {ds[0]}")
        check_plain_conv(ds[0], f"{path}.downsample.0", strides=(1, 2))
    elif first:
        raise UnsupportedModelError(f"cannot convert {path}: the first block of a strided stage "
                                    "needs a downsample shortcut (torchvision always builds one)")


def _check_layout(stages: dict[str, nn.Sequential], prefix: str):
    """The converted network takes each conv's stride and dilation from the strides asked
    for, so a given model must have one of torchvision's layouts (any
    ``replace_stride_with_dilation``): anything else would be replaced without a word."""
    found = layout_mismatches(stages)
    if found:
        raise UnsupportedModelError(
            f"cannot convert {prefix or 'the model'}: its strides and dilations are not a layout "
            f"torchvision builds (the standard strides, or replace_stride_with_dilation), and "
            f"the converted network would not keep them: {prefix}" + f"; {prefix}".join(found))


def _check_stem(children: dict[str, nn.Module], prefix: str):
    c = children["conv1"]
    expect_type(c, prefix + "conv1", nn.Conv2d, "an nn.Conv2d")
    if c.kernel_size != (7, 7) or c.stride != (2, 2) or c.padding != (3, 3):
        raise UnsupportedModelError(f"cannot convert {prefix}conv1 ({c}): expected torchvision's "
                                    "7x7 stride-2 stem conv")
    expect_type(children["bn1"], prefix + "bn1", nn.BatchNorm2d, "an nn.BatchNorm2d")
    expect_type(children["relu"], prefix + "relu", nn.ReLU, "an nn.ReLU")
    p = children["maxpool"]
    expect_type(p, prefix + "maxpool", nn.MaxPool2d, "an nn.MaxPool2d")
    if (p.kernel_size, p.stride, p.padding) not in ((3, 2, 1), ((3, 3), (2, 2), (1, 1))):
        raise UnsupportedModelError(f"cannot convert {prefix}maxpool ({p}): expected torchvision's "
                                    "3x3 stride-2 max pool")


def given_strides(children: dict[str, nn.Module]) -> dict[str, int]:
    """Output stride of every stage in the model as given (with its own stride/dilation)."""
    s = children["conv1"].stride[0] * 2  # stem conv and max pool
    strides = {}
    for name in STAGES:
        if name not in children:
            break
        first = children[name][0]
        s *= stride_conv(first)[0].stride[0]
        strides[name] = s
    return strides


# ---------------------------------------------------------------------- the trunk
class _ResNetTrunk:
    """Mixin: the stem and stages of a ResNet, dense up to the finest stride, CAD after."""

    def _build_trunk(self, children: dict[str, nn.Module], finest: int, coarsest: int,
                     engine: str, prefix: str):
        for name in STEM:
            if name not in children:
                raise UnsupportedModelError(f"cannot convert {prefix or 'the model'}: missing the "
                                            f"ResNet stem child {name!r}")
        _check_stem(children, prefix)
        stages = [n for n in STAGES if n in children]
        if stages != list(STAGES[:len(stages)]):
            raise UnsupportedModelError(f"cannot convert {prefix or 'the model'}: expected the "
                                        f"stages {', '.join(STAGES)} in order, got {stages}")
        for name in stages:
            layer = children[name]
            expect_type(layer, prefix + name, nn.Sequential, "an nn.Sequential of blocks")
            if len(layer) == 0:
                raise UnsupportedModelError(f"cannot convert {prefix}{name}: it has no blocks "
                                            "(torchvision's stages have at least one)")
            for i, block in enumerate(layer):
                _check_block(block, f"{prefix}{name}.{i}", first=(i == 0 and name != "layer1"))
        _check_layout({name: children[name] for name in stages}, prefix)
        self.given_strides = given_strides(children)
        self.dense_names: list[str] = []
        self.sparse_names: list[str] = []
        for name in STEM:  # always dense: finest_stride >= 4
            self.add_module(name, children[name])
            self.dense_names.append(name)
        s_in = 4
        for name in stages:
            unit = name != "layer1"
            s_out = s_in * 2 if unit else s_in
            layer = children[name]
            if s_out <= finest:
                blocks = [_dense_block(b, 2 if unit and i == 0 else 1) for i, b in enumerate(layer)]
                changed = {str(i): b for i, b in enumerate(blocks) if b is not layer[i]}
                self.add_module(name, shell(layer, changed) if changed else layer)
                self.dense_names.append(name)
            else:
                self.add_module(name, self._cad_stage(layer, name, s_in, s_out, unit, coarsest,
                                                      engine, prefix))
                self.sparse_names.append(name)
            s_in = s_out
        if not self.sparse_names or CANONICAL_STRIDE[stages[-1]] < coarsest:
            raise ValueError(f"coarsest_stride {coarsest} is beyond the last stage "
                             f"{prefix}{stages[-1]} (stride {CANONICAL_STRIDE[stages[-1]]})")

    @staticmethod
    def _cad_stage(layer, name, s_in, s_out, unit, coarsest, engine, prefix) -> nn.Sequential:
        d_in, d_out = max(1, s_in // coarsest), max(1, s_out // coarsest)
        stride = 2 if unit and s_out <= coarsest else 1
        blocks = []
        for i, block in enumerate(layer):
            path = f"{prefix}{name}.{i}"
            first = i == 0
            if type(block) is Bottleneck:
                blocks.append(CADBottleneck(block, stride if first else 1, d_in if first else d_out,
                                            engine, path))
            else:
                blocks.append(CADBasicBlock(block, stride if first else 1,
                                            d_in if first else d_out, d_out, engine, path))
        return nn.Sequential(*blocks)

    #: run the dense stages as one compiled graph (``adapters.optimize_for_inference``)
    compile_dense = False

    @workspace_scope()
    def _run_trunk(self, images: torch.Tensor, enter: Callable, capture=(),
                   room_for_dense: bool = False):
        """Run the stem and stages; ``enter(dense, images)`` makes the step-0 tensor. Returns
        the last stage's output and the outputs of the stages named in ``capture``. The
        engines' workspaces are released at the end (a dense head after it runs without).
        ``room_for_dense``: the last stage's output comes in a buffer with room for its
        densified map (:func:`_run_blocks`)."""
        captured = {}
        x = images
        if (self.compile_dense and not any(n in capture for n in self.dense_names)
                and not any(hooked(m) for n in self.dense_names
                            for m in getattr(self, n).modules())):  # hooks: see _run_head
            x = self._compiled_dense_stages()(x)
        else:
            for name in self.dense_names:
                x = getattr(self, name)(x)
                if name in capture:
                    captured[name] = x
        x = enter(x, images)
        previous = self.dense_names[-1]  # a returned dense map would share x's features
        for name in self.sparse_names:
            held = [x]
            del x  # the stage input is freed when its first block lets it go
            # owned: neither returned nor seen by a hook of the stage that made it
            owned = previous not in capture and not any(
                hooked(m) for m in getattr(self, previous).modules())
            x = _run_blocks(getattr(self, name), held,
                            room_for_dense and name == self.sparse_names[-1], owned)
            if name in capture:
                captured[name] = x
            previous = name
        return x, captured

    def _compiled_dense_stages(self):
        """The dense stages as one function under ``compiled_for_inference``, made on first
        use and kept for this module (:func:`~adapters.inference.kept_compiled`)."""
        from .inference import kept_compiled

        return kept_compiled(self, "_compiled_dense", lambda: nn.Sequential(
            OrderedDict((n, getattr(self, n)) for n in self.dense_names)))

    def _trunk_parts(self) -> dict[str, nn.Module]:
        return {"dense": nn.ModuleList(getattr(self, n) for n in self.dense_names),
                "sparse": nn.ModuleList(getattr(self, n) for n in self.sparse_names)}


def _trunk_strides(children, finest, coarsest, family):
    last = [n for n in STAGES if n in children]
    top = CANONICAL_STRIDE[last[-1]] if last else 4
    return check_strides(finest, coarsest, RESNET_FINEST, top, family, WHERE_STEPS)


class CADResNet(_ResNetTrunk, CADModel):
    """A torchvision ResNet classifier with content-adaptive downsampling.

    ``forward(images, keep)`` returns the logits: the global average pool is area-weighted
    over the sites (every site counts with the finest-grid cells it owns), then ``fc``; with
    ``fc = nn.Identity()`` (the usual way to get features) the pooled vector ``[B, C]``.
    ``forward_features(images, keep)`` returns ``layer4``'s output as a CADTensor; feature maps
    of several stages: :class:`CADResNetFeatures` (``convert_resnet(..., return_layers=...)``).
    """

    def __init__(self, model: ResNet, finest_stride: int = 8, coarsest_stride: int = 16,
                 engine: str = "auto"):
        CADModel.__init__(self, finest_stride, coarsest_stride)
        expect_type(model, "", ResNet, "a torchvision ResNet")
        children = dict(model.named_children())
        extra = set(children) - set(STEM) - set(STAGES) - {"avgpool", "fc"}
        if extra:
            name = sorted(extra)[0]
            raise UnsupportedModelError(f"cannot convert {name} ({type(children[name]).__name__}): "
                                        "not a child of torchvision's ResNet")
        _trunk_strides(children, finest_stride, coarsest_stride, "ResNet")
        self._build_trunk({k: v for k, v in children.items() if k not in ("avgpool", "fc")},
                          finest_stride, coarsest_stride, engine, "")
        pool = children["avgpool"]
        if type(pool) is nn.Identity:
            raise UnsupportedModelError(
                "cannot convert avgpool (nn.Identity): torchvision would flatten the whole layer4 "
                "map into fc; for feature maps convert the ResNet with "
                "adapters.convert_resnet(model, finest, coarsest, return_layers={'layer4': "
                "'out'}), for the pooled vector keep avgpool and set fc = nn.Identity()")
        expect_type(pool, "avgpool", nn.AdaptiveAvgPool2d, "nn.AdaptiveAvgPool2d((1, 1))")
        if pool.output_size not in (1, (1, 1)):
            raise UnsupportedModelError(f"cannot convert avgpool ({pool}): only a global pool "
                                        "(output size 1) is supported")
        expect_type(children["fc"], "fc", (nn.Linear, nn.Identity),
                    "an nn.Linear (or nn.Identity: the model returns the pooled features)")
        self.avgpool = CADAdaptiveAvgPool2d(1)
        self.fc = children["fc"]

    def forward_features(self, images: torch.Tensor, keep, *,
                         room_for_dense: bool = False) -> CADTensor:
        """The last stage's output. ``room_for_dense``: its features come in a buffer with
        room for its densified map, so that ``dense(consume=True)`` builds the map in place
        (a folded model, :func:`adapters.fold_batchnorm`: its last stage's blocks write into
        the first block's shortcut; else the map is a fresh one)."""
        self._check_images(images)
        return self._run_trunk(images, lambda x, img: self._enter(x, keep, img),
                               room_for_dense=room_for_dense)[0]

    def forward(self, images: torch.Tensor, keep) -> torch.Tensor:
        x = self.forward_features(images, keep)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def parts(self) -> dict[str, nn.Module]:
        return {**self._trunk_parts(), "head": nn.ModuleList([self.avgpool, self.fc]),
                **self._mask_part()}


class CADResNetFeatures(_ResNetTrunk, CADModel):
    """Feature maps of a torchvision ResNet's stages with content-adaptive downsampling, in
    the style of torchvision's ``IntermediateLayerGetter``.

    ``return_layers`` maps child names of the trunk (``conv1``, ``bn1``, ``relu``,
    ``maxpool``, ``layer1``..``layer4``) to output names; the trunk is converted up to the last
    of them (later children, ``avgpool`` and ``fc`` are dropped, as torchvision does).
    ``forward(images, keep)`` returns an ``OrderedDict`` name -> features in trunk order:
    stages before the first adaptive step as the dense maps they are (their own stride);
    the others densified on the finest grid (owner fill, ``[B, C, H0, W0]``) with
    ``dense=True`` (default), or as :class:`~cad_spconv.tensor.CADTensor` with
    ``dense=False`` (``x.dense(grid="step")`` samples the step's grid). The guarantees hold for
    every returned map: all kept == the network at the finest stride with the later strides
    replaced by dilation; none kept == the strided network's map, nearest-upsampled onto the
    finest grid; Guarantee 2 on the step's grid; for any mask the dense emulation.
    """

    def __init__(self, model: ResNet, finest_stride: int, coarsest_stride: int,
                 return_layers: Mapping[str, str], engine: str = "auto", dense: bool = True):
        CADModel.__init__(self, finest_stride, coarsest_stride)
        expect_type(model, "", ResNet, "a torchvision ResNet")
        if not isinstance(dense, bool):
            raise TypeError(f"dense must be a bool, got {dense!r}")
        trunk_names = STEM + STAGES
        if not isinstance(return_layers, Mapping) or not return_layers:
            raise TypeError("return_layers must be a non-empty dict {child name: output name}, "
                            f"e.g. {{'layer3': 'feat3', 'layer4': 'out'}}, got {return_layers!r}")
        children = dict(model.named_children())
        for name, out in return_layers.items():
            if name not in trunk_names or name not in children:
                raise ValueError(
                    f"return_layers: {name!r} is not a child of the ResNet trunk; choose from "
                    f"{', '.join(n for n in trunk_names if n in children)} (for the pooled "
                    "vector convert the classifier with fc = nn.Identity())")
            if not isinstance(out, str):
                raise TypeError(f"return_layers[{name!r}] must be a str (the output name), "
                                f"got {out!r}")
        if len(set(return_layers.values())) != len(return_layers):
            raise ValueError(f"return_layers has repeated output names: {dict(return_layers)}")
        last = max(trunk_names.index(n) for n in return_layers)
        kept = {n: children[n] for n in trunk_names[:last + 1] if n in children}
        reached = CANONICAL_STRIDE[trunk_names[last]]
        if reached < coarsest_stride:
            raise ValueError(
                f"return_layers ends at {trunk_names[last]} (stride {reached}), before "
                f"coarsest_stride {coarsest_stride} is reached: choose coarsest_stride <= "
                f"{reached} or return a later stage")
        _trunk_strides(kept, finest_stride, coarsest_stride, "ResNet")
        self._build_trunk(kept, finest_stride, coarsest_stride, engine, "")
        self.return_layers = OrderedDict((n, return_layers[n]) for n in trunk_names
                                         if n in return_layers)
        self.dense = dense

    def forward(self, images: torch.Tensor, keep) -> "OrderedDict[str, Features]":
        self._check_images(images)
        # densified: the last stage's map built in its own buffer (dense(consume=True))
        _, captured = self._run_trunk(images, lambda x, img: self._enter(x, keep, img),
                                      capture=tuple(self.return_layers),
                                      room_for_dense=self.dense)
        out = OrderedDict()
        for name, key in self.return_layers.items():
            x = captured.pop(name)
            out[key] = x.dense(consume=True) if self.dense and isinstance(x, CADTensor) else x
        return out

    def parts(self) -> dict[str, nn.Module]:
        return {**self._trunk_parts(), **self._mask_part()}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", return_layers={dict(self.return_layers)}, "
                f"dense={self.dense}")


Features = Union[torch.Tensor, CADTensor]


class CADResNetBackbone(_ResNetTrunk, nn.Module):
    """The ResNet trunk of a segmentation model (torchvision ``IntermediateLayerGetter``
    children ``conv1``..``layer4``), same child names so ``state_dict`` keys match."""

    def __init__(self, children: dict[str, nn.Module], finest_stride: int, coarsest_stride: int,
                 engine: str, prefix: str):
        nn.Module.__init__(self)
        self._build_trunk(children, finest_stride, coarsest_stride, engine, prefix)

    def run(self, images, enter, capture=(), room_for_dense: bool = False):
        return self._run_trunk(images, enter, capture, room_for_dense)

    def forward(self, *args, **kwargs):
        raise RuntimeError("CADResNetBackbone is run by its CADSegmentation model")


def convert_resnet(model: ResNet, finest_stride: int = 8, coarsest_stride: int = 16,
                   engine: str = "auto", return_layers: Optional[Mapping[str, str]] = None,
                   dense: bool = True) -> Union[CADResNet, CADResNetFeatures]:
    """Convert a torchvision ResNet / ResNeXt / Wide ResNet classifier (torchvision-style
    builder; see :func:`adapters.convert`). With ``fc = nn.Identity()`` the converted model
    returns the pooled features. With ``return_layers`` (torchvision's
    ``IntermediateLayerGetter`` style, e.g. ``{"layer3": "feat3", "layer4": "out"}``) it
    returns those stages' feature maps instead: :class:`CADResNetFeatures` (``dense``: densify
    them on the finest grid, or return CADTensors)."""
    if return_layers is not None:
        return follow_mode(CADResNetFeatures(model, finest_stride, coarsest_stride,
                                             return_layers, engine, dense), model)
    if dense is not True:
        raise ValueError("dense= applies with return_layers only (a classifier returns logits)")
    return follow_mode(CADResNet(model, finest_stride, coarsest_stride, engine), model)
