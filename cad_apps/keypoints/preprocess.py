"""What an image goes through before SIFT and the network (D2-Net's HPatches protocol as the
paper's code runs it): an optional area resize, sizes made multiples of 8, caffe preprocessing.

- ``semantics="paper"`` (default): if ``height + width > max_sum_edges`` (2800) the image is
  scaled by ``max_sum_edges / (height + width)`` with area interpolation (sizes truncated to
  integers); then the bottom / right rows and columns beyond a multiple of 8 are cropped.
  Keypoints map back to the image as read through pixel centres,
  ``x = (x' + 0.5) * W / W' - 0.5`` (the identity when nothing was resized).
- ``semantics="reference"``: the paper's code instead resizes (area interpolation) straight to
  the multiple-of-8 size (a slight squash instead of a crop) and maps keypoints back with
  ``x = x' * W / W'``. (Its test for "already a multiple of 8" looks at the size before the
  2800 resize, so a resized image can end up with other sizes there; we always make the
  multiple of 8 — the network input must be one.)

Caffe preprocessing (D2-Net's ``d2_tf.pth`` weights expect it): BGR channel order, the per-channel
mean ``(103.939, 116.779, 123.68)`` subtracted, no scaling.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CAFFE_MEAN_BGR", "MAX_SUM_EDGES", "SEMANTICS", "Prepared", "prepare_image",
           "caffe_tensor"]

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
MAX_SUM_EDGES = 2800
SEMANTICS = ("paper", "reference")


@dataclass
class Prepared:
    """The network's view of one image."""

    rgb: np.ndarray            # uint8 [h, w, 3], h and w multiples of 8
    original_size: tuple       # (H, W) of the image as read
    scaled_size: tuple         # (H', W') the coordinates of ``rgb`` are measured in
    semantics: str

    def to_original(self, xy: np.ndarray) -> np.ndarray:
        """``[N, 2]`` (x, y) in ``rgb`` pixels -> pixels of the image as read (float64)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        (H, W), (h, w) = self.original_size, self.scaled_size
        scale = np.array([W / w, H / h])
        if self.semantics == "reference":
            return xy * scale
        return (xy + 0.5) * scale - 0.5


def _check_semantics(semantics: str) -> str:
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {SEMANTICS}, got {semantics!r}")
    return semantics


def prepare_image(rgb: np.ndarray, max_sum_edges: int = MAX_SUM_EDGES,
                  semantics: str = "paper") -> Prepared:
    """Resize / crop an RGB ``uint8`` image for the network (see the module docstring)."""
    import cv2

    _check_semantics(semantics)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {rgb.dtype} {rgb.shape}")
    H, W = rgb.shape[:2]
    h, w = H, W
    if H + W > max_sum_edges:
        factor = max_sum_edges / (H + W)
        h, w = int(H * factor), int(W * factor)
    h8, w8 = h - h % 8, w - w % 8
    if h8 < 8 or w8 < 8:
        resized = ((f", {h}x{w} after resizing to max_sum_edges {max_sum_edges} (raise "
                    "--max-sum-edges)") if (h, w) != (H, W) else "")
        raise ValueError(f"image of {H}x{W} pixels{resized} is too small: the network needs at "
                         "least 8x8 pixels after resizing (stride 8)")
    if semantics == "reference":
        out = rgb if (h8, w8) == (H, W) else cv2.resize(rgb, (w8, h8), interpolation=cv2.INTER_AREA)
        return Prepared(np.ascontiguousarray(out), (H, W), (h8, w8), semantics)
    out = rgb if (h, w) == (H, W) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
    return Prepared(np.ascontiguousarray(out[:h8, :w8]), (H, W), (h, w), semantics)


def caffe_tensor(rgb: np.ndarray, dtype=None, device=None):
    """``[1, 3, h, w]`` BGR minus the caffe mean (computed in float64, then cast to ``dtype``)."""
    import torch

    bgr = rgb[:, :, ::-1].astype(np.float64) - np.asarray(CAFFE_MEAN_BGR)
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))[None]
    return x.to(device=device, dtype=dtype or torch.float32)
