"""Keep specs for the library from the test helpers' masks.

The helpers (``inputs.random_masks``, ``emulation.mixed_masks``) describe a level map as an
integer tensor; the library takes level maps only through ``LevelPlan.from_level_map`` (an
integer keep mask is refused, never read as a level map), so tests pass them through here.
"""
from __future__ import annotations

import torch

from cad_spconv import LevelPlan


def as_keep(spec, num_levels: int, device=None):
    """``spec`` as the library takes it: an integer level map becomes a ``LevelPlan``; bool
    masks, lists of them and plans pass through (moved to ``device`` if given)."""
    if isinstance(spec, LevelPlan):
        return spec if device is None else spec.to(device)
    if isinstance(spec, torch.Tensor):
        spec = spec if device is None else spec.to(device)
        if spec.dtype != torch.bool:
            return LevelPlan.from_level_map(spec, num_levels)
        return spec
    if isinstance(spec, (list, tuple)):
        return [m if device is None else m.to(device) for m in spec]
    return spec
