"""Engines beyond the op checks of test_ops.py (which run every engine against the dense
emulation): gradients, the lattice split, workspaces and bad input."""
import numpy as np
import pytest
import torch

from tests.support import dense_reference as ref
from cad_spconv import CADTensor, LevelPlan, conv_rulebook, functional as CF
from cad_spconv.backend import spconv_status
from cad_spconv.engines import ENGINES, select_engine, sparse_conv
from tests.support import rounding as R
from tests.support.inputs import make_input


@pytest.mark.parametrize("engine", ["lattice", "torch", "products"])
@pytest.mark.parametrize("k,stride,groups", [(3, 1, 1), (3, 2, 1), (1, 2, 1), (1, 1, 1),
                                             (3, 2, 2), (1, 1, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("weight_format", [torch.contiguous_format, torch.channels_last])
def test_gradients_match_dense_reference(engine, k, stride, groups, dtype, weight_format,
                                         device):
    """Backward through the engine equals backward through the dense emulation in float64
    (float32: the engine's own GEMM route, e.g. oneDNN on CPU, against the float64 one), with
    NCHW and channels-last weights (which the engines read as views where they can)."""
    if engine == "products" and groups > 1:
        pytest.skip("the products engine has no grouped convs (its refusal: test_ops.py)")
    case = ((13, 11), 2, "levels")
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    for step in range(2 if stride == 2 else 3):
        x, levels = make_input(case, step, 4, torch.float64, device, seed=step + 7)
        gen = torch.Generator().manual_seed(step)
        w = torch.randn(6, 4 // groups, k, k, generator=gen, dtype=torch.float64).to(device)
        b = torch.randn(6, generator=gen, dtype=torch.float64).to(device)
        up = None
        grads = []
        for run in ("engine", "reference"):
            cast = dtype if run == "engine" else torch.float64
            f = x.features.to(cast).requires_grad_(True)
            fmt = weight_format if run == "engine" else torch.contiguous_format
            wr = w.to(cast).clone(memory_format=fmt).requires_grad_(True)
            br = b.to(cast).requires_grad_(True)
            if run == "engine":
                y = CF.conv2d(CADTensor(f, x.plan, step), wr, br, stride, 1, groups, engine).features
            else:
                y = ref.conv(f, levels, step, stride, wr, br, 1, groups)
            if up is None:
                up = torch.randn(y.shape, generator=torch.Generator().manual_seed(3),
                                 dtype=torch.float64).to(device)
            (y * up.to(cast)).sum().backward()
            grads.append((f.grad, wr.grad, br.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_gemm_route(dtype, amx, monkeypatch):
    """``x @ w.T + b`` of the lattice engine's GEMMs: oneDNN's 1x1 conv on channels-last views
    on CPU for float32, and for bfloat16 where the CPU has no AMX; a GEMM otherwise (torch.mm);
    same values either way, into a given output too, and no rows at all."""
    import cad_spconv.engines.gemm as E
    monkeypatch.setattr(E, "CPU_AMX", amx)
    calls = []
    real = E.F.conv2d
    monkeypatch.setattr(E.F, "conv2d", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((37, 20), (9, 20), (9,)))
    want = x.double() @ w.double().t() + b.double()
    size = x.double().abs() @ w.double().abs().t()
    # a float32 accumulator for bfloat16, the bias possibly added to the rounded product
    bound = R.conv_bound(size + b.double().abs(), want, dtype, 21, roundings=2)
    unbiased = R.conv_bound(size, want - b.double(), dtype, 20)
    into = torch.full((37, 9), float("nan"), dtype=dtype)
    given = E.matmul_nk(x, w, b, out=into)
    onednn = (dtype in E._ONEDNN_DTYPES and torch.backends.mkldnn.is_available()
              and not (amx and dtype == torch.bfloat16))
    assert (given is into) != onednn  # oneDNN returns its own result, never a copy
    for got in (E.matmul_nk(x, w, b), given):
        assert got.shape == (37, 9) and got.dtype == dtype
        R.assert_within(got, want, bound, "x @ w.T + b")
    R.assert_within(E.matmul_nk(x, w, None), want - b.double(), unbiased, "x @ w.T")
    assert len(calls) == (3 if onednn else 0)
    assert E.matmul_nk(x[:0], w, b).shape == (0, 9)
    # the gather's chunks: oneDNN's 1x1 conv in float32 on AVX-512 CPUs only
    for fp32_chunks_on_onednn in (True, False):
        monkeypatch.setattr(E, "CPU_AVX512", fp32_chunks_on_onednn)
        calls.clear()
        into = torch.full((37, 9), float("nan"), dtype=dtype)
        got = E.matmul_nk(x, w, b, into, chunk=True)
        assert len(calls) == (1 if onednn and dtype == torch.float32 and fp32_chunks_on_onednn
                              else 0)
        assert (got is into) == (len(calls) == 0)
        R.assert_within(got, want, bound, f"chunks, oneDNN {fp32_chunks_on_onednn}")


@pytest.mark.parametrize("fp32_chunks_on_onednn", [True, False])
def test_float32_gather_on_either_chunk_route(fp32_chunks_on_onednn, monkeypatch):
    """float32 gathers in chunks on oneDNN's 1x1 conv (AVX-512 CPUs) or on ``torch.mm`` with
    only the kernel rows inside the grid (AVX2-only CPUs): both against the float64 dense
    emulation, many chunks, dilated taps that leave the grid, images with different masks."""
    import cad_spconv.engines.gemm as G
    import cad_spconv.engines.lattice as E
    monkeypatch.setattr(G, "CPU_AVX512", fp32_chunks_on_onednn)
    monkeypatch.setattr(E, "gather_cost", lambda *a: 0.0)  # every off-lattice site gathered
    monkeypatch.setattr(E, "_GATHER_CHUNK_ELEMENTS", 9 * 8 * 7)  # 7 rows per chunk
    x, levels = make_input(((17, 23), 3, "map"), 1, 8, torch.float32, "cpu", seed=21)
    onednn = torch.backends.mkldnn.is_available()
    assert E._reads_inside_rows(x.features, 1) == (not (fp32_chunks_on_onednn and onednn))
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(5, 8, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    w, b = w.float(), b.float()
    with torch.no_grad():
        got = CF.conv2d(x, w, b, 1, 3, 1, "lattice").features
    R.assert_conv_within(got, x.features, levels, 1, 1, w, b, 3, engine="lattice")


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_gemm_route_reaches_onednn_with_gradients():
    """At network sizes (more than 20480 input elements, 2 threads) PyTorch runs the 1x1 conv on
    oneDNN itself (smaller ones take its own GEMM path): values and gradients in float32 against
    float64, and the kernel seen in the profile."""
    import cad_spconv.engines.gemm as E
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(1)
        x, w, b = (torch.randn(*shape, generator=gen) for shape in ((3000, 64), (96, 64), (96,)))
        up = torch.randn(3000, 96, generator=gen)
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        with torch.profiler.profile() as prof:
            y = E.matmul_nk(xs, ws, bs)
        (y * up).sum().backward()
        x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
        y64 = x64 @ w64.t() + b64
        (y64 * up.double()).sum().backward()
    finally:
        torch.set_num_threads(threads)
    assert "aten::mkldnn_convolution" in {e.key for e in prof.key_averages()}
    x, w, b, up = (t.double().abs() for t in (x, w, b, up))
    # (result, float64 result, S, terms, roundings): the bias may be added to a rounded GEMM
    for got, want, size, terms, roundings in (
            (y, y64, x @ w.t() + b, 65, 2), (xs.grad, x64.grad, up @ w, 96, 1),
            (ws.grad, w64.grad, up.t() @ x, 3000, 1), (bs.grad, b64.grad, up.sum(0), 3000, 1)):
        R.assert_within(got, want, R.conv_bound(size, want, torch.float32, terms,
                                                roundings=roundings))


@pytest.mark.parametrize("grid,L", [((13, 11), 1), ((17, 23), 3), ((64, 128), 1)])
def test_lattice_split_partitions_the_output(grid, L, device):
    """Lattice rows and rest rows cover every output site once; the rest reads exactly the
    full rulebook's entries; the lattice cells are sites of their step."""
    rng = np.random.default_rng(0)
    keep = torch.from_numpy(rng.uniform(size=(2, *grid)) < 0.1).to(device)
    plan = LevelPlan.from_keep(keep, grid, L)
    for step_in in range(L + 1):
        for step_out in {step_in, min(step_in + 1, L)}:
            book = conv_rulebook(plan, (3, 3), (2, 2), step_in, step_out)
            split = book.lattice()
            out_rows = (torch.arange(book.num_out, device=device) if split.out_rows is None
                        else split.out_rows)
            phase_rows = [p.out_rows for p in split.phases]
            rows = torch.cat([out_rows, split.rest_rows, *phase_rows]).sort().values
            assert torch.equal(rows, torch.arange(book.num_out, device=device))
            geo = plan.geometry(step_out)
            for part in split.phases:  # a phase site reads its own cell's owner on the grid
                (a, b), (Hp, Wp), s = part.offset, part.grid, 2 ** step_in
                c = geo.coords[part.out_rows]
                assert bool(((c[:, 1] % s == a) & (c[:, 2] % s == b)).all())
                images = c[:, 0].unique()  # the images whose phase runs densely, in order
                slot = torch.searchsorted(images, c[:, 0].contiguous())
                assert part.in_rows.numel() == images.numel() * Hp * Wp
                assert torch.equal(part.positions, (slot * Hp + c[:, 1] // s) * Wp + c[:, 2] // s)
                assert torch.equal(part.in_rows[part.positions], part.out_rows)
            coords = plan.geometry(step_out).coords[out_rows]
            s = 2 ** step_out
            assert bool(((coords[:, 1] % s == 0) & (coords[:, 2] % s == 0)).all())
            if split.in_rows is not None:
                cin = plan.geometry(step_in).coords[split.in_rows]
                Hi, Wi = split.in_grid
                ys = torch.arange(Hi, device=device).repeat_interleave(Wi).repeat(2) * 2 ** step_in
                assert torch.equal(cin[:, 1], ys)
            full = book.gather[split.rest_rows]
            inside = split.num_inside
            assert torch.equal(full[:inside], split.rest_index[:inside])
            assert bool((full[:inside] >= 0).all())
            outside = full[inside:] < 0
            assert torch.equal(split.border_zeros, outside.reshape(-1).nonzero()[:, 0])
            assert split.border_zero_offsets.tolist() == [0] + outside.sum(1).cumsum(0).tolist()
            # row groups: contiguous over the border, each site's inside kernel rows exactly
            # [first, stop), and the taps left to zero on those rows
            K, (kh, kw) = book.num_taps, book.kernel_size
            start, row_zeros, counts = inside, [], []
            for lo, hi, r0, r1 in split.row_groups:
                assert lo == start and hi > lo and 0 <= r0 < r1 <= kh
                start = hi
                rows_in = (full[lo:hi] >= 0).view(-1, kh, kw).any(2)
                assert bool(rows_in[:, r0:r1].all()) and not bool(rows_in[:, :r0].any())
                assert not bool(rows_in[:, r1:].any())
                out_taps = (full[lo:hi] < 0).view(-1, kh, kw)[:, r0:r1].reshape(hi - lo, -1)
                counts += out_taps.sum(1).tolist()
                site, tap = out_taps.nonzero().unbind(1)
                row_zeros.append((site + lo - inside) * K + tap)
            assert start == split.num_rest
            assert torch.equal(split.row_zeros, torch.cat(row_zeros) if row_zeros
                               else torch.zeros(0, dtype=torch.long, device=device))
            assert split.row_zero_offsets.tolist() == [0] + torch.tensor(
                counts, dtype=torch.long).cumsum(0).tolist()
            centre = full[inside:, 4:5].expand_as(full[inside:])  # out of grid: own centre row
            assert torch.equal(torch.where(full[inside:] >= 0, full[inside:], centre),
                               split.rest_index[inside:])
            # every row read lies in the output site's own image (no cross-image reads)
            img_in = plan.geometry(step_in).coords[:, 0]
            img_out = plan.geometry(step_out).coords[split.rest_rows, 0]
            assert torch.equal(img_in[split.rest_index], img_out[:, None].expand_as(full))


@pytest.mark.parametrize("cost", [float("inf"), None])
@pytest.mark.parametrize("case", [((13, 11), 2, "levels"), ((17, 23), 3, "map"),
                                  ((9, 16), 2, "keep"), ((13, 11), 2, "all")])
@pytest.mark.parametrize("k,dilation,groups", [(3, 1, 1), (3, 3, 1), ((3, 5), (2, 1), 1),
                                               (5, 1, 2), (3, 6, 1)])
def test_dense_phases_match_dense_reference(cost, case, k, dilation, groups, device,
                                            monkeypatch):
    """Stride-1 convs at step >= 1 with off-lattice phases run as dense convs on the phase
    grids (every phase: cost inf; the engine's rule: None), float64 against the dense emulation,
    values and gradients; batches whose images have different masks, odd grids, wide dilations
    whose taps mostly leave the grid."""
    import cad_spconv.engines.lattice as E
    rule = E.gather_cost
    if cost:
        monkeypatch.setattr(E, "gather_cost", lambda *a: cost)
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(5)
    for step in range(1, case[1] + 1):
        x, levels = make_input(case, step, 6, torch.float64, device, seed=step + 11)
        w = torch.randn(4, 6 // groups, kh, kw, generator=gen, dtype=torch.float64).to(device)
        b = torch.randn(4, generator=gen, dtype=torch.float64).to(device)
        book = conv_rulebook(x.plan, (kh, kw), (dilation,) * 2 if isinstance(dilation, int)
                             else dilation, step, step)
        split = book.lattice(cost or rule(book.num_taps, 6 // groups))
        if cost == float("inf") and not split.finest:  # every off-lattice site in a phase
            assert split.num_rest == 0
            assert sum(p.out_rows.numel() for p in split.phases) + (
                split.out_rows.numel() if split.out_rows is not None else 0) == book.num_out
        grads = []
        for run in ("engine", "reference"):
            f = x.features.clone().requires_grad_(True)
            wr, br = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
            if run == "engine":
                y = CF.conv2d(CADTensor(f, x.plan, step), wr, br, 1, dilation, groups,
                              "lattice").features
                with torch.no_grad():  # the inference path (workspaces) gives the same
                    torch.testing.assert_close(CF.conv2d(
                        x, w, b, 1, dilation, groups, "lattice").features, y.detach(),
                        rtol=1e-12, atol=1e-12)
            else:
                y = ref.conv(f, levels, step, 1, wr, br, dilation, groups)
            (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=device
                                ).view_as(y)).sum().backward()
            grads.append((y.detach(), f.grad, wr.grad, br.grad))
        for got, want in zip(*grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_dense_phase_rule(monkeypatch):
    """The ASPP's wide taps (rate 36 on a 64x128 grid at step 1: most taps of a site are padding)
    make a sparser phase go dense than a conv whose taps stay inside the grid."""
    import cad_spconv.rulebook as R
    assert R._mean_taps_in_grid(32, 3, 1) == pytest.approx(3 - 2 / 32)
    assert R._mean_taps_in_grid(32, 3, 18) == pytest.approx(2 - 4 / 32)  # rows 14..17: 1 tap
    assert R._mean_taps_in_grid(5, 3, 9) == 1.0
    keep = torch.zeros(1, 64, 128, dtype=torch.bool)
    keep[:, :, :80] = True  # 62.5 % of the cells kept
    plan = LevelPlan.from_keep(keep, (64, 128), 1)
    wide = conv_rulebook(plan, (3, 3), (18, 18), 1, 1).lattice(1.2)
    narrow = conv_rulebook(plan, (3, 3), (1, 1), 1, 1).lattice(1.2)
    assert len(wide.phases) == 3 and wide.num_rest == 0
    # a gather of only the inside kernel rows (1.875 of 3 on a 32-row phase grid at rate 18)
    # costs 1.2 * 1280 * 5.625 = 8640 < 2048 * 1.875 * 2.4375 = 9360: gathered
    book = conv_rulebook(plan, (3, 3), (18, 18), 1, 1)
    rows_only = book.lattice(1.2, inside_rows=True)
    assert rows_only.phases == () and rows_only.num_rest == 3 * 32 * 40
    # one rulebook keeps both splits apart (inside_rows is part of the cache key), and
    # prepare() builds on a fresh one what a forward built on another (the bench's geometry)
    assert book.lattice(1.2) is not rows_only and len(book.lattice(1.2).phases) == 3
    assert book.lattice(1.2, True) is rows_only and book.lattice_args() == ((1.2, True), (1.2, False))
    from cad_spconv.engines import prepare
    fresh = conv_rulebook(plan, (3, 3), (18, 18), 1, 1)
    assert prepare(fresh, "lattice", like=book) == "lattice"
    assert fresh.lattice_args() == book.lattice_args()
    assert narrow.phases == () and narrow.num_rest == 3 * 32 * 40
    # the same at a higher gather cost: every phase of the narrow conv (0.625 * 1.6 >= 0.94)
    assert len(conv_rulebook(plan, (3, 3), (1, 1), 1, 1).lattice(1.6).phases) == 3
    from cad_spconv.engines.lattice import gather_cost
    # chunks on oneDNN's 1x1 conv (float32, AVX-512) pay its weight reorder per chunk: the
    # ASPP's (227 rows) more; chunks on torch.mm have no such cost: one figure per CPU kind
    import cad_spconv.engines.gemm as G
    for avx512, cost in ((True, 1.2), (False, 1.0)):
        monkeypatch.setattr(G, "CPU_AVX512", avx512)
        assert gather_cost(9, 512, True) == cost and gather_cost(9, 2048, True) == 1.5
        assert gather_cost(9, 512) == cost and gather_cost(9, 2048) == cost
        assert gather_cost(9, 2048, cuda=True) == 1.2


def test_dense_phases_are_chosen_per_image():
    """Phases go dense per image: in a batch of a fully kept and a sparse image only the kept
    image's phases run densely, the sparse one's sites are gathered as in a batch of its own
    (so one image's mask never changes how another's are computed). Bitwise equality is not
    claimed: the lattice conv and the gather chunks see the whole batch, and oneDNN's blocking
    may change the rounding with the batch."""
    keep = torch.zeros(2, 64, 128, dtype=torch.bool)
    keep[0] = True
    keep[1, :8, :8] = True
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 3, 3, generator=gen)
    alone, pair = (LevelPlan.from_keep(k, (64, 128), 1) for k in (keep[1:], keep))
    dense_images = []
    for plan in (alone, pair):
        split = conv_rulebook(plan, (3, 3), (18, 18), 1, 1).lattice(1.2)
        dense_images.append([p.in_rows.numel() // (p.grid[0] * p.grid[1]) for p in split.phases])
    assert dense_images == [[], [1, 1, 1]]  # only the fully kept image's phases are dense
    f1 = torch.randn(alone.num_sites(1), 8, generator=gen)
    second = pair.geometry(1).coords[:, 0] == 1  # sites in raster order: image 1's come last
    f = torch.cat([torch.randn(int((~second).sum()), 8, generator=gen), f1])
    y1 = CF.conv2d(CADTensor(f1, alone, 1), w, None, 1, 18, 1, "lattice").features
    y = CF.conv2d(CADTensor(f, pair, 1), w, None, 1, 18, 1, "lattice").features
    # both within the rounding bound of image 1's own float64 conv
    levels = ref.levels_from_masks([keep[1:].numpy()], 1)
    for got, what in ((y1, "alone"), (y[second], "in the pair")):
        R.assert_conv_within(got, f1, levels, 1, 1, w, None, 18, engine="lattice", what=what)


def test_lattice_at_step_zero_is_one_dense_conv(device):
    """With nothing merged yet the lattice engine is exactly the dense conv (no gather)."""
    x = torch.randn(2, 5, 9, 14, dtype=torch.float64, device=device)
    t = CADTensor.from_dense(x, torch.zeros(2, 9, 14, dtype=torch.bool, device=device), 1)
    w = torch.randn(7, 5, 3, 3, dtype=torch.float64, device=device)
    y = CF.conv2d(t, w, engine="lattice")
    assert y.cache.keys() and all("gather" not in book._derived for _, book in y.cache.items())
    torch.testing.assert_close(y.dense(), torch.nn.functional.conv2d(x, w, padding=1),
                               rtol=1e-9, atol=1e-10)


def test_auto_engine_selection():
    plan = LevelPlan.from_keep(torch.zeros(1, 5, 5, dtype=torch.bool), (5, 5), 1)
    book = conv_rulebook(plan, (3, 3), (1, 1), 0, 1)
    assert select_engine(torch.device("cpu"), 1, book) == "lattice"
    assert select_engine(torch.device("cuda"), 1, book) == "torch"  # measured (BENCHMARKS.md)
    from cad_spconv import GatherRulebook
    hand = GatherRulebook(book.gather, book.num_in, (3, 3), 0, 1)
    assert select_engine(torch.device("cpu"), 1, hand) == "torch"
    with pytest.raises(ValueError, match="lattice engine needs a conv rulebook"):
        sparse_conv(torch.randn(25, 2), torch.randn(2, 2, 3, 3), None, hand, engine="lattice")
    with pytest.raises(ValueError, match="unknown engine"):
        sparse_conv(torch.randn(25, 2), torch.randn(2, 2, 3, 3), None, book, engine="fast")
    assert {"auto", "tuned", "lattice", "torch", "spconv", "spconv-igemm", "products"} == set(
        ENGINES)


@pytest.mark.skipif(not spconv_status()[0], reason=f"spconv unavailable: {spconv_status()[1]}")
def test_tuned_leaves_out_engines_that_sum_half_precision_in_it():
    """spconv runs float16 on CPU but adds its taps in float16: ``tuned`` must not pick it for
    half precision (its result would depend on the timing: a test of float32 sums failed
    when spconv won), and keeps it for float32."""
    import cad_spconv.engines as E
    from cad_spconv.engines.tuned import candidates
    x, _ = make_input(((13, 11), 2, "levels"), 1, 8, torch.float32, "cpu", seed=2)
    w = torch.randn(8, 8, 3, 3)
    book = CF.conv_book(x, (3, 3), 1, 1)
    half = [n for n, e in E.registered().items() if e.sums_half_in_dtype]
    assert "spconv" in half and "torch" not in half
    assert "spconv" in candidates(x.features, w, 1, book)
    for dtype in (torch.float16, torch.bfloat16):
        f, wd = x.features.to(dtype), w.to(dtype)
        assert E.registered()["spconv"].supports(f, wd, 1, book) == (dtype == torch.float16)
        names = candidates(f, wd, 1, book)
        assert "torch" in names and not set(half) & set(names), (dtype, names)


def test_tuned_engine_times_once_per_layer_shape_and_keeps_the_fastest(monkeypatch):
    """``tuned`` times every candidate on the first call of a layer shape, keeps the fastest
    (here the one not slowed down), returns its (correct) output, and later calls of that
    shape run the kept engine only."""
    import types

    import cad_spconv.engines as E
    from cad_spconv.engines.tuned import candidates
    E.clear_tuned()
    calls = []
    clock = [0.0]  # the tuner's clock: only the slowed engines move it (no machine load can)

    def slowed(name, real):
        def conv(*args):
            calls.append(name)
            if name != "torch":
                clock[0] += 1.0  # every other engine is slower
            return real(*args)
        return conv

    for name, engine in E.registered().items():
        monkeypatch.setattr(engine, "conv", slowed(name, engine.conv))
    monkeypatch.setattr(E.tuned, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    case = ((13, 11), 2, "levels")
    x, levels = make_input(case, 1, 4, torch.float64, "cpu", seed=2)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    want = ref.conv(x.features, levels, 1, 2, w, b, 1, 1)
    with torch.no_grad():
        got = CF.conv2d(x, w, b, 2, 1, 1, "tuned").features
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    names = candidates(x.features, w, 1, CF.conv_book(x, (3, 3), 1, 2))
    assert {"lattice", "torch"} <= set(names)
    assert calls == names * (1 + E.tuned.TUNE_REPS)  # warm-ups, then the candidates in turn
    (choice,) = E.tuned_choices()
    assert choice["engine"] == "torch" and set(choice["seconds"]) == set(names)
    assert choice["weight_shape"] == (5, 4, 3, 3) and choice["adaptive_step"] == 1
    calls.clear()
    with torch.no_grad():
        again = CF.conv2d(x, w, b, 2, 1, 1, "tuned").features
    assert calls == ["torch"]
    torch.testing.assert_close(again, want, rtol=1e-9, atol=1e-10)
    # another shape (grouped: spconv cannot run it) is tuned on its own
    wg = torch.randn(6, 2, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        CF.conv2d(x, wg, None, 2, 1, 2, "tuned")
    assert len(E.tuned_choices()) == 2
    assert "spconv" not in E.tuned_choices()[1]["seconds"]
    # prepare() builds what the tuned choice last run on a rulebook reads; auto's otherwise
    assert E.prepare(CF.conv_book(x, (3, 3), 1, 2), "tuned") == E.tuned_choices()[1]["engine"]
    assert E.prepare(conv_rulebook(x.plan, (3, 3), (1, 1), 1, 2), "tuned") == "lattice"
    # ... and, given like=, what the tuned layers ran on that one
    fresh = conv_rulebook(x.plan, (3, 3), (1, 1), 1, 2)
    ran = E.prepare(fresh, "tuned", like=CF.conv_book(x, (3, 3), 1, 2))
    assert ran == E.tuned_choices()[1]["engine"]
    E.clear_tuned()
    assert E.tuned_choices() == []


def test_tuned_choice_is_per_semantics():
    """A layer shape tuned on a paper-semantics plan (where the lattice engine may win) and then
    met under semantics="reference" (where the lattice engine cannot run) is tuned again, not
    sent to the first choice (which crashed: found by the NaN tests in the full suite)."""
    import cad_spconv.engines as E
    E.clear_tuned()
    case = ((13, 11), 2, "levels")
    x, levels = make_input(case, 1, 4, torch.float64, "cpu", seed=5)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    E.tuned._tuned.clear()
    with torch.no_grad():
        CF.conv2d(x, w, None, 1, 1, 1, "tuned")
        key = next(iter(E.tuned._tuned))
        E.tuned._tuned[key] = ("lattice", E.tuned._tuned[key][1])  # as if the lattice won
        xr = CADTensor(x.features, x.plan.with_semantics("reference"), 1)
        got = CF.conv2d(xr, w, None, 1, 1, 1, "tuned").features
    want = ref.conv_reference_semantics(x.features, levels, 1, 1, w)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    semantics = {c["semantics"]: c["engine"] for c in E.tuned_choices()}
    assert semantics["paper"] == "lattice" and semantics["reference"] != "lattice"
    E.clear_tuned()


def test_inference_path_matches_autograd_path():
    """The no-grad path (preallocated buffers, chunked) equals the autograd path bit for bit
    in float64, also when the rest spans several chunks."""
    import cad_spconv.engines.lattice as E
    case = ((40, 37), 1, "keep")
    x, levels = make_input(case, 1, 8, torch.float64, "cpu", seed=5)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    b = torch.randn(8, dtype=torch.float64)
    old = E._GATHER_CHUNK_ELEMENTS, E._GATHER_CHUNK_ELEMENTS_CUDA
    try:
        E._GATHER_CHUNK_ELEMENTS = E._GATHER_CHUNK_ELEMENTS_CUDA = 9 * 8 * 7  # 7 rows per chunk
        with torch.no_grad():
            fast = CF.conv2d(x, w, b, engine="lattice").features
        slow = CF.conv2d(x, w.requires_grad_(True), b, engine="lattice").features
    finally:
        E._GATHER_CHUNK_ELEMENTS, E._GATHER_CHUNK_ELEMENTS_CUDA = old
    assert x.plan.geometry(1).coords.shape[0] > 7 * 3
    torch.testing.assert_close(fast, slow.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast, ref.conv(x.features, levels, 1, 1, w.detach(), b), rtol=1e-9,
                               atol=1e-10)


def test_packed_weight_follows_weight_updates():
    """The cached GEMM layout of a weight is rebuilt after an in-place update (inference)."""
    case = ((21, 19), 1, "keep")
    x, levels = make_input(case, 1, 5, torch.float64, "cpu", seed=11)
    w = torch.randn(4, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        first = CF.conv2d(x, w, engine="lattice").features
        w.mul_(-2.0)
        second = CF.conv2d(x, w, engine="lattice").features
    torch.testing.assert_close(second, -2.0 * first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(second, ref.conv(x.features, levels, 1, 1, w), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("engine", ["lattice", "products", "torch", "spconv"])
@pytest.mark.parametrize("fused", [True, False])
def test_kept_weights_follow_an_optimizer_step(engine, fused):
    """An eval pass keeps re-laid-out weights and the batch norm's scale and shift; after a
    training step they must follow the new parameters. Fused optimizers update parameters
    without moving their version counters, so only the optimizer step hook catches them."""
    from cad_spconv.nn import CADBatchNorm2d, CADConv2d

    if engine == "spconv":
        pytest.importorskip("spconv.pytorch")
    case = ((13, 11), 2, "levels")
    x, levels = make_input(case, 1, 8, torch.float64, "cpu", seed=5)
    torch.manual_seed(0)
    conv = CADConv2d(8, 2, 3, padding=1, engine=engine).double()
    bn = CADBatchNorm2d.from_module(torch.nn.BatchNorm2d(2).double(), inplace=True)
    model = torch.nn.Sequential(conv, bn)
    opt = torch.optim.AdamW(model.parameters(), lr=0.5, fused=fused, foreach=False if fused else None)
    model.eval()
    with torch.no_grad():
        model(x)  # keeps the weight layouts and the scale and shift
    model.train()
    model(x).features.square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        got = model(x).features
        y = ref.conv(x.features, levels, 1, 1, conv.weight, conv.bias)
        want = torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight,
                                              bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_clear_caches_after_writes_through_data():
    """Writes through ``.data`` move no version counter; ``cad_spconv.clear_caches()`` is the
    documented way to make the engines and batch norms read the new values."""
    import cad_spconv
    from cad_spconv.nn import CADBatchNorm2d, CADConv2d

    case = ((13, 11), 2, "levels")
    x, levels = make_input(case, 1, 8, torch.float64, "cpu", seed=6)
    torch.manual_seed(1)
    conv = CADConv2d(8, 2, 3, padding=1, engine="lattice").double()
    bn = CADBatchNorm2d.from_module(torch.nn.BatchNorm2d(2).double(), inplace=True).eval()
    with torch.no_grad():
        bn(conv(x))
        conv.weight.data.copy_(torch.randn_like(conv.weight))
        bn.weight.data.mul_(3.0)
        cad_spconv.clear_caches()
        got = bn(conv(x)).features
        y = ref.conv(x.features, levels, 1, 1, conv.weight, conv.bias)
        want = torch.nn.functional.batch_norm(y, bn.running_mean, bn.running_var, bn.weight,
                                              bn.bias, False, 0.0, bn.eps)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_workspaces_across_inference_mode_and_no_grad():
    """Scratch buffers made under inference_mode must not leak into no_grad calls (inference
    tensors cannot be written outside inference mode), nor the other way round."""
    case = ((19, 23), 1, "keep")
    x, levels = make_input(case, 1, 6, torch.float64, "cpu", seed=3)
    w = torch.randn(6, 6, 3, 3, dtype=torch.float64)
    expected = ref.conv(x.features, levels, 1, 1, w)
    with torch.inference_mode():
        a = CF.conv2d(x, w, engine="lattice").features
    with torch.no_grad():
        b = CF.conv2d(x, w, engine="lattice").features
    with torch.inference_mode():
        c = CF.conv2d(x, w, engine="lattice").features
    for got in (a, b, c):
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("engine", ["lattice", "torch", "auto", "tuned"])
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blas", [False, True])
def test_autocast_runs_the_conv_in_the_autocast_dtype(engine, cast, blas, monkeypatch):
    """Under ``torch.autocast`` the engines compute in its dtype, as ``F.conv2d`` does there:
    float32 features and float32 parameters, then (second conv) features already in that dtype
    with float32 parameters. ``blas``: the GEMMs on BLAS with ``out=`` (the CUDA route), which
    autocast does not cast by itself."""
    import cad_spconv.engines.gemm as E
    if blas:
        monkeypatch.setattr(E, "_ONEDNN", False)
    case = ((13, 11), 2, "levels")
    gen = torch.Generator().manual_seed(4)
    for stride in (1, 2):
        x, levels = make_input(case, 1, 8, torch.float32, "cpu", seed=4)
        w1, w2 = (torch.randn(8, 8, 3, 3, generator=gen) / 8 for _ in range(2))
        b1, b2 = (torch.randn(8, generator=gen) for _ in range(2))
        with torch.no_grad(), torch.autocast("cpu", dtype=cast):
            y = CF.conv2d(x, w1, b1, stride, 1, 1, engine)
            z = CF.conv2d(y, w2, b2, 1, 1, 1, engine)
        assert y.features.dtype == z.features.dtype == cast
        step = 1 + (stride == 2)
        # autocast rounds the float32 features, weights and biases to its dtype first: the
        # references take those rounded values
        for got, (f, step_in, s, w, b) in ((y, (x.features, 1, stride, w1, b1)),
                                           (z, (y.features, step, 1, w2, b2))):
            f, w, b = (t.to(cast) for t in (f, w, b))
            R.assert_conv_within(got.features, f, levels, step_in, s, w, b, engine=engine,
                                 what=f"{engine} stride {stride}")


def test_mixed_dtypes_outside_autocast_are_refused():
    x, _ = make_input(((9, 8), 1, "keep"), 0, 4, torch.bfloat16, "cpu", seed=1)
    w = torch.randn(4, 4, 3, 3)
    for engine in ("lattice", "torch", "tuned"):
        with pytest.raises(TypeError, match="bfloat16, the weight torch.float32.*autocast"):
            CF.conv2d(x, w, engine=engine)
    with pytest.raises(TypeError, match="and the bias torch.float64"):
        CF.conv2d(x, w.bfloat16(), torch.zeros(4, dtype=torch.float64))


def test_spconv_engine_refuses_bfloat16_and_tuned_leaves_it_out():
    x, _ = make_input(((9, 8), 1, "keep"), 0, 4, torch.bfloat16, "cpu", seed=1)
    w = torch.randn(4, 4, 3, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        CF.conv2d(x, w, engine="spconv")
    from cad_spconv.engines.tuned import candidates
    assert "spconv" not in candidates(x.features, w, 1, CF.conv_book(x, (3, 3), 1, 1))


def test_engine_caches_are_reported():
    """Workspaces and weight layouts live between calls; ``cached_bytes`` counts them (the
    benchmark adds them to the CAD peak memory)."""
    import cad_spconv.engines as E
    x, _ = make_input(((40, 37), 1, "keep"), 1, 8, torch.float32, "cpu", seed=3)
    w = torch.randn(16, 8, 3, 3)
    with torch.no_grad():
        CF.conv2d(x, w, engine="lattice")
    packed = E.weight_layout(w, "krsc", lambda t: pytest.fail("not cached"))
    assert packed.shape == (16, 3, 3, 8)
    assert E.cached_bytes("cpu") >= packed.numel() * 4 + 8 * 9 * 4  # layout + an im2col row
    if not torch.cuda.is_available():
        assert E.cached_bytes("cuda") == 0


def test_cache_use_names_the_entries_a_call_reads_and_what_they_hold():
    """``cache_use`` collects the kept entries that the calls inside read or build (also one
    built before: a second user of a shared layout sees it); ``held_bytes`` sums what they
    hold now, so a workspace released by its scope counts nothing; nested uses count for the
    outer one too."""
    import cad_spconv.engines as E
    from cad_spconv.engines.layouts import clear_caches
    x, _ = make_input(((40, 37), 1, "keep"), 1, 8, torch.float32, "cpu", seed=3)
    w = torch.randn(16, 8, 3, 3)
    layout = w.numel() * 4  # the gather's [C_out, kh, kw, C_in] copy (float32: no prepacking)
    clear_caches()
    with torch.no_grad():
        with E.cache_use() as first:
            CF.conv2d(x, w, engine="lattice")
        with E.cache_use() as outer:
            with E.cache_use() as again:  # built before: read, and named all the same
                CF.conv2d(x, w, engine="lattice")
        assert first == again == outer and first
        # the layout and workspaces kept outside a scope
        assert E.held_bytes(first, "cpu") == E.cached_bytes("cpu") > layout
        with E.cache_use() as scoped:
            with E.workspace_scope():
                CF.conv2d(x, w, engine="lattice")
    assert scoped == first
    assert E.held_bytes(scoped, "cpu") == layout  # the scope's end released its workspaces
    with E.cache_use() as nothing:
        pass
    assert E.held_bytes(nothing) == 0 and E.held_bytes(first, "cuda") == 0
    clear_caches()
    assert E.held_bytes(first) == 0


def test_workspace_scope_releases_workspaces_when_the_outermost_scope_exits():
    """Inside a scope workspaces are reused (nested scopes included); when the outermost scope
    exits they are gone (weight layouts stay), and the results stay exact."""
    import cad_spconv.engines as E
    from cad_spconv.engines.layouts import clear_caches
    case = ((40, 37), 1, "keep")
    x, levels = make_input(case, 1, 8, torch.float64, "cpu", seed=6)
    w = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    want = ref.conv(x.features, levels, 1, 1, w)
    clear_caches()
    with torch.no_grad():
        CF.conv2d(x, w, engine="lattice")
        kept = E.cached_bytes("cpu")  # outside any scope workspaces stay
        clear_caches()
        with E.workspace_scope():
            first = CF.conv2d(x, w, engine="lattice").features
            held = E.cached_bytes("cpu")
            with E.workspace_scope():
                second = CF.conv2d(x, w, engine="lattice").features
            assert E.cached_bytes("cpu") == held  # an inner scope releases nothing
        after = E.cached_bytes("cpu")
    layout = w.numel() * 8
    assert kept > layout and held > layout and after == layout
    for got in (first, second):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", [((17, 23), 3, "map"), ((13, 11), 2, "levels")])
@pytest.mark.parametrize("kernel,dilation,stride", [
    ((3, 5), (2, 1), 1), ((3, 5), (2, 1), 2),
    ((3, 3), (8, 8), 1)])  # taps 16 cells apart: kernel rows leave a 13-row grid entirely
def test_tap_products_read_each_site_own_image_and_taps(case, kernel, dilation, stride,
                                                        device):
    """The products form of a rulebook: every piece is one image's rows, and each in-grid tap
    of a site reads the product of its own input row and tap, in a piece of that tap's kernel
    row and the site's image; out-of-grid taps read the zero row after all products. The
    products engine on it equals the dense reference."""
    x, levels = make_input(case, 1, 4, torch.float64, device, seed=4)
    step_out = 1 + (stride == 2)
    book = conv_rulebook(x.plan, kernel, dilation, 1, step_out)
    tables = book.products()
    kh, kw = book.kernel_size
    image_in = x.plan.geometry(1).coords[:, 0]
    image_out = x.plan.geometry(step_out).coords[:, 0]
    if dilation == (8, 8) and case[0] == (13, 11):  # the case it is there for
        assert len(tables.pieces) < kh * x.plan.batch_size
    w = torch.randn(5, 4, *kernel, dtype=torch.float64, device=device)
    y = CF.conv2d(x, w, None, stride, dilation, 1, "products").features
    torch.testing.assert_close(y, ref.conv(x.features, levels, 1, stride, w, None, dilation, 1),
                               rtol=1e-9, atol=1e-9)
    # what each product row holds: its input row, kernel row, tap column and image
    owner, owner_row, owner_col, owner_image = [], [], [], []
    for r, a, b in tables.pieces:
        assert 0 <= a < b <= book.num_in and image_in[a:b].unique().numel() == 1
        for c in range(kw):  # a piece's products, tap after tap
            owner.append(torch.arange(a, b, device=device))
            for table, value in ((owner_row, r), (owner_col, c), (owner_image, image_in[a])):
                table.append(torch.full((b - a,), int(value), device=device))
    owner, owner_row, owner_col, owner_image = map(torch.cat, (owner, owner_row, owner_col,
                                                               owner_image))
    assert owner.numel() == tables.num_rows * kw
    index, gather = tables.index, book.gather
    tap = torch.arange(kh * kw, device=device).expand_as(gather)
    inside = gather >= 0
    assert (index[~inside] == tables.num_rows * kw).all()
    read = index[inside]
    assert torch.equal(owner[read], gather[inside])
    assert torch.equal(owner_row[read], tap[inside] // kw)
    assert torch.equal(owner_col[read], tap[inside] % kw)
    assert torch.equal(owner_image[read], image_out[:, None].expand_as(gather)[inside])


def test_lattice_engine_runs_wide_stride_one_layers_as_products(monkeypatch):
    """The lattice engine hands stride-1 convs with C_in >= 4 C_out to the products engine
    (and only those), exactly; ``prepare(like=...)`` then builds the products form too."""
    import cad_spconv.engines.products as P
    from cad_spconv.engines import prepare
    calls = []
    real = P.products_conv
    monkeypatch.setattr(P, "products_conv", lambda *a: calls.append(a) or real(*a))
    case = ((17, 23), 3, "map")
    for c_in, stride, expect in ((24, 1, True), (23, 1, False), (24, 2, False)):
        for step in (1, 2):
            x, levels = make_input(case, step, c_in, torch.float64, "cpu", seed=step)
            w = torch.randn(6, c_in, 3, 3, dtype=torch.float64)
            b = torch.randn(6, dtype=torch.float64)
            calls.clear()
            y = CF.conv2d(x, w, b, stride, 2, 1, "lattice")
            assert bool(calls) == expect, (c_in, stride, step)
            torch.testing.assert_close(y.features, ref.conv(x.features, levels, step, stride,
                                                            w, b, 2, 1), rtol=1e-9, atol=1e-9)
            book = CF.conv_book(x, (3, 3), 2, stride)
            assert book.has_derived("products") == expect
            fresh = conv_rulebook(x.plan, (3, 3), (2, 2), step, step + (stride == 2))
            prepare(fresh, "auto", "cpu", like=book)
            assert fresh.has_derived("products") == expect
    # a rulebook the products engine itself ran on (as a tuned candidate does) is no reason for
    # the lattice engine to build products on another
    x, _ = make_input(case, 1, 23, torch.float64, "cpu", seed=1)
    CF.conv2d(x, torch.randn(6, 23, 3, 3, dtype=torch.float64), None, 1, 2, 1, "products")
    book = CF.conv_book(x, (3, 3), 2, 1)
    fresh = conv_rulebook(x.plan, (3, 3), (2, 2), 1, 1)
    prepare(fresh, "lattice", "cpu", like=book)
    assert book.has_derived("products") and not fresh.has_derived("products")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("stride", [1, 2])
def test_a_bias_of_the_wrong_shape_is_refused(engine, stride):
    """As ``F.conv2d`` does: a bias must have one value per output channel (some engines would
    broadcast a single value, others fail deep inside)."""
    x, _ = make_input(((9, 7), 1, "keep"), 0, 4, torch.float64, "cpu", seed=2)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    for bias in (torch.zeros(1, dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                 torch.zeros(3, 1, dtype=torch.float64)):
        with pytest.raises(ValueError, match=r"bias has shape .* need \(3,\)"):
            CF.conv2d(x, w, bias, stride, 1, 1, engine)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("channels", [8, 12, 5])
def test_lattice_row_copy_is_index_copy_bit_for_bit(dtype, channels, device):
    """The lattice engine's row scatter (8-byte words where rows split into them) writes the
    same bits as ``index_copy_``: NaN payloads, -0.0 and infinities included; rows of odd
    byte size, sources at an odd offset and autograd take ``index_copy_`` itself."""
    from cad_spconv.engines.lattice import _copy_rows
    gen = torch.Generator().manual_seed(channels)
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    info = torch.iinfo(bits)
    raw = torch.randint(info.min, info.max, (9, channels), generator=gen, dtype=torch.int64)
    src = raw.to(bits).view(dtype).to(device)  # every bit pattern: NaNs with payloads too
    rows = torch.tensor([6, 0, 13, 2, 9, 11, 4, 1, 7], device=device)
    for source in (src, torch.cat([src[:1, :1].flatten(), src.flatten()])[1:].view(9, -1)):
        want = torch.zeros(14, channels, dtype=dtype, device=device)
        want.index_copy_(0, rows, source)
        got = torch.zeros(14, channels, dtype=dtype, device=device)
        _copy_rows(got, rows, source)
        assert torch.equal(got.view(bits), want.view(bits))
    if dtype.is_floating_point and dtype != torch.float16:
        src = torch.randn(9, channels, generator=gen).to(device, dtype).requires_grad_(True)
        out = torch.zeros(14, channels, dtype=dtype, device=device)
        _copy_rows(out, rows, src)
        out.sum().backward()
        assert torch.equal(src.grad, torch.ones_like(src))
