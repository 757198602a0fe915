"""Convs with their epilogue, ``relu(conv(x) + residual)`` (``cad_spconv.engines.epilogue``):
the float64 dense reference within the rounding bound of the route, in float64, float32 and
bfloat16, on random multi-level masks (odd grids, three images with different masks), 1x1
and 3x3, strides 1 and 2, groups; oneDNN fuses it where it can and only there; autograd; the
refusals."""
import pytest
import torch

from cad_spconv import CADTensor, functional as CF
from cad_spconv.engines import epilogue, sparse_conv
from tests.support import dense_reference as ref
from tests.support import rounding as R
from tests.support.epilogue import fused_epilogues
from tests.support.inputs import make_input

CASES = [  # (grid, num_levels, mask kind)
    ((13, 11), 2, "levels"), ((17, 23), 3, "map"), ((9, 16), 2, "keep"),
    ((13, 11), 2, "all"), ((13, 11), 2, "none"),
]
CPU = torch.device("cpu")
BF16 = torch.bfloat16 in epilogue._FUSED_DTYPES


def _residual(x: CADTensor, step: int, channels: int, dtype, seed: int) -> CADTensor:
    gen = torch.Generator().manual_seed(100 + seed)
    f = torch.randn(x.plan.num_sites(step), channels, generator=gen).to(dtype)
    return CADTensor(f, x.plan, step)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", ["auto", "lattice", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stride,groups", [(1, 1, 1), (1, 2, 1), (3, 1, 1), (3, 2, 1),
                                             (1, 1, 2), (3, 2, 2)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_epilogue_matches_dense_reference(case, engine, dtype, k, stride, groups, with_residual,
                                          monkeypatch):
    """Every output site within the rounding bound of the float64 ``relu(conv + residual)``
    on the same rounded inputs (the residual one term more, its add one rounding more than
    the conv's route where it is not fused); fused by oneDNN exactly where the conv runs as
    one oneDNN conv (1x1 convs of the lattice engine, grid convs of ``"auto"``) in float32 and
    bfloat16 (with a residual: without groups); with a ReLU alone, the 3x3 convs of the
    lattice engine apply it part by part (their dense parts as oneDNN post-ops)."""
    L = case[1]
    gen = torch.Generator().manual_seed(3)
    answers = fused_epilogues(monkeypatch)
    for step in range(L + (stride == 1)):
        if stride == 2 and step == L:
            continue
        x, levels = make_input(case, step, 6, torch.float32, CPU, seed=step)
        x = x.replace_feature(x.features.to(dtype))
        w = (torch.randn(12, 6 // groups, k, k, generator=gen) / (2 * k)).to(dtype)
        b = torch.randn(12, generator=gen).to(dtype)
        step_out = step + (stride == 2)
        res = _residual(x, step_out, 12, dtype, step)
        if not with_residual:  # a ReLU alone: the residual's part below is zero
            res = res.replace_feature(torch.zeros_like(res.features))
        answers.clear()
        with torch.no_grad():
            y = CF.conv2d(x, w, b, stride, 1, groups, engine, relu=True,
                          residual=res if with_residual else None)
        assert y.step == step_out and y.features.dtype == dtype
        grid = engine == "auto" and CF.grid_levels(x, step_out) is not None
        one_conv = grid or (k == 1 and engine in ("auto", "lattice"))
        # a residual fuses without groups only
        fusable = dtype in epilogue._FUSED_DTYPES and (groups == 1 or not with_residual)
        # a ReLU alone: the 3x3 convs' dense lattice part takes it as a post-op too
        parts = engine in ("auto", "lattice") and not with_residual
        assert any(answers) == ((one_conv or parts) and fusable), (step, answers)
        pre = ref.conv(x.features.double(), levels, step, stride, w.double(), b.double(), 1,
                       groups) + res.features.double()
        size = R.conv_size(x.features, levels, step, stride, w, b, 1, groups) + \
            res.features.double().abs()
        route = R.engine_route(engine, dtype, True)
        # one oneDNN op (conv, bias and add) rounds once
        roundings = 1 if one_conv and any(answers) else route["roundings"] + with_residual
        bound = R.conv_bound(size, pre, dtype, w[0].numel() + 2, roundings=roundings,
                             accumulate=route["accumulate"])
        R.assert_within(y.features, torch.relu(pre), bound, f"{engine} step {step}")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
def test_epilogue_options_alone_and_autograd(case):
    """``relu`` alone, ``residual`` alone, both: the composition of the separate ops, values
    and gradients (float64, autograd recording: the unfused route)."""
    x, _ = make_input(case, 0, 6, torch.float64, CPU, seed=1)
    gen = torch.Generator().manual_seed(4)
    for k, stride in ((1, 1), (3, 2)):
        w = torch.randn(8, 6, k, k, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
        f = x.features.clone().requires_grad_()
        xin = x.replace_feature(f)
        res = _residual(x, stride - 1, 8, torch.float64, 0)
        r = res.features.clone().requires_grad_()
        for relu, residual in ((True, None), (False, r), (True, r)):
            got = CF.conv2d(xin, w, b, stride, relu=relu, residual=None if residual is None
                            else res.replace_feature(residual)).features
            want = CF.conv2d(xin, w, b, stride).features
            want = want + residual if residual is not None else want
            want = torch.relu(want) if relu else want
            assert torch.equal(got, want)
            grads = torch.autograd.grad(got.square().sum(), (f, w, b, r), allow_unused=True)
            wants = torch.autograd.grad(want.square().sum(), (f, w, b, r), allow_unused=True)
            for g, h in zip(grads, wants):
                assert (g is None and h is None) or torch.allclose(g, h, rtol=1e-12, atol=0)


def test_fuses_only_where_onednn_computes_it():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, 4, 1, 1), torch.randn(3)
    with torch.no_grad():
        assert epilogue.fuses(x, w, b)
        assert not epilogue.fuses(x.double(), w.double(), b.double())  # no float64 in oneDNN
        assert not epilogue.fuses(x, w.double(), b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not epilogue.fuses(x, w, b)  # autocast's casts are F.conv2d's
    assert not epilogue.fuses(x, w.requires_grad_(), b)  # no autograd formula
    with torch.no_grad():
        assert epilogue.fuses(x, w, b)


def test_refusals_name_the_problem():
    case = CASES[0]
    x, _ = make_input(case, 0, 6, torch.float32, CPU, seed=1)
    w = torch.randn(8, 6, 3, 3)
    res = _residual(x, 0, 8, torch.float32, 0)
    with pytest.raises(TypeError, match="residual must be a CADTensor"):
        CF.conv2d(x, w, residual=res.features)
    with pytest.raises(ValueError, match="output's step 1"):
        CF.conv2d(x, w, stride=2, residual=res)
    with pytest.raises(ValueError, match="4 channels, the conv outputs 8"):
        CF.conv2d(x, w, residual=_residual(x, 0, 4, torch.float32, 0))
    other, _ = make_input(case, 0, 8, torch.float32, CPU, seed=2)
    with pytest.raises(ValueError, match="another plan"):
        CF.conv2d(x, w, residual=other)
    with pytest.raises(TypeError, match="relu must be a bool"):
        CF.conv2d(x, w, relu=1)
    book = CF.conv_book(x, (3, 3), 1, 1)
    with pytest.raises(ValueError, match=r"residual must be the output's shape"):
        sparse_conv(x.features, w, None, book, residual=res.features[1:])


@pytest.mark.skipif(not BF16, reason="oneDNN has no bfloat16 convs on this CPU")
def test_fused_bfloat16_rounds_once():
    """The fused epilogue adds the residual to the float32 accumulator and rounds once: on
    inputs where rounding the conv's output first is off by a full unit in the last place, the
    fused result is the float64 result rounded (the unfused route's is not)."""
    # the conv's output 1 + 2**-8 is a tie in bfloat16 (rounded first, to 1); the residual
    # 2**-9 then rounds 1 + 2**-9 down to 1, while the exact sum rounds up to 1 + 2**-7
    # (two channels, two cells: a map that is channels-last only, which oneDNN fuses)
    x = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 1, 2).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    w = torch.tensor([1 + 2 ** -7, 0.0], dtype=torch.bfloat16).view(1, 2, 1, 1)
    b = torch.tensor([-2 ** -8], dtype=torch.bfloat16)
    res = torch.full((1, 1, 1, 2), 2 ** -9, dtype=torch.bfloat16)
    exact = 1 + 2 ** -8 + 2 ** -9
    with torch.no_grad():
        fused = epilogue.conv_map(x, w, b, 1, (0, 0), (1, 1), 1, True, res)
    assert epilogue.fuses(x, w, b, res)
    assert fused.flatten().tolist() == [float(torch.tensor(exact).to(torch.bfloat16))] * 2
    assert fused.flatten().tolist() == [1 + 2 ** -7] * 2
    unfused = torch.relu(torch.nn.functional.conv2d(x, w, b) + res)
    assert unfused.flatten().tolist() == [1.0] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,c", [(1, 1), (1, 8), (5, 1), (7, 8)])
def test_degenerate_maps_take_the_unfused_route(dtype, n, c):
    """One site, one channel: maps whose layout torch reads as NCHW (where its fallback would
    fail in bfloat16) are not fused; every shape gives the composed ops' values."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, c, generator=gen).to(dtype)
    w = torch.randn(3, c, 1, 1, generator=gen).to(dtype)
    b = torch.randn(3, generator=gen).to(dtype)
    res = torch.randn(n, 3, generator=gen).to(dtype)
    with torch.no_grad():
        got = epilogue.fused_rows(x, w, b, 1, True, res)
        want = torch.relu(x.double() @ w.double().view(3, c).t() + b.double() + res.double())
    if got is None:  # the caller's own GEMM route
        assert n == 1 or c == 1
    else:
        assert got.shape == (n, 3)
        R.assert_within(got, want, R.conv_bound(
            (x.double().abs() @ w.double().abs().view(3, c).t() + b.double().abs()
             + res.double().abs()), want, dtype, c + 2), f"{n} x {c}")


@pytest.mark.parametrize("case", [CASES[0], CASES[3]])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_residual_inplace_writes_into_the_residual_without_autograd(case, k, dtype):
    """``residual_inplace``: without autograd the result is the residual's own features,
    overwritten, on every route (oneDNN's fused conv: 1x1 and grid convs in float32 /
    bfloat16; elsewhere the add after the conv); where autograd records, the residual is left
    as it was. The values are those of the out-of-place call."""
    x, _ = make_input(case, 0, 32, torch.float32, CPU, seed=1)
    x = x.replace_feature(x.features.to(dtype))
    gen = torch.Generator().manual_seed(6)
    w = (torch.randn(32, 32, k, k, generator=gen) / (4 * k)).to(dtype)
    b = torch.randn(32, generator=gen).to(dtype)
    for grad in (False, True):
        res = _residual(x, 0, 32, dtype, 2)
        kept = res.features.clone()
        with torch.set_grad_enabled(grad):
            wg = w.clone().requires_grad_(grad)
            want = CF.conv2d(x, wg, b, relu=True, residual=res).features
            assert torch.equal(res.features, kept)
            got = CF.conv2d(x, wg, b, relu=True, residual=res, residual_inplace=True).features
        assert torch.equal(got, want)
        assert (got.data_ptr() == res.features.data_ptr()) == (not grad)
        assert torch.equal(res.features, kept if grad else want)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_weights_follow_changes_of_the_weight(dtype, amx, monkeypatch):
    """oneDNN convs on maps read their weight prepacked and kept in bfloat16 on AMX CPUs (not
    in float32, nor without AMX, where it gained nothing): a weight changed in place gets a new
    layout, and another input shape reads the kept one (the values of ``F.conv2d`` on the
    current weight)."""
    import cad_spconv.engines as E
    from cad_spconv.engines import gemm

    monkeypatch.setattr(gemm, "CPU_AMX", amx)

    if dtype not in epilogue._FUSED_DTYPES:
        pytest.skip(f"oneDNN has no {dtype} convs on this CPU")
    gen = torch.Generator().manual_seed(7)
    w = (torch.randn(16, 8, 3, 3, generator=gen) / 8).to(dtype)
    b = torch.randn(16, generator=gen).to(dtype)
    for shape in ((1, 8, 9, 11), (2, 8, 5, 7)):
        x = torch.randn(*shape, generator=gen).to(dtype).contiguous(
            memory_format=torch.channels_last)
        for _ in range(2):
            with torch.no_grad(), E.cache_use() as kept:
                got = epilogue.conv_map(x, w, b, 1, (2, 2), (2, 2), 1, relu=True)
                want = torch.relu(torch.nn.functional.conv2d(x, w, b, 1, 2, 2))
            assert torch.equal(got, want)  # oneDNN's conv either way
            packed = [key for kind, key in kept
                      if kind == "layout" and key[1][0] == "onednn-conv"]
            assert len(packed) == (dtype == torch.bfloat16 and amx)
            with torch.no_grad():
                w.mul_(-1)  # a changed weight: a new layout
