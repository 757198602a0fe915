"""Helpers of the keypoint-study tests: tiny HPatches-format sets, thin VGG stacks, D2-Net
checkpoints with D2-Net's key names, and transcriptions of the reference rules written for the
tests (not imported from the package)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from .inputs import FRAMES
D2_PREFIX = "dense_feature_extraction.model."
#: vgg16().features[:23]: (kind, channels) per layer
VGG16_D2 = ["c64", "r", "c64", "r", "p", "c128", "r", "c128", "r", "p", "c256", "r", "c256", "r",
            "c256", "r", "p", "c512", "r", "c512", "r", "c512", "r"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine (two OpenMP
    threads on an oversubscribed CPU made a tiny conv take 40 ms instead of < 1 ms).
    Import it into a test module to apply it there; the count is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def frame_scenes(n: int, size=(144, 192)):
    """``n`` RGB scenes from the real Cityscapes frames (area-resized), or ``None`` if absent."""
    import cv2

    if not os.path.isdir(FRAMES):
        return None
    names = sorted(f for f in os.listdir(FRAMES) if f.endswith(".png"))[:n]
    if len(names) < n:
        return None
    out = []
    for name in names:
        bgr = cv2.imread(os.path.join(FRAMES, name), cv2.IMREAD_COLOR)
        small = cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        out.append(np.ascontiguousarray(small[:, :, ::-1]))
    return out


def make_hpatches(root, image_size=(48, 64), num_scenes=1, seed=0, frames=True) -> list[str]:
    """An HPatches-format set: per scene one ``i_`` and one ``v_`` sequence. Scenes are the
    real frames when available (``frames=True``), procedural otherwise."""
    from cad_apps.keypoints.hpatches import synthetic_scene, write_synthetic

    h, w = image_size
    scenes = frame_scenes(num_scenes, (3 * h, 3 * w)) if frames else None
    if scenes is None:
        scenes = [synthetic_scene((3 * h, 3 * w), seed + i) for i in range(num_scenes)]
    return write_synthetic(str(root), scenes, image_size=image_size, seed=seed)


def thin_vgg(scale: int = 16, seed: int = 0, dtype=torch.float64) -> nn.Sequential:
    """The layer structure of ``vgg16().features[:23]`` with ``1/scale`` of the channels, random
    weights and biases (biases non-zero so that a wrong read cannot hide)."""
    gen = torch.Generator().manual_seed(seed)
    layers, cin = [], 3
    for kind in VGG16_D2:
        if kind == "r":
            layers.append(nn.ReLU(inplace=True))
        elif kind == "p":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            cout = max(2, int(kind[1:]) // scale)
            conv = nn.Conv2d(cin, cout, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (9 * cin)) ** 0.5)
                conv.bias.copy_(torch.randn(cout, generator=gen) * 0.1)
            layers.append(conv)
            cin = cout
    return nn.Sequential(*layers).to(dtype).eval()


def d2_checkpoint(stack: nn.Sequential) -> dict:
    """A checkpoint laid out as D2-Net's ``d2_tf.pth``: ``{"model": {...}}`` with keys
    ``dense_feature_extraction.model.<i>.weight / .bias`` (``<i>`` the conv's index in D2-Net's
    ``nn.Sequential``)."""
    sd = {}
    for i, m in enumerate(stack):
        if isinstance(m, nn.Conv2d):
            sd[f"{D2_PREFIX}{i}.weight"] = m.weight.detach().clone()
            sd[f"{D2_PREFIX}{i}.bias"] = m.bias.detach().clone()
    return {"model": sd}


def dense_reference(stack: nn.Sequential, x: torch.Tensor, output_stride: int) -> torch.Tensor:
    """D2-Net's dense network at ``output_stride``, written out layer by layer as the paper's
    code lists it (``DenseFeatureExtractionModule_OS{1,2,4,8}``): pools kept up to the output
    stride, the remaining ones dropped, convs after them with dilation 2 / 4 / 8."""
    import torch.nn.functional as F

    convs = [m for m in stack if isinstance(m, nn.Conv2d)]
    # (conv indices per VGG block) and the dilation of each block at each output stride
    blocks = [(0, 1), (2, 3), (4, 5, 6), (7, 8, 9)]
    dilation = {8: (1, 1, 1, 1), 4: (1, 1, 1, 2), 2: (1, 1, 2, 4), 1: (1, 2, 4, 8)}[output_stride]
    pooled = {8: (True, True, True), 4: (True, True, False), 2: (True, False, False),
              1: (False, False, False)}[output_stride]
    for b, idx in enumerate(blocks):
        if b > 0 and pooled[b - 1]:
            x = F.max_pool2d(x, 2, 2)
        for i in idx:
            d = dilation[b]
            x = F.relu(F.conv2d(x, convs[i].weight, convs[i].bias, padding=d, dilation=d))
    return x


def reference_levels(xy: np.ndarray, image_size, dilations, finest_stride: int,
                     reduction: str = "sample") -> np.ndarray:
    """The paper code's pooling mask (``create_pooling_mask``) transcribed with loops: start
    at the coarsest level everywhere; for level ``i`` from coarse to fine with
    ``dilations[i] != 0``: mark the pixels within the centred ``d x d`` square of a keypoint,
    bring them to the finest grid (``sample``: every ``F``-th pixel as the reference;
    ``any``: a cell is marked if any pixel of its footprint is), and set every ``2**(i+1)``
    block of the finest grid holding a marked cell to ``i``."""
    H, W = image_size
    F = finest_stride
    L = len(dilations)
    seeds = np.zeros((H, W), dtype=bool)
    for x, y in np.asarray(xy).reshape(-1, 2):
        seeds[int(round(y)), int(round(x))] = True
    h0, w0 = H // F, W // F
    levels = np.full((h0, w0), L, dtype=np.int64)
    for i in reversed(range(L)):
        d = dilations[i]
        if d == 0:
            continue
        r = d // 2
        marked = np.zeros((H, W), dtype=bool)
        for y, x in zip(*np.nonzero(seeds)):
            marked[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
        if reduction == "sample":
            grid = marked[::F, ::F][:h0, :w0]
        else:
            grid = marked[:h0 * F, :w0 * F].reshape(h0, F, w0, F).any(axis=(1, 3))
        size = 2 ** (i + 1)
        for by in range(0, h0, size):
            for bx in range(0, w0, size):
                if grid[by:by + size, bx:bx + size].any():
                    levels[by:by + size, bx:bx + size] = i
    return levels


def random_keypoints(rng, image_size, n: int) -> np.ndarray:
    H, W = image_size
    return np.stack([rng.integers(0, W, n), rng.integers(0, H, n)], 1)
