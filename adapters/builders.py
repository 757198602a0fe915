"""The torchvision models the adapters convert, by name, built without downloading anything.

One list of names for every command (eval, train-mask, bench, demo) and one builder per family,
at any ResNet output stride (:mod:`adapters.output_stride`).
"""
from __future__ import annotations

from torch import nn

from .output_stride import check_output_stride, set_output_stride

__all__ = ["SEGMENTATION_MODELS", "CLASSIFIER_MODELS", "segmentation_model", "classifier_model"]

#: torchvision segmentation builders with a ResNet backbone
SEGMENTATION_MODELS = ("deeplabv3_resnet101", "deeplabv3_resnet50", "fcn_resnet101",
                       "fcn_resnet50")
#: torchvision ResNet-family classifiers
CLASSIFIER_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                     "wide_resnet50_2", "wide_resnet101_2")


def _check_name(name: str, names: tuple, what: str) -> str:
    if name not in names:
        raise ValueError(f"unknown model {name!r} ({what}); choose one of {', '.join(names)}")
    return name


def segmentation_model(name: str, num_classes: int = 19, aux_loss: bool = False,
                       output_stride: int = 8) -> nn.Module:
    """torchvision segmentation model ``name`` with random weights (no download), its ResNet
    backbone at ``output_stride`` (torchvision builds 8; 16 / 32 un-dilate ``layer3`` /
    ``layer4``). The head is torchvision's (ASPP rates 12 / 24 / 36)."""
    from torchvision.models import get_model

    _check_name(name, SEGMENTATION_MODELS, "segmentation model")
    check_output_stride(output_stride)
    model = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                      aux_loss=aux_loss)
    if output_stride != 8:
        set_output_stride(model.backbone, output_stride)
    return model


def classifier_model(name: str, output_stride: int = 32, **kwargs) -> nn.Module:
    """torchvision ResNet-family classifier ``name`` with random weights at ``output_stride``."""
    from torchvision.models import get_model

    _check_name(name, CLASSIFIER_MODELS, "classifier")
    check_output_stride(output_stride)
    model = get_model(name, weights=None, **kwargs)
    if output_stride != 32:
        set_output_stride(model, output_stride)
    return model
