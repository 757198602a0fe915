"""Downsampling masks from the paper (Hesse et al., CVPRW 2023, Sec. 4 and supplement C).

Every function returns keep masks that converted models and :func:`~cad_spconv.plan.make_plan`
accept: bool ``[B, 1, H, W]`` at image resolution (``True`` = keep at the finest resolution),
or, for :func:`keypoints`, a list of such masks, one per adaptive step, finest first. A model
reduces them onto its finest grid with the any-pixel rule (a cell is kept if any pixel of its
footprint is kept, ``SEMANTICS.md``); :func:`subsample` gives the reference code's reduction
instead (every ``stride``-th pixel).

- :func:`edge`: thresholded image gradients, dilated (Sec. 4.2, "edge mask").
- :func:`oracle`: wrong at the coarse stride but right at the fine one, dilated (Sec. 4.1).
- :func:`keypoints`: keypoints dilated with one square size per level (Sec. 4.3);
  :func:`sift_keypoints` detects them with OpenCV (optional extra ``cad-spconv[sift]``).
- :func:`random`, :func:`random_like`, :func:`shuffle_plan`, :func:`invert`: "inadequate
  masks" (Sec. 4.3); random and shuffled masks are drawn at the granularity of the blocks a
  plan decides, so their budgets (level fractions, multiply-adds) are exact.
- :func:`kept_fraction`: fraction of cells of a given stride that a mask keeps.

Images are ImageNet-normalised float tensors ``[B, 3, H, W]`` (as the data pipeline yields).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .images import denormalize
from .plan import LevelPlan, reduce_to_grid

__all__ = ["edge", "oracle", "keypoints", "sift_keypoints", "sift_points", "require_opencv",
           "random", "random_like",
           "shuffle_plan", "invert",
           "dilate", "subsample", "reference_blocks", "kept_fraction", "EDGE_OPERATORS", "GRAYSCALES"]


#: ``reference``: the public reference code's detector: central differences
#: ``g[y, x+1] - g[y, x-1]`` and ``g[y+1, x] - g[y-1, x]`` with zero padding, each compared
#: *signed* against the threshold (one-sided: only intensity rising to the right / downwards
#: fires). The paper's thresholds 0.15 / 0.35 / 0.95 were set with this detector.
#: ``sobel``: what the paper's text says: magnitude ``sqrt(gx^2 + gy^2)`` of the 3x3 Sobel
#: gradient (replicate padding). Its gain is 4x that of the central difference, so the same
#: threshold keeps far more (docs/masks.md has the measured fractions).
EDGE_OPERATORS = ("reference", "sobel")
#: ``luminance``: ``0.299 R + 0.587 G + 0.114 B`` (the reference code); ``mean``: channel mean.
GRAYSCALES = ("luminance", "mean")

MaskList = Sequence[torch.Tensor]


# ---------------------------------------------------------------------------------- helpers
def _check_images(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W], got {type(images).__name__}")
    if images.dim() == 3 and images.shape[0] == 3:
        raise ValueError(f"images must be a batch [B, 3, H, W] (ImageNet-normalised RGB), got one "
                         f"image {tuple(images.shape)}; add the batch dimension with images[None]")
    if images.dim() != 4:
        raise ValueError(f"images must be [B, 3, H, W] (ImageNet-normalised RGB), got "
                         f"{images.dim()} dimensions {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (ImageNet-normalised RGB), got "
                         f"{images.shape[1]} in {tuple(images.shape)}; give a grayscale image "
                         "3 channels before normalising it, e.g. gray.expand(-1, 3, -1, -1)")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be float (ImageNet-normalised), got {images.dtype}; "
                        "convert with (images / 255 - mean) / std")
    return images


def _check_keep(keep: torch.Tensor, what: str = "keep mask") -> torch.Tensor:
    """A bool mask ``[B, 1, H, W]`` (``[B, H, W]`` is accepted and given a channel)."""
    if not isinstance(keep, torch.Tensor):
        raise TypeError(f"{what} must be a bool torch.Tensor [B, 1, H, W], got {type(keep).__name__}")
    if keep.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor, got {keep.dtype}; convert it "
                        "explicitly: a 0/1 mask with `mask.bool()`, scores with `mask > 0.5`")
    if keep.dim() == 3:
        keep = keep[:, None]
    if keep.dim() != 4 or keep.shape[1] != 1:
        raise ValueError(f"{what} must be [B, 1, H, W] or [B, H, W], got {tuple(keep.shape)}")
    return keep


def _check_size(size: int, what: str, allow_zero: bool = False) -> int:
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"{what} must be an int, got {size!r}")
    if allow_zero and size == 0:
        return 0
    if size < 1 or size % 2 == 0:
        raise ValueError(f"{what} must be an odd square kernel size >= 1 (a centred window"
                         f"{', or 0 for none' if allow_zero else ''}), got {size}")
    return size


def dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Dilate a bool mask ``[B, 1, H, W]`` with a centred ``size x size`` square (odd size;
    1 = unchanged). Pixels outside the image are not kept."""
    mask = _check_keep(mask, "mask")
    size = _check_size(size, "dilation")
    if size == 1:
        return mask
    # max pool pads with -inf, so the border never grows the mask
    out = F.max_pool2d(mask.to(torch.float32), size, stride=1, padding=size // 2)
    return out > 0


def _gray(images: torch.Tensor, grayscale: str) -> torch.Tensor:
    if grayscale == "luminance":
        w = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images * w).sum(1, keepdim=True)
    if grayscale == "mean":
        return images.mean(1, keepdim=True)
    raise ValueError(f"grayscale must be one of {', '.join(GRAYSCALES)}, got {grayscale!r}")


# ---------------------------------------------------------------------------------- edge
def edge(images: torch.Tensor, threshold: float = 0.15, dilation: int = 11,
         operator: str = "reference", grayscale: str = "luminance") -> torch.Tensor:
    """The paper's edge mask (Sec. 4.2): gradients of the grayscale of the ImageNet-normalised
    image against ``threshold`` (paper: 0.15 / 0.35 / 0.95), dilated with a square kernel of
    size ``dilation`` (paper: 11).

    ``operator``: ``"reference"`` (default; the reference code's signed central differences,
    with which the paper's thresholds were set) or ``"sobel"`` (Sobel magnitude), see
    :data:`EDGE_OPERATORS`. ``grayscale``: ``"luminance"`` (default, as the reference code) or
    ``"mean"``. Returns bool ``[B, 1, H, W]`` at image resolution. The reference code then
    reduces the mask to the finest grid with :func:`subsample`; a model given this mask uses
    the any-pixel rule, which keeps somewhat more cells (docs/masks.md).
    """
    images = _check_images(images)
    dilation = _check_size(dilation, "dilation")
    if not isinstance(threshold, numbers.Real) or isinstance(threshold, bool):
        raise TypeError(f"threshold must be a number, got {threshold!r}")
    threshold = float(threshold)  # numpy scalars too
    if not math.isfinite(threshold) or threshold < 0:
        # NaN would keep nothing, +-inf nothing / everything; below 0 keeps every pixel, as 0
        raise ValueError(f"threshold must be finite and >= 0, got {threshold!r}")
    # half precision would round the gradients before the threshold: the mask would depend on
    # how the image is stored (float32 and float64 keep their own precision)
    if images.dtype in (torch.float16, torch.bfloat16):
        images = images.float()
    g = _gray(images, grayscale)
    if operator == "reference":
        p = F.pad(g, (1, 1, 1, 1))  # zero padding, as the reference's conv with padding=1
        gx = p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]
        gy = p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]
        edges = (gx >= threshold) | (gy >= threshold)
    elif operator == "sobel":
        p = F.pad(g, (1, 1, 1, 1), mode="replicate")
        dx = p[:, :, :, 2:] - p[:, :, :, :-2]            # [B,1,H+2,W]
        dy = p[:, :, 2:, :] - p[:, :, :-2, :]            # [B,1,H,W+2]
        gx = dx[:, :, :-2] + 2 * dx[:, :, 1:-1] + dx[:, :, 2:]
        gy = dy[:, :, :, :-2] + 2 * dy[:, :, :, 1:-1] + dy[:, :, :, 2:]
        edges = (gx * gx + gy * gy).sqrt() >= threshold
    else:
        raise ValueError(f"operator must be one of {', '.join(EDGE_OPERATORS)}, got {operator!r}")
    return dilate(edges, dilation)


# ---------------------------------------------------------------------------------- oracle
def _labels(pred: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(pred, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(pred).__name__}")
    if pred.dtype.is_floating_point:
        if pred.dim() != 4:
            raise ValueError(f"{what}: float predictions must be logits [B, C, H, W], got "
                             f"{tuple(pred.shape)}")
        return pred.argmax(1)
    if pred.dtype == torch.bool or pred.dim() != 3:
        raise ValueError(f"{what} must be logits [B, C, H, W] or an integer label map [B, H, W], "
                         f"got {pred.dtype} {tuple(pred.shape)}")
    return pred


def oracle(pred_coarse: torch.Tensor, pred_fine: torch.Tensor, target: torch.Tensor,
           dilation: int, ignore_index: int = 255) -> torch.Tensor:
    """The oracle mask (Sec. 4.1): pixels misclassified at the coarse stride but classified
    correctly at the fine stride, dilated with a square of size ``dilation``.

    Predictions are logits ``[B, C, H, W]`` (argmax taken) or label maps ``[B, H, W]`` at the
    resolution of ``target`` ``[B, H, W]`` (integer class ids, ``ignore_index`` ignored).
    Returns bool ``[B, 1, H, W]``.
    """
    coarse = _labels(pred_coarse, "pred_coarse")
    fine = _labels(pred_fine, "pred_fine")
    if not isinstance(target, torch.Tensor) or target.dim() != 3 or target.dtype.is_floating_point \
            or target.dtype == torch.bool:
        raise ValueError("target must be an integer label map [B, H, W]")
    for name, p in (("pred_coarse", coarse), ("pred_fine", fine)):
        if p.shape != target.shape:
            raise ValueError(
                f"{name} has size {tuple(p.shape)}, target {tuple(target.shape)}: upsample the "
                "logits to the target size first, e.g. F.interpolate(logits, size=target.shape"
                "[-2:], mode='bilinear', align_corners=False)")
    wrong_then_right = (coarse != target) & (fine == target) & (target != ignore_index)
    return dilate(wrong_then_right[:, None], _check_size(dilation, "dilation"))


# ---------------------------------------------------------------------------------- keypoints
def _points_list(points) -> list[torch.Tensor]:
    if isinstance(points, torch.Tensor) and points.dim() == 2:
        points = [points]
    if isinstance(points, torch.Tensor) and points.dim() == 3:
        points = list(points)
    if not isinstance(points, (list, tuple)):
        raise TypeError("points must be a list (one entry per image) of [N, 2] (x, y) "
                        f"coordinates, got {type(points).__name__}")
    out = []
    for i, p in enumerate(points):
        p = torch.as_tensor(p)
        if p.numel() == 0:
            p = p.reshape(0, 2)
        if p.dim() != 2 or p.shape[1] != 2:
            raise ValueError(f"points of image {i} must be [N, 2] (x, y), got {tuple(p.shape)}")
        out.append(p)
    return out


def keypoints(points, image_size: Sequence[int], dilations: Sequence[int],
              device=None) -> list[torch.Tensor]:
    """Per-level masks from keypoints (Sec. 4.3): one square dilation per adaptive step.

    ``points``: per image an ``[N, 2]`` array of ``(x, y)`` pixel coordinates (OpenCV
    convention: pixel centres at integers; rounded to the nearest pixel, ties to even). ``dilations``: one
    odd size per level, finest first (the paper's triples, e.g. ``(11, 19, 35)``); ``0`` leaves
    that level unconstrained. Mask ``l`` marks what must stay at level ``<= l``. Returns a list
    of ``len(dilations)`` bool masks ``[B, 1, H, W]``.
    """
    H, W = (int(v) for v in image_size)
    pts = _points_list(points)
    if len(dilations) == 0:
        raise ValueError("dilations must name one size per adaptive step (finest first)")
    sizes = [_check_size(d, f"dilations[{i}]", allow_zero=True) for i, d in enumerate(dilations)]
    B = len(pts)
    if device is None:
        device = pts[0].device if B and isinstance(pts[0], torch.Tensor) else "cpu"
    seeds = torch.zeros(B, 1, H, W, dtype=torch.bool, device=device)
    counts = torch.tensor([p.shape[0] for p in pts], device=device)
    if int(counts.sum()):
        xy = torch.cat([p.to(device=device, dtype=torch.float64) for p in pts])
        xi = torch.round(xy[:, 0]).to(torch.int64)
        yi = torch.round(xy[:, 1]).to(torch.int64)
        outside = (xi < 0) | (xi >= W) | (yi < 0) | (yi >= H)
        if bool(outside.any()):
            j = int(outside.nonzero()[0])
            raise ValueError(f"keypoint ({float(xy[j, 0])}, {float(xy[j, 1])}) lies outside the "
                             f"{H}x{W} image; points are (x, y) pixel coordinates")
        b = torch.repeat_interleave(torch.arange(B, device=device), counts)
        seeds[b, 0, yi, xi] = True
    return [dilate(seeds, s) if s else torch.zeros_like(seeds) for s in sizes]


def sift_points(gray, num_points: int = 512):
    """The ``num_points`` strongest distinct SIFT keypoints of a grey ``uint8`` image ``[h, w]``
    (numpy), as the paper selects them (following Uzpak et al., 3DV 2020): OpenCV's SIFT with
    default parameters, strongest response first, positions rounded to whole pixels (Python's
    ``round``: halves to even), de-duplicated on the rounded ``(y, x)``, the first
    ``num_points`` kept. Returns ``xy`` int64 ``[N, 2]`` (x, y) and ``responses`` float32
    ``[N]``, strongest first (ties keep OpenCV's order); points never lie outside the image.
    Needs OpenCV: ``pip install 'cad-spconv[sift]'``."""
    import numpy as np
    try:
        import cv2
    except ImportError as e:  # optional dependency
        raise ImportError("SIFT needs OpenCV: pip install 'cad-spconv[sift]' "
                          "(opencv-python-headless)") from e
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 1:
        raise ValueError(f"num_points must be an int >= 1, got {num_points!r}")
    h, w = gray.shape
    xy, responses, seen = [], [], set()
    for kp in sorted(cv2.SIFT_create().detect(gray, None), key=lambda k: k.response,
                     reverse=True):  # stable for ties
        x = min(max(round(kp.pt[0]), 0), w - 1)
        y = min(max(round(kp.pt[1]), 0), h - 1)
        if (y, x) in seen:
            continue
        seen.add((y, x))
        xy.append((x, y))
        responses.append(kp.response)
        if len(xy) == num_points:
            break
    return (np.array(xy, dtype=np.int64).reshape(-1, 2),
            np.array(responses, dtype=np.float32))


def require_opencv(what: str):
    """The ``cv2`` module, or an ImportError saying that ``what`` needs OpenCV and how to get
    it (an optional dependency: the ``sift`` extra)."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"{what} needs OpenCV (SIFT keypoints): pip install "
                          "'cad-spconv[sift]' (opencv-python-headless)") from e
    return cv2


def sift_keypoints(images: torch.Tensor, num_points: int = 512) -> list[torch.Tensor]:
    """:func:`sift_points` of every image of an ImageNet-normalised batch ``[B, 3, H, W]``
    (grey: OpenCV's luminance of the RGB image): ``(x, y)`` float64 ``[N, 2]`` per image."""
    images = _check_images(images)
    cv2 = require_opencv("sift_keypoints")
    rgb = (denormalize(images.detach()) * 255).round().to(torch.uint8)
    out = []
    for img in rgb.permute(0, 2, 3, 1).cpu().numpy():  # one OpenCV call per image
        xy, _ = sift_points(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), num_points)
        out.append(torch.from_numpy(xy).to(torch.float64))
    return out


# ---------------------------------------------------------------------------------- ablation
def _positive_int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be an int >= 1, got {v!r}")
    return v


def _size_pair(size, what: str) -> tuple[int, int]:
    """``(H, W)``: two positive ints (torch.Size, tuple or list)."""
    if (not isinstance(size, (tuple, list, torch.Size)) or len(size) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1
                   for v in size)):
        raise ValueError(f"{what} must be (H, W), two positive ints, got {size!r}")
    return int(size[0]), int(size[1])


def _finest_grid(image_size: Sequence[int], finest_stride: int, grid) -> tuple[int, int]:
    """The model's finest grid: ``grid`` if given, else ``ceil(size / finest_stride)``."""
    H, W = _size_pair(image_size, "image_size")
    if grid is None:
        return -(-H // finest_stride), -(-W // finest_stride)
    gh, gw = _size_pair(grid, "grid")
    if not (H // finest_stride <= gh <= -(-H // finest_stride)
            and W // finest_stride <= gw <= -(-W // finest_stride)):
        raise ValueError(f"grid {gh}x{gw} is not the finest grid of a {H}x{W} image at stride "
                         f"{finest_stride} (floor or ceil of size / stride)")
    return gh, gw


def _to_pixels(cells: torch.Tensor, finest_stride: int, size: Sequence[int]) -> torch.Tensor:
    """Cells ``[B, h, w]`` of the finest grid -> bool ``[B, 1, H, W]``, every cell covering its
    ``finest_stride``-pixel square (pixels past the grid, dropped by floor-mode pools: False)."""
    H, W = (int(v) for v in size)
    out = cells[:, None].repeat_interleave(finest_stride, -2).repeat_interleave(finest_stride, -1)
    out = out[..., :H, :W]
    if out.shape[-2:] != (H, W):
        out = F.pad(out, (0, W - out.shape[-1], 0, H - out.shape[-2]))
    return out


def _expand(cells: torch.Tensor, cell: int, size: Sequence[int]) -> torch.Tensor:
    out = cells.repeat_interleave(cell, -2).repeat_interleave(cell, -1)
    return out[..., : int(size[0]), : int(size[1])]


def _clipped(start: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """Side of the blocks ``[start, start + size)`` clipped to ``[0, extent)``."""
    return (extent - start).clamp(0, size)


def _permute_within(groups: torch.Tensor, batch: int, generator) -> torch.Tensor:
    """Per batch row a uniformly random permutation of the last axis of ``groups``
    (``[..., n]`` int, shared by the batch) that maps every entry to one of the same group:
    ``[batch, ..., n]``, entry ``i`` = the index whose content moves to ``i``."""
    n = groups.shape[-1]
    g = groups.to(torch.float64)
    rand = torch.rand((batch,) + tuple(groups.shape), generator=generator,
                      dtype=torch.float64).to(groups.device)
    # sorted by group then at random / then by index: the k-th of both orders share a group
    order_rand = torch.argsort(2 * g + rand, dim=-1)
    index = torch.arange(n, device=groups.device, dtype=torch.float64) / n
    order_id = torch.argsort(2 * g + index, dim=-1).expand_as(order_rand)
    return torch.empty_like(order_rand).scatter_(-1, order_id, order_rand)


def _shuffle_levels(levels: torch.Tensor, num_levels: int, generator) -> torch.Tensor:
    """A random quadtree with the blocks of ``levels`` ``[B, H, W]`` moved (see
    :func:`shuffle_plan`): top-level blocks permuted among blocks of the same clipped shape,
    then at every level below the four children of each block permuted among children of the
    same clipped shape. Returns the new level map."""
    B, H, W = levels.shape
    dev = levels.device
    L = num_levels
    S = 2 ** L
    ys = torch.arange(H, device=dev)
    xs = torch.arange(W, device=dev)
    # top level: blocks of side S, one class per clipped shape
    nby, nbx = -(-H // S), -(-W // S)
    bh = _clipped(torch.arange(nby, device=dev) * S, S, H)
    bw = _clipped(torch.arange(nbx, device=dev) * S, S, W)
    shape = (bh[:, None] * (S + 1) + bw[None, :]).reshape(-1)
    src = _permute_within(shape, B, generator)                     # [B, nby * nbx]
    block = (ys // S)[:, None] * nbx + (xs // S)[None, :]           # [H, W]
    src_block = src[:, block]                                       # [B, H, W]
    sy = (src_block // nbx) * S + (ys & 1)[None, :, None]
    sx = (src_block % nbx) * S + (xs & 1)[None, None, :]
    # levels L-1 .. 1: the children (side c) of every block of side 2c, keyed by the
    # destination block; level 0 needs none (a 2x2 block's cells always share their level)
    for s in range(L - 1, 0, -1):
        c = 2 ** s
        nny, nnx = -(-H // (2 * c)), -(-W // (2 * c))
        top = torch.arange(nny, device=dev) * 2 * c
        left = torch.arange(nnx, device=dev) * 2 * c
        ch = torch.stack([_clipped(top, c, H), _clipped(top + c, c, H)], -1)   # [nny, 2]
        cw = torch.stack([_clipped(left, c, W), _clipped(left + c, c, W)], -1)  # [nnx, 2]
        groups = (ch[:, None, :, None] * (c + 1) + cw[None, :, None, :]).reshape(nny, nnx, 4)
        tau = _permute_within(groups, B, generator)                  # [B, nny, nnx, 4]
        child = ((ys >> s) & 1)[:, None] * 2 + ((xs >> s) & 1)[None, :]
        moved = tau[:, (ys // (2 * c))[:, None], (xs // (2 * c))[None, :], child]  # [B, H, W]
        sy = sy + ((moved >> 1) & 1) * c
        sx = sx + (moved & 1) * c
    b = torch.arange(B, device=dev)[:, None, None]
    return levels[b, sy, sx]


def shuffle_plan(plan: LevelPlan, generator: Optional[torch.Generator] = None) -> LevelPlan:
    """The blocks of ``plan`` at random places, with exactly its budget.

    Per image, the top-level blocks (``2**L`` finest cells a side, clipped at the border) are
    permuted at random among the blocks of the same clipped shape, each carrying its whole
    subtree; then, at every level below, the four children of every block are permuted among
    the children of the same clipped shape. On grids whose sides are multiples of ``2**L``
    every top-level block has the same shape and may go anywhere.

    Guarantee (per image, exact): the new plan has as many sites of every level *and clipped
    block shape* as ``plan``, hence the same :meth:`LevelPlan.level_fractions`, the same number
    of sites at every step and the same multiply-adds in every layer of a converted model. A
    plan that one keep mask can produce (every split block holds a level-0 cell) gives such a
    plan again. Uses the CPU ``generator`` (default: torch's global one)."""
    if not isinstance(plan, LevelPlan):
        raise TypeError(f"shuffle_plan takes a LevelPlan, got {type(plan).__name__}; for masks "
                        "use random_like(keep, finest_stride, num_levels)")
    levels = _shuffle_levels(plan.levels, plan.num_levels, generator)
    return LevelPlan(levels, plan.num_levels, plan.semantics, validate=False)


def random(batch_size: int, image_size: Sequence[int], fraction: float, finest_stride: int,
           generator: Optional[torch.Generator] = None, device=None,
           grid: Optional[Sequence[int]] = None) -> torch.Tensor:
    """A random keep mask whose level-0 share is ``fraction``, for the "inadequate mask"
    ablation.

    A keep mask decides level 0 per aligned 2x2 block of the finest grid (a block stays at the
    finest resolution iff it holds a kept cell, whatever the number of levels), so the draw is
    over those blocks: per image and per clipped block shape (interior ``2x2``; ``2x1``,
    ``1x2``, ``1x1`` along a right / bottom border of odd size) exactly
    ``floor(fraction * n + 1/2)`` of the ``n`` blocks of that shape, uniformly at random; all
    their cells are kept. The level-0 share of every image's plan (``level_fractions()[:, 0]``,
    the multiply-adds at the finest resolution) is therefore ``fraction`` up to half a block per
    shape (exactly ``k / n`` blocks on grids with even sides); with ``L >= 2`` levels the
    coarser levels follow from the keep rule. ``finest_stride``: the model's finest stride
    (pixels per finest-grid cell; ``1`` for a mask at the finest grid); ``grid``: the model's
    finest grid if it is not ``ceil(size / finest_stride)`` (VGG stacks with floor-mode pools
    on sizes not divisible by the stride). Returns bool ``[B, 1, H, W]`` at ``image_size``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) \
            or not 0.0 <= float(fraction) <= 1.0:
        raise ValueError(f"fraction (the level-0 share) must be a number in [0, 1], got "
                         f"{fraction!r}")
    batch_size = _nonnegative(batch_size, "batch_size")
    finest_stride = _positive_int(finest_stride, "finest_stride")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__} "
                        "(a seed: torch.Generator().manual_seed(seed))")
    H, W = _finest_grid(image_size, finest_stride, grid)
    nby, nbx = -(-H // 2), -(-W // 2)
    bh = _clipped(torch.arange(nby) * 2, 2, H)
    bw = _clipped(torch.arange(nbx) * 2, 2, W)
    shape = (bh[:, None] * 3 + bw[None, :]).reshape(-1)             # [n] one id per block shape
    n = shape.numel()
    # a uniformly random order of the blocks within every shape class; the first
    # floor(fraction * n_c + 1/2) blocks of each class are kept
    rand = torch.rand(batch_size, n, generator=generator, dtype=torch.float64)
    order = torch.argsort(2 * shape.to(torch.float64) + rand, dim=1)
    position = torch.empty_like(order).scatter_(
        1, order, torch.arange(n).expand(batch_size, n).contiguous())
    per_class = torch.bincount(shape, minlength=9)
    start = (torch.cumsum(per_class, 0) - per_class)[shape]        # blocks of smaller classes
    count = per_class[shape]
    quota = torch.floor(float(fraction) * count.to(torch.float64) + 0.5).to(torch.int64)
    kept_blocks = (position - start) < quota
    cells = kept_blocks.view(batch_size, nby, nbx)
    cells = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)[:, :H, :W]
    return _to_pixels(cells, finest_stride, image_size).to("cpu" if device is None else device)


def _nonnegative(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    return v


def random_like(keep: Union[torch.Tensor, MaskList], finest_stride: int, num_levels: int,
                generator: Optional[torch.Generator] = None,
                grid: Optional[Sequence[int]] = None):
    """``keep``'s budget at random places: the quadtree a model builds from ``keep``, its
    blocks shuffled (:func:`shuffle_plan`), returned as a mask of the same form.

    ``keep``: a bool keep mask ``[B, 1, H, W]`` / ``[B, H, W]``, or a list of per-level masks
    (finest first), at image resolution (``finest_stride`` = the model's finest stride) or at
    the finest grid (``finest_stride=1``); ``num_levels``: the model's adaptive steps ``L``;
    ``grid``: the model's finest grid if it is not ``ceil(size / finest_stride)``.

    Guarantee (per image, exact): the plan the model builds from the result has as many sites
    of every level and clipped block shape as the plan it builds from ``keep``, hence exactly
    the same ``level_fractions()``, the same number of sites at every step and the same
    multiply-adds. Blocks clipped at a border of odd size only trade places with blocks of the
    same clipped shape (that is what "same budget" means there). Returns a bool ``[B, 1, H,
    W]`` mask for a mask (kept cells = the level-0 cells of the shuffled plan, expanded to
    ``finest_stride`` pixels), a list of ``L`` masks (mask ``l``: level ``<= l``) for a list.
    """
    finest_stride = _positive_int(finest_stride, "finest_stride")
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels (the model's adaptive steps L) must be an int >= 1, got "
                         f"{num_levels!r}")
    single = isinstance(keep, torch.Tensor)
    given = [keep] if single else list(keep) if isinstance(keep, (list, tuple)) else None
    if not given:
        raise TypeError("random_like needs a bool keep mask or a non-empty list of per-level "
                        f"masks, got {type(keep).__name__ if given is None else 'an empty list'}")
    given = [_check_keep(m, f"mask {i}") for i, m in enumerate(given)]
    size = tuple(given[0].shape[-2:])
    for i, m in enumerate(given[1:], 1):
        if m.shape != given[0].shape:
            raise ValueError(f"mask {i} has shape {tuple(m.shape)}, mask 0 {tuple(given[0].shape)}")
    cells = _finest_grid(size, finest_stride, grid)
    reduced = [reduce_to_grid(m, cells, f"mask {i}", stride=finest_stride)
               for i, m in enumerate(given)]
    plan = LevelPlan.from_level_masks(reduced, cells, num_levels)
    levels = _shuffle_levels(plan.levels, num_levels, generator)
    if single:
        return _to_pixels(levels == 0, finest_stride, size)
    return [_to_pixels(levels <= l, finest_stride, size) for l in range(num_levels)]


def invert(keep: Union[torch.Tensor, MaskList], finest_stride: int = 1,
           grid: Optional[Sequence[int]] = None):
    """The "unreasonable" mask: keep what was downsampled and vice versa.

    For one mask: its complement. For a per-level list ``m_0 <= ... <= m_{L-1}`` (mask ``l`` =
    level ``<= l``): ``[~m_{L-1}, ..., ~m_0]``, so a cell whose finest allowed level was ``r``
    gets ``L - r`` (far from keypoints becomes finest, keypoints coarsest).

    The complement is taken on the model's finest grid: ``finest_stride`` (pixels per finest
    cell; ``1``: the mask is at the grid) and ``grid`` (the finest grid if it is not ``ceil(size
    / finest_stride)``). A cell is kept if any of its pixels is, so complementing pixels would
    keep every cell holding both kinds under the mask and its inverse alike; instead each mask
    is reduced to the grid, complemented there and returned at its own size, every cell
    covering its pixels (pixels past the grid: False).
    """
    finest_stride = _positive_int(finest_stride, "finest_stride")
    single = isinstance(keep, torch.Tensor)
    masks = [_check_keep(keep)] if single else [_check_keep(m, f"mask {i}")
                                                 for i, m in enumerate(keep)]
    if not masks:
        raise ValueError("invert needs a mask or a non-empty list of masks")

    def complement(m):
        if finest_stride == 1 and grid is None:
            return ~m
        size = m.shape[-2:]
        cells = _finest_grid(size, finest_stride, grid)
        return _to_pixels(~reduce_to_grid(m, cells, stride=finest_stride), finest_stride, size)

    inverted = [complement(m) for m in reversed(masks)]
    return inverted[0] if single else inverted


# ---------------------------------------------------------------------------------- reduction
def subsample(keep: torch.Tensor, stride: int) -> torch.Tensor:
    """The reference code's reduction onto a grid of stride ``stride``: every ``stride``-th
    pixel, ``keep[..., ::stride, ::stride]`` (size ``ceil(H / stride)``). (Its published edge
    model keeps whole 4x4 blocks of these cells: :func:`reference_blocks`.)"""
    keep = _check_keep(keep)
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}")
    return keep[:, :, ::stride, ::stride]


def reference_blocks(keep: torch.Tensor, stride: int = 8, block: int = 4) -> torch.Tensor:
    """The reference code's ``edges_os16till8`` rule (its published edge model, 8 -> 16): the
    image-resolution mask is subsampled at ``stride`` (:func:`subsample`), then every aligned
    ``block x block`` group of cells (4x4 stride-8 cells = 32x32 pixels; clipped at the border)
    in which any cell is kept is kept whole. Returns bool ``[B, 1, ceil(H/stride),
    ceil(W/stride)]``, a keep mask at the finest grid of a model with that finest stride."""
    cells = subsample(keep, stride)
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    grown = F.max_pool2d(cells.to(torch.float32), block, block, ceil_mode=True) > 0
    return _expand(grown, block, cells.shape[-2:])


def kept_fraction(keep: torch.Tensor, stride: int, sample_stride: Optional[int] = None
                  ) -> torch.Tensor:
    """Fraction of the cells of stride ``stride`` (``stride x stride`` pixels, clipped at the
    border) that contain a kept pixel, per image: float64 ``[B]``. ``keep`` is at image
    resolution. With ``sample_stride`` (the finest stride ``f``) the mask is first reduced as the
    reference code does (:func:`subsample`), then a cell counts if any of its samples is kept."""
    keep = _check_keep(keep)
    stride = _positive_int(stride, "stride")
    if sample_stride is not None:
        sample_stride = _positive_int(sample_stride, "sample_stride")
        if stride % sample_stride:
            raise ValueError(f"stride {stride} must be a multiple of sample_stride {sample_stride}")
        keep = subsample(keep, sample_stride)
        stride //= sample_stride
    cells = F.max_pool2d(keep.to(torch.float32), stride, stride, ceil_mode=True) > 0
    return cells.flatten(1).to(torch.float64).mean(1)
