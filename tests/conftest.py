"""Shared fixtures and options; helpers for the tests live in ``tests/support``."""
import zlib

import numpy as np
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


@pytest.fixture(autouse=True)
def seeded_global_rngs(request):
    """Draws a test makes without its own generator depend on the test alone, not on which
    tests ran before it in the process, so a failure reproduces when the test runs by itself."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    np.random.seed(seed)


@pytest.fixture(autouse=True)
def full_float32_on_cuda():
    """float32 exactness tests compare at 1e-4; PyTorch lets cuDNN convs use TF32 (10-bit
    mantissa, errors near 1e-3) by default, on the references' dense convs and on the engines'
    alike, so the tests run CUDA float32 in full precision (the bench times the defaults)."""
    if not CUDA:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
