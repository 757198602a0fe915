"""The multi-resolution tensor.

A :class:`CADTensor` is a batch of multi-resolution feature maps: one feature row per active
site, sites on the finest grid (spconv coordinates ``(batch, y, x)``). It knows its step (how
many adaptive downsamplings it went through) and its :class:`~cad_spconv.plan.LevelPlan`, and it
carries a :class:`~cad_spconv.rulebook.RulebookCache` that every tensor derived from it shares,
so a whole network builds each rulebook once per forward.
"""
from __future__ import annotations

from typing import Optional

import torch

from .plan import LevelPlan, PlanSpec, make_plan, same_device
from .rulebook import RulebookCache

__all__ = ["CADTensor"]


class CADTensor:
    """Features ``[N, C]`` of the sites of ``plan`` at ``step``, in the plan's raster order."""

    __slots__ = ("features", "plan", "step", "cache")

    def __init__(self, features: torch.Tensor, plan: LevelPlan, step: int,
                 cache: Optional[RulebookCache] = None):
        if features.dim() != 2:
            raise ValueError(f"features must be [N, C], got {tuple(features.shape)}")
        n = plan.num_sites(step)
        if features.shape[0] != n:
            raise ValueError(f"features have {features.shape[0]} rows, the plan has {n} sites at "
                             f"step {step}")
        if not same_device(features.device, plan.device):
            raise ValueError(f"features are on {features.device}, the plan on {plan.device}")
        self.features = features
        self.plan = plan
        self.step = step
        self.cache = cache if cache is not None else RulebookCache()

    # ------------------------------------------------------------------ entry / exit
    @classmethod
    def from_dense(cls, x: torch.Tensor, keep: PlanSpec, num_levels: Optional[int] = None
                   ) -> "CADTensor":
        """Enter at step 0 from a dense map ``[B, C, H, W]`` at the finest grid.

        ``keep``: a :class:`LevelPlan` or anything :func:`~cad_spconv.plan.make_plan` takes
        (then ``num_levels`` is required).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"expected a dense [B, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(keep, LevelPlan):
            num_levels = keep.num_levels if num_levels is None else num_levels
        elif num_levels is None:
            raise ValueError("num_levels is required unless keep is a LevelPlan")
        plan = make_plan(keep, x.shape[-2:], num_levels, batch_size=x.shape[0], device=x.device)
        features = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return cls(features, plan, 0)

    def dense(self, grid: str = "finest") -> torch.Tensor:
        """Densify by owner fill: ``[B, C, H, W]`` on the finest grid (``grid="finest"``), or on
        the grid of the current step (``grid="step"``: every ``2**step``-th finest cell)."""
        owner = self.plan.geometry(self.step).owner
        if grid == "step":
            s = 2 ** self.step
            owner = owner[:, ::s, ::s]
        elif grid != "finest":
            raise ValueError(f"grid must be 'finest' or 'step', got {grid!r}")
        B, H, W = owner.shape
        out = self.features[owner.reshape(-1)].reshape(B, H, W, -1)
        return out.permute(0, 3, 1, 2)

    def to_spconv(self):
        """The same data as a ``spconv.pytorch.SparseConvTensor`` (no copy of features)."""
        from .backend import require_spconv

        require_spconv()
        from spconv.pytorch import SparseConvTensor

        return SparseConvTensor(self.features, self.indices, list(self.plan.grid),
                                self.plan.batch_size)

    # ------------------------------------------------------------------ derived tensors
    def replace_features(self, features: torch.Tensor, step: Optional[int] = None) -> "CADTensor":
        """A tensor on the same plan sharing the rulebook cache."""
        return CADTensor(features, self.plan, self.step if step is None else step, self.cache)

    def check_same_sites(self, other: "CADTensor", what: str = "operands"):
        if not isinstance(other, CADTensor):
            raise TypeError(f"{what}: expected a CADTensor, got {type(other).__name__}")
        if other.plan is not self.plan or other.step != self.step:
            raise ValueError(f"{what} must have the same sites (same plan object and step); got "
                             f"steps {self.step} and {other.step}")

    def __add__(self, other: "CADTensor") -> "CADTensor":
        self.check_same_sites(other, "residual add")
        return self.replace_features(self.features + other.features)

    def __iadd__(self, other: "CADTensor") -> "CADTensor":
        """In-place residual add (``out += identity``, as torchvision's blocks): no new feature
        matrix. Same autograd rules as an in-place add on a dense tensor."""
        self.check_same_sites(other, "residual add")
        self.features += other.features
        return self

    # ------------------------------------------------------------------ properties
    @property
    def indices(self) -> torch.Tensor:
        """``[N, 3]`` int32 spconv coordinates (batch, y, x) on the finest grid."""
        return self.plan.geometry(self.step).coords.to(torch.int32)

    @property
    def num_sites(self) -> int:
        return self.features.shape[0]

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    @property
    def batch_size(self) -> int:
        return self.plan.batch_size

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return self.plan.grid

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    def __repr__(self) -> str:
        H, W = self.plan.grid
        return (f"CADTensor(sites={self.num_sites}, channels={self.num_channels}, step={self.step}"
                f"/{self.plan.num_levels}, grid={H}x{W}, batch={self.batch_size}, "
                f"dtype={self.dtype}, device={self.device})")
