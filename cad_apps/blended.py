"""The reference code's training model for the learned mask (Hesse et al., CVPRW 2023, Sec. 3).

The backbone after the adaptive step runs twice with shared weights, once dense at the finest
stride and once dense at the coarsest stride (nearest upsampled), and the two feature maps are
blended with the hard Gumbel mask before the head. Evaluation then uses the sparse (converted)
network with the estimator as its ``keep`` callable, which is exact where the blend is an
approximation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.output_stride import CANONICAL_STRIDE, output_stride
from cad_spconv.learned_mask import MaskEstimator, upsample_cells
from cad_spconv.plan import num_adaptive_steps

__all__ = ["BlendedSegmenter", "features_before_adaptive"]


def features_before_adaptive(model: nn.Module, images: torch.Tensor,
                             finest_stride: int) -> torch.Tensor:
    """The dense feature map entering the first adaptive step of a torchvision segmentation
    model with a ResNet backbone (``layer2`` output for ``finest_stride`` 8)."""
    backbone = model.backbone
    x = images
    with output_stride(backbone, finest_stride):
        for name, module in backbone.named_children():
            if CANONICAL_STRIDE.get(name, finest_stride + 1) > finest_stride:
                break
            x = module(x)
    return x


class BlendedSegmenter(nn.Module):
    """The reference code's training model for the learned mask.

    ``model``: a torchvision segmentation model with a ResNet backbone (``DeepLabV3`` / ``FCN``:
    ``model.backbone`` is an ``IntermediateLayerGetter``, ``model.classifier`` the head, built
    for features at ``finest_stride``, e.g. ASPP rates 12/24/36 at stride 8). The layers before
    the first adaptive step run once; the rest runs dense at ``finest_stride`` and, with the same
    weights (batch norm included), at ``coarsest_stride``; the coarse features are upsampled
    (nearest) and the two are blended with the hard Gumbel mask, then the head runs at the
    finest stride. The auxiliary classifier, if any, is not used.

    ``forward(images)`` returns ``{"out": logits [B, K, H, W], "low_res": [B, 1, h, w] hard
    mask, "rho_hat": fraction of low-resolution cells}``.
    """

    def __init__(self, model: nn.Module, estimator: MaskEstimator, finest_stride: int = 8,
                 coarsest_stride: int = 16):
        super().__init__()
        factor = 2 ** num_adaptive_steps(finest_stride, coarsest_stride)
        if estimator.downsample != factor:
            raise ValueError(f"the estimator downsamples by {estimator.downsample}, the model by "
                             f"{factor} ({finest_stride} -> {coarsest_stride}); build it with "
                             f"MaskEstimator(downsample={factor})")
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(model, "classifier"):
            raise TypeError("expected a torchvision segmentation model (DeepLabV3 / FCN) with "
                            "`backbone` (ResNet IntermediateLayerGetter) and `classifier`")
        names = [n for n, _ in backbone.named_children()]
        unknown = [n for n in names if n not in CANONICAL_STRIDE]
        if unknown:
            raise TypeError(f"unexpected backbone children {unknown}: a torchvision ResNet is needed")
        self.model = model
        self.estimator = estimator
        self.finest_stride = finest_stride
        self.coarsest_stride = coarsest_stride
        self.factor = factor
        self.pre = [n for n in names if CANONICAL_STRIDE[n] <= finest_stride]
        self.post = [n for n in names if CANONICAL_STRIDE[n] > finest_stride]
        if not self.post:
            raise ValueError(f"no backbone layer downsamples beyond stride {finest_stride}")

    def _post(self, x: torch.Tensor, stride: int) -> torch.Tensor:
        backbone = self.model.backbone
        with output_stride(backbone, stride):
            for name in self.post:
                x = getattr(backbone, name)(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The dense feature map entering the first adaptive step."""
        return features_before_adaptive(self.model, images, self.finest_stride)

    def forward(self, images: torch.Tensor, tau: float | None = None) -> dict:
        x = self.features(images)
        grid = x.shape[-2:]
        low = self.estimator.sample(x, tau)
        fine = self._post(x, self.finest_stride)
        coarse = upsample_cells(self._post(x, self.coarsest_stride), self.factor, grid)
        m = upsample_cells(low, self.factor, grid)
        blended = m * coarse + (1 - m) * fine
        logits = self.model.classifier(blended)
        logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return {"out": logits, "low_res": low, "rho_hat": low.mean()}
