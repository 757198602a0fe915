"""CADTensor is a spconv SparseConvTensor: spconv's own code consumes it, and it keeps its plan,
step and rulebook cache through spconv's paths."""
import numpy as np
import pytest
import torch
from torch import nn

from cad_spconv import CADTensor, LevelPlan, functional as CF
from cad_spconv.backend import import_spconv
from tests.support import dense_reference as ref
from tests.support.inputs import make_input, tol

spconv = import_spconv()


def test_is_a_sparse_conv_tensor_with_spconv_fields():
    x, levels = make_input(((13, 11), 2, "levels"), 1, 6, torch.float64, "cpu", seed=3)
    assert isinstance(x, spconv.SparseConvTensor)
    assert x.indices.dtype == torch.int32 and x.indices.shape == (x.num_sites, 3)
    assert x.spatial_shape == [13, 11] and x.batch_size == 3
    # indices are the sites of the step: a level-l site sits at multiples of 2**min(l, step)
    idx = x.indices.long()
    lv = torch.from_numpy(levels)[idx[:, 0], idx[:, 1], idx[:, 2]].clamp(max=1)
    assert bool(((idx[:, 1] % 2 ** lv == 0) & (idx[:, 2] % 2 ** lv == 0)).all())


def test_spconv_sparse_sequential_runs_pointwise_layers_on_a_cad_tensor():
    """spconv's SparseSequential applies plain modules through ``replace_feature``: the result is
    still a CADTensor on the same plan, step and rulebook cache, and a CAD conv continues."""
    x, levels = make_input(((13, 11), 2, "levels"), 1, 6, torch.float64, "cpu", seed=4)
    bn = nn.BatchNorm1d(6).double().eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    seq = spconv.SparseSequential(bn, nn.ReLU(), spconv.SparseReLU())
    with torch.no_grad():
        y = seq(x)
    assert type(y) is CADTensor and y.plan is x.plan and y.step == 1 and y.cache is x.cache
    torch.testing.assert_close(y.features, torch.relu(bn(x.features)), **tol(torch.float64))
    w = torch.randn(4, 6, 3, 3, dtype=torch.float64)
    z = CF.conv2d(y, w, stride=2)
    assert z.step == 2 and z.cache is x.cache
    torch.testing.assert_close(z.features, ref.conv(y.features, levels, 1, 2, w, None, 1, 1),
                               rtol=1e-9, atol=1e-10)


def test_dense_owner_fill_and_spconv_scatter():
    """``dense()`` fills every cell from its owner (the contract); ``fill="scatter"`` is
    spconv's own densify (features at the site cells, zeros elsewhere), and equals what the
    base class computes."""
    x, levels = make_input(((9, 10), 2, "keep"), 2, 3, torch.float64, "cpu", seed=5)
    owner = x.plan.geometry(2).owner
    want = x.features[owner.reshape(-1)].reshape(*owner.shape, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(x.dense(), want, rtol=0, atol=0)
    scattered = x.dense(fill="scatter")
    torch.testing.assert_close(scattered, spconv.SparseConvTensor.dense(x), rtol=0, atol=0)
    torch.testing.assert_close(x.dense(False, fill="scatter"), scattered.permute(0, 2, 3, 1), rtol=0, atol=0)
    sites = torch.zeros(owner.shape, dtype=torch.bool)
    c = x.plan.geometry(2).coords
    sites[c[:, 0], c[:, 1], c[:, 2]] = True
    assert bool((scattered.permute(0, 2, 3, 1)[~sites] == 0).all())
    torch.testing.assert_close(x.dense(grid="step"), want[:, :, ::4, ::4], rtol=0, atol=0)
    torch.testing.assert_close(x.dense(fill="scatter", grid="step"), scattered[:, :, ::4, ::4],
                               rtol=0, atol=0)
    # the module form picks the same grid
    from cad_spconv.nn import Densify
    torch.testing.assert_close(Densify(grid="step")(x), want[:, :, ::4, ::4], rtol=0, atol=0)
    torch.testing.assert_close(Densify()(x), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="fill must be"):
        x.dense(fill="nearest")
    with pytest.raises(TypeError, match=r"x.dense\(grid='step'\)"):  # not read as channels_first
        x.dense("step")


def _plan_of_kind(levels: str, rng, grid=(13, 11), L=2):
    """(level map, plan) of 3 images on an odd grid: ``"all l"`` every cell at level l (the
    sites one grid's cells), else random multi-level masks that differ per image (``"1 or
    2"``: nothing kept at level 0)."""
    if levels.startswith("all"):
        level_map = np.full((3, *grid), int(levels[-1]))
    else:
        masks = [rng.uniform(size=(3, *grid)) < 0.05 for _ in range(L)]
        if levels == "1 or 2":
            masks[0][:] = False
        level_map = ref.levels_from_masks(masks, L)
    return level_map, LevelPlan.from_level_map(torch.from_numpy(level_map), L)


@pytest.mark.parametrize("levels", ["0 or 1 or 2", "1 or 2", "all 0", "all 1", "all 2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_owner_fill_on_every_kind_of_plan(levels, dtype):
    """Owner fill and the step's grid at every step, whichever shortcut applies (sites all
    the cells of one grid, or not), against the emulation's fill; integer features too."""
    rng = np.random.default_rng(8)
    level_map, plan = _plan_of_kind(levels, rng)
    L = plan.num_levels
    for step in range(L + 1):
        feats = torch.from_numpy(rng.integers(-99, 99, (plan.num_sites(step), 5))).to(dtype)
        x = CADTensor(feats, plan, step)
        want = ref.Geometry(level_map, step).fill(feats)
        torch.testing.assert_close(x.dense(), want, rtol=0, atol=0)
        torch.testing.assert_close(x.dense(grid="step"), want[:, :, ::2 ** step, ::2 ** step],
                                   rtol=0, atol=0)
        torch.testing.assert_close(x.dense(channels_first=False), want.permute(0, 2, 3, 1),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("levels", ["0 or 1 or 2", "all 0", "all 1", "all 2"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_dense_into_a_kept_buffer(levels, layout):
    """``dense(out=...)`` writes every cell of the buffer, whichever shortcut applies (a view, an
    upsampling, a gather, the scatter), on odd sizes and a batch of different masks, and returns
    the buffer itself; the buffer's old contents never leak through."""
    rng = np.random.default_rng(9)
    grid, L = (13, 11), 2
    if levels.startswith("all"):
        level_map = np.full((3, *grid), int(levels[-1]))
    else:
        level_map = ref.levels_from_masks([rng.uniform(size=(3, *grid)) < 0.05
                                           for _ in range(L)], L)
    plan = LevelPlan.from_level_map(torch.from_numpy(level_map), L)
    for step in range(L + 1):
        x = CADTensor(torch.randn(plan.num_sites(step), 5, dtype=torch.float64), plan, step)
        for kwargs in ({}, {"grid": "step"}, {"fill": "scatter"}, {"channels_first": False}):
            want = x.dense(**kwargs)
            shape = want.shape
            if layout == "strided":  # every other column of a wider buffer
                buf = torch.full((*shape[:-1], 2 * shape[-1]), float("nan"),
                                 dtype=want.dtype)[..., ::2]
            else:
                buf = torch.full(shape, float("nan"), dtype=want.dtype)
                if layout == "channels_last" and len(shape) == 4:
                    buf = buf.contiguous(memory_format=torch.channels_last)
            got = x.dense(**kwargs, out=buf)
            assert got is buf
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_dense_passes_gradients_on_every_path(level):
    """Owner fill is differentiable on each path (the upsampling into a fresh result included):
    gradcheck in float64 on an odd grid, a batch of two."""
    levels = torch.full((2, 7, 5), level, dtype=torch.long)
    levels[1, :4, :4] = 0  # the images differ: the gather beside the grid paths
    for lv in (levels, torch.full_like(levels, level)):
        plan = LevelPlan.from_level_map(lv, 2)
        f = torch.randn(plan.num_sites(2), 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda f: CADTensor(f, plan, 2).dense(), (f,))


def test_dense_refuses_a_buffer_that_does_not_fit():
    x, _ = make_input(((9, 10), 2, "keep"), 2, 3, torch.float64, "cpu", seed=5)
    want = x.dense()
    B, C, H, W = want.shape
    with pytest.raises(ValueError, match=rf"out must be a \[{B}, {C}, {H}, {W}\] torch.float64"):
        x.dense(out=torch.empty(B, H, W, C, dtype=torch.float64))  # NHWC for channels-first
    with pytest.raises(ValueError, match="got .* torch.float32"):
        x.dense(out=torch.empty(want.shape))
    with pytest.raises(TypeError, match="out must be a tensor"):
        x.dense(out=want.numpy())
    with pytest.raises(ValueError, match="shares memory with the features"):
        x.dense(grid="step", out=x.features.view(-1)[:want[:, :, ::4, ::4].numel()].view(
            want[:, :, ::4, ::4].shape))


@pytest.mark.parametrize("levels", ["0 or 1 or 2", "1 or 2", "all 0", "all 2"])
@pytest.mark.parametrize("inference", [False, True])
@pytest.mark.parametrize("chunk_rows", [3, None])
def test_dense_consume_builds_the_map_in_the_features_buffer(levels, inference, chunk_rows,
                                                             monkeypatch):
    """``dense(consume=True)`` in a buffer with room (``features_with_room``): the owner fill
    of the emulation, at every step of random multi-level masks that differ per image on an
    odd grid, in the features' own buffer where it is not one grid's map already (then a
    view), in chunks of a few rows too; every other kwarg as ``dense``; the consumed tensor's
    features raise afterwards."""
    from cad_spconv import tensor
    from cad_spconv.tensor import features_with_room
    if chunk_rows is not None:
        monkeypatch.setattr(tensor, "_IN_PLACE_CHUNK_BYTES", chunk_rows * 5 * 8)
    plan = _plan_of_kind(levels, np.random.default_rng(12))[1]
    L = plan.num_levels
    for step in range(L + 1):
        for kwargs in ({}, {"channels_first": False}, {"grid": "step"}, {"fill": "scatter"}):
            with torch.inference_mode(inference):
                feats = torch.randn(plan.num_sites(step), 5, dtype=torch.float64)
                x = CADTensor(feats, plan, step)
                want = x.dense(**kwargs)
                room = features_with_room(plan, step, 5, torch.float64)
                room.copy_(feats)
                x = x.replace_feature(room)
                ptr = room.data_ptr()
                del room
                got = x.dense(**kwargs, consume=True)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            if not kwargs or kwargs == {"channels_first": False}:  # in place, or a view
                assert got.data_ptr() == ptr
            with pytest.raises(RuntimeError, match="features were released"):
                x.features


def test_dense_consume_in_place_needs_owners_in_raster_order():
    """The in-place fill relies on each cell's owner coming at or before it: with an owner map
    that breaks this (as another site order would), the map is a fresh one, and right."""
    import dataclasses

    from cad_spconv.tensor import features_with_room
    plan = _plan_of_kind("0 or 1 or 2", np.random.default_rng(3))[1]
    geo = plan.geometry(1)
    owner = geo.owner.clone()
    owner[0, 0, 0] = geo.num_sites - 1  # the first cell owned by the last site
    plan._geometry[1] = dataclasses.replace(geo, owner=owner)
    feats = torch.randn(plan.num_sites(1), 5, dtype=torch.float64)
    want = CADTensor(feats, plan, 1).dense()
    room = features_with_room(plan, 1, 5, torch.float64).copy_(feats)
    x, ptr = CADTensor(room, plan, 1), room.data_ptr()
    del room
    got = x.dense(consume=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got.data_ptr() != ptr


def test_dense_consume_leaves_shared_features_alone():
    """Where anything else holds the features (another tensor on them, a view, autograd),
    ``dense(consume=True)`` builds a fresh map and the other holder's values stay as they
    were; without room it is a fresh map too."""
    from cad_spconv.tensor import features_with_room
    x, _ = make_input(((9, 10), 2, "keep"), 1, 3, torch.float64, "cpu", seed=7)
    want = x.dense()

    def fresh():
        f = features_with_room(x.plan, 1, 3, torch.float64)
        return x.replace_feature(f.copy_(x.features))

    y = fresh()
    other = y.shadow_copy()  # a second tensor on the same feature matrix
    kept = other.features.clone()
    torch.testing.assert_close(y.dense(consume=True), want, rtol=0, atol=0)
    assert torch.equal(other.features, kept)
    for inference in (False, True):  # a view of the features (without autograd's base too)
        with torch.inference_mode(inference):
            y = fresh()
            view = y.features[1:]
            kept = view.clone()
            torch.testing.assert_close(y.dense(consume=True), want, rtol=0, atol=0)
            assert torch.equal(view, kept)
    y = fresh()
    y = y.replace_feature(y.features.requires_grad_())
    got = y.dense(consume=True)
    assert got.requires_grad and got.data_ptr() != want.data_ptr()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(x.dense(consume=True), want, rtol=0, atol=0)  # no room
    with pytest.raises(RuntimeError, match="features were released"):  # consumed twice
        x.dense(consume=True)
    assert "released" in repr(x)
    again = x.replace_feature(torch.zeros(x.plan.num_sites(1), 3, dtype=torch.float64))
    assert again.num_sites == x.plan.num_sites(1)  # a released tensor still makes new ones
    with pytest.raises(TypeError, match="consume must be a bool"):
        make_input(((9, 10), 2, "keep"), 1, 3, torch.float64, "cpu")[0].dense(consume=1)


def test_replace_feature_keeps_plan_and_refuses_a_wrong_row_count():
    x, _ = make_input(((8, 8), 1, "keep"), 0, 2, torch.float32, "cpu", seed=6)
    y = x.replace_feature(x.features * 2)
    assert y.plan is x.plan and y.cache is x.cache and isinstance(y, CADTensor)
    with pytest.raises(ValueError, match="rows"):
        x.replace_feature(x.features[:-1])
    with pytest.raises(NotImplementedError, match="fixed by its plan"):
        x.select_by_index(torch.arange(3))


def test_a_rulebook_cache_serves_one_plan():
    """Cache keys do not name the plan: a cache handed to a tensor on another plan (even one
    with the same site counts) would give it the first plan's rulebooks."""
    x, _ = make_input(((8, 8), 1, "keep"), 1, 2, torch.float64, "cpu", seed=6)
    CF.conv2d(x, torch.randn(2, 2, 3, 3, dtype=torch.float64))
    other = LevelPlan(x.plan.levels.clone(), x.plan.num_levels)
    with pytest.raises(ValueError, match="another plan.*leave cache= out"):
        CADTensor(x.features, other, 1, x.cache)
    y = CADTensor(x.features, x.plan, 1, x.cache)  # the same plan shares it
    assert y.cache is x.cache


def test_replace_feature_at_another_step_and_bad_features():
    """A derived tensor takes the new step's indices and shares plan and cache; what is not a
    [N, C] tensor of the right rows, or sits on another device, is refused by name."""
    x, levels = make_input(((9, 7), 1, "keep"), 0, 2, torch.float32, "cpu", seed=6)
    n1 = x.plan.num_sites(1)
    f1 = torch.randn(n1, 3, generator=torch.Generator().manual_seed(6))
    y = x.replace_feature(f1, step=1)
    assert (y.step, y.num_sites, y.num_channels) == (1, n1, 3) and x.step == 0
    assert y.indices is x.plan.geometry(1).indices and x.indices is x.plan.geometry(0).indices
    assert y.plan is x.plan and y.cache is x.cache and y.spatial_shape == [9, 7]
    # densified through step 1's owners (the reference), not step 0's
    torch.testing.assert_close(y.dense(), ref.Geometry(levels, 1).fill(f1), rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{n1 + 1} rows, the plan has {n1} sites at step 1"):
        x.replace_feature(torch.zeros(n1 + 1, 3), step=1)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        x.replace_feature(torch.zeros(x.num_sites))
    with pytest.raises(ValueError, match="features are on meta"):
        x.replace_feature(torch.zeros(x.num_sites, 2, device="meta"))


def test_rulebooks_are_inspectable_in_spconv_pair_format():
    """The pairs of a cached rulebook drive spconv's own indice_conv to the same output as the
    engines (float64), whatever the engine that built the cache."""
    w = torch.randn(3, 5, 3, 3, dtype=torch.float64)
    for engine in ("lattice", "torch"):
        x, levels = make_input(((11, 12), 2, "levels"), 0, 5, torch.float64, "cpu", seed=7)
        y = CF.conv2d(x, w, stride=2, engine=engine)
        (key, book), = x.cache.items()
        pairs, counts = book.spconv_pairs()
        assert pairs.dtype == torch.int32 and pairs.shape == (2, 9, book.num_out)
        assert counts.shape == (9,) and int(counts.sum()) == book.num_pairs()
        # every pair is a (input row, output row) read of the gather table
        for k in range(9):
            n = int(counts[k])
            got = book.gather[pairs[1, k, :n].long(), k]
            assert torch.equal(got, pairs[0, k, :n].long())
        expected = ref.conv(x.features, levels, 0, 2, w, None, 1, 1)
        torch.testing.assert_close(y.features, expected, rtol=1e-9, atol=1e-10)
        # the pairs alone compute the conv (what spconv's indice_conv does): per tap (row-major
        # over the kernel) out[o] += x[i] @ W_tap
        taps = w.permute(2, 3, 1, 0).reshape(9, 5, 3)
        out = torch.zeros(book.num_out, 3, dtype=torch.float64)
        for k in range(9):
            n = int(counts[k])
            rows_in, rows_out = pairs[0, k, :n].long(), pairs[1, k, :n].long()
            out.index_add_(0, rows_out, x.features[rows_in] @ taps[k])
        torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-10)
        assert np.isfinite(y.features.numpy()).all()
