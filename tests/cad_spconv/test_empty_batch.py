"""Every op on a batch of 0 images gives the empty result a dense op gives (issue 11 item 6:
plan.py raised IndexError, tensor.py RuntimeError, the tuned and spconv engines asserted)."""
import pytest
import torch

from cad_spconv import CADTensor, LevelPlan, functional as CF
from cad_spconv.backend import spconv_status
from cad_spconv.nn import CADBatchNorm2d

SPCONV = spconv_status()[0]
ENGINES = ["auto", "lattice", "torch", "tuned"] + [pytest.param(e, marks=pytest.mark.skipif(
    not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}"))
    for e in ("spconv", "spconv-igemm")]


def empty_tensor(device, dtype=torch.float32, num_levels=2, grid=(9, 7), channels=4):
    plan = LevelPlan.from_keep(torch.zeros(0, 1, 72, 56, dtype=torch.bool, device=device), grid,
                               num_levels)
    return CADTensor.from_dense(torch.zeros(0, channels, *grid, dtype=dtype, device=device), plan)


def test_plan_of_no_images(device):
    for keep in (torch.zeros(0, 1, 72, 56, dtype=torch.bool), [torch.zeros(0, 9, 7, dtype=torch.bool)] * 2):
        plan = (LevelPlan.from_keep(keep.to(device), (9, 7), 2) if isinstance(keep, torch.Tensor)
                else LevelPlan.from_level_masks([m.to(device) for m in keep], (9, 7), 2))
        assert plan.batch_size == 0 and plan.level_fractions().shape == (0, 3)
        assert [plan.num_sites(s) for s in range(3)] == [0, 0, 0]
        assert plan.sites_per_image(2).shape == (0,)
    plan = LevelPlan.from_level_map(torch.zeros(0, 9, 7, dtype=torch.int64, device=device), 2)
    assert plan.levels.shape == (0, 9, 7)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stride,k", [(1, 3), (2, 3), (1, 1), (2, 1), (2, 5)])
def test_conv(engine, stride, k, device):
    if engine == "spconv-igemm" and device.type == "cpu":
        pytest.skip("spconv-igemm runs on CUDA only")
    x = empty_tensor(device)
    w = torch.randn(5, 4, k, k, device=device)
    with torch.no_grad():
        y = CF.conv2d(x, w, torch.randn(5, device=device), stride, 1, 1, engine)
    assert y.features.shape == (0, 5) and y.step == stride - 1
    assert y.dense().shape == (0, 5, 9, 7) and y.dense(grid="step").shape[:2] == (0, 5)


def test_other_ops(device):
    x = empty_tensor(device)
    for pool in [(2, 2, 0), (3, 2, 1), (3, 1, 1)]:
        assert CF.max_pool2d(x, *pool).features.shape == (0, 4)
    bn = CADBatchNorm2d(4).to(device).eval()
    assert bn(x).features.shape == (0, 4)
    assert CF.global_avg_pool(x).shape == (0, 4)
    assert (x + x).features.shape == (0, 4)
    assert x.dense(fill="scatter").shape == (0, 4, 9, 7)
    assert x.dense(channels_first=False).shape == (0, 9, 7, 4)
