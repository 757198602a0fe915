"""Hypothesis strategies and settings for the property-based tests of the sparse ops.

Examples are cases of the dense reference's world: a batch of 1..3 images on a finest grid of
1..40 cells a side, 1..3 levels, a different mask per image (drawn from a seed and per-image
densities, so that shrinking makes grids small, batches short and masks simple), in one of the
forms the library takes (a keep mask at the finest grid or at image resolution, per-level masks,
a level map through ``LevelPlan.from_level_map``).

Settings: every property test uses :func:`settings_for` (a fixed example count per test,
``derandomize=True`` so CI always runs the same examples, no deadline, no example database).
``CAD_HYPOTHESIS_EXAMPLES=N`` runs ``N`` examples per test instead (e.g. 2000 for a long
search); ``CAD_HYPOTHESIS_SEED=S`` draws other examples (still reproducible).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from . import dense_reference as ref

#: examples per test from the environment (None: each test's own CI count)
EXAMPLES = int(os.environ.get("CAD_HYPOTHESIS_EXAMPLES", "0")) or None
SEED = int(os.environ.get("CAD_HYPOTHESIS_SEED", "0"))

settings.register_profile(
    "cad-ci", derandomize=True, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much])


def settings_for(ci_examples: int) -> settings:
    """The settings of one property test: ``ci_examples`` examples (or
    ``CAD_HYPOTHESIS_EXAMPLES``), derandomized."""
    return settings(settings.get_profile("cad-ci"), max_examples=EXAMPLES or ci_examples)


DENSITIES = [0.0, 0.01, 0.05, 0.15, 0.4, 1.0]
FORMS = ["keep", "image", "levels", "map"]


@dataclass
class Case:
    """One drawn batch: its level map (numpy, for the reference) and the spec the library
    is given."""

    levels: np.ndarray          # [B, H, W] int64
    num_levels: int
    spec: object                # bool mask / list of bool masks / LevelPlan
    form: str
    stride: int                 # image-resolution masks: pixels per cell, else 1

    @property
    def batch(self) -> int:
        return self.levels.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return self.levels.shape[1], self.levels.shape[2]

    def __repr__(self) -> str:
        B, H, W = self.levels.shape
        return (f"Case(batch={B}, grid={H}x{W}, L={self.num_levels}, form={self.form!r}, "
                f"stride={self.stride}, levels per image="
                f"{[np.bincount(l.ravel(), minlength=self.num_levels + 1).tolist() for l in self.levels]})")


def reduce_any(mask: np.ndarray, grid, s: int) -> np.ndarray:
    """Any-pixel reduction by a known scale ``s`` (ceil sizes), by looping over cells."""
    B = mask.shape[0]
    H, W = grid
    out = np.zeros((B, H, W), dtype=bool)
    for i in range(H):
        for j in range(W):
            out[:, i, j] = mask[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(B, -1).any(1)
    return out


@st.composite
def cases(draw, max_side: int = 40, max_batch: int = 3, max_levels: int = 3,
          forms=tuple(FORMS)) -> Case:
    from cad_spconv import LevelPlan

    H = draw(st.integers(1, max_side))
    W = draw(st.integers(1, max_side))
    L = draw(st.integers(1, max_levels))
    B = draw(st.integers(1, max_batch))
    form = draw(st.sampled_from(list(forms)))
    seed = draw(st.integers(0, 2 ** 32 - 1)) ^ SEED
    rng = np.random.default_rng(seed)
    n_masks = L if form in ("levels", "map") else 1
    dens = draw(st.lists(st.sampled_from(DENSITIES), min_size=B * n_masks, max_size=B * n_masks))
    dens = np.asarray(dens).reshape(n_masks, B, 1, 1)
    stride = draw(st.sampled_from([2, 3, 8])) if form == "image" else 1
    if form == "image":
        # an image of h x w pixels whose ceil(h / stride) x ceil(w / stride) grid is H x W
        h = stride * H - draw(st.integers(0, stride - 1))
        w = stride * W - draw(st.integers(0, stride - 1))
        pixels = rng.uniform(size=(B, h, w)) < dens[0] / stride
        masks = [reduce_any(pixels, (H, W), stride)]
        spec = torch.from_numpy(pixels)[:, None]
    else:
        masks = [rng.uniform(size=(B, H, W)) < dens[i] for i in range(n_masks)]
        spec = ([torch.from_numpy(m) for m in masks] if form == "levels"
                else torch.from_numpy(masks[0])[:, None])
    levels = ref.levels_from_masks(masks, L)
    if form == "map":
        spec = LevelPlan.from_level_map(torch.from_numpy(levels), L)
    return Case(levels, L, spec, form, stride)


@dataclass
class Poison:
    """Non-finite values written into one image's features (``None`` = none)."""

    image: int
    value: float
    where: str      # "all" sites of the image, or "site" (one site, ``index`` of the image's)
    index: int

    def apply(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        rows = (images == self.image).nonzero()[:, 0]
        f = features.clone()
        if rows.numel():
            f[rows if self.where == "all" else rows[self.index % rows.numel()]] = self.value
        return f


def poisons(batch: int) -> st.SearchStrategy[Optional[Poison]]:
    return st.one_of(st.none(), st.builds(
        Poison, st.integers(0, batch - 1),
        st.sampled_from([float("nan"), float("inf"), -float("inf")]),
        st.sampled_from(["all", "site"]), st.integers(0, 10 ** 6)))


def classes(t: torch.Tensor) -> torch.Tensor:
    """NaN / +Inf / -Inf indicators, stacked."""
    return torch.stack([t.isnan(), t.isposinf(), t.isneginf()])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, rtol=1e-9, atol=1e-10):
    """Same shape, same NaN / +Inf / -Inf entries, finite entries close."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    differ = (classes(actual) != classes(expected)).any(0)
    assert not differ.any(), f"{int(differ.sum())} entries differ in finiteness"
    fin = torch.isfinite(expected)
    torch.testing.assert_close(actual[fin], expected[fin], rtol=rtol, atol=atol)
