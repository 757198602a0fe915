"""torchvision FCN / DeepLabV3 (ResNet backbones) in content-adaptive form.

Backbone: the converted ResNet trunk (:mod:`adapters.resnet`). Heads, two ways:

- default (the paper's setup, Sec. 4.2): the backbone output is densified at the finest stride
  (owner fill) and the head runs densely there;
- ``sparse_head=True``: the head runs on the multi-resolution tensor as well (its convs by the
  conv rule, the ASPP image-pooling branch area-weighted over the sites) and only its logits are
  densified, right before the final bilinear upsampling. The reference code cannot do this.

ASPP atrous rates are rescaled so that receptive fields in image space are those of the model as
given: a rate ``r`` at the given output stride ``s`` becomes ``r * s / t`` at the stride ``t``
the head runs at (the finest stride for a dense head; the coarsest-stride network for a sparse
one, i.e. ``r * s / t * 2**L`` on the finest grid). The other head convs keep their dilation, as
DeepLab does between output strides 8 and 16, except in a head that runs at a finer stride than
the model's (the dense head of a stride-16 model at stride 8): there they are dilated by the
ratio, as the paper code's ``classifier_dilation`` (see ``_head_dilation``).
"""
from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from typing import Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import (ASPP, ASPPConv, ASPPPooling, DeepLabHead,
                                                       DeepLabV3)
from torchvision.models.segmentation.fcn import FCN, FCNHead

from cad_spconv.engines import workspace_scope
from cad_spconv.nn import CADAdaptiveAvgPool2d, hooked
from cad_spconv.tensor import CADTensor

from .common import (POINTWISE, CADModel, UnsupportedModelError, cad_conv, cad_layer,
                     dense_conv, expect_type, follow_mode, shell)
from .deeplabv3plus import DeepLabHeadV3Plus, DeepLabV3Plus
from .output_stride import CANONICAL_STRIDE, STAGES
from .resnet import CADResNetBackbone, _trunk_strides

__all__ = ["CADSegmentation", "CADASPP", "CADASPPPooling", "convert_segmentation"]

Features = Union[torch.Tensor, CADTensor]


class CADASPPPooling(nn.Sequential):
    """ASPP image-pooling branch on a multi-resolution tensor: area-weighted global mean over
    the sites, the branch's 1x1 conv / batch norm / ReLU on the pooled ``[B, C, 1, 1]`` vector,
    then every site of an image receives its image's vector (the dense branch's upsampling of a
    1x1 map is a constant)."""

    def __init__(self, branch: ASPPPooling):
        super().__init__(CADAdaptiveAvgPool2d(1), *list(branch)[1:])

    def forward(self, x: CADTensor) -> CADTensor:
        pooled = self[0](x)
        for module in list(self)[1:]:
            pooled = module(pooled)
        images = x.plan.geometry(x.step).coords[:, 0]
        return x.replace_feature(pooled.flatten(1)[images])


class CADASPP(nn.Module):
    """torchvision ``ASPP`` on a multi-resolution tensor: the branches run on the same sites and
    are concatenated per site, then projected."""

    def __init__(self, aspp: ASPP, rate_scale: Fraction, engine: str, path: str):
        super().__init__()
        branches = []
        for i, branch in enumerate(aspp.convs):
            p = f"{path}.convs.{i}"
            if type(branch) is ASPPPooling:
                _check_pooling(branch, p)
                branches.append(CADASPPPooling(branch))
            elif type(branch) is ASPPConv:
                conv = branch[0]
                branches.append(nn.Sequential(
                    cad_conv(conv, 1, _scaled_rate(conv, rate_scale, f"{p}.0"), engine, f"{p}.0"),
                    *[cad_layer(m, f"{p}.{j}", engine) for j, m in enumerate(branch) if j > 0]))
            elif type(branch) is nn.Sequential:
                branches.append(_cad_sequential(branch, p, engine, rate_scale))
            else:
                expect_type(branch, p, (ASPPConv, ASPPPooling, nn.Sequential), "an ASPP branch")
        self.convs = nn.ModuleList(branches)
        expect_type(aspp.project, f"{path}.project", nn.Sequential, "an nn.Sequential")
        self.project = _cad_sequential(aspp.project, f"{path}.project", engine, rate_scale)

    def forward(self, x: CADTensor) -> CADTensor:
        outs = [branch(x) for branch in self.convs]
        for o in outs[1:]:
            outs[0].check_same_sites(o, "ASPP branches")
        return self.project(x.replace_feature(torch.cat([o.features for o in outs], dim=1)))


def _check_pooling(branch: ASPPPooling, path: str):
    pool = branch[0]
    expect_type(pool, f"{path}.0", nn.AdaptiveAvgPool2d, "nn.AdaptiveAvgPool2d(1)")
    if pool.output_size not in (1, (1, 1)):
        raise UnsupportedModelError(f"cannot convert {path}.0 ({pool}): only a global pool")
    for j, m in enumerate(list(branch)[1:], 1):
        if type(m) not in (nn.Conv2d, nn.BatchNorm2d) + POINTWISE:
            expect_type(m, f"{path}.{j}", (nn.Conv2d, nn.BatchNorm2d), "a 1x1 conv, batch norm "
                        "or elementwise op")
        if type(m) is nn.Conv2d and m.kernel_size != (1, 1):
            raise UnsupportedModelError(f"cannot convert {path}.{j} ({m}): the pooling branch "
                                        "must use 1x1 convs")


def _scaled_rate(conv: nn.Conv2d, scale: Fraction, path: str) -> int:
    d = conv.dilation[0]
    rate = d * scale
    if conv.dilation[0] != conv.dilation[1] or rate.denominator != 1 or rate < 1:
        raise ValueError(
            f"cannot rescale the atrous rate of {path} ({conv}): rate {d} at the given output "
            f"stride becomes {rate} at the stride the head runs at, which is not a whole "
            "number; choose strides for which it is (e.g. finest_stride equal to the model's "
            "output stride)")
    return int(rate)


def _cad_sequential(seq: nn.Sequential, path: str, engine: str,
                    rate_scale: Fraction) -> nn.Sequential:
    layers = []
    for i, m in enumerate(seq):
        p = f"{path}.{i}"
        if type(m) is ASPP:
            layers.append(CADASPP(m, rate_scale, engine, p))
        elif type(m) is nn.Conv2d and m.kernel_size != (1, 1):
            layers.append(cad_layer(m, p, engine, _head_dilation(m, rate_scale)))
        else:
            layers.append(cad_layer(m, p, engine))
    return nn.Sequential(*layers)


class CADDeepLabHeadV3Plus(nn.Module):
    """The DeepLabV3+ head with its ASPP on the multi-resolution tensor (``sparse_head``): the
    ASPP output is densified at the finest stride, then the decoder runs densely on the
    ``layer1`` grid as in the dense model. Same child names as :class:`DeepLabHeadV3Plus`."""

    def __init__(self, head: DeepLabHeadV3Plus, rate_scale: Fraction, engine: str, path: str):
        super().__init__()
        self.project = head.project
        self.aspp = CADASPP(head.aspp, rate_scale, engine, f"{path}.aspp")
        self.classifier = head.classifier

    def forward(self, low_level: torch.Tensor, out: CADTensor) -> torch.Tensor:
        return DeepLabHeadV3Plus.decode(self, low_level, self.aspp(out).dense())


def _head_dilation(conv: nn.Conv2d, scale: Fraction) -> int:
    """Dilation of a head conv outside the ASPP at another stride: the paper code's
    ``classifier_dilation`` (times ``scale`` when the head runs at a finer stride than the
    weights were trained at), else unchanged (a coarser stride cannot undo a dilation)."""
    d = conv.dilation[0]
    return int(d * scale) if scale > 1 and (d * scale).denominator == 1 else d


def _dense_head(head: nn.Module, rate_scale: Fraction, path: str) -> nn.Module:
    """The head for dense use at another stride: ASPP atrous convs rescaled, the other 3x3
    convs as :func:`_head_dilation` says (shells), all else shared; the head itself when
    nothing changes."""
    if rate_scale == 1:
        return head
    if type(head) is ASPPConv:
        conv = head[0]
        new = dense_conv(conv, 1, _scaled_rate(conv, rate_scale, f"{path}.0"))
        return shell(head, {"0": new}) if new is not conv else head
    if type(head) is nn.Conv2d:
        if head.kernel_size == (1, 1) or head.dilation[0] != head.dilation[1]:
            return head
        return dense_conv(head, head.stride[0], _head_dilation(head, rate_scale))
    changes = {}
    for name, child in head.named_children():
        new = _dense_head(child, rate_scale, f"{path}.{name}")
        if new is not child:
            changes[name] = new
    return shell(head, changes) if changes else head


def _cad_head(head: nn.Module, rate_scale: Fraction, engine: str, path: str) -> nn.Module:
    if type(head) is DeepLabHeadV3Plus:
        return CADDeepLabHeadV3Plus(head, rate_scale, engine, path)
    expect_type(head, path, (DeepLabHead, FCNHead, nn.Sequential),
                "a torchvision DeepLabHead, FCNHead or an nn.Sequential of convertible layers")
    return _cad_sequential(head, path, engine, rate_scale)


class CADSegmentation(CADModel):
    """torchvision FCN / DeepLabV3, or DeepLabV3+ (:mod:`adapters.deeplabv3plus`), with
    content-adaptive downsampling in the backbone. DeepLabV3+'s decoder reads ``layer1`` (dense,
    stride 4) and runs densely there; its ASPP runs densified at the finest stride or, with
    ``sparse_head``, on the multi-resolution tensor.

    ``forward(images, keep)`` returns an ``OrderedDict`` with ``"out"`` (and ``"aux"`` where the
    model has an auxiliary classifier), logits upsampled bilinearly to the image size as in
    torchvision. ``forward_logits`` stops before the upsampling; ``forward_features`` returns the
    backbone output (a CADTensor).
    """

    def __init__(self, model: Union[FCN, DeepLabV3, DeepLabV3Plus], finest_stride: int = 8,
                 coarsest_stride: int = 16, sparse_head: bool = False, engine: str = "auto"):
        super().__init__(finest_stride, coarsest_stride)
        expect_type(model, "", (FCN, DeepLabV3, DeepLabV3Plus),
                    "a torchvision FCN or DeepLabV3, or adapters.deeplabv3plus.DeepLabV3Plus")
        if not isinstance(sparse_head, bool):
            raise TypeError(f"sparse_head must be a bool, got {sparse_head!r}")
        self.sparse_head = sparse_head
        backbone = model.backbone
        expect_type(backbone, "backbone", IntermediateLayerGetter,
                    "torchvision's IntermediateLayerGetter over a ResNet (other backbones, e.g. "
                    "MobileNetV3, are not supported)")
        children = dict(backbone.named_children())
        unknown = [n for n in children if n not in CANONICAL_STRIDE]
        if unknown:
            raise UnsupportedModelError(
                f"cannot convert backbone.{unknown[0]} ({type(children[unknown[0]]).__name__}): "
                "only ResNet backbones (conv1, bn1, relu, maxpool, layer1..layer4) are supported")
        returns = dict(backbone.return_layers)
        self.out_layer = _layer_for(returns, "out")
        self.aux_layer = _layer_for(returns, "aux") if model.aux_classifier is not None else None
        self.low_layer = _layer_for(returns, "low_level") if type(model) is DeepLabV3Plus else None
        _trunk_strides(children, finest_stride, coarsest_stride, "DeepLabV3/FCN")
        self.backbone = CADResNetBackbone(children, finest_stride, coarsest_stride, engine,
                                          "backbone.")
        if self.out_layer not in self.backbone.sparse_names:
            raise ValueError(f"the backbone output ({self.out_layer}) lies before the first "
                             f"adaptive step: lower finest_stride")
        self.classifier = self._convert_head(model.classifier, self.out_layer, "classifier", engine)
        self.aux_classifier = (None if self.aux_layer is None else
                               self._convert_head(model.aux_classifier, self.aux_layer,
                                                  "aux_classifier", engine))

    def _head_is_sparse(self, layer: str) -> bool:
        """Whether the head on ``layer`` runs on the multi-resolution tensor (else densely on
        the densified map, or on a dense stage output before the first adaptive step)."""
        return self.sparse_head and layer in self.backbone.sparse_names

    def _head_stride(self, layer: str, sparse: bool) -> int:
        """Stride of the grid a head reads, in the network it runs in."""
        if sparse:  # the coarsest-stride network
            return min(CANONICAL_STRIDE[layer], self.coarsest_stride)
        return self.finest_stride  # densified at the finest grid

    def _convert_head(self, head: nn.Module, layer: str, path: str, engine: str) -> nn.Module:
        sparse = self._head_is_sparse(layer)
        scale = Fraction(self.backbone.given_strides[layer], self._head_stride(layer, sparse))
        if sparse:
            return _cad_head(head, scale, engine, path)
        return _dense_head(head, scale, path)

    # ------------------------------------------------------------------ forward
    def _backbone(self, images, keep, room_for_dense: bool = False):
        self._check_images(images)
        capture = tuple(n for n in (self.aux_layer, self.low_layer) if n is not None)
        return self.backbone.run(images, lambda x, img: self._enter(x, keep, img), capture,
                                 room_for_dense)

    def forward_features(self, images: torch.Tensor, keep, *,
                         room_for_dense: bool = False) -> CADTensor:
        """The backbone's output (``room_for_dense``: as
        :meth:`adapters.resnet.CADResNet.forward_features`)."""
        return self._backbone(images, keep, room_for_dense)[0]

    def forward_logits(self, images: torch.Tensor, keep) -> "OrderedDict[str, Features]":
        """Head outputs before upsampling: a CADTensor for a sparse head, else a dense map at
        the finest stride (DeepLabV3+: always dense, on the ``layer1`` grid)."""
        # a dense head reads the backbone output's map, built in its own buffer
        dense_head = not self._head_is_sparse(self.out_layer)
        out, captured = self._backbone(images, keep, room_for_dense=dense_head)
        if self.low_layer is not None:
            low = captured[self.low_layer]
            if not dense_head:
                return OrderedDict(out=self._run_head(self.classifier, low, out))
            out = out.dense(consume=True)
            return OrderedDict(out=self._run_head(self.classifier, {"low_level": low,
                                                                    "out": out}))
        # rebinding ``out`` to the densified map frees the sparse features before the head
        # runs: at the head's peak CAD then holds one map of the backbone output, as the dense
        # model does
        out = self._head_input(self.out_layer, out)
        result = OrderedDict(out=self._run_head(self.classifier, out))
        if self.aux_classifier is not None:
            del out
            aux = self._head_input(self.aux_layer, captured.pop(self.aux_layer))
            result["aux"] = self._run_head(self.aux_classifier, aux)
        return result

    def _head_input(self, layer: str, x: Features) -> Features:
        if isinstance(x, CADTensor) and not self._head_is_sparse(layer):
            # the paper's setup: densify at the finest stride (the sparse features are not
            # read again: the map may take their buffer)
            return x.dense(consume=True)
        return x

    #: run the dense heads compiled (``adapters.optimize_for_inference``)
    compile_dense = False

    def _run_head(self, head: nn.Module, *inputs) -> Features:
        if any(isinstance(x, CADTensor) for x in inputs):  # sparse: release its workspaces
            with workspace_scope():
                return head(*inputs)
        # a dense head on a dense map: one graph, as the dense model's (eager where a layer is
        # hooked, a MAC count: a compiled graph calls no hooks)
        if self.compile_dense and not any(hooked(m) for m in head.modules()):
            from .inference import kept_compiled

            name = next(n for n, m in self.named_children() if m is head)
            return kept_compiled(self, f"_compiled_{name}", lambda: head, head)(*inputs)
        return head(*inputs)

    def forward(self, images: torch.Tensor, keep) -> "OrderedDict[str, torch.Tensor]":
        size = images.shape[-2:]
        result = OrderedDict()
        for key, logits in self.forward_logits(images, keep).items():
            dense = logits.dense() if isinstance(logits, CADTensor) else logits
            result[key] = F.interpolate(dense, size=size, mode="bilinear", align_corners=False)
        return result

    def parts(self) -> dict[str, nn.Module]:
        parts = {**self.backbone._trunk_parts(), "head": self.classifier}
        if self.aux_classifier is not None:
            parts["aux"] = self.aux_classifier
        return {**parts, **self._mask_part()}


def _layer_for(returns: dict[str, str], key: str) -> str:
    names = [k for k, v in returns.items() if v == key]
    if len(names) != 1 or names[0] not in STAGES:
        raise UnsupportedModelError(f"cannot convert backbone: its return_layers must map one "
                                    f"ResNet stage (layer1..layer4) to {key!r}, got {returns}")
    return names[0]


def convert_segmentation(model, finest_stride: int = 8, coarsest_stride: int = 16,
                         sparse_head: bool = False, engine: str = "auto") -> CADSegmentation:
    """Convert a torchvision FCN / DeepLabV3 or a DeepLabV3+ with a ResNet backbone (see
    :func:`adapters.convert`)."""
    return follow_mode(CADSegmentation(model, finest_stride, coarsest_stride, sparse_head,
                                       engine), model)
