"""``experiments.tiled_phases``: its tiled conv computes the conv rule exactly (so the times it
reports compare equal work), against the dense reference in float64."""
import pytest
import torch

from cad_spconv.plan import make_plan
from cad_spconv.rulebook import conv_rulebook
from experiments.tiled_phases import tile_phases, tiled_conv
from tests.support import dense_reference as ref
from tests.support.emulation import mixed_masks


@pytest.mark.parametrize("grid, num_levels, step, dilation, size", [
    ((13, 19), 1, 1, 1, 4),
    ((13, 19), 1, 1, 2, 3),
    ((17, 22), 2, 1, 1, 2),
    ((17, 22), 2, 2, 1, 3),
])
def test_tiled_conv_matches_the_dense_reference(grid, num_levels, step, dilation, size):
    spec, levels = mixed_masks(seed=step * 10 + dilation, batch=2, grid=grid,
                               num_levels=num_levels)
    plan = make_plan(spec, grid, num_levels)
    book = conv_rulebook(plan, (3, 3), (dilation, dilation), step, step)
    gen = torch.Generator().manual_seed(size)
    features = torch.randn(plan.num_sites(step), 5, generator=gen, dtype=torch.float64)
    features[0, 0] = float("inf")  # an out-of-grid cell reading it must still give 0
    weight = torch.randn(4, 5, 3, 3, generator=gen, dtype=torch.float64)
    got = tiled_conv(features, weight, book, tile_phases(book, size))
    want = ref.conv(features, levels, step, 1, weight, dilation=dilation)
    torch.testing.assert_close(got, want, equal_nan=True)


def test_tiles_refuse_a_conv_at_step_0():
    spec, _ = mixed_masks(seed=1, batch=1, grid=(9, 9), num_levels=1)
    book = conv_rulebook(make_plan(spec, (9, 9), 1), (3, 3), (1, 1), 0, 0)
    with pytest.raises(ValueError, match="step >= 1"):
        tile_phases(book, 4)
