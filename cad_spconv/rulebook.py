"""Rulebooks (indice pairs) for convs and pools on multi-resolution tensors.

A rulebook says, for every output site and kernel tap, which input site is read. It is built
from the plan's owner map with the dilation-scaled submanifold rule of ``SEMANTICS.md``:
output site ``p`` reads ``q = p + D*o`` with ``D = d * 2**step_in``; out-of-grid taps read zero
(``-1``), in-grid taps read the owner of ``q`` (parent-patch fill). All vectorized.

Rulebooks only depend on the plan and the layer geometry, so they are cached in a
:class:`RulebookCache` that travels with every tensor derived from the same input: a ResNet
builds a handful per forward, not one per layer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import torch

from .plan import LevelPlan

__all__ = ["Rulebook", "RulebookCache", "conv_rulebook", "pool2_rulebook"]


@dataclass(eq=False)
class Rulebook:
    """Input row per (output site, tap).

    gather: ``[N_out, K]`` int64; ``-1`` marks a tap that reads zero (outside the grid).
    Taps are in row-major kernel order, matching ``weight.flatten(2)`` of a ``torch.nn.Conv2d``
    and spconv's ``[C_out, kh, kw, C_in]`` filters.
    """

    gather: torch.Tensor
    num_in: int
    kernel_size: tuple[int, int]
    step_in: int
    step_out: int
    _padded: Optional[torch.Tensor] = field(default=None, repr=False)
    _pairs: Optional[tuple[torch.Tensor, torch.Tensor]] = field(default=None, repr=False)

    @property
    def num_out(self) -> int:
        return self.gather.shape[0]

    @property
    def num_taps(self) -> int:
        return self.gather.shape[1]

    @property
    def is_identity(self) -> bool:
        """A 1x1 conv on the same site set: output row i reads input row i."""
        return self.num_taps == 1 and self.step_in == self.step_out

    def padded(self) -> torch.Tensor:
        """``gather`` with ``-1`` replaced by ``num_in`` (a zero / sentinel row appended)."""
        if self._padded is None:
            self._padded = torch.where(self.gather < 0, self.num_in, self.gather)
        return self._padded

    def num_pairs(self) -> int:
        """Number of (input, output, tap) reads: what a gather-GEMM-scatter engine multiplies."""
        return int((self.gather >= 0).sum())

    def spconv_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """spconv's native format: ``indice_pairs`` int32 ``[2, K, N_out]`` (row 0 input, row 1
        output, valid entries first per tap, rest ``-1``) and ``indice_pair_num`` int32 ``[K]``."""
        if self._pairs is None:
            valid = self.gather >= 0
            # stable sort puts the valid rows of each tap first, keeping output order
            order = torch.sort((~valid).to(torch.int8), dim=0, stable=True).indices
            inp = torch.gather(self.gather, 0, order)
            counts = valid.sum(0)
            rows = torch.arange(self.num_out, device=self.gather.device)[:, None]
            used = rows < counts[None, :]
            out = torch.where(used, order, -1)
            inp = torch.where(used, inp, -1)
            pairs = torch.stack([inp.t(), out.t()]).to(torch.int32).contiguous()
            self._pairs = (pairs, counts.to(torch.int32))
        return self._pairs


class RulebookCache:
    """Rulebooks keyed by geometry, shared by all tensors derived from one input."""

    def __init__(self):
        self._books: dict[Hashable, Rulebook] = {}
        self.builds = 0  # how many rulebooks were built (for tests and profiling)

    def get(self, key: Hashable, build: Callable[[], Rulebook]) -> Rulebook:
        book = self._books.get(key)
        if book is None:
            book = build()
            self._books[key] = book
            self.builds += 1
        return book

    def __len__(self) -> int:
        return len(self._books)


def _tap_offsets(kernel_size, spacing, device):
    kh, kw = kernel_size
    dy, dx = spacing
    oy = (torch.arange(kh, device=device) - kh // 2) * dy
    ox = (torch.arange(kw, device=device) - kw // 2) * dx
    return oy.repeat_interleave(kw), ox.repeat(kh)


def _read_owner(plan: LevelPlan, step_in: int, coords: torch.Tensor, oy: torch.Tensor,
                ox: torch.Tensor) -> torch.Tensor:
    """Input row read at ``coords + (oy, ox)`` per tap; ``-1`` outside the grid."""
    H, W = plan.grid
    owner = plan.geometry(step_in).owner
    b = coords[:, 0:1]
    qy = coords[:, 1:2] + oy[None]
    qx = coords[:, 2:3] + ox[None]
    inside = (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
    rows = owner[b, qy.clamp(0, H - 1), qx.clamp(0, W - 1)]
    return torch.where(inside, rows, -1)


def conv_rulebook(plan: LevelPlan, kernel_size: tuple[int, int], dilation: tuple[int, int],
                  step_in: int, step_out: int) -> Rulebook:
    """Rulebook of a conv (or overlapping pool) read from step ``step_in``, written to the sites
    of ``step_out`` (``step_in`` for stride 1, ``step_in + 1`` for an adaptive step)."""
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel size must be odd (same padding), got {kh}x{kw}")
    if step_out not in (step_in, step_in + 1):
        raise ValueError(f"step_out must be step_in or step_in + 1, got {step_in} -> {step_out}")
    coords = plan.geometry(step_out).coords
    spacing = (dilation[0] * 2 ** step_in, dilation[1] * 2 ** step_in)
    oy, ox = _tap_offsets(kernel_size, spacing, coords.device)
    gather = _read_owner(plan, step_in, coords, oy, ox)
    return Rulebook(gather, plan.num_sites(step_in), (kh, kw), step_in, step_out)


def pool2_rulebook(plan: LevelPlan, step_in: int) -> Rulebook:
    """2x2/2 window pool (VGG): a merged site reads its (up to) four children at spacing
    ``2**step_in``; a site kept at its level passes through (only tap 0)."""
    step_out = step_in + 1
    coords = plan.geometry(step_out).coords
    s = 2 ** step_in
    dev = coords.device
    oy = torch.tensor([0, 0, s, s], device=dev)
    ox = torch.tensor([0, s, 0, s], device=dev)
    gather = _read_owner(plan, step_in, coords, oy, ox)
    merged = plan.levels[coords[:, 0], coords[:, 1], coords[:, 2]] >= step_out
    gather[:, 1:] = torch.where(merged[:, None], gather[:, 1:], -1)
    return Rulebook(gather, plan.num_sites(step_in), (2, 2), step_in, step_out)
