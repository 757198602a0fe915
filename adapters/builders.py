"""The torchvision models the adapters convert, by name, built without downloading anything.

One list of names for every command (eval, train-mask, bench, demo) and one builder per family,
at any ResNet output stride (:mod:`adapters.output_stride`). Segmentation heads follow DeepLab's
convention (and the paper's code): the ASPP atrous rates belong to the output stride
(:data:`ASPP_RATES`), and a model trained at one output stride and run at a finer one dilates
its head's 3x3 conv by the ratio (the paper code's ``classifier_dilation``).
"""
from __future__ import annotations

from torch import nn

from .output_stride import check_output_stride, set_output_stride

__all__ = ["SEGMENTATION_MODELS", "CLASSIFIER_MODELS", "ASPP_RATES", "segmentation_model",
           "classifier_model", "set_head_geometry", "head_convs"]

#: segmentation models with a ResNet backbone: torchvision's builders, plus DeepLabV3 on
#: ResNet-152 and DeepLabV3+ (the paper's code base, DeepLabV3Plus-Pytorch, Tab. 1)
SEGMENTATION_MODELS = ("deeplabv3_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet152",
                       "deeplabv3plus_resnet101", "deeplabv3plus_resnet50", "fcn_resnet101",
                       "fcn_resnet50")
#: torchvision ResNet-family classifiers
CLASSIFIER_MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                     "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
                     "wide_resnet50_2", "wide_resnet101_2")
#: DeepLab's ASPP atrous rates per output stride (the paper's code: 4 -> 24/48/72, ...)
ASPP_RATES = {4: (24, 48, 72), 8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def _check_name(name: str, names: tuple, what: str) -> str:
    if name not in names:
        raise ValueError(f"unknown model {name!r} ({what}); choose one of {', '.join(names)}")
    return name


def segmentation_model(name: str, num_classes: int = 19, aux_loss: bool = False,
                       output_stride: int = 8, trained_output_stride: int | None = None
                       ) -> nn.Module:
    """Segmentation model ``name`` with random weights (no download), its ResNet backbone at
    ``output_stride`` and its head built for it (:func:`set_head_geometry`).
    ``trained_output_stride`` (default: ``output_stride``): the stride the weights were trained
    at, which sets the head's ``classifier_dilation``."""
    from torchvision.models import get_model, resnet152
    from torchvision.models.segmentation.deeplabv3 import _deeplabv3_resnet

    _check_name(name, SEGMENTATION_MODELS, "segmentation model")
    check_output_stride(output_stride)
    if name.startswith("deeplabv3plus_"):
        from .deeplabv3plus import deeplabv3plus_resnet

        if aux_loss:
            raise ValueError(f"{name} has no auxiliary head")
        resnet = get_model(name.split("_", 1)[1], weights=None,
                           replace_stride_with_dilation=[False, True, True])
        model = deeplabv3plus_resnet(resnet, num_classes)
    elif name == "deeplabv3_resnet152":  # torchvision builds DeepLabV3 on ResNet-50 / 101 only
        model = _deeplabv3_resnet(resnet152(weights=None,
                                            replace_stride_with_dilation=[False, True, True]),
                                  num_classes, aux_loss)
    else:
        model = get_model(name, weights=None, weights_backbone=None, num_classes=num_classes,
                          aux_loss=aux_loss)
    if output_stride != 8:
        set_output_stride(model.backbone, output_stride)
    set_head_geometry(model, output_stride, trained_output_stride or output_stride)
    return model


def head_convs(model: nn.Module):
    """(the ASPP convs with an atrous rate, the head's other 3x3 convs) of a DeepLabV3 /
    DeepLabV3+ / FCN model (FCN: no ASPP)."""
    from torchvision.models.segmentation.deeplabv3 import ASPP, ASPPConv

    head = model.classifier
    aspp = [m for m in head.modules() if isinstance(m, ASPP)]
    rated = [m[0] for a in aspp for m in a.convs if isinstance(m, ASPPConv)]
    in_aspp = {id(m) for a in aspp for m in a.modules()}
    others = [m for m in head.modules() if isinstance(m, nn.Conv2d) and id(m) not in in_aspp
              and m.kernel_size == (3, 3)]
    return rated, others


def set_head_geometry(model: nn.Module, output_stride: int, trained_output_stride: int) -> None:
    """Head geometry of the paper's code for a model run at ``output_stride`` with weights
    trained at ``trained_output_stride``: ASPP rates :data:`ASPP_RATES` of the run stride, the
    other 3x3 head convs dilated by ``trained / run`` (``classifier_dilation``; 1 when the
    strides agree, as for every published checkpoint, and when the run stride is coarser, which
    a dilation cannot undo). Attributes only, in place."""
    rated, others = head_convs(model)
    if rated:
        for conv, rate in zip(rated, ASPP_RATES[output_stride]):
            conv.dilation = conv.padding = (rate, rate)
    ratio = max(1, trained_output_stride // output_stride)
    for conv in others:
        conv.dilation = conv.padding = (ratio, ratio)
    # the auxiliary head reads layer3, whose stride is the output stride up to 16 (a stride-32
    # backbone strides layer4 only): its own ratio, as adapters.convert dilates it
    aux = getattr(model, "aux_classifier", None)
    if aux is not None:
        aux_ratio = max(1, min(trained_output_stride, 16) // min(output_stride, 16))
        for conv in aux.modules():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3):
                conv.dilation = conv.padding = (aux_ratio, aux_ratio)


def classifier_model(name: str, output_stride: int = 32, **kwargs) -> nn.Module:
    """torchvision ResNet-family classifier ``name`` with random weights at ``output_stride``."""
    from torchvision.models import get_model

    _check_name(name, CLASSIFIER_MODELS, "classifier")
    check_output_stride(output_stride)
    model = get_model(name, weights=None, **kwargs)
    if output_stride != 32:
        set_output_stride(model, output_stride)
    return model
