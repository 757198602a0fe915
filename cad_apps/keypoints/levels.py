"""Level plans of the keypoint study (Hesse et al., CVPRW 2023, Sec. 4.3 and Fig. 7): where the
adaptive D2-Net stays at which stride.

**Keypoint masks.** One odd square dilation per adaptive level, finest first (the paper's and
its code's order): with finest stride ``F`` the ``L = log2(8 / F)`` levels are strides
``F, 2F, ..., 8``; ``dilations[l]`` is the size of the square around each keypoint (in image
pixels) that stays at stride ``<= 2**l * F``, and ``0`` leaves level ``l`` unconstrained. So
``--finest-stride 1 --dilations 25 51 51``: stride 1 within the 25x25 square around a keypoint,
stride 2 and 4 within 51x51, stride 8 elsewhere.

The paper's code dilates at image resolution and then, coarse to fine, sets every ``2**(l+1)``
block of the finest grid holding a dilated cell to level ``l`` (finer overwriting coarser). We
build the same quadtree with :func:`cad_spconv.masks.keypoints` and
:meth:`cad_spconv.LevelPlan.from_level_masks` (a ``2**s`` block merges iff it holds no cell of
masks ``0 .. s-1``); the two agree whenever the dilations do not decrease from fine to coarse
(tested against a transcription of the reference rule). Decreasing dilations (e.g. ``25 11``,
or ``11 0 35``) make the reference rule produce blocks that mix levels, which is no quadtree;
they are refused.

Reduction onto the finest grid (``F > 1``): ``semantics="paper"`` keeps a cell if any pixel of
its ``F x F`` footprint is in the dilated square (the library's rule); ``"reference"`` samples
every ``F``-th pixel as the paper's code does.

**Inadequate masks** (Fig. 6 ablation) at exactly the keypoint plan's budget: the same number
of sites at every level, drawn top-down at the granularity the levels decide (coarsest blocks
first, then the children of the blocks not chosen, and so on):

- ``random``: blocks in random order;
- ``inverted``: blocks nearest to a keypoint (Chebyshev distance on the finest grid) become
  coarse first, so the far-away regions get the fine levels (ties in random order).

With a finest grid that is a multiple of ``2**L`` (always in the pipeline: images are multiples
of 8) every block is whole, so level fractions and multiply-adds equal the keypoint plan's
exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["MASKS", "num_levels", "check_dilations", "keypoint_masks", "keypoint_plan",
           "budget_levels", "random_levels", "inverted_levels", "site_counts"]

MASKS = ("keypoints", "random", "inverted")


def num_levels(finest_stride: int) -> int:
    """Adaptive levels between ``finest_stride`` and 8."""
    if finest_stride not in (1, 2, 4, 8):
        raise ValueError(f"--finest-stride must be 1, 2, 4 or 8, got {finest_stride}")
    return (8 // finest_stride).bit_length() - 1


def check_dilations(dilations: Sequence[int], finest_stride: int) -> tuple[int, ...]:
    """Validate one dilation per level (finest first): ints, odd or 0, not decreasing."""
    L = num_levels(finest_stride)
    dil = tuple(dilations)
    if len(dil) != L:
        if L == 0:
            raise ValueError(f"--finest-stride {finest_stride} is the dense stride-8 network, "
                             f"which has no adaptive levels: give no --dilations (got {len(dil)})")
        raise ValueError(
            f"--finest-stride {finest_stride} has {L} adaptive level(s) (strides "
            f"{', '.join(str(finest_stride * 2 ** i) for i in range(L))} below 8), so --dilations "
            f"needs {L} value(s), finest first (e.g. {' '.join(['25', '51', '51'][-L:])}), "
            f"got {len(dil)}")
    for i, d in enumerate(dil):
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 0 or (d and d % 2 == 0):
            raise ValueError(f"--dilations: value {i} ({d!r}) must be an odd square size in pixels, "
                             "or 0 to leave that level unconstrained")
    for i in range(1, L):
        if dil[i] < dil[i - 1]:
            raise ValueError(
                f"--dilations {' '.join(map(str, dil))}: level {i} (stride {finest_stride * 2 ** i}) "
                f"has a smaller square ({dil[i]}) than the finer level {i - 1} ({dil[i - 1]}); the "
                "paper's rule then builds blocks that mix levels (no valid quadtree). Dilations must "
                f"not decrease from fine to coarse: use e.g. {' '.join(map(str, _fixed(dil)))}")
    return tuple(int(d) for d in dil)


def _fixed(dil):
    out, m = [], 0
    for d in dil:
        m = max(m, d)
        out.append(m)
    return out


def keypoint_masks(xy: np.ndarray, image_size: Sequence[int], dilations: Sequence[int],
                   finest_stride: int, semantics: str = "paper", device=None) -> list:
    """Per-level bool masks ``[1, 1, H0, W0]`` on the finest grid (finest first)."""
    import torch

    from cad_spconv import masks
    from cad_spconv.plan import reduce_to_grid

    dil = check_dilations(dilations, finest_stride)
    H, W = (int(v) for v in image_size)
    if H % 8 or W % 8:
        raise ValueError(f"image size {H}x{W} must be a multiple of 8 (preprocess it first)")
    F = finest_stride
    grid = (H // F, W // F)
    pts = torch.as_tensor(np.asarray(xy, dtype=np.float64).reshape(-1, 2))
    per_level = masks.keypoints([pts], (H, W), dil, device=device)
    if semantics == "reference":
        return [m[:, :, ::F, ::F] for m in per_level]
    if semantics != "paper":
        raise ValueError(f"semantics must be 'paper' or 'reference', got {semantics!r}")
    return [reduce_to_grid(m, grid, stride=F)[:, None] for m in per_level]


def keypoint_plan(xy, image_size, dilations, finest_stride, semantics="paper", device=None):
    """The :class:`~cad_spconv.LevelPlan` of the keypoint masks (one image)."""
    from cad_spconv import LevelPlan

    m = keypoint_masks(xy, image_size, dilations, finest_stride, semantics, device)
    H, W = (int(v) for v in image_size)
    return LevelPlan.from_level_masks(m, (H // finest_stride, W // finest_stride),
                                      num_levels(finest_stride))


def site_counts(levels: np.ndarray, L: int) -> list[int]:
    """Number of sites of every level (whole blocks)."""
    return [int((levels == l).sum()) // 4 ** l for l in range(L + 1)]


def budget_levels(levels: np.ndarray, L: int, key: np.ndarray | None, rng) -> np.ndarray:
    """A level map with the same number of sites per level as ``levels`` ([H0, W0], grid a
    multiple of ``2**L``), drawn top-down: at level ``l`` (coarsest first) the candidate blocks
    are ordered by ``key`` (a per-cell float map; a block's key is the minimum over its cells;
    ``None``: random order), ties randomly, and the first ones take level ``l``; the others
    split into their four children, the candidates of level ``l - 1``."""
    levels = np.asarray(levels)
    H, W = levels.shape
    B = 2 ** L
    if H % B or W % B:
        raise ValueError(f"budget-matched masks need a finest grid that is a multiple of {B}, got "
                         f"{H}x{W}")
    counts = site_counts(levels, L)
    out = np.full((H, W), -1, dtype=np.int64)
    ys, xs = np.mgrid[0:H:B, 0:W:B]
    ys, xs = ys.ravel(), xs.ravel()
    for l in range(L, -1, -1):
        size = 2 ** l
        if key is None:
            order = rng.permutation(len(ys))
        else:
            block_key = key.reshape(H // size, size, W // size, size).min(axis=(1, 3))
            order = np.lexsort((rng.random(len(ys)), block_key[ys // size, xs // size]))
        take, rest = order[:counts[l]], order[counts[l]:]
        chosen = np.zeros((H // size, W // size), dtype=bool)
        chosen[ys[take] // size, xs[take] // size] = True
        out[np.repeat(np.repeat(chosen, size, 0), size, 1)] = l
        if l == 0:
            if len(rest):
                raise AssertionError("budget_levels: site counts are not those of a quadtree")
            break
        h = size // 2
        ys = np.concatenate([ys[rest], ys[rest], ys[rest] + h, ys[rest] + h])
        xs = np.concatenate([xs[rest], xs[rest] + h, xs[rest], xs[rest] + h])
    return out


def random_levels(levels: np.ndarray, L: int, rng) -> np.ndarray:
    """The keypoint plan's budget, blocks in random order."""
    return budget_levels(levels, L, None, rng)


def inverted_levels(levels: np.ndarray, L: int, cells: np.ndarray, rng) -> np.ndarray:
    """The keypoint plan's budget with keypoints coarsest: ``cells`` ``[N, 2]`` are the keypoints'
    finest-grid cells ``(row, col)``; blocks nearest to one become coarse first."""
    import cv2

    H, W = np.asarray(levels).shape
    src = np.ones((H, W), dtype=np.uint8)
    cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
    if len(cells):
        src[cells[:, 0], cells[:, 1]] = 0
        dist = cv2.distanceTransform(src, cv2.DIST_C, 3).astype(np.float64)
    else:
        dist = np.zeros((H, W))
    return budget_levels(levels, L, dist, rng)
