"""The learned downsampling mask (Hesse et al., CVPRW 2023, Sec. 3 and supplement C.2).

A shallow CNN reads the dense feature map entering the first adaptive downsampling (ResNet
``layer2`` output, 512 channels, stride 8) and predicts, per cell of the coarse grid, whether
to downsample. Training samples the decision with hard Gumbel-Softmax (straight-through,
``tau = 1``) and adds the budget term ``(rho - rho_hat)^2``, ``rho`` = target fraction of
low-resolution cells (paper: 0.5); inference takes the argmax.

Training follows the reference code: the backbone after the adaptive step runs twice with shared
weights, once dense at the finest stride and once dense at the coarsest stride (nearest
upsampled), and the two feature maps are blended with the hard mask before the head
(:class:`BlendedSegmenter`). Evaluation then uses the sparse (converted) network with the
estimator as its ``keep`` callable, which is exact where the blend is an approximation.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskEstimator", "budget_loss", "BlendedSegmenter", "resnet_output_stride",
           "set_resnet_output_stride", "resnet_stage_strides", "upsample_cells",
           "features_before_adaptive", "KEEP",
           "DOWNSAMPLE"]

#: Channel of the estimator's logits that means "keep the finest resolution" / "downsample"
#: (the reference code's order, so its checkpoints load unchanged).
KEEP, DOWNSAMPLE = 0, 1


class MaskEstimator(nn.Sequential):
    """The paper's shallow mask estimator (supplement C.2, reference code layout).

    ``conv3x3 C->128, ReLU, conv3x3 128->64, ReLU, maxpool, conv3x3 64->64, ReLU,
    conv3x3 64->2`` (convs with bias, padding 1). The max pool (window = stride =
    ``downsample``, default 2 = one adaptive step) brings the decision onto the coarse grid;
    ``ceil_mode`` makes that grid ``ceil(H0 / downsample)`` for odd sizes, like a strided conv.
    State-dict keys (``0.weight`` ... ``7.bias``) are those of the reference code's
    ``backbone.mask_estimator``: see :meth:`load_reference`.

    ``forward(features)`` returns the inference keep mask (bool ``[B, 1, H0, W0]`` on the
    finest grid, argmax), so the module itself is a ``keep`` callable for converted models;
    training uses :meth:`sample`.
    """

    def __init__(self, in_channels: int = 512, downsample: int = 2, tau: float = 1.0):
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of two >= 2 (2**L for L adaptive "
                             f"steps), got {downsample}")
        super().__init__(
            nn.Conv2d(in_channels, 128, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(downsample, downsample, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(64, 2, 3, padding=1))
        self.in_channels = in_channels
        self.downsample = downsample
        self.tau = tau

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, 2, ceil(H0/s), ceil(W0/s)]``; channel :data:`KEEP` / :data:`DOWNSAMPLE`."""
        if not isinstance(features, torch.Tensor) or features.dim() != 4 \
                or features.shape[1] != self.in_channels:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"MaskEstimator expects the dense features entering the adaptive "
                             f"step, [B, {self.in_channels}, H0, W0]; got {shape}")
        return super().forward(features)

    def sample(self, features: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """Training: hard Gumbel-Softmax sample of the downsample indicator, float
        ``[B, 1, h, w]`` with values 0/1 and straight-through gradients."""
        one_hot = F.gumbel_softmax(self.logits(features), tau=self.tau if tau is None else tau,
                                   hard=True, dim=1)
        return one_hot[:, DOWNSAMPLE:DOWNSAMPLE + 1]

    def low_res(self, features: torch.Tensor) -> torch.Tensor:
        """Inference: bool ``[B, 1, h, w]``, True where the coarse cell is downsampled."""
        return self.logits(features).argmax(1, keepdim=True) == DOWNSAMPLE

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """The keep mask on the finest grid: bool ``[B, 1, H0, W0]`` (argmax, every finest
        cell of a kept coarse cell is kept)."""
        keep = ~self.low_res(features)
        return upsample_cells(keep, self.downsample, features.shape[-2:])

    @staticmethod
    def reference_state_dict(state_dict: Mapping[str, torch.Tensor],
                             prefix: str = "backbone.mask_estimator.") -> dict:
        """The estimator's entries of a reference-code checkpoint (``model_state`` of the
        paper's ``..._ad_resnet101_...pth``), with ``prefix`` removed."""
        if "model_state" in state_dict and isinstance(state_dict["model_state"], Mapping):
            state_dict = state_dict["model_state"]
        out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not out:
            raise KeyError(f"no keys starting with {prefix!r} in the checkpoint; is this the "
                           "reference code's learned-mask checkpoint?")
        return out

    def load_reference(self, state_dict: Mapping[str, torch.Tensor],
                       prefix: str = "backbone.mask_estimator."):
        """Load the estimator from a reference-code checkpoint (strict)."""
        return self.load_state_dict(self.reference_state_dict(state_dict, prefix), strict=True)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, downsample={self.downsample}, tau={self.tau}"


def upsample_cells(x: torch.Tensor, factor: int, size) -> torch.Tensor:
    """Nearest upsampling by an integer ``factor``, cropped to ``size`` (odd sizes: the coarse
    grid is ``ceil(H / factor)``, so the last row/column of cells is clipped)."""
    out = x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
    return out[..., : int(size[0]), : int(size[1])]


def budget_loss(low_res: torch.Tensor, rho: float) -> torch.Tensor:
    """``(rho - rho_hat)^2`` with ``rho_hat`` the fraction of downsampled (low-resolution) cells
    of the batch (paper Sec. 3)."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (target fraction of low-resolution cells) must lie in [0, 1], got {rho}")
    return (rho - low_res.mean()) ** 2


# ------------------------------------------------------------------ ResNet stride configurations
# Output stride after each named child of a torchvision ResNet with no dilation.
_RESNET_STRIDES = {"conv1": 2, "bn1": 2, "relu": 2, "maxpool": 4, "layer1": 4, "layer2": 8,
                   "layer3": 16, "layer4": 32}


def resnet_stage_strides() -> dict:
    """Standard output stride after each top-level child of a torchvision ResNet."""
    return dict(_RESNET_STRIDES)


def _block_convs(block: nn.Module):
    """(strided 3x3 conv, other 3x3 convs) of a torchvision ResNet block."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    if isinstance(block, Bottleneck):
        return block.conv2, []
    if isinstance(block, BasicBlock):
        return block.conv1, [block.conv2]
    raise TypeError(f"expected torchvision ResNet blocks (BasicBlock / Bottleneck), got "
                    f"{type(block).__name__}")


def set_resnet_output_stride(backbone: nn.Module, output_stride: int) -> list:
    """Give a torchvision ResNet (or its ``IntermediateLayerGetter``) the strides and dilations
    of output stride ``output_stride`` (8, 16 or 32; 4 also dilates ``layer2``), in place.

    Follows torchvision's ``replace_stride_with_dilation`` exactly for Bottleneck networks
    (``layer{k}`` block 0 keeps the previous dilation on its strided conv, later blocks take the
    new one); for BasicBlock networks the 3x3 conv after the (removed) stride also takes the new
    dilation (the rule of ``SEMANTICS.md``). Only conv attributes change, so parameters, buffers
    and ``state_dict`` stay those of the model. Returns the previous settings (for restoring).
    """
    if output_stride not in (4, 8, 16, 32):
        raise ValueError(f"output_stride must be 4, 8, 16 or 32, got {output_stride}")
    saved = []

    def setconv(conv: nn.Conv2d, stride=None, dilation=None):
        saved.append((conv, conv.stride, conv.dilation, conv.padding))
        if stride is not None:
            conv.stride = (stride, stride)
        if dilation is not None:
            k = conv.kernel_size[0]
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation * (k - 1) // 2, dilation * (k - 1) // 2)

    try:
        dilation = 1
        for name in ("layer2", "layer3", "layer4"):
            layer = getattr(backbone, name, None)
            if layer is None:
                raise TypeError(f"expected a torchvision ResNet backbone with {name}; got "
                                f"{type(backbone).__name__}")
            previous = dilation
            if _RESNET_STRIDES[name] > output_stride:
                dilation *= 2
                stride = 1
            else:
                stride = 2
            for i, block in enumerate(layer):
                strided, others = _block_convs(block)
                if i == 0:
                    setconv(strided, stride, previous)
                    for conv in others:
                        setconv(conv, dilation=dilation)
                    if block.downsample is not None:
                        setconv(block.downsample[0], stride=stride)
                else:
                    for conv in (strided, *others):
                        setconv(conv, dilation=dilation)
    except BaseException:
        _restore(saved)
        raise
    return saved


def _restore(saved: list):
    for conv, stride, dil, pad in reversed(saved):
        conv.stride, conv.dilation, conv.padding = stride, dil, pad


@contextlib.contextmanager
def resnet_output_stride(backbone: nn.Module, output_stride: int) -> Iterator[None]:
    """:func:`set_resnet_output_stride` for the duration of a ``with`` block (restored on exit):
    one set of weights runs as the dense finest- and coarsest-stride networks."""
    saved = set_resnet_output_stride(backbone, output_stride)
    try:
        yield
    finally:
        _restore(saved)


def features_before_adaptive(model: nn.Module, images: torch.Tensor,
                             finest_stride: int) -> torch.Tensor:
    """The dense feature map entering the first adaptive step of a torchvision segmentation
    model with a ResNet backbone (``layer2`` output for ``finest_stride`` 8)."""
    backbone = model.backbone
    x = images
    with resnet_output_stride(backbone, finest_stride):
        for name, module in backbone.named_children():
            if _RESNET_STRIDES.get(name, finest_stride + 1) > finest_stride:
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
        if coarsest_stride % finest_stride or coarsest_stride <= finest_stride:
            raise ValueError(f"coarsest_stride ({coarsest_stride}) must be finest_stride "
                             f"({finest_stride}) times a power of two")
        factor = coarsest_stride // finest_stride
        if factor & (factor - 1):
            raise ValueError(f"coarsest_stride / finest_stride must be a power of two, got {factor}")
        if estimator.downsample != factor:
            raise ValueError(f"the estimator downsamples by {estimator.downsample}, the model by "
                             f"{factor} ({finest_stride} -> {coarsest_stride}); build it with "
                             f"MaskEstimator(downsample={factor})")
        backbone = getattr(model, "backbone", None)
        if backbone is None or not hasattr(model, "classifier"):
            raise TypeError("expected a torchvision segmentation model (DeepLabV3 / FCN) with "
                            "`backbone` (ResNet IntermediateLayerGetter) and `classifier`")
        names = [n for n, _ in backbone.named_children()]
        unknown = [n for n in names if n not in _RESNET_STRIDES]
        if unknown:
            raise TypeError(f"unexpected backbone children {unknown}: a torchvision ResNet is needed")
        self.model = model
        self.estimator = estimator
        self.finest_stride = finest_stride
        self.coarsest_stride = coarsest_stride
        self.factor = factor
        self.pre = [n for n in names if _RESNET_STRIDES[n] <= finest_stride]
        self.post = [n for n in names if _RESNET_STRIDES[n] > finest_stride]
        if not self.post:
            raise ValueError(f"no backbone layer downsamples beyond stride {finest_stride}")

    def _post(self, x: torch.Tensor, output_stride: int) -> torch.Tensor:
        backbone = self.model.backbone
        with resnet_output_stride(backbone, output_stride):
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
