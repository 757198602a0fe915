"""Fold eval-mode batch norm into the conv before it, for inference.

A batch norm in eval mode is an affine map per channel, ``y = a * x + b``; after a conv it can
be merged into the conv's weight and bias (``W' = a W``, ``b' = a b_conv + b``), which saves one
pass over every feature map. On a CAD tensor the batch norm acts per site with the same
per-channel map, so the same fold is exact there too (up to rounding).

:func:`fold_batchnorm` works on torchvision ResNets / FCN / DeepLabV3 / VGG-BN and on their
converted forms (``adapters.convert``), dense and CAD layers alike. The folded convs get new
parameters, so by default the model is copied first: a converted model shares its dense
stages (modules, not only parameters) with its source, and folding in place would change the
source as well.
"""
from __future__ import annotations

import copy

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

from .resnet import CADBasicBlock, CADBottleneck

__all__ = ["fold_batchnorm"]

# (conv, batch norm) attribute pairs that run back to back in a module's forward
_PAIRS = {
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    CADBottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    CADBasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
}
# modules whose children named conv1 / bn1 are the stem (conv1 -> bn1 -> relu -> maxpool)
_STEM_OWNERS = ("ResNet", "IntermediateLayerGetter", "CADResNet", "CADResNetBackbone",
                "CADResNetFeatures")
# modules that run their children in registration order, like nn.Sequential
_IN_ORDER = ("CADVGGFeatures",)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """``model`` with every batch norm that directly follows a conv folded into that conv; the
    batch norms become ``nn.Identity``. The model must be in eval mode.

    Folded: the conv/bn pairs of torchvision and CAD ResNet blocks, the ResNet stem (unless a
    feature extractor returns ``conv1``'s own output), and every
    ``nn.Sequential`` entry ``Conv2d, BatchNorm2d`` (downsample shortcuts, ASPP, heads, VGG-BN).
    ``inplace=False`` (default) folds a deep copy; ``inplace=True`` changes ``model`` itself
    and every module it shares with other models. ``result.folded_batchnorms`` counts them.
    """
    if model.training:
        raise ValueError("fold_batchnorm folds the running statistics of eval mode; call "
                         "model.eval() first (a training-mode batch norm normalizes by batch "
                         "statistics and cannot be folded)")
    if not inplace:
        model = copy.deepcopy(model)
    count = 0
    for module in list(model.modules()):
        pairs = list(_PAIRS.get(type(module), ()))
        # the stem, unless its conv's own output is returned (return_layers), which the fold
        # would change
        if (type(module).__name__ in _STEM_OWNERS
                and "conv1" not in getattr(module, "return_layers", {})):
            pairs.append(("conv1", "bn1"))
        for conv_name, bn_name in pairs:
            count += _fold(module, conv_name, bn_name)
        if isinstance(module, nn.Sequential) or type(module).__name__ in _IN_ORDER:
            names = list(module._modules)
            for conv_name, bn_name in zip(names, names[1:]):
                count += _fold(module, conv_name, bn_name)
    model.folded_batchnorms = getattr(model, "folded_batchnorms", 0) + count
    return model


def _fold(owner: nn.Module, conv_name: str, bn_name: str) -> int:
    conv, bn = owner._modules.get(conv_name), owner._modules.get(bn_name)
    if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
        return 0
    if bn.training or conv.training:
        raise ValueError(f"fold_batchnorm: {type(owner).__name__}.{bn_name} is in training mode; "
                         "call model.eval() first")
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"fold_batchnorm: {type(owner).__name__}.{bn_name} keeps no running "
                         "statistics (track_running_stats=False): it normalizes by batch "
                         "statistics even in eval mode and cannot be folded")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"fold_batchnorm: {type(owner).__name__}.{bn_name} has "
                         f"{bn.num_features} features, the conv before it {conv.out_channels} "
                         "outputs")
    setattr(owner, conv_name, fuse_conv_bn_eval(conv, bn))  # a copy of conv, same class
    setattr(owner, bn_name, nn.Identity())
    return 1
