"""Level plans: which finest-grid cells are merged into coarser sites.

A :class:`LevelPlan` stores, for every finest-grid cell of every image, the final level of the
site that owns it (a quadtree, see ``SEMANTICS.md``). From it follow, per step ``t``, the
active sites (raster order), the owner map (cell -> site index) and the area each site owns.
Everything is computed with vectorized tensor ops on the plan's device and cached on the plan.
"""
from __future__ import annotations

from dataclasses import KW_ONLY, InitVar, dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["LevelPlan", "StepGeometry", "make_plan", "reduce_to_grid", "same_device",
           "num_adaptive_steps", "SEMANTICS"]

#: tap-anchor conventions of coarse sites (see :class:`LevelPlan`)
SEMANTICS = ("paper", "reference")


@dataclass(frozen=True)
class StepGeometry:
    """Sites of one step of a plan.

    coords:  ``[N, 3]`` int64 (batch, y, x) of the active sites in raster order.
    owner:   ``[B, H, W]`` int64, index into ``coords`` of the site owning each cell.
    area:    ``[N]`` int64, cells owned by each site (blocks clipped at the border).
    indices: ``coords`` as int32, spconv's index format.
    """

    coords: torch.Tensor
    owner: torch.Tensor
    area: torch.Tensor
    indices: torch.Tensor

    @property
    def num_sites(self) -> int:
        return self.coords.shape[0]


def _block_any(x: torch.Tensor, size: int) -> torch.Tensor:
    """Per aligned ``size x size`` block (clipped at the border): any cell true. ``[B,H,W]``."""
    pooled = F.max_pool2d(x[:, None].to(torch.float32), size, size, ceil_mode=True)[:, 0]
    return pooled > 0


def _expand_blocks(x: torch.Tensor, size: int, shape: Sequence[int]) -> torch.Tensor:
    """Broadcast a per-block map back onto the cells it covers."""
    return x.repeat_interleave(size, 1).repeat_interleave(size, 2)[:, : shape[0], : shape[1]]


#: what every refusal of a non-bool keep mask says (integer masks are never read as level maps)
_BOOL_FIX = ("Convert it explicitly: a 0/1 mask with `mask.bool()`, scores or probabilities with "
             "`mask > 0.5`; a level map (the level 0..L of every finest-grid cell) is given as "
             "`LevelPlan.from_level_map(level_map, num_levels)`")


def _check_mask(mask: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{what} must be a bool tensor (True = keep at the finest resolution), got "
                        f"{mask.dtype}. {_BOOL_FIX}")
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise ValueError(f"{what} must be [B, 1, h, w] or [B, h, w], got {tuple(mask.shape)}")
        mask = mask[:, 0]
    if mask.dim() != 3:
        raise ValueError(f"{what} must be [B, 1, h, w] or [B, h, w], got {tuple(mask.shape)}")
    return mask


def reduce_to_grid(mask: torch.Tensor, grid: Sequence[int], what: str = "keep mask",
                   stride: int | None = None) -> torch.Tensor:
    """Reduce a bool mask ``[B, h, w]`` (or ``[B, 1, h, w]``) onto the finest grid ``(H, W)``.

    A cell is kept if any pixel of its footprint ``[i*s, (i+1)*s)`` is kept. ``stride`` gives
    the scale ``s`` (a model knows it: its finest stride); the grid may then be the ceil size
    (strided convs, blocks clipped at the border) or the floor size (floor-mode pools, whose
    dropped pixels are ignored). Without ``stride`` the scale is inferred from the sizes: the
    one power of two that fits either way, else the one integer with ``ceil(h/s) == H`` and
    ``ceil(w/s) == W``; an ambiguous size (two scales fit, e.g. 17x17 onto 2x2: 16 by ceil, 8 by
    floor) is an error asking for ``stride``.
    """
    mask = _check_mask(mask, what)
    H, W = int(grid[0]), int(grid[1])
    h, w = mask.shape[-2:]
    if (h, w) == (H, W):
        return mask
    if stride is None:
        stride = _infer_scale(h, w, H, W, what)
    s = int(stride)
    fits = all(n in (-(-m // s), m // s) for n, m in ((H, h), (W, w)))
    if s < 1 or not fits:
        raise ValueError(f"{what} of size {h}x{w} does not map onto the finest grid {H}x{W} at "
                         f"stride {s}: give it at the finest grid or at image resolution")
    return _block_any(mask[:, : H * s, : W * s], s)


def _infer_scale(h: int, w: int, H: int, W: int, what: str) -> int:
    def ceil_fits(s):
        return -(-h // s) == H and -(-w // s) == W

    def floor_fits(s):
        return h // s == H and w // s == W

    def cells(s):  # where each cell's footprint ends, per axis: what a scale decides
        return tuple(tuple(min(i * s, m) for i in range(1, n + 1)) for n, m in ((H, h), (W, w)))

    powers = [2 ** i for i in range(max(h, w).bit_length() + 1)]
    # a strided conv gives the ceil size, a floor-mode pool the floor size: with a small grid
    # both can fit, at different scales (17x17 onto 2x2: 16 by ceil, 8 by floor); scales that
    # cut the same footprints (any s >= 8 for 8x8 onto 1x1) are one
    scales = [s for s in powers if ceil_fits(s) or floor_fits(s)]
    if scales and len({cells(s) for s in scales}) == 1:
        return scales[0]
    if not scales:
        scales = [s for s in range(1, h + 1) if ceil_fits(s)]
        if len(scales) == 1:
            return scales[0]
    raise ValueError(
        f"{what} of size {h}x{w} does not map onto the finest grid {H}x{W} by one scale s "
        f"(ceil(h/s) == {H}, ceil(w/s) == {W}, or floor for floor-mode pools"
        + (f"; candidates {', '.join(map(str, scales))}" if scales else "")
        + "): give it at the finest grid, or pass the stride explicitly")


def _check_level_values(levels: torch.Tensor, num_levels: int) -> None:
    """Values in ``0..num_levels`` and block-consistent: every level-``s`` site fills its whole
    aligned ``2**s`` block (clipped at the grid's border)."""
    lo, hi = (int(levels.min()), int(levels.max())) if levels.numel() else (0, 0)
    if lo < 0 or hi > num_levels:
        raise ValueError(f"level map values must lie in 0..{num_levels}, got {lo}..{hi}")
    for s in range(1, num_levels + 1):
        is_s = levels == s
        bad = _block_any(is_s, 2 ** s) & _block_any(~is_s, 2 ** s)
        if bool(bad.any()):
            b, by, bx = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"level map is not block-consistent: image {b}, block at ({by * 2 ** s}, "
                f"{bx * 2 ** s}) of size {2 ** s} mixes level {s} with other levels; a level-{s} "
                f"site must fill its whole aligned {2 ** s}x{2 ** s} block")


@dataclass(eq=False)
class LevelPlan:
    """Final level of every finest-grid cell's owner site, for a batch of images.

    levels: ``[B, H, W]`` int64 in ``0..num_levels``, block-consistent (a level-``l`` site sits
    at multiples of ``2**l`` and all cells of its clipped ``2**l`` block carry level ``l``).
    Build it with :meth:`from_keep`, :meth:`from_level_masks`, :meth:`from_level_map` or
    :func:`make_plan`. Built directly, ``LevelPlan(levels, num_levels)`` checks the values as
    :meth:`from_level_map` does (reading them: a GPU sync); ``validate=False`` skips that for
    levels known to be valid (another plan's).

    semantics: where a coarse site measures its taps from (``SEMANTICS.md``): ``"paper"``
    (default: its top-left cell, which keeps Guarantee 2) or ``"reference"`` (the paper's public
    code: the centre cell ``2**l // 2`` of its block, to reproduce its published models). The
    sites and their owners are the same; only conv rulebooks differ (:meth:`with_semantics`).
    """

    levels: torch.Tensor
    num_levels: int
    semantics: str = "paper"
    _: KW_ONLY
    validate: InitVar[bool] = True

    def __post_init__(self, validate: bool):
        _check_levels(self.num_levels)
        if (not isinstance(self.levels, torch.Tensor) or self.levels.dtype != torch.int64
                or self.levels.dim() != 3):
            raise TypeError("LevelPlan needs int64 levels [B, H, W]; build plans with "
                            "LevelPlan.from_keep / from_level_masks / from_level_map or make_plan")
        if self.semantics not in SEMANTICS:
            raise ValueError(f"semantics must be one of {', '.join(map(repr, SEMANTICS))}, got "
                             f"{self.semantics!r}")
        if validate:  # the constructors below pass False: their levels are valid by making
            _check_level_values(self.levels, self.num_levels)
        self._geometry: dict[int, StepGeometry] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_keep(cls, keep: torch.Tensor, grid: Sequence[int], num_levels: int) -> "LevelPlan":
        """One keep mask per image: kept cells stay at level 0, blocks of ``2**s`` without a
        kept cell merge (the coarsest such block wins), giving a quadtree."""
        keep = reduce_to_grid(keep, grid)
        return cls.from_level_masks([keep], grid, num_levels)

    @classmethod
    def from_level_masks(cls, masks: Sequence[torch.Tensor], grid: Sequence[int],
                         num_levels: int) -> "LevelPlan":
        """Per-level masks, finest first: mask ``l`` marks cells that must be at level ``<= l``.
        Fewer than ``num_levels`` masks leave the missing levels unconstrained."""
        _check_levels(num_levels)
        if len(masks) == 0 or len(masks) > num_levels:
            raise ValueError(f"expected 1..{num_levels} per-level masks (one per adaptive step, "
                             f"finest first), got {len(masks)}")
        grid = (int(grid[0]), int(grid[1]))
        reduced = [reduce_to_grid(m, grid, f"level mask {i}") for i, m in enumerate(masks)]
        first = reduced[0]
        for i, m in enumerate(reduced[1:], 1):
            if m.shape[0] != first.shape[0]:
                raise ValueError(f"level mask {i} has batch size {m.shape[0]}, mask 0 has {first.shape[0]}")
            if m.device != first.device:
                raise ValueError(f"level mask {i} is on {m.device}, mask 0 on {first.device}")
        forbidden = torch.zeros_like(first)
        levels = torch.zeros(first.shape, dtype=torch.int64, device=first.device)
        for s in range(1, num_levels + 1):
            if s - 1 < len(reduced):
                forbidden = forbidden | reduced[s - 1]
            merge = ~_expand_blocks(_block_any(forbidden, 2 ** s), 2 ** s, grid)
            levels += merge.to(torch.int64)  # merges are nested, so the count is the level
        return cls(levels, num_levels, validate=False)

    @classmethod
    def from_level_map(cls, level_map: torch.Tensor, num_levels: int) -> "LevelPlan":
        """An explicit level map ``[B, H, W]`` (or ``[B, 1, H, W]``) of integers at the finest
        grid: the final level ``0..num_levels`` of the site owning every cell, block-consistent.
        This is the only way a level map enters (converted models and :func:`make_plan` take
        the :class:`LevelPlan`); integer tensors given as ``keep`` are refused, never read as
        level maps."""
        _check_levels(num_levels)
        if not isinstance(level_map, torch.Tensor):
            raise TypeError(f"level map must be a torch.Tensor, got {type(level_map).__name__}")
        if level_map.dtype.is_floating_point or level_map.dtype == torch.bool or level_map.is_complex():
            raise TypeError(f"level map must be an integer tensor, got {level_map.dtype}")
        if level_map.dim() == 4 and level_map.shape[1] == 1:
            level_map = level_map[:, 0]
        if level_map.dim() != 3:
            raise ValueError(f"level map must be [B, H, W] or [B, 1, H, W], got {tuple(level_map.shape)}")
        levels = level_map.to(torch.int64)
        return cls(levels, num_levels)

    def merge_maps(self) -> list[torch.Tensor]:
        """The plan in quadtree form, what :meth:`from_merge_maps` rebuilds it from: per
        adaptive step ``s = 1..L`` a bool ``[B, ceil(H / 2**s), ceil(W / 2**s)]``, one entry per
        aligned ``2**s`` block, true where the block merged (its cells are at level ``>= s``).
        About ``1 / 3`` byte per finest cell instead of the level map's 8."""
        # block-consistency: a block at level >= s has that level in every cell, so its top-left
        # cell stands for it
        return [self.levels[:, :: 2 ** s, :: 2 ** s] >= s for s in range(1, self.num_levels + 1)]

    @classmethod
    def from_merge_maps(cls, merge_maps: Sequence[torch.Tensor], grid: Sequence[int],
                        semantics: str = "paper") -> "LevelPlan":
        """The plan whose :meth:`merge_maps` these are, on a finest grid of ``grid`` cells
        (checked as :meth:`from_level_map` checks a level map: a block merged at step ``s + 1``
        must be merged at ``s`` too)."""
        _check_levels(len(merge_maps))
        grid = (int(grid[0]), int(grid[1]))
        levels = None
        batch = merge_maps[0].shape[0] if isinstance(merge_maps[0], torch.Tensor) else None
        for s, merged in enumerate(merge_maps, 1):
            want = (-(-grid[0] // 2 ** s), -(-grid[1] // 2 ** s))
            if (not isinstance(merged, torch.Tensor) or merged.dtype != torch.bool
                    or merged.dim() != 3 or tuple(merged.shape[1:]) != want
                    or merged.shape[0] != batch):
                got = (f"{merged.dtype} {tuple(merged.shape)}" if isinstance(merged, torch.Tensor)
                       else type(merged).__name__)
                raise ValueError(f"merge map of step {s} must be a bool [B, {want[0]}, {want[1]}] "
                                 f"tensor for a {grid[0]}x{grid[1]} grid (B as in step 1's), got "
                                 f"{got}; LevelPlan.merge_maps() makes them")
            cells = _expand_blocks(merged, 2 ** s, grid).to(torch.int64)
            levels = cells if levels is None else levels + cells
        return cls.from_level_map(levels, len(merge_maps)).with_semantics(semantics)

    # ------------------------------------------------------------------ properties
    @property
    def batch_size(self) -> int:
        return self.levels.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.levels.shape[1]), int(self.levels.shape[2])

    @property
    def device(self) -> torch.device:
        return self.levels.device

    @property
    def level_range(self) -> tuple[int, int]:
        """The lowest and highest final level of any cell of the batch (cached)."""
        low_high = self.__dict__.get("_level_range")
        if low_high is None:
            low_high = ((int(self.levels.min()), int(self.levels.max())) if self.levels.numel()
                        else (self.num_levels, self.num_levels))
            self.__dict__["_level_range"] = low_high
        return low_high

    def grid_level(self, step: int) -> Optional[int]:
        """``c`` where the sites of ``step`` are all the cells of one grid of ``2**c`` cells
        (every image, in raster order: a feature matrix there is the NHWC map of that grid),
        else ``None``. That holds up to step ``min level`` (``c = step``: nothing kept up to
        here) and at every step when all cells share one level (``c = min(level, step)``:
        everything kept, for instance)."""
        known = self.__dict__.setdefault("_grid_level", {})  # asked by every conv and densify
        if step not in known:
            self._check_step(step)
            low, high = self.level_range
            known[step] = min(low, step) if low >= step or low == high else None
        return known[step]

    def to(self, device) -> "LevelPlan":
        device = torch.device(device)
        if device == self.device:
            return self
        return LevelPlan(self.levels.to(device), self.num_levels, self.semantics, validate=False)

    def with_semantics(self, semantics: str) -> "LevelPlan":
        """This plan (same levels, same cached sites) under another tap-anchor convention."""
        if semantics == self.semantics:
            return self
        other = LevelPlan(self.levels, self.num_levels, semantics, validate=False)
        other._geometry = self._geometry  # sites and owners do not depend on the anchor
        other._padded = self.__dict__.setdefault("_padded", {})
        return other

    def geometry(self, step: int) -> StepGeometry:
        """Active sites, owner map and areas at ``step`` (cached)."""
        geo = self._geometry.get(step)
        if geo is None:
            self._check_step(step)
            geo = self._build_geometry(step)
            self._geometry[step] = geo
        return geo

    def padded_owner(self, step: int, pad: tuple[int, int]) -> torch.Tensor:
        """The owner map of ``step`` with ``pad = (py, px)`` cells of ``-1`` (outside the grid)
        around it, ``[B, H + 2 py, W + 2 px]`` (cached): rulebooks read taps from it with no
        bounds checks."""
        key = (step, int(pad[0]), int(pad[1]))
        cache = self.__dict__.setdefault("_padded", {})
        owner = cache.get(key)
        if owner is None:
            py, px = key[1:]
            owner = cache[key] = torch.nn.functional.pad(self.geometry(step).owner,
                                                         (px, px, py, py), value=-1)
        return owner

    def num_sites(self, step: int) -> int:
        return self.geometry(step).num_sites

    def sites_per_image(self, step: int) -> torch.Tensor:
        """``[B]`` number of sites of each image at ``step``."""
        coords = self.geometry(step).coords
        return torch.bincount(coords[:, 0], minlength=self.batch_size)

    def level_fractions(self) -> torch.Tensor:
        """``[B, L+1]`` fraction of finest-grid cells owned by sites of each level."""
        counts = F.one_hot(self.levels.flatten(1), self.num_levels + 1).sum(1)
        H, W = self.grid
        return counts.to(torch.float64) / max(1, H * W)

    # ------------------------------------------------------------------ internals
    def _check_step(self, step: int):
        if not 0 <= step <= self.num_levels:
            raise ValueError(f"step must lie in 0..{self.num_levels}, got {step}")

    def _build_geometry(self, step: int) -> StepGeometry:
        B, H, W = self.levels.shape
        dev = self.device
        m = self.levels.clamp(max=step)
        ys = torch.arange(H, device=dev).view(1, H, 1)
        xs = torch.arange(W, device=dev).view(1, 1, W)
        # owner block's top-left corner: clear the low m bits
        oy = (ys >> m) << m
        ox = (xs >> m) << m
        is_site = (oy == ys) & (ox == xs)
        flat_site = is_site.flatten()
        site_index = torch.cumsum(flat_site, 0) - 1
        bs = torch.arange(B, device=dev).view(B, 1, 1)
        owner_flat = (bs * H + oy) * W + ox
        owner = site_index[owner_flat]
        coords = is_site.nonzero()
        area = torch.bincount(owner.flatten(), minlength=coords.shape[0])
        return StepGeometry(coords=coords, owner=owner, area=area,
                            indices=coords.to(torch.int32))


# an init-only argument, not state: without this, plan.validate would read the class default
del LevelPlan.validate


def same_device(a, b) -> bool:
    """Device equality that treats ``cuda`` and ``cuda:<current>`` alike."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        return a.type != "cuda" or (a.index or torch.cuda.current_device()) == (b.index or torch.cuda.current_device())
    return a.index == b.index


def _power_of_two(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1 and (v & (v - 1)) == 0


def num_adaptive_steps(finest_stride: int, coarsest_stride: int) -> int:
    """``L = log2(coarsest / finest)`` for a valid stride pair: powers of two with
    ``coarsest > finest`` (at least one adaptive downsampling step)."""
    for name, v in (("finest_stride", finest_stride), ("coarsest_stride", coarsest_stride)):
        if not _power_of_two(v):
            raise ValueError(f"{name} must be a power of two (1, 2, 4, 8, ...), got {v!r}")
    if coarsest_stride <= finest_stride:
        raise ValueError(f"coarsest_stride ({coarsest_stride}) must be larger than finest_stride "
                         f"({finest_stride}): there must be at least one adaptive downsampling step")
    return (coarsest_stride // finest_stride).bit_length() - 1


def _check_levels(num_levels: int):
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels (adaptive steps L) must be an int >= 1, got {num_levels!r}")


PlanSpec = Union[LevelPlan, torch.Tensor, Sequence[torch.Tensor]]


def make_plan(spec: PlanSpec, grid: Sequence[int], num_levels: int,
              batch_size: int | None = None, device=None) -> LevelPlan:
    """Build a :class:`LevelPlan` from any accepted form.

    - a :class:`LevelPlan` (checked against ``grid`` and ``num_levels``); a level map enters
      this way, as ``LevelPlan.from_level_map(level_map, num_levels)``;
    - a bool keep mask ``[B, 1, h, w]`` / ``[B, h, w]`` at the finest grid or finer;
    - a list of bool per-level masks, finest first.

    A keep mask must be bool: an integer, uint8 or float tensor is refused with the fix named
    (``mask.bool()``, ``mask > 0.5``, or ``LevelPlan.from_level_map`` for a level map), so that
    a 0/1 mask is never mistaken for a level map (where 1 means *downsample*).
    """
    grid = (int(grid[0]), int(grid[1]))
    if isinstance(spec, LevelPlan):
        plan = spec
        if plan.num_levels != num_levels:
            raise ValueError(f"plan has {plan.num_levels} levels, the model needs {num_levels}")
    elif isinstance(spec, torch.Tensor):
        if spec.dtype != torch.bool:
            raise TypeError(f"keep must be a bool mask (True = keep at the finest resolution), "
                            f"got a {spec.dtype} tensor. {_BOOL_FIX}")
        plan = LevelPlan.from_keep(spec, grid, num_levels)
    elif isinstance(spec, (list, tuple)):
        plan = LevelPlan.from_level_masks(list(spec), grid, num_levels)
    else:
        raise TypeError("keep must be a bool tensor, a list of bool tensors (one per level) or a "
                        f"LevelPlan (level maps: LevelPlan.from_level_map), got "
                        f"{type(spec).__name__}")
    if plan.grid != grid:
        raise ValueError(f"plan grid {plan.grid[0]}x{plan.grid[1]} does not match the finest grid "
                         f"{grid[0]}x{grid[1]}: build the LevelPlan on the model's finest grid "
                         "(the feature map entering the first adaptive step)")
    if batch_size is not None and plan.batch_size != batch_size:
        raise ValueError(f"keep has batch size {plan.batch_size}, the input has {batch_size}: "
                         "give one mask per image")
    if device is not None and not same_device(plan.device, device):
        raise ValueError(f"keep is on {plan.device}, the input on {torch.device(device)}: move the "
                         "mask with `.to(images.device)`")
    return plan
