import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import dense_reference as ref  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run the tests marked slow (big torchvision models)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device on this machine")),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def random_masks(rng, batch, grid, num_levels, kind):
    """(spec for the library, per-level masks in numpy for the reference).

    kind: 'keep' (one keep mask, a different density per image), 'levels' (one mask per level),
    'map' (an integer level map), 'all' (everything kept), 'none' (nothing kept).
    """
    H, W = grid
    if kind in ("all", "none"):
        keep = np.full((batch, H, W), kind == "all")
        return torch.from_numpy(keep), [keep]
    if kind == "keep":
        dens = rng.uniform(0.02, 0.3, size=(batch, 1, 1))
        keep = rng.uniform(size=(batch, H, W)) < dens
        return torch.from_numpy(keep), [keep]
    masks = [rng.uniform(size=(batch, H, W)) < rng.uniform(0.01, 0.15) for _ in range(num_levels)]
    if kind == "levels":
        return [torch.from_numpy(m) for m in masks], masks
    if kind == "map":
        levels = ref.levels_from_masks(masks, num_levels)
        return torch.from_numpy(levels), masks
    raise ValueError(kind)
