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

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MaskEstimator", "budget_loss", "upsample_cells", "KEEP", "DOWNSAMPLE"]

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
        return self.sample_logits(self.logits(features), tau)

    def sample_logits(self, logits: torch.Tensor, tau: float | None = None) -> torch.Tensor:
        """:meth:`sample` from given :meth:`logits` (the reference draws two samples from one
        evaluation: one blends the paths, the other estimates the budget)."""
        one_hot = F.gumbel_softmax(logits, tau=self.tau if tau is None else tau, hard=True, dim=1)
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
