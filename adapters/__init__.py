"""Convert torchvision models to content-adaptive (CAD) form (Hesse et al., CVPRW 2023).

    from adapters import convert
    cad = convert(model, finest_stride=8, coarsest_stride=16)
    out = cad(images, keep)

The converted model runs densely up to ``finest_stride``; every downsampling from there to
``coarsest_stride`` becomes an adaptive step (``L = log2(coarsest / finest)``), and layers past
the coarsest stride keep their dilation of the coarsest-stride network. It holds the original
parameters (nothing is copied), so ``cad.load_state_dict(model.state_dict())`` works. See
``docs/adapters.md`` for the rules.
"""
from __future__ import annotations

from typing import Mapping, Optional

from torch import nn
from torchvision.models.resnet import ResNet
from torchvision.models.segmentation.deeplabv3 import DeepLabV3
from torchvision.models.segmentation.fcn import FCN
from torchvision.models.vgg import VGG

from .deeplabv3plus import DeepLabV3Plus
from .dilated import Im2colConv2d, im2col_dilated_convs
from .fold import fold_batchnorm
from .inference import compiled_for_inference, optimize_for_inference
from cad_spconv.engines import check_engine
from cad_spconv.plan import SEMANTICS

from .common import SUPPORTED, CADModel, UnsupportedModelError, follow_mode
from .resnet import CADBasicBlock, CADBottleneck, CADResNet, CADResNetFeatures, convert_resnet
from .segmentation import CADASPP, CADASPPPooling, CADSegmentation, convert_segmentation
from .vgg import CADVGGFeatures, convert_vgg_features

__all__ = ["convert", "CADModel", "CADResNet", "CADResNetFeatures", "CADSegmentation",
           "CADVGGFeatures",
           "CADBottleneck", "CADBasicBlock", "CADASPP", "CADASPPPooling", "convert_resnet",
           "convert_segmentation", "convert_vgg_features", "UnsupportedModelError", "SUPPORTED",
           "fold_batchnorm", "im2col_dilated_convs", "Im2colConv2d", "DeepLabV3Plus",
           "optimize_for_inference", "compiled_for_inference"]


def convert(model: nn.Module, finest_stride: int = 8, coarsest_stride: int = 16,
            sparse_head: bool = False, engine: str = "auto", semantics: str = "paper",
            return_layers: Optional[Mapping[str, str]] = None, dense: bool = True) -> CADModel:
    """Content-adaptive version of a torchvision model, sharing its parameters.

    - ``model``: a torchvision ResNet / ResNeXt / Wide ResNet classifier, an FCN or DeepLabV3
      with a ResNet backbone (any ``replace_stride_with_dilation``), a DeepLabV3+
      (:class:`adapters.DeepLabV3Plus`), or a VGG feature stack
      (``vgg16(...).features``, ``vgg16_bn(...).features`` or a prefix of one).
    - ``finest_stride`` / ``coarsest_stride``: powers of two; ResNets adapt at their strided
      stages (finest 4, 8 or 16; coarsest up to 32), VGG stacks at their 2x2 max pools (coarsest
      = the stride the stack ends at).
    - ``sparse_head`` (segmentation only): run the head on the multi-resolution tensor and
      densify only before the final upsampling; by default the backbone output is densified at
      the finest stride and the head runs densely there (the paper's setup).
    - ``engine``: conv engine of the converted layers, one of
      :data:`cad_spconv.engines.ENGINES` (``cad_spconv.engines.describe()`` lists them).
    - ``semantics``: ``"paper"`` (default; coarse sites measure their taps from their top-left
      cell, which keeps Guarantee 2) or ``"reference"`` (the paper's public code: from the
      centre cell of their block, to reproduce its published models; ``docs/SEMANTICS.md``).
      The lattice engine needs ``"paper"``; under ``"reference"`` ``engine="auto"`` runs the
      ``"torch"`` engine.

    Returns a :class:`CADResNet`, :class:`CADSegmentation` or :class:`CADVGGFeatures`, called
    as ``cad(images, keep)``; ``keep`` is a bool keep mask (True = keep at the finest
    resolution) ``[B, 1, h, w]`` / ``[B, h, w]`` at image resolution or at the finest grid, a
    list of ``L`` per-level bool masks (finest first), a ``LevelPlan`` (explicit level maps:
    ``LevelPlan.from_level_map``), or a callable (e.g. a mask estimator module) taking the dense
    feature map entering the first adaptive step and returning one of these.

    ResNet classifiers only: ``return_layers`` (torchvision's ``IntermediateLayerGetter`` style,
    e.g. ``{"layer3": "feat3", "layer4": "out"}``) returns those stages' feature maps
    (:class:`CADResNetFeatures`; ``dense=False`` keeps them as CADTensors); a ResNet with
    ``fc = nn.Identity()`` returns its pooled features.
    """
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {', '.join(map(repr, SEMANTICS))}, got "
                         f"{semantics!r}")
    if semantics == "reference" and engine == "lattice":  # else refused at the first forward
        from cad_spconv.engines import EngineUnsupported
        from cad_spconv.engines.lattice import NEEDS_PAPER_SEMANTICS
        raise EngineUnsupported(NEEDS_PAPER_SEMANTICS)
    if (return_layers is not None or dense is not True) and type(model) is not ResNet:
        raise ValueError(f"return_layers / dense apply to ResNet classifiers only, not to "
                         f"{type(model).__name__}")
    cad = _convert(model, finest_stride, coarsest_stride, sparse_head, engine, return_layers,
                   dense)
    cad.semantics = semantics
    return follow_mode(cad, model)


def _convert(model, finest_stride, coarsest_stride, sparse_head, engine, return_layers,
             dense) -> CADModel:
    check_engine(engine)
    if not isinstance(sparse_head, bool):
        raise TypeError(f"sparse_head must be a bool, got {sparse_head!r}")
    if type(model) in (FCN, DeepLabV3, DeepLabV3Plus):
        return convert_segmentation(model, finest_stride, coarsest_stride, sparse_head, engine)
    if sparse_head:
        raise ValueError(f"sparse_head=True applies to segmentation models (FCN, DeepLabV3) only, "
                         f"not to {type(model).__name__}: classifiers always pool area-weighted "
                         "over the multi-resolution tensor, VGG stacks have no head")
    if type(model) is ResNet:
        return convert_resnet(model, finest_stride, coarsest_stride, engine, return_layers, dense)
    if type(model) is nn.Sequential:
        return convert_vgg_features(model, finest_stride, coarsest_stride, engine)
    if type(model) is VGG:
        raise UnsupportedModelError(
            "cannot convert the VGG classifier (avgpool: AdaptiveAvgPool2d((7, 7)), classifier: "
            "fully connected layers need a fixed 7x7 grid): convert its feature stack instead, "
            "e.g. convert(model.features[:23], finest_stride=1, coarsest_stride=8) for D2-Net")
    raise UnsupportedModelError(
        f"cannot convert the model ({type(model).__module__}.{type(model).__name__}): it has no "
        f"content-adaptive adapter. Supported: {SUPPORTED}")
