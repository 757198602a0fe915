"""``experiments.fused_gather_gemm``: the lattice engine with its gather + GEMM on the fused
kernel computes the conv rule (so the times it reports compare equal work), against the dense
reference in float64 on the same bfloat16 inputs, within the rounding bound of the route. Slow:
the first run compiles the kernel (about a minute on 2 cores); needs a C++ compiler and a CPU
whose oneDNN packs bfloat16 filters (AMX)."""
import shutil

import pytest
import torch

from cad_spconv import CADTensor, functional as CF
from cad_spconv.plan import make_plan
from tests.support import rounding as R
from tests.support.emulation import mixed_masks


@pytest.fixture(scope="module")
def fused():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the fused kernel")
    from experiments import fused_gather_gemm
    if not fused_gather_gemm.kernel().could_pack():
        pytest.skip("this CPU has no packed bfloat16 micro-kernel (AMX)")
    return fused_gather_gemm


@pytest.mark.slow
@pytest.mark.parametrize("grid, num_levels, step, dilation, block_rows", [
    ((13, 19), 1, 1, 1, 16),
    ((17, 22), 2, 1, 2, 7),
    ((17, 22), 2, 2, 1, 32),
])
def test_fused_rest_matches_the_dense_reference(fused, grid, num_levels, step, dilation,
                                                block_rows):
    spec, levels = mixed_masks(seed=step * 10 + dilation, batch=2, grid=grid,
                               num_levels=num_levels)
    plan = make_plan(spec, grid, num_levels)
    gen = torch.Generator().manual_seed(block_rows)
    features = torch.randn(plan.num_sites(step), 24, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(64, 24, 3, 3, generator=gen) / 9).to(torch.bfloat16)
    x = CADTensor(features, plan, step)
    with torch.inference_mode(), fused.fused_rest(block_rows) as written:
        got = CF.conv2d(x, weight, None, 1, dilation, 1, "lattice").features
    assert written["rows"] > block_rows  # the kernel wrote rows, in more than one block
    R.assert_conv_within(got, features, levels, step, 1, weight, None, dilation,
                         engine="lattice", what="fused rest")
