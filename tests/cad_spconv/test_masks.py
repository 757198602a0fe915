"""Masks from the paper, each against an independent numpy / dense-conv emulation."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.support import dense_reference as ref
from tests.support.inputs import FRAMES
from cad_spconv import LevelPlan, images, masks, reduce_to_grid


# ------------------------------------------------------------------ independent emulations
def np_dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Square dilation by looping over the kept pixels (mask [B, H, W])."""
    out = np.zeros_like(mask)
    r = size // 2
    for b, y, x in zip(*np.nonzero(mask)):
        out[b, max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
    return out


def np_cells_any(mask: np.ndarray, s: int) -> np.ndarray:
    B, H, W = mask.shape
    h, w = -(-H // s), -(-W // s)
    out = np.zeros((B, h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = mask[:, i * s:(i + 1) * s, j * s:(j + 1) * s].reshape(B, -1).any(1)
    return out


def conv_edges(images: torch.Tensor, threshold: float, operator: str) -> torch.Tensor:
    """Edges through F.conv2d with explicit kernels (the reference code's way)."""
    w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
    g = (images * w).sum(1, keepdim=True)
    if operator == "reference":
        kx = torch.zeros(1, 1, 3, 3, dtype=images.dtype)
        kx[0, 0, 1, 0], kx[0, 0, 1, 2] = -1, 1
        ky = kx.transpose(2, 3).contiguous()
        gx, gy = F.conv2d(g, kx, padding=1), F.conv2d(g, ky, padding=1)
        return (gx >= threshold) | (gy >= threshold)
    kx = torch.tensor([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=images.dtype).view(1, 1, 3, 3)
    ky = kx.transpose(2, 3).contiguous()
    gp = F.pad(g, (1, 1, 1, 1), mode="replicate")
    gx, gy = F.conv2d(gp, kx), F.conv2d(gp, ky)
    return (gx ** 2 + gy ** 2).sqrt() >= threshold


def load_frames():
    from PIL import Image

    names = sorted(f for f in os.listdir(FRAMES) if f.endswith(".png"))
    mean = torch.tensor(images.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(images.IMAGENET_STD).view(3, 1, 1)
    out = []
    for n in names:
        a = np.asarray(Image.open(os.path.join(FRAMES, n)).convert("RGB"), dtype=np.float32) / 255
        out.append((torch.from_numpy(a).permute(2, 0, 1) - mean) / std)
    return torch.stack(out), names


# ------------------------------------------------------------------ edge
@pytest.mark.parametrize("operator", masks.EDGE_OPERATORS)
@pytest.mark.parametrize("size", [(37, 53), (40, 64)])
def test_edge_matches_conv_reference(operator, size):
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(3, 3, 5, 7, generator=gen, dtype=torch.float64)
    images = F.interpolate(coarse, size=size, mode="nearest") + \
        0.3 * F.interpolate(coarse.flip(1), size=size, mode="bilinear", align_corners=False)
    gain = 4 if operator == "sobel" else 1
    for threshold, dilation in ((0.15 * gain, 1), (0.35 * gain, 3), (0.95 * gain, 5)):
        expected = np_dilate(conv_edges(images, threshold, operator)[:, 0].numpy(), dilation)
        got = masks.edge(images, threshold, dilation, operator=operator)
        assert got.dtype == torch.bool and got.shape == (3, 1, *size)
        np.testing.assert_array_equal(got[:, 0].numpy(), expected)
        assert 0 < expected.mean() < 1  # the case is not trivial


def test_edge_grayscale_choice():
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 21, 19, generator=gen)
    lum = masks.edge(images, 0.3, 1, grayscale="luminance")
    mean = masks.edge(images, 0.3, 1, grayscale="mean")
    g = images.mean(1, keepdim=True)
    p = F.pad(g, (1, 1, 1, 1))
    expected = ((p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) >= 0.3) | ((p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) >= 0.3)
    assert torch.equal(mean, expected)
    assert not torch.equal(lum, mean)


@pytest.mark.skipif(not os.path.isdir(FRAMES), reason=f"real frames not found at {FRAMES}")
def test_edge_kept_fractions_on_real_frames_land_in_paper_bands():
    """Issue 4 bands (1024x2048, dilation 11, stride-16 cells, reference reduction)."""
    images, names = load_frames()
    assert images.shape[-2:] == (1024, 2048) and len(names) == 3
    bands = {0.15: (57, 76), 0.35: (31, 45), 0.95: (10, 17)}
    previous = None
    for threshold, (lo, hi) in bands.items():
        keep = masks.edge(images, threshold, 11)
        frac = masks.kept_fraction(keep, 16, sample_stride=8)
        pct = [round(100 * float(f)) for f in frac]
        assert all(lo <= p <= hi for p in pct), (threshold, pct, names)
        # the any-pixel rule of the models keeps a superset of the reference's cells
        assert bool((masks.kept_fraction(keep, 16) >= frac).all())
        if previous is not None:
            assert bool((frac < previous).all())  # higher threshold, fewer cells
        previous = frac


# ------------------------------------------------------------------ dilation, reduction
@pytest.mark.parametrize("size", [1, 3, 7])
def test_dilate_matches_loop(size):
    rng = np.random.default_rng(size)
    m = rng.uniform(size=(2, 13, 17)) < 0.05
    got = masks.dilate(torch.from_numpy(m)[:, None], size)[:, 0].numpy()
    np.testing.assert_array_equal(got, np_dilate(m, size))


@pytest.mark.parametrize("shape,stride", [((2, 37, 53), 8), ((1, 64, 48), 16), ((3, 5, 9), 4)])
def test_kept_fraction_and_subsample(shape, stride):
    rng = np.random.default_rng(0)
    m = rng.uniform(size=shape) < 0.03
    keep = torch.from_numpy(m)[:, None]
    got = masks.kept_fraction(keep, stride)
    np.testing.assert_allclose(got.numpy(), np_cells_any(m, stride).mean((1, 2)), rtol=0, atol=0)
    sub = masks.subsample(keep, 2)
    np.testing.assert_array_equal(sub[:, 0].numpy(), m[:, ::2, ::2])
    if stride % 2 == 0:
        got = masks.kept_fraction(keep, stride, sample_stride=2)
        expected = np_cells_any(m[:, ::2, ::2], stride // 2).mean((1, 2))
        np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=0)


def assert_mixes_levels(levels: np.ndarray):
    """Every image has kept and merged cells, in the clipped border row and column too."""
    for lv in levels:
        for part in (lv, lv[-1], lv[:, -1]):
            assert set(np.unique(part).tolist()) == {0, 1}, lv


def test_masks_feed_level_plans_at_odd_sizes():
    # piecewise-constant images (white noise would keep almost every cell): edges along the
    # borders of 4x5 regions, which cross the 8x8 cells at odd offsets
    gen = torch.Generator().manual_seed(2)
    coarse = torch.randn(2, 3, 4, 5, generator=gen)
    images = F.interpolate(coarse, size=(65, 97), mode="nearest")
    keep = masks.edge(images, 0.95, 3)
    grid = (9, 13)  # ceil(65 / 8), ceil(97 / 8)
    plan = LevelPlan.from_keep(keep, grid, 1)
    expected = ref.levels_from_masks([ref.keep_to_grid(keep[:, 0].numpy(), grid)], 1)
    assert_mixes_levels(expected)
    np.testing.assert_array_equal(plan.levels.numpy(), expected)
    # the reference code's reduction is a finest-grid mask as well
    plan = LevelPlan.from_keep(masks.subsample(keep, 8), grid, 1)
    expected = ref.levels_from_masks([keep[:, 0, ::8, ::8].numpy()], 1)
    assert_mixes_levels(expected)
    np.testing.assert_array_equal(plan.levels.numpy(), expected)


# ------------------------------------------------------------------ oracle
def test_oracle_matches_numpy():
    rng = np.random.default_rng(3)
    B, K, H, W = 2, 4, 23, 31
    target = rng.integers(0, K, size=(B, H, W))
    target[:, :3] = 255
    coarse = np.where(rng.uniform(size=target.shape) < 0.2, rng.integers(0, K, size=target.shape), target)
    fine = np.where(rng.uniform(size=target.shape) < 0.1, rng.integers(0, K, size=target.shape), target)
    expected = np_dilate((coarse != target) & (fine == target) & (target != 255), 5)
    got = masks.oracle(torch.from_numpy(coarse), torch.from_numpy(fine), torch.from_numpy(target), 5)
    np.testing.assert_array_equal(got[:, 0].numpy(), expected)
    assert expected.any() and not expected.all()
    # logits give the same mask through their argmax
    logits = F.one_hot(torch.from_numpy(coarse).clamp(max=K - 1), K).permute(0, 3, 1, 2).double()
    got2 = masks.oracle(logits, torch.from_numpy(fine), torch.from_numpy(target), 5)
    coarse_c = np.minimum(coarse, K - 1)
    np.testing.assert_array_equal(
        got2[:, 0].numpy(), np_dilate((coarse_c != target) & (fine == target) & (target != 255), 5))


def test_oracle_rejects_mismatched_sizes():
    t = torch.zeros(1, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="upsample the logits"):
        masks.oracle(torch.zeros(1, 3, 4, 4), t, t, 3)


# ------------------------------------------------------------------ keypoints
def test_keypoints_per_level_dilations():
    H, W = 29, 41
    pts = [torch.tensor([[3.4, 5.6], [40.0, 28.0], [20.5, 10.0]]), torch.zeros(0, 2),
           np.array([[0.0, 0.0]])]
    got = masks.keypoints(pts, (H, W), (0, 5, 11))
    assert len(got) == 3 and all(m.shape == (3, 1, H, W) for m in got)
    seeds = np.zeros((3, H, W), dtype=bool)
    for b, p in enumerate(pts):
        for x, y in np.asarray(p).reshape(-1, 2):
            seeds[b, int(np.round(y)), int(np.round(x))] = True  # nearest pixel, ties to even
    assert not got[0].any()  # size 0: level unconstrained
    np.testing.assert_array_equal(got[1][:, 0].numpy(), np_dilate(seeds, 5))
    np.testing.assert_array_equal(got[2][:, 0].numpy(), np_dilate(seeds, 11))
    assert not got[1][1].any()
    # a list of per-level masks is what plans take
    plan = LevelPlan.from_level_masks(got, (H, W), 3)
    assert plan.levels.shape == (3, H, W)


def test_keypoints_rejects_points_outside():
    with pytest.raises(ValueError, match="outside"):
        masks.keypoints([torch.tensor([[50.0, 1.0]])], (10, 10), (3,))
    with pytest.raises(ValueError, match="odd"):
        masks.keypoints([torch.tensor([[1.0, 1.0]])], (10, 10), (4,))


def test_sift_keypoints_read_the_rgb_image_as_grey():
    """The batch's SIFT points are those of the RGB image's grey (OpenCV's luminance),
    computed here with numpy: red blobs on a blue ground, where reading the channels as BGR
    would give another grey image."""
    pytest.importorskip("cv2", reason="OpenCV (extra 'sift') not installed")
    rng = np.random.default_rng(3)
    rgb = np.zeros((96, 128, 3), dtype=np.uint8)
    rgb[..., 2] = 200
    for _ in range(12):
        y, x = rng.integers(8, 88), rng.integers(8, 120)
        rgb[y - 4:y + 4, x - 4:x + 4] = (220, 30, 0)
    grey = np.clip(np.round(rgb @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
    want = masks.sift_points(grey, 50)[0]
    got = masks.sift_keypoints(images.normalize(torch.from_numpy(rgb).permute(2, 0, 1))[None],
                               50)[0]
    assert len(want) > 0
    np.testing.assert_array_equal(got.numpy(), want)


def test_sift_keypoints_optional():
    cv2 = pytest.importorskip("cv2", reason="OpenCV (extra 'sift') not installed")
    assert cv2 is not None
    gen = torch.Generator().manual_seed(4)
    img = torch.full((1, 3, 96, 128), -1.0)
    for _ in range(12):  # bright blobs
        y, x = torch.randint(8, 88, (1,), generator=gen).item(), torch.randint(8, 120, (1,), generator=gen).item()
        img[:, :, y - 4:y + 4, x - 4:x + 4] = 2.0
    pts = masks.sift_keypoints(img, num_points=10)
    assert len(pts) == 1 and 1 <= pts[0].shape[0] <= 10
    assert bool((pts[0][:, 0] >= 0).all() and (pts[0][:, 0] < 128).all())
    assert bool((pts[0][:, 1] >= 0).all() and (pts[0][:, 1] < 96).all())
    m = masks.keypoints(pts, (96, 128), (5,))[0]
    assert m.any()


# ------------------------------------------------------------------ random / invert
def grid_levels(mask_or_list, grid, stride, num_levels) -> np.ndarray:
    """The level map a model builds from keep masks at image resolution (numpy reference)."""
    given = [mask_or_list] if isinstance(mask_or_list, torch.Tensor) else mask_or_list
    cells = [np_cells_any(m[:, 0].numpy(), stride)[:, :grid[0], :grid[1]] for m in given]
    return ref.levels_from_masks(cells, num_levels)


def random_keep(rng, B, size, density=(0.002, 0.05)):
    dens = rng.uniform(*density, size=(B, 1, 1, 1))
    return torch.from_numpy(rng.uniform(size=(B, 1, *size)) < dens)


@pytest.mark.parametrize("num_levels", [1, 2, 3])
@pytest.mark.parametrize("size,stride", [((37, 53), 8), ((64, 96), 8), ((29, 43), 1),
                                         ((100, 77), 4), ((8, 8), 8), ((5, 3), 1)])
def test_random_like_has_the_budget_of_the_mask_it_imitates(num_levels, size, stride):
    """Issue 11 item 3: shuffling finest cells raised the level-0 share (a block stays fine if
    any of its cells is kept). Shuffled blocks keep every image's sites per level and clipped
    shape, hence its level fractions, its sites at every step and its multiply-adds."""
    rng = np.random.default_rng(hash((size, stride, num_levels)) % 2 ** 32)
    grid = (-(-size[0] // stride), -(-size[1] // stride))
    gen = torch.Generator().manual_seed(3)
    for trial in range(3):
        keep = random_keep(rng, 3, size)
        levels = grid_levels(keep, grid, stride, num_levels)
        shuffled = masks.random_like(keep, stride, num_levels, generator=gen)
        assert shuffled.shape == (3, 1, *size) and shuffled.dtype == torch.bool
        new = grid_levels(shuffled, grid, stride, num_levels)
        assert ref.census(new, num_levels) == ref.census(levels, num_levels)
        for step in range(num_levels + 1):
            a, b = ref.Geometry(levels, step), ref.Geometry(new, step)
            np.testing.assert_array_equal(np.bincount(a.sites[:, 0], minlength=3),
                                          np.bincount(b.sites[:, 0], minlength=3))
        # the library's own plans agree, exactly
        plan = LevelPlan.from_keep(keep, grid, num_levels)
        again = LevelPlan.from_keep(shuffled, grid, num_levels)
        assert torch.equal(plan.level_fractions(), again.level_fractions())
        # the kept cells are whole cells of the finest grid, the level-0 cells of the new plan
        cells = np.asarray(new == 0)
        expanded = cells.repeat(stride, 1).repeat(stride, 2)[:, :size[0], :size[1]]
        np.testing.assert_array_equal(shuffled[:, 0].numpy(), expanded)


def test_random_like_moves_the_blocks():
    gen = torch.Generator().manual_seed(0)
    keep = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    keep[:, :, :8, :8] = True  # one corner kept
    moved = [masks.random_like(keep, 4, 2, generator=gen) for _ in range(20)]
    assert len({bytes(m.numpy().tobytes()) for m in moved}) > 10
    assert not all(bool(m[:, :, :8, :8].all()) for m in moved)


@pytest.mark.parametrize("num_levels", [2, 3])
def test_random_like_of_per_level_masks(num_levels):
    gen = torch.Generator().manual_seed(6)
    pts = [torch.tensor([[5.0, 5.0], [30.0, 20.0]]), torch.tensor([[12.0, 3.0]])]
    given = masks.keypoints(pts, (33, 47), (3, 9, 17)[:num_levels])
    grid = (9, 12)
    levels = grid_levels(given, grid, 4, num_levels)
    shuffled = masks.random_like(given, 4, num_levels, generator=gen)
    assert isinstance(shuffled, list) and len(shuffled) == num_levels
    for lo, hi in zip(shuffled, shuffled[1:]):
        assert not bool((lo & ~hi).any())  # nested
    new = grid_levels(shuffled, grid, 4, num_levels)
    assert ref.census(new, num_levels) == ref.census(levels, num_levels)
    assert not (new == levels).all()


def test_shuffle_plan_keeps_sites_per_level_and_shape():
    rng = np.random.default_rng(2)
    gen = torch.Generator().manual_seed(2)
    for grid, L in [((13, 11), 1), ((17, 23), 3), ((9, 16), 2), ((1, 5), 2)]:
        level_masks = [rng.uniform(size=(3, *grid)) < rng.uniform(0.01, 0.2) for _ in range(L)]
        levels = ref.levels_from_masks(level_masks, L)
        plan = LevelPlan.from_level_map(torch.from_numpy(levels), L)
        new = masks.shuffle_plan(plan, gen)
        LevelPlan.from_level_map(new.levels, L)  # a valid quadtree
        assert ref.census(new.levels.numpy(), L) == ref.census(levels, L)
        for step in range(L + 1):
            assert torch.equal(plan.sites_per_image(step), new.sites_per_image(step))
        if grid != (1, 5):  # room to move: an identity shuffle must not pass
            assert not torch.equal(new.levels, plan.levels), grid


@pytest.mark.parametrize("size,stride,grid", [((37, 53), 8, None), ((64, 64), 8, None),
                                              ((29, 43), 4, (7, 10)), ((9, 7), 1, None)])
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_random_level0_share_is_the_fraction(size, stride, grid, fraction):
    """The fraction of random(...) is the level-0 share of the plan, for any number of levels:
    per clipped 2x2-block shape exactly floor(fraction * n + 1/2) of its n blocks."""
    gen = torch.Generator().manual_seed(5)
    m = masks.random(4, size, fraction, stride, generator=gen, grid=grid)
    assert m.shape == (4, 1, *size) and m.dtype == torch.bool
    cells_grid = grid or (-(-size[0] // stride), -(-size[1] // stride))
    H, W = cells_grid
    cells = np_cells_any(m[:, 0].numpy(), stride)[:, :H, :W]
    for L in (1, 2, 3):
        levels = ref.levels_from_masks([cells], L)
        np.testing.assert_array_equal(levels == 0, cells)  # kept cells are whole 2x2 blocks
    census = ref.census(ref.levels_from_masks([cells], 1), 1)
    shapes = {(min(2, H - y), min(2, W - x)) for y in range(0, H, 2) for x in range(0, W, 2)}
    for b in range(4):
        for h, w in shapes:
            n = sum(1 for y in range(0, H, 2) for x in range(0, W, 2)
                    if (min(2, H - y), min(2, W - x)) == (h, w))
            kept = n - census[b].get((1, h, w), 0)
            assert kept == int(np.floor(fraction * n + 0.5)), (b, h, w)
    if grid is not None:
        assert not m[..., H * stride:, :].any() and not m[..., W * stride:].any()
    again = masks.random(4, size, fraction, stride, generator=torch.Generator().manual_seed(5),
                         grid=grid)
    assert torch.equal(m, again)
    if 0 < fraction < 1:
        assert not all(torch.equal(m[0], m[b]) for b in range(1, 4))


def test_random_is_uniform_over_blocks():
    gen = torch.Generator().manual_seed(9)
    m = masks.random(400, (16, 16), 0.25, 1, generator=gen)
    freq = m[:, 0, ::2, ::2].double().mean(0)
    assert float(freq.min()) > 0.15 and float(freq.max()) < 0.35


def test_random_like_and_random_errors():
    keep = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(TypeError, match="bool"):
        masks.random_like(keep.long(), 8, 1)
    with pytest.raises(ValueError, match="num_levels"):
        masks.random_like(keep, 8, 0)
    with pytest.raises(ValueError, match="finest_stride"):
        masks.random_like(keep, 0, 1)
    with pytest.raises(TypeError, match="non-empty list"):
        masks.random_like([], 8, 1)
    with pytest.raises(ValueError, match="fraction"):
        masks.random(1, (4, 4), 1.5, 1)
    with pytest.raises(ValueError, match="not the finest grid"):
        masks.random(1, (29, 43), 0.5, 4, grid=(9, 10))
    for size in ((16, 24, 3), (-4, 8), (0, 8), (16.0, 24), 16):
        with pytest.raises(ValueError, match=r"image_size must be \(H, W\), two positive ints"):
            masks.random(1, size, 0.5, 4)
    assert masks.random(1, (np.int64(16), 24), 0.5, 4).shape == (1, 1, 16, 24)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator, got int"):
        masks.random(1, (16, 24), 0.5, 4, 7)
    with pytest.raises(TypeError, match="LevelPlan"):
        masks.shuffle_plan(keep)


@pytest.mark.parametrize("operator", ["reference", "sobel"])
def test_edge_threshold_is_inclusive(operator):
    """A gradient equal to the threshold is an edge (the reference code compares with ``>=``);
    one ulp above it, none is. Values 0 and 0.5 keep every gradient exact in float64; the
    expected mask is the operator written again in numpy."""
    img = torch.zeros(1, 3, 5, 6, dtype=torch.float64)
    img[..., 3:] = 0.5
    g = img[0, 0].numpy()
    if operator == "reference":  # signed central differences, zero padding
        p = np.pad(g, 1)
        gx, gy = p[1:-1, 2:] - p[1:-1, :-2], p[2:, 1:-1] - p[:-2, 1:-1]
        t = 0.5
        want = (gx >= t) | (gy >= t)
    else:  # Sobel magnitude, replicated border
        p = np.pad(g, 1, mode="edge")
        dx, dy = p[:, 2:] - p[:, :-2], p[2:, :] - p[:-2, :]
        gx, gy = dx[:-2] + 2 * dx[1:-1] + dx[2:], dy[:, :-2] + 2 * dy[:, 1:-1] + dy[:, 2:]
        t = 2.0
        want = np.sqrt(gx * gx + gy * gy) >= t
    assert want.any() and not want.all()
    got = masks.edge(img, t, dilation=1, operator=operator, grayscale="mean")
    np.testing.assert_array_equal(got[0, 0].numpy(), want)
    assert not masks.edge(img, np.nextafter(t, np.inf), 1, operator, "mean").any()


def test_invert_single_and_per_level():
    rng = np.random.default_rng(7)
    keep = torch.from_numpy(rng.uniform(size=(2, 1, 9, 11)) < 0.3)
    assert torch.equal(masks.invert(keep), ~keep)
    # at image resolution the complement is taken on the finest grid: a cell with kept and
    # dropped pixels is fine under the mask, so coarse under its inverse (and vice versa)
    for size, stride, grid in (((37, 53), 8, None), ((37, 53), 8, (4, 6)), ((20, 30), 4, None)):
        pixels = torch.from_numpy(rng.uniform(size=(3, 1, *size)) < 0.01)
        cells = grid or (-(-size[0] // stride), -(-size[1] // stride))
        inv = masks.invert(pixels, stride, grid)
        assert inv.shape == pixels.shape and inv.dtype == torch.bool
        on_grid = reduce_to_grid(pixels, cells, stride=stride)
        assert 0 < on_grid.float().mean() < 1
        assert torch.equal(reduce_to_grid(inv, cells, stride=stride), ~on_grid)
        # pixel by pixel: a pixel is kept where its cell is not kept, and pixels past the grid
        # (a floor grid) never are
        want = np.zeros(pixels.shape, dtype=bool)
        for i in range(cells[0]):
            for j in range(cells[1]):
                block = (..., slice(i * stride, (i + 1) * stride), slice(j * stride, (j + 1) * stride))
                want[block] = ~pixels[block].numpy().any(axis=(-2, -1), keepdims=True)
        np.testing.assert_array_equal(inv.numpy(), want)
        per_level = masks.invert([pixels], stride, grid)
        assert len(per_level) == 1 and torch.equal(per_level[0], inv)
    pts = [torch.tensor([[5.0, 4.0]])]
    levels = masks.keypoints(pts, (15, 15), (1, 5, 9))
    inv = masks.invert(levels)
    L = 3
    rank = np.full((1, 15, 15), L)
    for l in reversed(range(L)):
        rank[levels[l][:, 0].numpy()] = l
    inv_rank = np.full((1, 15, 15), L)
    for l in reversed(range(L)):
        inv_rank[inv[l][:, 0].numpy()] = l
    np.testing.assert_array_equal(inv_rank, L - rank)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match=r"batch \[B, 3, H, W\].*images\[None\]"):
        masks.edge(torch.zeros(3, 8, 8), 0.1, 3)
    with pytest.raises(TypeError, match="float"):
        masks.edge(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0.1, 3)
    with pytest.raises(ValueError, match="odd"):
        masks.edge(torch.zeros(1, 3, 8, 8), 0.1, 4)
    with pytest.raises(ValueError, match="operator"):
        masks.edge(torch.zeros(1, 3, 8, 8), 0.1, 3, operator="canny")
    for bad in (float("nan"), float("inf"), -float("inf"), -0.5):  # NaN kept nothing, silently
        with pytest.raises(ValueError, match="threshold must be finite and >= 0"):
            masks.edge(torch.zeros(1, 3, 8, 8), bad, 3)
    with pytest.raises(TypeError, match="bool"):
        masks.dilate(torch.zeros(1, 1, 4, 4), 3)


def test_edge_on_a_one_channel_image_asks_for_three_channels():
    """Issue 11 item 7: a [B, 1, H, W] image got "add a batch dimension with images[None]"."""
    with pytest.raises(ValueError, match=r"3 channels .*got 1 in \(2, 1, 8, 8\).*expand") as err:
        masks.edge(torch.zeros(2, 1, 8, 8), 0.1, 3)
    assert "batch" not in str(err.value)
    with pytest.raises(ValueError, match=r"got 2 dimensions"):
        masks.edge(torch.zeros(8, 8), 0.1, 3)


def test_edge_does_not_depend_on_how_the_image_is_stored():
    """Half-precision images give the mask of their values, computed in float32 (rounded
    gradients would flip pixels near the threshold); numpy thresholds and fractions are
    numbers too."""
    img = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float16):
        stored = img.to(dtype)
        assert torch.equal(masks.edge(stored, 0.15, 3), masks.edge(stored.float(), 0.15, 3))
    assert torch.equal(masks.edge(img, np.float32(0.35), 3), masks.edge(img, 0.35, 3))
    gen = torch.Generator().manual_seed(1)
    assert masks.random(1, (32, 48), np.float32(0.5), 8, generator=gen).shape == (1, 1, 32, 48)


@pytest.mark.parametrize("args, message", [((8, 0), "sample_stride must be an int >= 1, got 0"),
                                           ((-8, 8), "stride must be an int >= 1, got -8"),
                                           ((8, -1), "sample_stride must be an int >= 1")])
def test_kept_fraction_names_the_bad_argument(args, message):
    keep = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=message):
        masks.kept_fraction(keep, *args)
