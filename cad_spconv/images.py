"""Image conventions shared by the masks and the applications: torchvision's ImageNet
normalisation, which every backbone the adapters convert expects."""
from __future__ import annotations

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize", "denormalize"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(image_uint8: torch.Tensor) -> torch.Tensor:
    """``[..., 3, H, W]`` uint8 RGB -> float32 normalised with the ImageNet mean / std."""
    if not isinstance(image_uint8, torch.Tensor) or image_uint8.dtype != torch.uint8:
        got = image_uint8.dtype if isinstance(image_uint8, torch.Tensor) else type(image_uint8).__name__
        raise TypeError(f"expected a uint8 RGB image tensor, got {got}")
    mean = torch.tensor(IMAGENET_MEAN, device=image_uint8.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image_uint8.device).view(3, 1, 1)
    return (image_uint8.to(torch.float32) / 255.0 - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize` (float in 0..1, clamped), for plotting and detectors."""
    mean = torch.tensor(IMAGENET_MEAN, device=image.device, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device, dtype=torch.float32).view(3, 1, 1)
    return (image.to(torch.float32) * std + mean).clamp(0, 1)
