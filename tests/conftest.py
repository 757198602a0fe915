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
def full_precision_on_cuda():
    """The exactness tests bound float32 results by float32 rounding and half-precision ones by
    a float32 accumulator (``tests/support/rounding.py``); PyTorch lets cuDNN and cuBLAS use
    TF32 for float32 (10-bit mantissa, errors near 1e-3) and reduce float16 / bfloat16 GEMMs in
    half precision by default, on the references' dense convs and on the engines' alike, so
    the tests turn both off (the bench times the defaults)."""
    if not CUDA:
        yield
        return
    matmul = torch.backends.cuda.matmul
    names = ("allow_tf32", "allow_fp16_reduced_precision_reduction",
             "allow_bf16_reduced_precision_reduction")
    saved = torch.backends.cudnn.allow_tf32, [getattr(matmul, n) for n in names]
    torch.backends.cudnn.allow_tf32 = False
    for n in names:
        setattr(matmul, n, False)
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved[0]
        for n, v in zip(names, saved[1]):
            setattr(matmul, n, v)
