"""A second emulation of ``semantics="reference"``, by the mechanism of the paper's code.

The reference code (github.com/visinf/cad, read for facts only) keeps a multi-resolution map as
a list of sites, one column per site, and runs a kxk conv as a 1-D deformable conv over that
list. At step ``t`` a site of level ``l`` has scale ``i = min(l, t)`` and sits at the centre
cell ``2**i // 2`` of its ``2**i`` block. A map of owner indices (each centre's index spread
over its block) turns a tap at ``centre + spacing * offset`` into the index of the site that
owns that cell; taps outside the image read zero. A downsampling step runs its conv (or 2x2
max pool) at step ``t`` and then keeps, for every block that merges, the step-``t`` site at
the block's top-left (its 2x2 pool takes the maximum of the four children).

This module restates that mechanism in numpy / torchvision for one image, with Python loops
over the sites (small grids only). ``tests/support/dense_reference.py`` emulates the same rule
as a dense conv through an owner-filled map; the two share nothing but the rule.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d


def sites(levels: np.ndarray, step: int) -> list[tuple[int, int, int]]:
    """``(scale, y, x)`` of every site at ``step`` (``y, x``: its block's centre cell), finer
    scales first, each in raster order: the reference code's site list."""
    out = []
    H, W = levels.shape
    for i in range(step + 1):
        here = levels == i if i < step else levels >= step
        c, size = 2 ** i // 2, 2 ** i
        out += [(i, y, x) for y in range(c, H, size) for x in range(c, W, size) if here[y, x]]
    return out


def owner_index(levels: np.ndarray, step: int) -> np.ndarray:
    """``[H, W]``: the index in :func:`sites` of the site whose block holds each cell."""
    index = np.full(levels.shape, -1, dtype=np.int64)
    for n, (i, y, x) in enumerate(sites(levels, step)):
        y0, x0 = y - 2 ** i // 2, x - 2 ** i // 2
        index[y0:y0 + 2 ** i, x0:x0 + 2 ** i] = n
    assert (index >= 0).all()
    return index


def graph_conv(g: torch.Tensor, levels: np.ndarray, step: int, weight: torch.Tensor,
               spacing: int) -> torch.Tensor:
    """``g``: ``[C_in, N]`` features of :func:`sites` at ``step``; a ``k x k`` conv whose taps
    are ``spacing`` cells apart, as a deformable conv over the site list (the 1-D offsets move
    each tap from the site's own column to its owner's; outside the image: zero)."""
    H, W = levels.shape
    k = weight.shape[-1]
    at = torch.tensor([(y, x) for _, y, x in sites(levels, step)])
    n = len(at)
    o = torch.arange(-(k // 2), k // 2 + 1) * spacing
    ty = at[:, :1] + o.repeat_interleave(k)[None]  # [N, k*k], taps in raster order
    tx = at[:, 1:] + o.repeat(k)[None]
    inside = (ty >= 0) & (ty < H) & (tx >= 0) & (tx < W)
    owner = torch.from_numpy(owner_index(levels, step))[ty.clamp(0, H - 1), tx.clamp(0, W - 1)]
    owner = torch.where(inside, owner, torch.full_like(owner, -1))  # column -1: zero padding
    # a 1-D conv of width k*k over the columns, tap j reading column n - k*k//2 + j unmoved
    unmoved = torch.arange(n)[:, None] + torch.arange(k * k)[None] - k * k // 2
    shift = (owner - unmoved).t().to(g.dtype)  # [k*k, N]
    offsets = torch.stack([shift, torch.zeros_like(shift)], 1).reshape(1, 2 * k * k, n, 1)
    w = weight.reshape(weight.shape[0], weight.shape[1], k * k, 1)
    return deform_conv2d(g[None, :, :, None], offsets, w, padding=(k * k // 2, 0))[0, :, :, 0]


def _kept_and_merged(levels: np.ndarray, step: int):
    """Indices in :func:`sites` at ``step``: those that stay, and the top-left step sites of
    the blocks that merge at ``step + 1`` (with their four children's indices)."""
    listed = sites(levels, step)
    where = {(y, x): n for n, (_, y, x) in enumerate(listed)}
    size = 2 ** step
    stay = [n for n, (i, y, x) in enumerate(listed) if i < step or levels[y, x] < step + 1]
    merged = [(n, [where[y + a, x + b] for a in (0, size) for b in (0, size)])
              for n, (i, y, x) in enumerate(listed)
              if i == step and levels[y, x] >= step + 1 and (y // size) % 2 == 0
              and (x // size) % 2 == 0]
    return stay, merged


def keep_top_left(g: torch.Tensor, levels: np.ndarray, step: int) -> torch.Tensor:
    """A strided conv's output at ``step`` to the site list at ``step + 1``."""
    stay, merged = _kept_and_merged(levels, step)
    return g[:, stay + [n for n, _ in merged]]


def graph_max_pool_2x2(g: torch.Tensor, levels: np.ndarray, step: int) -> torch.Tensor:
    stay, merged = _kept_and_merged(levels, step)
    return torch.cat([g[:, stay]] + [g[:, kids].amax(1, keepdim=True) for _, kids in merged], 1)


def from_dense(dense: torch.Tensor, levels: np.ndarray, step: int) -> torch.Tensor:
    """``[C, H, W]`` owner-filled map to the site list (each site's value read at its centre)."""
    return torch.stack([dense[:, y, x] for _, y, x in sites(levels, step)], 1)


def to_dense(g: torch.Tensor, levels: np.ndarray, step: int) -> torch.Tensor:
    """The site list to a ``[C, H, W]`` map filled through the owner indices."""
    return g[:, torch.from_numpy(owner_index(levels, step))]
