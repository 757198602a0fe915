"""An independent dense emulation of SEMANTICS.md, for tests only.

Written without the library: levels by looping over quadtree blocks in numpy, owners by
modular arithmetic, every sparse layer as "fill through the owner map, then a dense torch op on
the finest grid, then sample at the output sites".
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def levels_from_masks(masks, num_levels: int) -> np.ndarray:
    """masks: list of bool arrays [B, H, W] at the finest grid (mask l: level <= l)."""
    masks = [np.asarray(m, dtype=bool) for m in masks]
    B, H, W = masks[0].shape
    levels = np.zeros((B, H, W), dtype=np.int64)
    forbidden = np.zeros((B, H, W), dtype=bool)
    for s in range(1, num_levels + 1):
        if s - 1 < len(masks):
            forbidden |= masks[s - 1]
        size = 2 ** s
        for b in range(B):
            for y0 in range(0, H, size):
                for x0 in range(0, W, size):
                    if not forbidden[b, y0:y0 + size, x0:x0 + size].any():
                        levels[b, y0:y0 + size, x0:x0 + size] = s
    return levels


def keep_to_grid(keep: np.ndarray, grid) -> np.ndarray:
    """Any-pixel reduction of [B, h, w] onto [B, H, W] with an integer factor (ceil sizes)."""
    B, h, w = keep.shape
    H, W = grid
    s = next(s for s in range(1, h + 1) if -(-h // s) == H and -(-w // s) == W)
    out = np.zeros((B, H, W), dtype=bool)
    for i in range(H):
        for j in range(W):
            out[:, i, j] = keep[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(B, -1).any(1)
    return out


class Geometry:
    """Sites and owners of one step, from a level map [B, H, W]."""

    def __init__(self, levels: np.ndarray, step: int):
        self.levels = levels
        B, H, W = levels.shape
        size = 2 ** np.minimum(levels, step)
        ys = np.arange(H)[None, :, None]
        xs = np.arange(W)[None, None, :]
        self.owner_y = ys - ys % size
        self.owner_x = xs - xs % size
        site = (self.owner_y == ys) & (self.owner_x == xs)
        self.sites = np.argwhere(site)  # raster order (b, y, x)
        index = -np.ones((B, H, W), dtype=np.int64)
        index[site] = np.arange(len(self.sites))
        bs = np.arange(B)[:, None, None]
        self.owner = index[bs, self.owner_y, self.owner_x]
        self.area = np.bincount(self.owner.ravel(), minlength=len(self.sites))

    def fill(self, features: torch.Tensor) -> torch.Tensor:
        """Dense [B, C, H, W] where every cell takes its owner's features."""
        owner = torch.as_tensor(self.owner, device=features.device)
        return features[owner].permute(0, 3, 1, 2)

    def sample(self, dense: torch.Tensor) -> torch.Tensor:
        """Features [N, C] of a dense map at this step's sites."""
        b, y, x = (torch.as_tensor(self.sites[:, i], device=dense.device) for i in range(3))
        return dense[b, :, y, x]


def conv(features, levels, step_in, stride, weight, bias=None, dilation=1, groups=1):
    """The conv rule: fill, dense conv at the finest grid with spacing D, sample at outputs.
    Kernels may be rectangular and ``dilation`` a pair (per axis)."""
    dy, dx = (dilation, dilation) if isinstance(dilation, int) else dilation
    D = (dy * 2 ** step_in, dx * 2 ** step_in)
    kh, kw = weight.shape[-2:]
    dense = Geometry(levels, step_in).fill(features)
    out = F.conv2d(dense, weight, bias, padding=(D[0] * (kh // 2), D[1] * (kw // 2)), dilation=D,
                   groups=groups)
    return Geometry(levels, step_in + (stride == 2)).sample(out)


def conv_reference_semantics(features, levels, step_in, stride, weight, bias=None, dilation=1,
                             groups=1):
    """The paper code's rule (``semantics="reference"``): as :func:`conv`, but an output site
    of level ``l`` (at ``step_in``: ``min(level, step_in)``) is evaluated at the centre cell
    ``2**l // 2`` of its block instead of its top-left cell (a 1x1 conv has no taps to measure:
    it stays per site). The dense conv runs on the filled
    map zero-padded past the bottom / right border, so an anchor (or tap) outside the grid
    reads zeros."""
    dy, dx = (dilation, dilation) if isinstance(dilation, int) else dilation
    D = (dy * 2 ** step_in, dx * 2 ** step_in)
    kh, kw = weight.shape[-2:]
    margin = 2 ** int(levels.max()) if levels.size else 1
    dense = F.pad(Geometry(levels, step_in).fill(features), (0, margin, 0, margin))
    out = F.conv2d(dense, weight, bias, padding=(D[0] * (kh // 2), D[1] * (kw // 2)), dilation=D,
                   groups=groups)
    geo = Geometry(levels, step_in + (stride == 2))
    b, y, x = geo.sites[:, 0], geo.sites[:, 1], geo.sites[:, 2]
    a = 2 ** np.minimum(levels[b, y, x], step_in) // 2 * (kh * kw > 1)  # 1x1: per site
    idx = [torch.as_tensor(v, device=out.device) for v in (b, y + a, x + a)]
    return out[idx[0], :, idx[1], idx[2]]


def max_pool_overlap(features, levels, step_in, k, stride, dilation=1):
    """Odd window (``k`` an int or a pair), same padding, taps spaced ``dilation * 2**step_in``
    (``dilation`` an int or a pair), out-of-grid taps ignored."""
    kh, kw = (k, k) if isinstance(k, int) else k
    dy, dx = (dilation, dilation) if isinstance(dilation, int) else dilation
    D = (dy * 2 ** step_in, dx * 2 ** step_in)
    dense = Geometry(levels, step_in).fill(features)
    py, px = D[0] * (kh // 2), D[1] * (kw // 2)
    padded = F.pad(dense, (px, px, py, py), value=float("-inf"))
    out = F.max_pool2d(padded, (kh, kw), stride=1, dilation=D)
    return Geometry(levels, step_in + (stride == 2)).sample(out)


def max_pool_overlap_reference_semantics(features, levels, step_in, k, stride):
    """:func:`max_pool_overlap` under the paper code's anchor rule: a site of level ``l``
    (``min(level, step_in)``) takes the window around the centre cell ``2**l // 2`` of its
    block (the same anchors as :func:`conv_reference_semantics`); out-of-grid taps ignored."""
    D = 2 ** step_in
    margin = 2 ** int(levels.max()) if levels.size else 1
    dense = Geometry(levels, step_in).fill(features)
    pad = D * (k // 2)
    padded = F.pad(dense, (pad, pad + margin, pad, pad + margin), value=float("-inf"))
    out = F.max_pool2d(padded, k, stride=1, dilation=D)
    geo = Geometry(levels, step_in + (stride == 2))
    b, y, x = geo.sites[:, 0], geo.sites[:, 1], geo.sites[:, 2]
    a = 2 ** np.minimum(levels[b, y, x], step_in) // 2
    idx = [torch.as_tensor(v, device=out.device) for v in (b, y + a, x + a)]
    return out[idx[0], :, idx[1], idx[2]]


def max_pool_2x2(features, levels, step_in):
    """Merged sites: max over children at spacing 2**step_in; kept sites pass through."""
    S = 2 ** step_in
    dense = Geometry(levels, step_in).fill(features)
    padded = F.pad(dense, (0, S, 0, S), value=float("-inf"))
    pooled = F.max_pool2d(padded, 2, stride=1, dilation=S)
    out_geo = Geometry(levels, step_in + 1)
    merged = torch.as_tensor(levels >= step_in + 1, device=dense.device)[:, None]
    return out_geo.sample(torch.where(merged, pooled, dense))


def global_avg_pool(features, levels, step):
    return Geometry(levels, step).fill(features).mean((2, 3))


def census(levels: np.ndarray, num_levels: int) -> list[dict]:
    """Per image: {(level, clipped height, clipped width): number of sites} of a level map
    [B, H, W], by looping over the quadtree's aligned blocks (a plan's budget: equal censuses
    give equal level fractions, sites at every step and multiply-adds)."""
    B, H, W = levels.shape
    out = []
    for b in range(B):
        count: dict = {}
        for l in range(num_levels + 1):
            s = 2 ** l
            for y in range(0, H, s):
                for x in range(0, W, s):
                    if levels[b, y, x] == l:
                        key = (l, min(s, H - y), min(s, W - x))
                        count[key] = count.get(key, 0) + 1
        out.append(count)
    return out
