"""DeepLabV3+ (Chen et al., ECCV 2018) with a torchvision ResNet backbone, in the state-dict
layout of DeepLabV3Plus-Pytorch, the code base of the paper's segmentation experiments (Hesse
et al., CVPRW 2023, Tab. 1), so its checkpoints load unchanged.

The encoder is torchvision's ResNet (``backbone.*``: ``IntermediateLayerGetter`` returning
``layer1`` as ``low_level`` and ``layer4`` as ``out``); the head (``classifier.*``) is

- ``project``: 1x1 conv ``C_low -> 48``, batch norm, ReLU on the stride-4 ``layer1`` features;
- ``aspp``: torchvision's ASPP on the ``layer4`` features (atrous rates of the output stride:
  12 / 24 / 36 at 8, 6 / 12 / 18 at 16), upsampled bilinearly (``align_corners=False``) to the
  ``layer1`` grid;
- ``classifier``: 3x3 conv ``48 + 256 -> 256`` on the concatenation ``[low, aspp]``, batch norm,
  ReLU, 1x1 conv to the classes;

then one bilinear upsampling to the image size, as DeepLabV3.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP

__all__ = ["DeepLabV3Plus", "DeepLabHeadV3Plus", "deeplabv3plus_resnet"]


class DeepLabHeadV3Plus(nn.Module):
    """The decoder head: ``forward({"low_level": [B, C_low, H/4, W/4], "out": [B, C, h, w]})``
    -> logits on the ``low_level`` grid."""

    def __init__(self, in_channels: int, low_level_channels: int, num_classes: int,
                 atrous_rates=(12, 24, 36)):
        super().__init__()
        self.project = nn.Sequential(nn.Conv2d(low_level_channels, 48, 1, bias=False),
                                     nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp = ASPP(in_channels, list(atrous_rates))
        self.classifier = nn.Sequential(
            nn.Conv2d(48 + 256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256),
            nn.ReLU(inplace=True), nn.Conv2d(256, num_classes, 1))

    def decode(self, low_level: torch.Tensor, aspp_out: torch.Tensor) -> torch.Tensor:
        """The part after the ASPP (dense, on the ``low_level`` grid)."""
        low = self.project(low_level)
        up = F.interpolate(aspp_out, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(torch.cat([low, up], dim=1))

    def forward(self, features: dict) -> torch.Tensor:
        return self.decode(features["low_level"], self.aspp(features["out"]))


class DeepLabV3Plus(nn.Module):
    """``forward(images)`` -> ``{"out": logits [B, K, H, W]}`` (torchvision's convention)."""

    def __init__(self, backbone: IntermediateLayerGetter, classifier: DeepLabHeadV3Plus):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = None

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        logits = self.classifier(self.backbone(images))
        return OrderedDict(out=F.interpolate(logits, size=images.shape[-2:], mode="bilinear",
                                             align_corners=False))


def deeplabv3plus_resnet(resnet: nn.Module, num_classes: int, atrous_rates=(12, 24, 36)
                         ) -> DeepLabV3Plus:
    """DeepLabV3+ on a torchvision ResNet (its strides / dilations as given)."""
    low = resnet.layer1[-1]
    low_channels = (low.conv3 if hasattr(low, "conv3") else low.conv2).out_channels
    high = resnet.layer4[-1]
    high_channels = (high.conv3 if hasattr(high, "conv3") else high.conv2).out_channels
    backbone = IntermediateLayerGetter(resnet, {"layer1": "low_level", "layer4": "out"})
    return DeepLabV3Plus(backbone, DeepLabHeadV3Plus(high_channels, low_channels, num_classes,
                                                     atrous_rates))
