"""Level plans of the keypoint study: the keypoint masks against a transcription of the paper
code's rule, the refusal of dilations that give no quadtree, and the budget-matched random /
inverted plans of the ablation (same sites per level, same multiply-adds)."""
import numpy as np
import pytest
import torch

from cad_apps.keypoints.levels import (budget_levels, check_dilations, inverted_levels,
                                       keypoint_plan, random_levels, site_counts)
from cad_spconv import LevelPlan
from cad_spconv.macs import count_macs
from tests.support.hpatches import random_keypoints, reference_levels, thin_vgg
from tests.support.hpatches import one_torch_thread  # noqa: F401 (autouse fixture)

SIZE = (48, 64)
CASES = [  # (finest stride, dilations) incl. the reference's own settings and zeros
    (1, (25, 51, 51)), (1, (3, 19, 35)), (1, (0, 0, 31)), (1, (1, 1, 1)), (1, (5, 5, 9)),
    (2, (11, 21)), (2, (3, 37)), (2, (0, 9)), (4, (7,)), (4, (31,)), (4, (1,)),
]


@pytest.mark.parametrize("finest,dilations", CASES)
@pytest.mark.parametrize("semantics,reduction", [("reference", "sample"), ("paper", "any")])
def test_keypoint_levels_match_the_reference_rule(finest, dilations, semantics, reduction):
    rng = np.random.default_rng(finest * 100 + sum(dilations))
    for n in (0, 1, 7, 40):
        xy = random_keypoints(rng, SIZE, n)
        plan = keypoint_plan(xy, SIZE, dilations, finest, semantics)
        expected = reference_levels(xy, SIZE, dilations, finest, reduction)
        np.testing.assert_array_equal(plan.levels[0].numpy(), expected)
        LevelPlan.from_level_map(plan.levels, plan.num_levels)  # a valid quadtree


def test_keypoint_levels_differ_between_reductions_at_coarse_finest_stride():
    """The two reductions are not the same rule (so the test above checks both): a keypoint at
    an odd pixel with dilation 1 is missed by sampling every 4th pixel."""
    xy = np.array([[5, 7]])
    paper = keypoint_plan(xy, SIZE, (1,), 4, "paper").levels[0].numpy()
    ref = keypoint_plan(xy, SIZE, (1,), 4, "reference").levels[0].numpy()
    assert paper[1, 1] == 0 and (ref == 1).all()


def test_the_reference_rule_gives_no_quadtree_for_decreasing_dilations():
    """Why decreasing dilations are refused: the reference rule then mixes levels in a block."""
    xy = np.array([[20, 20]])
    levels = reference_levels(xy, SIZE, (25, 11), 2)
    with pytest.raises(ValueError, match="not block-consistent"):
        LevelPlan.from_level_map(torch.from_numpy(levels)[None], 2)


@pytest.mark.parametrize("dilations,finest,match", [
    ((25, 11), 2, "must\nnot decrease|not decrease"), ((11, 0, 35), 1, "not decrease"),
    ((51, 25, 51), 1, "not decrease"), ((4,), 4, "odd"), ((3, 5), 1, "needs 3 value"),
    ((3,), 8, "no adaptive levels: give no --dilations"), ((-1,), 4, "odd"),
])
def test_bad_dilations_are_refused_with_the_fix(dilations, finest, match):
    with pytest.raises(ValueError, match=match):
        check_dilations(dilations, finest)


def test_decreasing_dilations_message_names_a_valid_alternative():
    with pytest.raises(ValueError, match="use e.g. 25 25 51"):
        check_dilations((25, 11, 51), 1)


def _plan(finest, dilations, n, seed):
    rng = np.random.default_rng(seed)
    xy = random_keypoints(rng, SIZE, n)
    return xy, keypoint_plan(xy, SIZE, dilations, finest)


@pytest.mark.parametrize("finest,dilations", [(1, (9, 19, 35)), (2, (7, 21)), (4, (11,))])
def test_budget_matched_plans_keep_sites_per_level(finest, dilations):
    xy, plan = _plan(finest, dilations, 12, 3)
    L = plan.num_levels
    levels = plan.levels[0].numpy()
    cells = xy[:, ::-1] // finest
    for make in (lambda r: random_levels(levels, L, r), lambda r: inverted_levels(levels, L, cells, r)):
        new = make(np.random.default_rng(0))
        assert site_counts(new, L) == site_counts(levels, L)
        np.testing.assert_array_equal(np.bincount(new.ravel(), minlength=L + 1),
                                      np.bincount(levels.ravel(), minlength=L + 1))
        LevelPlan.from_level_map(torch.from_numpy(new)[None], L)  # a valid quadtree
        assert not np.array_equal(new, levels)
        np.testing.assert_array_equal(new, make(np.random.default_rng(0)))  # deterministic


def _chebyshev(cells, shape):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    return np.min([np.maximum(abs(ys - y), abs(xs - x)) for y, x in cells], axis=0)


def test_inverted_plan_puts_keypoints_coarsest():
    xy, plan = _plan(1, (3, 5, 9), 3, 5)
    levels = plan.levels[0].numpy()
    cells = xy[:, ::-1]
    inv = inverted_levels(levels, 3, cells, np.random.default_rng(0))
    dist = _chebyshev(cells, levels.shape)
    assert (levels[cells[:, 0], cells[:, 1]] == 0).all()
    assert (inv[cells[:, 0], cells[:, 1]] == 3).all()
    # the coarsest blocks are the ones nearest to a keypoint
    block = dist.reshape(6, 8, 8, 8).min(axis=(1, 3))
    coarse = inv[::8, ::8] == 3
    assert block[coarse].max() <= block[~coarse].min()
    # and the finest cells sit farther from keypoints than any finest cell of the keypoint plan
    assert dist[inv == 0].min() > dist[levels == 0].max()


def test_budget_levels_orders_blocks_by_key():
    """A hand-made case: 8x8 grid, L = 2, key = raster index; with one level-2 site, one
    level-1 site and the rest level 0, the top-left 4x4 block takes level 2 and the first
    2x2 child of the top-right block level 1."""
    levels = np.zeros((8, 8), dtype=np.int64)
    levels[4:, 4:] = 2
    levels[0:2, 0:2] = 1
    key = np.arange(64.0).reshape(8, 8)
    out = budget_levels(levels, 2, key, np.random.default_rng(0))
    expected = np.zeros((8, 8), dtype=np.int64)
    expected[:4, :4] = 2
    expected[:2, 4:6] = 1
    np.testing.assert_array_equal(out, expected)
    assert site_counts(out, 2) == site_counts(levels, 2)


def test_a_blocks_key_is_the_minimum_over_its_cells():
    """4x4 grid, L = 1, one level-1 site: the top-left block holds the smallest cell key (0)
    but also the largest (10); the top-right block is 5 throughout, the others 9. By the
    minimum the top-left block is first; by the maximum or the mean it would not be."""
    levels = np.zeros((4, 4), dtype=np.int64)
    levels[2:, 2:] = 1
    key = np.full((4, 4), 9.0)
    key[:2, :2] = [[0, 10], [10, 10]]
    key[:2, 2:] = 5
    out = budget_levels(levels, 1, key, np.random.default_rng(0))
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[:2, :2] = 1
    np.testing.assert_array_equal(out, expected)


def test_budget_matched_plans_cost_the_same_multiply_adds():
    stack = thin_vgg(scale=32)
    from adapters import convert

    cad = convert(stack, 1, 8)
    xy, plan = _plan(1, (9, 19, 35), 10, 7)
    levels = plan.levels[0].numpy()
    x = torch.randn(1, 3, *SIZE, dtype=torch.float64)
    base = count_macs(cad, x, plan)["total"]
    for new in (random_levels(levels, 3, np.random.default_rng(1)),
                inverted_levels(levels, 3, xy[:, ::-1], np.random.default_rng(1))):
        assert count_macs(cad, x, LevelPlan.from_level_map(torch.from_numpy(new)[None], 3))["total"] == base


def test_budget_levels_refuses_partial_blocks():
    with pytest.raises(ValueError, match="multiple of 8"):
        budget_levels(np.zeros((12, 16), dtype=np.int64), 3, None, np.random.default_rng(0))
