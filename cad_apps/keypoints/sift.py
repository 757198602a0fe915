"""SIFT keypoints as the paper uses them (:func:`cad_spconv.masks.sift_points`: OpenCV's SIFT,
strongest first, rounded, de-duplicated, the first 512) on the grey image of the keypoint study.

Grey image:

- ``"luminance"`` (default): ``0.299 R + 0.587 G + 0.114 B`` (OpenCV's RGB -> grey, rounded);
- ``"reference"``: what the paper's code computes. It undoes the caffe preprocessing of the
  float32 network input but leaves the channels in BGR order, so its weights fall on the wrong
  channels (``0.299 B + 0.587 G + 0.114 R``), and it truncates to ``uint8``. Reproduced here
  arithmetic step by step.
"""
from __future__ import annotations

import numpy as np

from .preprocess import CAFFE_MEAN_BGR

__all__ = ["GRAY_MODES", "gray_image", "detect"]

GRAY_MODES = ("luminance", "reference")


def gray_image(rgb: np.ndarray, mode: str = "luminance") -> np.ndarray:
    """Grey ``uint8 [h, w]`` of an RGB ``uint8`` image (see the module docstring)."""
    import cv2

    if mode == "luminance":
        return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    if mode != "reference":
        raise ValueError(f"gray mode must be one of {GRAY_MODES}, got {mode!r}")
    mean = np.asarray(CAFFE_MEAN_BGR)
    bgr = rgb[:, :, ::-1].astype(np.float64)
    net_input = (bgr - mean).astype(np.float32)          # what the network receives
    restored = net_input.astype(np.float64) + mean       # the mean added back, still BGR
    g = 0.299 * restored[..., 0] + 0.587 * restored[..., 1] + 0.114 * restored[..., 2]
    return np.clip(np.trunc(g), 0, 255).astype(np.uint8)  # float -> uint8 truncates


def detect(rgb: np.ndarray, num_points: int = 512, gray: str = "luminance"
           ) -> tuple[np.ndarray, np.ndarray]:
    """The ``num_points`` strongest distinct SIFT keypoints of an RGB ``uint8`` image:
    :func:`cad_spconv.masks.sift_points` on :func:`gray_image`. Returns ``xy`` int64
    ``[N, 2]`` (x, y) whole pixels and ``responses`` float32 ``[N]``, strongest first."""
    from cad_spconv.masks import sift_points

    return sift_points(gray_image(rgb, gray), num_points)
