"""The spconv implicit-GEMM engine (cad_spconv.engines.spconv_igemm).

CPU: the tables built from our rulebooks, and an independent emulation of what the kernel
does with them (tiles of sorted positions, OR of their tap masks, -1 reads zero, writes through
the argsort) against the dense reference, for the library's order and for random ones.
CUDA: spconv's kernel itself against the dense reference (float32, float16), and the errors.
"""
import numpy as np
import pytest
import torch

from tests.support import dense_reference as ref
from cad_spconv import GatherRulebook, LevelPlan, conv_rulebook
from cad_spconv.engines.spconv_igemm import IGemmPairs, igemm_conv, implicit_gemm_pairs, run_implicit_gemm
from tests.support import inputs
from tests.support.inputs import CUDA

needs_cuda = pytest.mark.skipif(not CUDA, reason="spconv's implicit GEMM needs a CUDA device; "
                                "none on this machine")


def _stack_problem():
    from cad_spconv.engines.spconv_igemm import igemm_status
    ok, reason = igemm_status()
    return None if ok else reason


# the kernel itself: CUDA and a spconv stack that can run it (else the reason is shown)
needs_kernel = pytest.mark.skipif(not CUDA or _stack_problem() is not None,
                                  reason="spconv's implicit GEMM needs a CUDA device (none on "
                                  "this machine)" if not CUDA else f"{_stack_problem()}")

CASES = [  # (grid, num_levels, mask kind): odd sizes, several levels, per-image masks
    ((13, 11), 1, "keep"), ((13, 11), 2, "levels"), ((17, 23), 3, "map"), ((9, 16), 2, "keep"),
    ((13, 11), 2, "all"), ((13, 11), 2, "none"),
]
# (kernel, dilation, stride)
GEOMETRIES = [(3, 1, 1), (3, 2, 1), (3, 1, 2), (3, 3, 2), (1, 1, 1), (1, 1, 2), (5, 1, 1),
              ((3, 5), (2, 1), 1)]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def make_input(case, step, channels, dtype, device, seed=0):
    x, levels = inputs.make_input(case, step, channels, dtype, device, seed)
    return x.features, x.plan, levels


def layers(case, geometries=GEOMETRIES):
    """(step_in, kernel, dilation, stride) of every layer the case allows."""
    L = case[1]
    for k, d, stride in geometries:
        for step in range(L + (stride == 1)):
            if stride == 2 and step == L:
                continue
            yield step, _pair(k), _pair(d), stride


def unsigned(masks: torch.Tensor) -> torch.Tensor:
    return masks.to(torch.int64) & 0xFFFFFFFF


def tap_bits(pair_fwd: torch.Tensor) -> torch.Tensor:
    """Per output row, the bits of its present taps (from pair_fwd alone)."""
    k = pair_fwd.shape[0]
    w = torch.tensor([1 << i for i in range(k)], dtype=torch.int64, device=pair_fwd.device)
    return ((pair_fwd >= 0).t().to(torch.int64) * w).sum(1)


def permuted(pairs: IGemmPairs, perm: torch.Tensor) -> IGemmPairs:
    """The same conv with the output rows processed in the order ``perm`` (masks follow)."""
    bits = tap_bits(pairs.pair_fwd)[perm]
    bits = torch.where(bits > 2 ** 31 - 1, bits - 2 ** 32, bits)
    return IGemmPairs(pairs.pair_fwd, bits.to(torch.int32).reshape(-1, 1).contiguous(),
                      perm.to(torch.int32).contiguous(), pairs.num_in, pairs.num_out,
                      pairs.kernel_volume)


def emulate(features, weight, bias, pairs: IGemmPairs, tile: int) -> torch.Tensor:
    """What spconv's masked implicit GEMM computes, written from its kernel semantics: sorted
    positions in tiles of ``tile`` rows; a tile runs every tap in the OR of its masks (AND the
    split's mask filter); tap k of output row o reads input pair_fwd[k, o] (nothing if -1);
    results go to rows mask_argsort[i]; the bias is added in the epilogue."""
    n_out, c_out, K = pairs.num_out, weight.shape[0], pairs.kernel_volume
    w = weight.flatten(2)  # [C_out, C_in, K], taps row-major = KRSC's (kh, kw) order
    masks = unsigned(pairs.pair_mask[:, 0])                                   # sorted positions
    bit = torch.tensor([1 << k for k in range(K)], dtype=torch.int64)
    has = (masks[:, None] & bit) != 0                                         # [N_out, K]
    tile_of = torch.arange(n_out) // tile
    tile_has = torch.zeros(int(tile_of[-1]) + 1, K, dtype=torch.int64).scatter_reduce_(
        0, tile_of[:, None].expand(-1, K), has.to(torch.int64), "amax") != 0  # OR per tile
    mask_filter = (int(pairs.masks[0][0]) & bit) != 0
    runs = tile_has.index_select(0, tile_of) & mask_filter                    # [N_out, K]
    rows = pairs.mask_argsort.long()                                          # output rows
    out = features.new_zeros(n_out, c_out)
    for k in range(K):
        idx = pairs.pair_fwd[k].long().index_select(0, rows)
        take = (runs[:, k] & (idx >= 0))[:, None].to(features.dtype)          # -1 reads nothing
        x = features.index_select(0, idx.clamp(min=0)) * take
        out.index_add_(0, rows, x @ w[:, :, k].t())  # rows is a permutation: one write each
    return out if bias is None else out + bias


# ---------------------------------------------------------------------- CPU: the tables
@pytest.mark.parametrize("case", CASES)
def test_tables_follow_spconv_format(case):
    _, plan, _ = make_input(case, 0, 1, torch.float64, "cpu")
    for step, k, d, stride in layers(case):
        book = conv_rulebook(plan, k, d, step, step + (stride == 2))
        pairs = implicit_gemm_pairs(book)
        assert implicit_gemm_pairs(book) is pairs  # cached per rulebook
        K, n = book.num_taps, book.num_out
        assert pairs.kernel_volume == K and pairs.num_out == n and pairs.num_in == book.num_in
        assert pairs.pair_fwd.dtype == pairs.pair_mask.dtype == pairs.mask_argsort.dtype == \
            torch.int32
        assert pairs.pair_fwd.shape == (K, n) and pairs.pair_fwd.is_contiguous()
        assert pairs.pair_mask.shape == (n, 1) and pairs.mask_argsort.shape == (n,)
        assert torch.equal(pairs.pair_fwd.long(), book.gather.t())
        # argsort is a permutation of the output rows
        assert torch.equal(pairs.mask_argsort.long().sort().values, torch.arange(n))
        # mask i holds exactly the present taps of row argsort[i], ascending (unsigned)
        masks = unsigned(pairs.pair_mask[:, 0])
        assert torch.equal(masks, tap_bits(pairs.pair_fwd)[pairs.mask_argsort.long()])
        assert bool((masks[1:] >= masks[:-1]).all())
        # the center tap is always in the grid: no output row has an empty mask
        assert bool((masks & (1 << (K // 2)) != 0).all())
        assert len(pairs.masks) == 1 and pairs.masks[0].dtype == np.uint32
        assert pairs.masks[0].shape == (1,) and int(pairs.masks[0][0]) == 0xFFFFFFFF


def test_tables_with_32_taps_and_refusal_beyond():
    """Bit 31 is a negative int32 (spconv reads the tensor as uint32) and sorts last; more
    than 32 taps (several mask words) is refused."""
    gen = torch.Generator().manual_seed(0)
    gather = torch.randint(-1, 40, (300, 32), generator=gen)
    gather[:, 0] = torch.randint(0, 40, (300,), generator=gen)
    gather[:100, 31] = 5
    pairs = implicit_gemm_pairs(GatherRulebook(gather, 40, (4, 8)))
    masks = unsigned(pairs.pair_mask[:, 0])
    assert bool((pairs.pair_mask[-1] < 0).all()) and bool((masks[1:] >= masks[:-1]).all())
    assert torch.equal(masks, tap_bits(pairs.pair_fwd)[pairs.mask_argsort.long()])
    with pytest.raises(ValueError, match="at most 32 kernel taps"):
        implicit_gemm_pairs(GatherRulebook(torch.zeros(5, 33, dtype=torch.long), 3, (3, 11)))


# ---------------------------------------------------------------------- CPU: the semantics
@pytest.mark.parametrize("case", CASES)
def test_emulated_kernel_matches_dense_reference_in_any_order(case):
    """float64, random weights and bias: the tables in the library's order, with other tile
    heights, and in random orders (masks permuted along) all give the dense reference."""
    c_in, c_out = 5, 4
    gen = torch.Generator().manual_seed(11)
    for i, (step, k, d, stride) in enumerate(layers(case)):
        x, plan, levels = make_input(case, step, c_in, torch.float64, "cpu", seed=i)
        book = conv_rulebook(plan, k, d, step, step + (stride == 2))
        w = torch.randn(c_out, c_in, *k, generator=gen, dtype=torch.float64)
        b = torch.randn(c_out, generator=gen, dtype=torch.float64) if i % 2 else None
        expected = ref.conv(x, levels, step, stride, w, b, d)
        pairs = implicit_gemm_pairs(book)
        perm = torch.randperm(book.num_out, generator=gen)
        for tables, tile in [(pairs, 32), (pairs, 128), (pairs, 7), (pairs, 1),
                             (permuted(pairs, perm), 32), (permuted(pairs, perm.flip(0)), 64)]:
            got = emulate(x, w, b, tables, tile)
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


def test_emulation_depends_on_the_masks():
    """The emulation really skips taps missing from a tile's masks (so the test above checks
    the masks): all-zero masks leave only the bias; masks out of step with the argsort
    (unsorted masks, sorted argsort) give a wrong result in tiles of one row."""
    case = ((13, 11), 2, "levels")
    x, plan, levels = make_input(case, 1, 3, torch.float64, "cpu", seed=3)
    book = conv_rulebook(plan, (3, 3), (1, 1), 1, 1)
    pairs = implicit_gemm_pairs(book)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(2, dtype=torch.float64)
    zero = IGemmPairs(pairs.pair_fwd, torch.zeros_like(pairs.pair_mask), pairs.mask_argsort,
                      pairs.num_in, pairs.num_out, pairs.kernel_volume)
    torch.testing.assert_close(emulate(x, w, b, zero, 32), b.expand(book.num_out, 2))
    bits = tap_bits(pairs.pair_fwd)
    assert not torch.equal(bits, bits[pairs.mask_argsort.long()])  # the order is not trivial
    stale = IGemmPairs(pairs.pair_fwd, bits.to(torch.int32).reshape(-1, 1), pairs.mask_argsort,
                       pairs.num_in, pairs.num_out, pairs.kernel_volume)
    expected = ref.conv(x, levels, 1, 1, w, b, 1)
    assert not torch.allclose(emulate(x, w, b, stale, 1), expected)


# ---------------------------------------------------------------------- errors (any device)
def _small_layer(device, dtype=torch.float32, c=8):
    case = ((13, 11), 1, "keep")
    x, plan, levels = make_input(case, 0, c, dtype, device, seed=1)
    book = conv_rulebook(plan, (3, 3), (1, 1), 0, 1)
    w = torch.randn(c, c, 3, 3, dtype=dtype, device=device)
    return x, w, book, levels


def test_errors_on_cpu():
    x, w, book, _ = _small_layer("cpu")
    with pytest.raises(ValueError, match="CUDA only.*engine='lattice'"):
        igemm_conv(x, w, None, book)
    with pytest.raises(ValueError, match="grouped"):
        igemm_conv(x, w[:, :4], None, book, groups=2)
    with pytest.raises(RuntimeError, match="inference-only"):
        igemm_conv(x, w.requires_grad_(True), None, book)
    with torch.no_grad():  # grad not required inside no_grad: the device error again
        with pytest.raises(ValueError, match="CUDA only"):
            igemm_conv(x, w, None, book)
    with pytest.raises(ValueError, match="rows"):
        igemm_conv(x[1:], w.detach(), None, book)


def test_rows_beyond_32_bit_byte_offsets_are_refused():
    """The kernel addresses rows with int32 byte offsets: 2**26 output rows of 8 float32
    channels reach 2 GiB (checked before anything is allocated or run, on any device)."""
    x = torch.zeros(4, 8)
    w = torch.zeros(8, 8, 3, 3)
    empty = torch.zeros(0, dtype=torch.int32)
    big = IGemmPairs(empty, empty, empty, num_in=4, num_out=2 ** 26, kernel_volume=9)
    with pytest.raises(ValueError, match="32-bit byte offsets.*engine='lattice'"):
        run_implicit_gemm(x, w, None, big)
    fits = IGemmPairs(empty, empty, empty, num_in=4, num_out=2 ** 26 - 1, kernel_volume=9)
    with pytest.raises(ValueError, match="CUDA only"):  # past the size check
        run_implicit_gemm(x, w, None, fits)


def test_numpy2_with_cumm_0_4_is_refused_not_crashed():
    """cumm 0.4 (spconv-cu120) kills the process under NumPy 2 inside implicit_gemm: that
    stack is refused with the fix named; cumm 0.7 or NumPy 1 pass."""
    from cad_spconv.engines.spconv_igemm import _stack_status, igemm_status
    ok, reason = _stack_status("0.4.11", "2.4.6")
    assert not ok and "NumPy 2.4.6" in reason and "cu126" in reason and "numpy<2" in reason
    assert _stack_status("0.7.11", "2.4.6")[0]
    assert _stack_status("0.4.11", "1.26.4")[0]
    from cad_spconv.backend import installed_builds, spconv_status
    cumm = next(iter(installed_builds("cumm").values()), None)
    if spconv_status()[0] and cumm is not None:  # this machine's own stack is judged alike
        assert igemm_status()[0] == _stack_status(cumm, np.__version__)[0]


def test_filters_are_krsc_and_follow_weight_updates():
    """spconv's filter layout [C_out, kh, kw, C_in], cached per weight until it changes."""
    from cad_spconv.engines import krsc_filters

    def _krsc(weight):
        return krsc_filters(weight, cache=True)
    w = torch.randn(4, 3, 3, 5)
    f = _krsc(w)
    assert f.shape == (4, 3, 5, 3) and f.is_contiguous()
    assert torch.equal(f[:, 1, 2, :], w[:, :, 1, 2])
    assert _krsc(w) is f
    w.mul_(2)
    assert torch.equal(_krsc(w), w.permute(0, 2, 3, 1))
    with torch.inference_mode():
        wi = torch.randn(2, 2, 1, 1)
        assert torch.equal(_krsc(wi), wi.permute(0, 2, 3, 1))


# ---------------------------------------------------------------------- CUDA: spconv's kernel
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-4}, torch.float16: {"rtol": 1e-2, "atol": 1e-2}}


@needs_kernel
@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_igemm_matches_dense_reference(case, dtype):
    """spconv's kernel on our tables against the dense reference (float64, from the same
    rounded inputs). Channels multiples of 8 (tensor-core kernels for float16); weights scaled
    so that outputs are O(1)."""
    c_in, c_out = 16, 24
    gen = torch.Generator().manual_seed(5)
    for i, (step, k, d, stride) in enumerate(layers(case)):
        x, plan, levels = make_input(case, step, c_in, dtype, "cuda", seed=i)
        book = conv_rulebook(plan, k, d, step, step + (stride == 2))
        scale = (c_in * k[0] * k[1]) ** -0.5
        w = (torch.randn(c_out, c_in, *k, generator=gen) * scale).to(dtype).cuda()
        b = torch.randn(c_out, generator=gen).to(dtype).cuda() if i % 2 else None
        with torch.no_grad():
            got = igemm_conv(x, w, b, book)
        assert got.dtype == dtype and got.shape == (book.num_out, c_out) and got.is_cuda
        expected = ref.conv(x.double(), levels, step, stride, w.double(),
                            None if b is None else b.double(), d)
        where = f"step {step}, kernel {k}, dilation {d}, stride {stride}"
        torch.testing.assert_close(got.double(), expected, **TOL[dtype],
                                   msg=lambda m, where=where: f"{where}: {m}")


@needs_kernel
def test_igemm_output_does_not_depend_on_the_order():
    """The kernel itself: tables in random orders (masks permuted along) give the same rows."""
    case = ((17, 23), 3, "map")
    x, plan, levels = make_input(case, 1, 16, torch.float32, "cuda", seed=2)
    book = conv_rulebook(plan, (3, 3), (2, 2), 1, 2)
    w = torch.randn(8, 16, 3, 3, device="cuda") / 12
    b = torch.randn(8, device="cuda")
    with torch.inference_mode():
        base = igemm_conv(x, w, b, book)
        pairs = implicit_gemm_pairs(book)
        for seed in range(3):
            perm = torch.randperm(book.num_out, generator=torch.Generator().manual_seed(seed))
            got = run_implicit_gemm(x, w, b, permuted(pairs, perm.cuda()))
            torch.testing.assert_close(got, base, rtol=1e-5, atol=1e-5)
    expected = ref.conv(x.double(), levels, 1, 2, w.double(), b.double(), 2)
    torch.testing.assert_close(base.double(), expected, rtol=1e-4, atol=1e-4)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_igemm_odd_channel_counts(dtype):
    """Channel counts that are not multiples of 4 or 8: spconv has kernels with one element
    per access for both dtypes (SIMT for float32, Turing tensor cores for float16)."""
    case = ((13, 11), 2, "levels")
    for c_in, c_out in [(6, 5), (3, 7)]:
        x, plan, levels = make_input(case, 1, c_in, dtype, "cuda", seed=c_in)
        book = conv_rulebook(plan, (3, 3), (1, 1), 1, 1)
        w = (torch.randn(c_out, c_in, 3, 3) / 6).to(dtype).cuda()
        b = torch.randn(c_out).to(dtype).cuda()
        with torch.no_grad():
            got = igemm_conv(x, w, b, book)
        expected = ref.conv(x.double(), levels, 1, 1, w.double(), b.double(), 1)
        torch.testing.assert_close(got.double(), expected, **TOL[dtype])


@needs_cuda
def test_unusable_stack_is_refused_on_cuda(monkeypatch):
    """Where igemm_status says no, the engine raises its reason and tuned leaves it out."""
    import cad_spconv.engines.spconv_igemm as G
    from cad_spconv.engines.tuned import candidates
    from cad_spconv.backend import SpconvUnavailable
    x, w, book, _ = _small_layer("cuda")
    monkeypatch.setattr(G, "igemm_status", lambda: (False, "stack refused for the test"))
    with torch.no_grad():
        with pytest.raises(SpconvUnavailable, match="refused for the test"):
            igemm_conv(x, w, None, book)
        assert "spconv-igemm" not in candidates(x, w, 1, book)


@needs_cuda
def test_igemm_errors_on_cuda():
    x, w, book, _ = _small_layer("cuda")
    with pytest.raises(RuntimeError, match="inference-only"):
        igemm_conv(x.requires_grad_(True), w, None, book)
    x = x.detach()
    with torch.no_grad():
        with pytest.raises(TypeError, match="float32 or float16"):
            igemm_conv(x.double(), w.double(), None, book)
        with pytest.raises(TypeError, match="one dtype"):
            igemm_conv(x, w.half(), None, book)
        with pytest.raises(ValueError, match="CUDA only"):
            igemm_conv(x, w.cpu(), None, book)
        cpu_book = conv_rulebook(LevelPlan.from_level_map(book.plan.levels.cpu(),
                                                          book.plan.num_levels),
                                 (3, 3), (1, 1), 0, 1)
        with pytest.raises(ValueError, match="rulebook lives on"):
            igemm_conv(x, w, None, cpu_book)
