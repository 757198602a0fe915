"""Shared fixtures and options; helpers for the tests live in ``tests/support``."""
import pytest
import torch

from tests.support.inputs import CUDA


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
