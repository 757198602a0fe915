"""Every op against the independent dense emulation (float64 and float32), both engines."""
import numpy as np
import pytest
import torch

from tests.support import dense_reference as ref
from cad_spconv import CADTensor, LevelPlan, functional as CF
from cad_spconv.backend import SpconvUnavailable, spconv_status
from cad_spconv.engines.spconv_igemm import igemm_status
from tests.support import rounding as R
from tests.support.inputs import make_input, tol

SPCONV = spconv_status()[0]
ENGINES = ["torch", "lattice", "products", "auto", "tuned"] + [pytest.param(e, marks=pytest.mark.skipif(
    not SPCONV, reason=f"spconv engine unavailable: {spconv_status()[1]}"))
    for e in ("spconv", "spconv-igemm")]

CASES = [  # (grid, num_levels, mask kind)
    ((13, 11), 1, "keep"), ((13, 11), 2, "levels"), ((17, 23), 3, "map"), ((9, 16), 2, "keep"),
    ((13, 11), 2, "all"), ((13, 11), 2, "none"),
]


def _refusal(engine: str, dtype, groups: int, device):
    """``(error type, message part)`` of the refusal ``engine`` gives a conv of this dtype and
    grouping on ``device``, or ``None`` where it runs the conv."""
    if (engine.startswith("spconv") or engine == "products") and groups > 1:
        return ValueError, "grouped"
    if engine == "spconv" and device.type == "cuda" and dtype == torch.float64:
        return TypeError, "no torch.float64 kernels on CUDA"
    if engine == "spconv-igemm":  # CUDA, float32 / float16 only: the rest is refused
        if device.type == "cpu":
            return ValueError, "CUDA only"
        if dtype == torch.float64:
            return TypeError, "float32 or float16"
        if not igemm_status()[0]:  # e.g. cumm 0.4 under NumPy 2: refused, not crashed
            return SpconvUnavailable, "NumPy"
    return None


def test_conv_refusals(device):
    """Every engine / dtype / grouping that the value test skips is refused with its error
    (not run, not crashed); the others are not refused."""
    x, _ = make_input(CASES[1], 0, 6, torch.float64, device)
    checked = 0
    for engine in ["torch", "lattice", "products", "auto", "tuned"] + (
            ["spconv", "spconv-igemm"] if SPCONV else []):
        for dtype in (torch.float64, torch.float32):
            for groups in (1, 3):
                refused = _refusal(engine, dtype, groups, device)
                if refused is None:
                    continue
                w = torch.randn(12, 6 // groups, 3, 3, dtype=dtype, device=device)
                with pytest.raises(refused[0], match=refused[1]):
                    CF.conv2d(x.replace_feature(x.features.to(dtype)), w, groups=groups,
                              engine=engine)
                checked += 1
    assert checked >= 2  # grouped products in both dtypes, on any machine


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,dilation,stride,groups,bias", [
    (3, 1, 1, 1, True), (3, 1, 2, 1, False), (1, 1, 2, 1, True), (1, 1, 1, 1, False),
    (5, 1, 1, 1, False), (3, 2, 1, 1, True), (3, 3, 2, 1, False), (3, 1, 1, 2, True),
    (3, 1, 2, 3, False), (1, 1, 1, 3, True), (1, 1, 2, 3, True), ((3, 5), (2, 1), 1, 1, True)])
def test_conv_matches_dense_reference(case, engine, dtype, k, dilation, stride, groups, bias, device):
    refused = _refusal(engine, dtype, groups, device)
    if refused:
        pytest.skip(f"{engine} refuses this conv ('{refused[1]}'): test_conv_refusals checks that")
    L = case[1]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(1)
    for step in range(L + (stride == 1)):
        if stride == 2 and step == L:
            continue
        x, levels = make_input(case, step, 6, dtype, device, seed=step)
        # 6 -> 12 channels: a swap of inputs and outputs per group cannot pass
        w = torch.randn(12, 6 // groups, kh, kw, generator=gen, dtype=dtype).to(device)
        b = torch.randn(12, generator=gen, dtype=dtype).to(device) if bias else None
        y = CF.conv2d(x, w, b, stride, dilation, groups, engine)
        assert y.step == step + (stride == 2) and y.features.dtype == dtype
        R.assert_conv_within(y.features, x.features, levels, step, stride, w, b, dilation,
                             groups, engine=engine, what=f"{engine} step {step}")


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]])
@pytest.mark.parametrize("engine", ["lattice", "torch", "auto"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,stride,bias", [(1, 1, True), (1, 2, False), (3, 1, True)])
def test_conv_into_a_given_output(case, engine, dtype, k, stride, bias):
    """``conv2d(..., out=...)``: the result's features are ``out`` itself (on every route: the
    GEMM writing into it, oneDNN adding into it, or a copy), within the float64 dense
    reference's bound, at every step of random multi-level masks and on one-grid plans;
    with autograd too. A wrong ``out`` is refused by name."""
    L = case[1]
    gen = torch.Generator().manual_seed(3)
    for step in range(L + (stride == 1)):
        if stride == 2 and step == L:
            continue
        x, levels = make_input(case, step, 8, torch.float32, "cpu", seed=step)
        x = x.replace_feature(x.features.to(dtype))
        w = (torch.randn(12, 8, k, k, generator=gen) / (3 * k)).to(dtype)
        b = torch.randn(12, generator=gen).to(dtype) if bias else None
        n_out = x.plan.num_sites(step + (stride == 2))
        for grad in (False, True):
            out = torch.full((n_out, 12), float("nan"), dtype=dtype)
            with torch.set_grad_enabled(grad):
                y = CF.conv2d(x, w.requires_grad_(grad and dtype != torch.bfloat16), b, stride,
                              1, 1, engine, out=out)
            assert y.features.data_ptr() == out.data_ptr() and y.features.shape == out.shape
            R.assert_conv_within(out.detach(), x.features, levels, step, stride, w.detach(), b,
                                 1, engine=engine, what=f"{engine} step {step} into out")
    with pytest.raises(ValueError, match=r"out must be a \[\d+, 12\] "):
        CF.conv2d(x, w.detach(), b, 1, out=torch.empty(1, 12, dtype=dtype))
    with pytest.raises(ValueError, match="out must be"):
        CF.conv2d(x, w.detach(), b, 1, out=torch.empty(x.num_sites, 12, dtype=torch.int32))
    with pytest.raises(TypeError, match="out must be a tensor"):
        CF.conv2d(x, w.detach(), b, 1, out=[0.0])
    if k == 1 and stride == 1:  # C -> C: the input's own features would fit
        w8 = torch.randn(8, 8, 1, 1, generator=gen).to(dtype)
        with pytest.raises(ValueError, match="shares memory with the input"):
            CF.conv2d(x, w8, None, 1, out=x.features)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k,dilation,stride", [(3, 1, 1), (3, 1, 2), (3, 2, 1), (1, 1, 2)])
def test_half_precision_convs_match_dense_reference(case, engine, dtype, k, dilation, stride,
                                                    device):
    """Values of the half-precision routes (bfloat16 on CPU and CUDA, float16 on CUDA): the
    float64 dense reference on the same rounded inputs and weights, within the rounding bound of
    each engine's route at every output site (on CPU a float32 accumulator and the roundings
    that ``rounding.engine_route`` names; on CUDA, where cuDNN picks the algorithm, the fixed
    tolerances)."""
    if dtype == torch.float16 and device.type == "cpu":
        pytest.skip("float16 convs are a CUDA dtype")
    if engine.startswith("spconv") and (dtype == torch.bfloat16 or device.type == "cpu"
                                        and engine == "spconv-igemm"):
        pytest.skip(f"{engine} has no {dtype} kernels here (its refusals: "
                    "test_conv_matches_dense_reference)")
    if engine == "spconv-igemm" and not igemm_status()[0]:
        pytest.skip(f"spconv-igemm unavailable: {igemm_status()[1]}")
    L = case[1]
    gen = torch.Generator().manual_seed(2)
    for step in range(L + (stride == 1)):
        if stride == 2 and step == L:
            continue
        x, levels = make_input(case, step, 8, torch.float32, device, seed=step)
        x = x.replace_feature(x.features.to(dtype))
        w = (torch.randn(8, 8, k, k, generator=gen) / (3 * k)).to(device, dtype)
        b = torch.randn(8, generator=gen).to(device, dtype)
        with torch.no_grad():
            y = CF.conv2d(x, w, b, stride, dilation, 1, engine)
        assert y.features.dtype == dtype and y.step == step + (stride == 2)
        R.assert_conv_within(y.features, x.features, levels, step, stride, w, b, dilation,
                             engine=engine, what=f"{engine} step {step}")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sums_keep_small_terms(engine, dtype, device):
    """The engines sum half-precision convs in float32 and the partial results they round are
    values the dtype holds here, so the result is the exact sum rounded once (random inputs
    cannot tell every sum in the dtype from that: some stay inside the rounding bound). One
    tap adds 1 and each of the 24 others a quarter of an ulp of 1: a sum in the dtype loses
    some of them in any order that meets the 1 before all 24 are added (6 ulps in sequence
    from the 1). Channel 0 has the 1 on the first tap, channel 1 on the last; images with
    different masks."""
    if device.type == "cuda":
        pytest.skip("cuDNN picks the algorithm by heuristics (Winograd, FFT, implicit GEMM): "
                    "its sums are not claimed exact")
    if engine.startswith("spconv"):
        pytest.skip("spconv's native algorithm sums the taps in the dtype (engine_route)")
    eps = torch.finfo(dtype).eps
    for step, case in enumerate([((17, 23), 3, "map"), ((13, 11), 2, "levels")]):
        x, levels = make_input(case, step, 1, dtype, device, seed=step)
        x = x.replace_feature(torch.ones_like(x.features))
        w = torch.full((2, 1, 5, 5), eps / 4, dtype=dtype)
        w[0, 0, 0, 0] = w[1, 0, -1, -1] = 1
        w = w.to(device)
        with torch.no_grad():
            y = CF.conv2d(x, w, None, 1, 1, 1, engine)
        want = ref.conv(x.features.double(), levels, step, 1, w.double())
        assert ((want == 1 + 6 * eps).float().mean(0) > 0.1).all()  # sites with all 25 taps
        # every partial sum is a multiple of eps / 4 below 2, exact in float32: the result is
        # the exact sum rounded once
        wrong = y.features != want.to(dtype)
        assert not wrong.any(), (f"{engine} {case}: {int(wrong.sum())} of {wrong.numel()} "
                                 f"outputs differ, e.g. {y.features[wrong][:4].tolist()} for "
                                 f"{want[wrong][:4].tolist()}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_max_pools_match_dense_reference(case, dtype, device):
    """Maxima of the same values: equal to the reference's, bit for bit."""
    exact = dict(rtol=0, atol=0)
    L = case[1]
    for step in range(L):
        x, levels = make_input(case, step, 4, dtype, device, seed=step)
        y = CF.max_pool2d(x, 2, 2)
        torch.testing.assert_close(y.features, ref.max_pool_2x2(x.features, levels, step), **exact)
        y = CF.max_pool2d(x, 3, 2, 1)
        torch.testing.assert_close(y.features, ref.max_pool_overlap(x.features, levels, step, 3, 2),
                                   **exact)
        y = CF.max_pool2d(x, 3, 1, 1)
        torch.testing.assert_close(y.features, ref.max_pool_overlap(x.features, levels, step, 3, 1),
                                   **exact)
        # the paper code's anchors: the 2x2 merge is the same, overlapping windows move
        r = CADTensor(x.features, x.plan.with_semantics("reference"), step)
        torch.testing.assert_close(CF.max_pool2d(r, 2, 2).features,
                                   ref.max_pool_2x2(x.features, levels, step), **exact)
        for stride in (1, 2):
            want = ref.max_pool_overlap_reference_semantics(x.features, levels, step, 3, stride)
            torch.testing.assert_close(CF.max_pool2d(r, 3, stride, 1).features, want, **exact)


@pytest.mark.parametrize("case", CASES[:4])
@pytest.mark.parametrize("k,dilation,stride", [(3, 2, 1), (3, 2, 2), ((3, 5), (2, 1), 1),
                                                ((5, 3), 1, 2)])
@pytest.mark.parametrize("chunk", [None, 4 * 15])  # 4 channels x 15 taps: 1 site per chunk
def test_dilated_rectangular_and_chunked_max_pools_with_gradients(case, k, dilation, stride,
                                                                   chunk, device, monkeypatch):
    """Max pools with dilated and rectangular windows, values and input gradients, against the
    dense reference's (float64), in one chunk and in many; the torch engine's conv in many
    chunks too (the gather loops hold at most ``CHUNK_ELEMENTS`` elements)."""
    import cad_spconv.engines.base as B
    import cad_spconv.engines.gather as G
    if chunk:
        monkeypatch.setattr(B, "CHUNK_ELEMENTS", chunk)
        monkeypatch.setattr(G, "CHUNK_ELEMENTS", chunk)
    L = case[1]
    kh, kw = (k, k) if isinstance(k, int) else k
    dy, dx = (dilation, dilation) if isinstance(dilation, int) else dilation
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(3, 4, kh, kw, generator=gen, dtype=torch.float64).to(device)
    for step in range(L + (stride == 1)):
        x, levels = make_input(case, step, 4, torch.float64, device, seed=step + 5)
        mine, theirs = (x.features.clone().requires_grad_() for _ in range(2))
        y = CF.max_pool2d(x.replace_feature(mine), k, stride, (dy * (kh // 2), dx * (kw // 2)),
                          dilation).features
        want = ref.max_pool_overlap(theirs, levels, step, k, stride, dilation)
        torch.testing.assert_close(y, want, **tol(torch.float64))
        seed = torch.randn(want.shape, generator=gen, dtype=torch.float64).to(device)
        (y * seed).sum().backward()
        (want * seed).sum().backward()
        torch.testing.assert_close(mine.grad, theirs.grad, **tol(torch.float64))
        got = CF.conv2d(x, w, None, stride, dilation, 1, "torch").features
        torch.testing.assert_close(
            got, ref.conv(x.features, levels, step, stride, w, None, dilation),
            **tol(torch.float64))


def test_rulebooks_of_one_cache_are_told_apart_by_every_geometry_argument():
    """Convs on one tensor share its rulebook cache: a rulebook is reused for the same kernel,
    dilation and stride only (a key missing one of them would hand over a wrong rulebook)."""
    case = ((17, 23), 3, "map")
    x, levels = make_input(case, 1, 4, torch.float64, "cpu", seed=8)
    gen = torch.Generator().manual_seed(8)
    w3, w5 = (torch.randn(4, 4, k, k, generator=gen, dtype=torch.float64) for k in (3, 5))
    calls = [(w3, 1, 1), (w3, 2, 1), (w3, (1, 2), 1), (w3, 1, 2), (w5, 1, 1), (w3, 1, 1),
             (w3, 2, 1)]
    for w, dilation, stride in calls:
        got = CF.conv2d(x, w, None, stride, dilation, 1, "torch").features
        want = ref.conv(x.features, levels, 1, stride, w, None, dilation)
        torch.testing.assert_close(got, want, **tol(torch.float64))
    assert x.cache.builds == 5  # the last two calls reused their rulebooks


def test_global_avg_pool_sums_half_precision_in_float32(device):
    """90000 sites of values in [0.5, 1.5): a float16 sum overflows (max 65504) and a bfloat16
    one stalls once ulp(sum) exceeds the addends; the mean must match float64's."""
    plan = LevelPlan.from_keep(torch.ones(1, 300, 300, dtype=torch.bool, device=device),
                               (300, 300), 1)
    values = torch.rand(plan.num_sites(0), 2, generator=torch.Generator().manual_seed(0)) + 0.5
    for dtype in (torch.float16, torch.bfloat16):
        x = CADTensor(values.to(dtype).to(device), plan, 0)
        out = CF.global_avg_pool(x)
        assert out.dtype == dtype
        want = values.to(dtype).double().mean(0, keepdim=True).to(device)
        # a sum of 90000 terms in float32, then the division and the output: two roundings
        size = values.to(dtype).double().abs().mean(0, keepdim=True).to(device)
        R.assert_within(out, want, R.conv_bound(size, want, dtype, plan.num_sites(0),
                                                roundings=2), str(dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk", [None, 7])  # 7 elements: one site per chunk of the sum
def test_global_avg_pool_and_densify(case, chunk, device, monkeypatch):
    if chunk:
        monkeypatch.setattr(CF, "_CHUNK_ELEMENTS", chunk)
    L = case[1]
    for step in range(L + 1):
        x, levels = make_input(case, step, 5, torch.float64, device, seed=step)
        geo = ref.Geometry(levels, step)
        want = ref.global_avg_pool(x.features, levels, step)
        torch.testing.assert_close(CF.global_avg_pool(x), want, **tol(torch.float64))
        f = x.features.clone().requires_grad_(True)  # the autograd path (no chunks)
        got = CF.global_avg_pool(CADTensor(f, x.plan, step))
        torch.testing.assert_close(got, want, **tol(torch.float64))
        up = torch.randn(got.shape, dtype=got.dtype, generator=torch.Generator().manual_seed(4))
        (got * up.to(device)).sum().backward()
        g = x.features.clone().requires_grad_(True)
        (ref.global_avg_pool(g, levels, step) * up.to(device)).sum().backward()
        torch.testing.assert_close(f.grad, g.grad, **tol(torch.float64))
        dense = geo.fill(x.features)
        torch.testing.assert_close(x.dense(), dense, rtol=0, atol=0)  # copies
        s = 2 ** step
        torch.testing.assert_close(x.dense(grid="step"), dense[:, :, ::s, ::s], rtol=0, atol=0)


def test_from_dense_roundtrip(device):
    x = torch.randn(2, 3, 7, 9, dtype=torch.float64, device=device)
    t = CADTensor.from_dense(x, torch.rand(2, 7, 9, device=device) < 0.2, 2)
    assert t.step == 0 and t.num_sites == 2 * 7 * 9
    torch.testing.assert_close(t.dense(), x)
    np.testing.assert_array_equal(t.indices[:, 1:].cpu().numpy().max(0), [6, 8])


def test_batch_norm_eval_and_train(device):
    x, levels = make_input(CASES[1], 1, 4, torch.float64, device)
    bn = torch.nn.BatchNorm2d(4).double().to(device)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    from cad_spconv.nn import CADBatchNorm2d
    cbn = CADBatchNorm2d.from_module(bn).eval()
    bn.eval()
    expected = bn(x.features[:, :, None, None])[:, :, 0, 0]
    torch.testing.assert_close(cbn(x).features, expected, **tol(torch.float64))
    # training: statistics over the sites (unweighted), written by hand; running statistics
    # updated with the unbiased variance, by momentum or (momentum=None) as a cumulative mean
    f = x.features
    mean, var = f.mean(0), ((f - f.mean(0)) ** 2).mean(0)
    n = f.shape[0]
    for momentum in (0.1, None):
        bn.momentum = cbn.momentum = momentum
        bn.num_batches_tracked.zero_()
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        cbn.train()
        out = cbn(x).features
        want = (f - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        torch.testing.assert_close(out, want, **tol(torch.float64))
        m = 0.1 if momentum is not None else 1.0  # the first batch of a cumulative mean
        torch.testing.assert_close(bn.running_mean, (1 - m) * rm + m * mean, **tol(torch.float64))
        torch.testing.assert_close(bn.running_var, (1 - m) * rv + m * var * n / (n - 1),
                                   **tol(torch.float64))
        assert int(bn.num_batches_tracked) == 1  # buffers are shared with the original module


def test_batch_norm_in_place_follows_every_change_of_its_parameters(device):
    """The in-place eval batch norm keeps its per-channel scale and shift between calls; any
    change of a statistic or parameter (in place, replaced, another dtype) is seen at once."""
    from cad_spconv.nn import CADBatchNorm2d
    x, _ = make_input(CASES[1], 1, 4, torch.float64, device)
    bn = torch.nn.BatchNorm2d(4).double().to(device).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    cbn = CADBatchNorm2d.from_module(bn, inplace=True).eval()

    def check(module, features):
        with torch.no_grad():
            out = cbn(x.replace_feature(features.clone())).features
            expected = module(features[:, :, None, None])[:, :, 0, 0]
        assert out.dtype == features.dtype
        torch.testing.assert_close(out, expected, **tol(features.dtype))

    check(bn, x.features)
    with torch.no_grad():
        bn.running_var.mul_(3)  # in place, through the shared buffer
        bn.weight.add_(0.5)
    check(bn, x.features)
    bn.load_state_dict({k: v + 1 if v.is_floating_point() else v
                        for k, v in bn.state_dict().items()})
    check(bn, x.features)
    cbn.bias = torch.nn.Parameter(bn.bias.detach() * -2)  # replaced on the CAD module only
    bn.bias = cbn.bias
    check(bn, x.features)
    bn.running_var.data = bn.running_var.data * 4  # storage swapped, version unchanged
    check(bn, x.features)
    bn.float(), cbn.float()
    check(bn, x.features.float())
    # training-mode forwards update the statistics without moving their version counters
    for module in (cbn, bn):
        module.train()
        with torch.no_grad():
            if module is cbn:
                cbn(x.replace_feature(x.features.float() * 3 + 2))
            else:
                bn(x.features.float()[:, :, None, None] * 3 - 2)
        module.eval()
        check(bn, x.features.float())


def test_batch_norm_in_place_keeps_whether_its_scale_is_finite_with_the_scale():
    """The kept scale comes with whether it is finite (the half-precision kernel's condition):
    a variance set to 0 in place (eps 0, so an infinite scale) must send the next call to the
    ``addcmul`` route, not leave the channel NaN through a stale flag."""
    from cad_spconv.nn import CADBatchNorm2d
    x, _ = make_input(CASES[1], 1, 4, torch.float64, "cpu")
    bn = torch.nn.BatchNorm2d(4, eps=0.0).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    cbn = CADBatchNorm2d.from_module(bn, inplace=True).eval()
    f = x.features.to(torch.bfloat16)
    for zero_variance in (False, True):
        if zero_variance:
            with torch.no_grad():
                bn.running_var[1] = 0.0
        scale, shift = CF.eval_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                           eps=0.0)
        want = torch.addcmul(shift, f, scale, out=f.clone())
        with torch.no_grad():
            got = cbn(x.replace_feature(f.clone())).features
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
        assert not got[:, 1].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_batch_norm_in_place_in_half_precision_takes_float32_scale_and_shift(dtype, device):
    """Half-precision statistics: the in-place batch norm computes as torch's does, in
    float32, rounding once. A float16 ``mean * scale`` overflowed (-inf for a result of 0) and
    ``var + eps`` fell below float16's normal range."""
    from cad_spconv.nn import CADBatchNorm2d
    x, _ = make_input(CASES[1], 1, 4, torch.float64, device)
    bn = torch.nn.BatchNorm2d(4, eps=1e-6).to(device).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([300.0, 0.5, -2.0, 0.0]))
        bn.running_var.copy_(torch.tensor([0.0, 0.0, 1.0, 3.0]))
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    bn.to(dtype)
    f = x.features.to(dtype)
    f[:, 0], f[:, 1] = 300.0, f[:, 1] * 1e-3 + 0.5  # a result of 0; tiny var + eps
    cbn = CADBatchNorm2d.from_module(bn, inplace=True).eval()
    with torch.no_grad():
        out = cbn(x.replace_feature(f.clone())).features
    want = torch.nn.functional.batch_norm(
        f.double(), *(t.double() for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias)),
        False, 0.0, bn.eps)
    R.assert_within(out, want, R.batch_norm_bound(f, bn, dtype), f"in place, {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels", [5, 512])  # 512: enough elements for torch's threads
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_batch_norm_in_place_half_precision_rounds_once(dtype, channels, layout):
    """On CPU, half-precision features with float32 scale and shift are normalized through
    torch's batch-norm kernel, aliased onto the features (a mixed-dtype ``addcmul`` runs
    unvectorized there): the values are those of the one mixed-dtype op, which rounds once,
    also for strided features, where torch's kernel would round twice."""
    x, _ = make_input(CASES[1], 1, channels, torch.float64, "cpu")
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(channels, generator=g) * 40
    var = torch.rand(channels, generator=g) + 0.01
    weight, bias = torch.rand(channels, generator=g) + 0.5, torch.randn(channels, generator=g)
    f = (x.features * 5 + mean).to(dtype)  # large means: scale and shift rounded first would cancel
    half = [t.to(dtype) for t in (mean, var, weight, bias)]
    m, v, w, b = (t.float() for t in half)  # float32 scale and shift, from the formula
    scale = w * torch.rsqrt(v + 1e-5)
    shift = b - m * scale
    want = torch.addcmul(shift, f, scale, out=f.clone())  # one mixed-dtype op: rounds once
    own = f.clone() if layout == "contiguous" else torch.cat([f, -f], 1)[:, :channels]
    assert own.is_contiguous() == (layout == "contiguous")
    got = CF.batch_norm(x.replace_feature(own), *half, inplace=True).features
    assert got.data_ptr() == own.data_ptr()  # in place
    assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["float64 weight", "zero variance, eps 0"])
def test_batch_norm_in_place_outside_the_half_kernel_matches_addcmul(case):
    """Where torch's batch-norm kernel would not give the mixed ``addcmul``'s values, the
    in-place route takes the ``addcmul``: float32 features with a float64 weight (the kernel
    refuses the parameter dtype) and an infinite scale from a zero variance with eps 0 (the
    kernel's shift, ``shift - 0 * inf``, makes the channel NaN)."""
    x, _ = make_input(CASES[1], 1, 4, torch.float64, "cpu")
    g = torch.Generator().manual_seed(5)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    weight, bias = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    if case == "float64 weight":
        f, eps = x.features.float(), 1e-5
        stats = (mean, var, weight.double(), bias.double())
    else:
        f, eps = x.features.to(torch.bfloat16), 0.0
        var[1] = 0.0
        stats = (mean, var, weight, bias)
    scale, shift = CF.eval_scale_shift(*stats, eps=eps)
    want = torch.addcmul(shift, f, scale, out=f.clone())
    got = CF.batch_norm(x.replace_feature(f.clone()), *stats, eps=eps, inplace=True).features
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    if case != "float64 weight":
        assert not got[:, 1].isnan().all()  # the kernel would make the channel NaN


@pytest.mark.parametrize("stats_dtype", [torch.bfloat16, torch.float32])  # float32: autocast
def test_batch_norm_in_place_half_precision_allocates_no_feature_copy(stats_dtype):
    """In place means no feature-sized temporary: half-precision features with float32 scale
    and shift take per-channel temporaries only (a mixed-dtype ``addcmul`` with ``out=`` made
    a float32 copy of the whole feature matrix on CPU, which raised the peak of whole networks
    above the dense one's)."""
    from cad_apps.bench.measure import _tensor_peak
    x, _ = make_input(CASES[1], 1, 64, torch.float64, "cpu")
    bound = 16 * 64 * 4  # per-channel scale, shift and temporaries
    assert x.features.shape[0] * 64 * 2 > 2 * bound  # a bfloat16 feature matrix would not fit
    stats = [t.to(stats_dtype) for t in (torch.zeros(64), torch.ones(64))]
    own = x.replace_feature(x.features.to(torch.bfloat16))
    with torch.no_grad():
        peak = _tensor_peak(lambda: CF.batch_norm(own, *stats, inplace=True).features, ())
    assert peak <= bound, peak


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_in_place(device, affine):
    """``inplace``: in eval mode without autograd the features are overwritten with what the
    out-of-place batch norm computes (half-precision features with float32 statistics too, as
    under autocast); with autograd recording or in training mode it computes out of place and
    leaves the input alone."""
    import copy

    from cad_spconv.nn import CADBatchNorm2d
    x, _ = make_input(CASES[1], 1, 4, torch.float64, device)
    bn = torch.nn.BatchNorm2d(4, affine=affine).double().to(device).eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    if affine:
        bn.weight.data.uniform_(0.5, 2), bn.bias.data.uniform_(-1, 1)
    expected = bn(x.features[:, :, None, None])[:, :, 0, 0]
    cbn = CADBatchNorm2d.from_module(bn, inplace=True).eval()
    with torch.no_grad():
        own = x.replace_feature(x.features.clone())
        out = cbn(own)
    assert out.features.data_ptr() == own.features.data_ptr()  # no new feature matrix
    torch.testing.assert_close(out.features, expected, atol=1e-12, rtol=1e-12)
    before = x.features.clone()
    if affine:  # autograd records (the parameters require grad): out of place
        out = cbn(x)
        assert out.features.requires_grad and out.features.data_ptr() != x.features.data_ptr()
        torch.testing.assert_close(out.features, expected, **tol(torch.float64))
    with torch.no_grad():
        cbn.train()
        cbn(x)
        # half-precision features, float32 statistics (autocast): in place, in the features'
        # dtype, as torch's batch norm returns it
        single = copy.deepcopy(bn).float()
        stats = [None if t is None else t.double()
                 for t in (single.running_mean, single.running_var, single.weight, single.bias)]
        for dtype in (torch.bfloat16, torch.float16):
            half = x.replace_feature(x.features.to(dtype))
            want = torch.nn.functional.batch_norm(half.features.double(), *stats, False, 0.0, single.eps)
            bound = R.batch_norm_bound(half.features, single, dtype)
            out = CADBatchNorm2d.from_module(single, inplace=True).eval()(half)
            assert out.features.data_ptr() == half.features.data_ptr() and out.dtype == dtype
            R.assert_within(out.features, want, bound, f"{dtype} features, float32 statistics")
    torch.testing.assert_close(x.features, before, atol=0, rtol=0)


def test_rulebooks_are_cached_and_shared(device):
    x, _ = make_input(CASES[1], 0, 4, torch.float64, device)
    w = torch.randn(4, 4, 3, 3, dtype=torch.float64, device=device)
    y = CF.conv2d(x, w)
    y = CF.conv2d(y, w)
    z = CF.conv2d(y, w, stride=2)
    z = CF.conv2d(z, w) + CF.conv2d(z, w)
    assert x.cache is z.cache
    # stride 2 at step 0 and stride 1 at step 1; a stride-1 conv at step 0 needs none (every
    # finest cell is a site there: it runs as the dense conv)
    assert x.plan.grid_level(0) == 0 and x.plan.grid_level(1) is None and x.cache.builds == 2


def _levels_at_least_one(batch, grid, seed):
    """A two-level map where no cell is kept (every level >= 1), 4x4 blocks at level 2 at a
    different density per image."""
    rng = np.random.default_rng(seed)
    H, W = grid
    blocks = rng.uniform(size=(batch, -(-H // 4), -(-W // 4))) < rng.uniform(0.2, 0.8, (batch, 1, 1))
    top = blocks.repeat(4, 1).repeat(4, 2)[:, :H, :W]
    return 1 + top.astype(np.int64)


@pytest.mark.parametrize("levels", ["1 or 2", "all 1", "all 0", "all 2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("k,dilation,stride,groups,bias", [
    (3, 1, 1, 1, True), (3, 1, 2, 1, False), (1, 1, 2, 1, True), (3, 2, 1, 2, True),
    ((3, 5), (2, 1), 1, 1, False), (5, 1, 2, 1, True)])
def test_conv_on_grids_of_cells_runs_without_a_rulebook(levels, dtype, k, dilation, stride,
                                                        groups, bias, device):
    """Where the sites on both sides are all the cells of one grid (``plan.grid_level``: up
    to step ``min level``, and at every step when all cells share a level) ``engine="auto"``
    runs a dense conv: no rulebook, and the dense emulation's result (odd grid, a batch whose
    images have different level maps). Elsewhere the conv builds its rulebook."""
    kh, kw = (k, k) if isinstance(k, int) else k
    level_map = (_levels_at_least_one(3, (13, 11), seed=4) if levels == "1 or 2"
                 else np.full((3, 13, 11), int(levels[-1])))
    plan = LevelPlan.from_level_map(torch.from_numpy(level_map).to(device), 2)
    assert plan.level_range == (int(level_map.min()), int(level_map.max()))
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(6, 6 // groups, kh, kw, generator=gen, dtype=dtype).to(device)
    b = torch.randn(6, generator=gen, dtype=dtype).to(device) if bias else None
    for step in range(2 + (stride == 1)):
        if stride == 2 and step == 2:
            continue
        feats = torch.randn(plan.num_sites(step), 6, generator=gen, dtype=dtype).to(device)
        x = CADTensor(feats, plan, step)
        y = CF.conv2d(x, w, b, stride, dilation, groups)
        args = (feats, level_map, step, stride, w, b, dilation, groups)
        R.assert_conv_within(y.features, *args, engine="auto", what=f"step {step}")
        assert y.step == step + (stride == 2) and y.indices is plan.geometry(y.step).indices
        dense = levels != "1 or 2" or step + (stride == 2) <= 1
        assert x.cache.builds == (0 if dense else 1), (step, stride)
        if dense:  # as the lattice engine computes it through its rulebook
            R.assert_conv_within(CF.conv2d(x, w, b, stride, dilation, groups, "lattice").features,
                                 *args, engine="lattice", what=f"lattice, step {step}")


def test_grid_conv_needs_every_image_coarse_and_keeps_autograd(device):
    """One image with a kept cell takes the batch off the grid path (the images are never
    mixed); gradients of the grid path equal those of the rulebook path (float64)."""
    levels = np.full((2, 9, 7), 1)
    plan = LevelPlan.from_level_map(torch.from_numpy(levels.copy()).to(device), 1)
    levels[1, 4:6, 2:4] = 0  # one kept block
    mixed = LevelPlan.from_level_map(torch.from_numpy(levels).to(device), 1)
    assert (plan.level_range, mixed.level_range) == ((1, 1), (0, 1))
    assert (plan.grid_level(1), mixed.grid_level(1)) == (1, None)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 4, 3, 3, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    f = torch.randn(mixed.num_sites(1), 4, generator=gen, dtype=torch.float64).to(device)
    y = CF.conv2d(CADTensor(f, mixed, 1), w)
    assert y.cache.builds == 1
    torch.testing.assert_close(y.features, ref.conv(f, levels, 1, 1, w.detach()), **tol(torch.float64))
    f = torch.randn(plan.num_sites(1), 4, generator=gen, dtype=torch.float64).to(device)
    grads = []
    for engine in ("auto", "torch"):
        x = CADTensor(f.clone().requires_grad_(), plan, 1)
        out = CF.conv2d(x, w, engine=engine)
        assert out.cache.builds == (engine != "auto")
        gw, gx = torch.autograd.grad(out.features.square().sum(), (w, x.features))
        grads.append((out.features.detach(), gw, gx))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16])
def test_grid_conv_under_autocast(cast):
    """Under ``torch.autocast`` the grid path is taken as without it (float32 features and
    parameters, then features already in the autocast dtype with float32 parameters) and
    computes in the autocast dtype, as the engines do; float64 features with float32 weights
    stay refused with the engines' message."""
    level_map = _levels_at_least_one(2, (13, 11), seed=7)
    plan = LevelPlan.from_level_map(torch.from_numpy(level_map), 2)
    gen = torch.Generator().manual_seed(8)
    w1, w2 = (torch.randn(8, 8, 3, 3, generator=gen) / 8 for _ in range(2))
    b1, b2 = (torch.randn(8, generator=gen) for _ in range(2))
    x = CADTensor(torch.randn(plan.num_sites(0), 8, generator=gen), plan, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=cast):
        y = CF.conv2d(x, w1, b1, stride=2)
        z = CF.conv2d(y, w2, b2)
        assert x.cache.builds == 0  # both on the grid path
        lattice = CF.conv2d(y, w2, b2, engine="lattice")
    assert y.features.dtype == z.features.dtype == cast
    # autocast rounds the float32 features, weights and biases to its dtype first: the
    # references take those rounded values
    for got, engine, (f, step, stride, w, b) in (
            (y, "auto", (x.features, 0, 2, w1, b1)), (z, "auto", (y.features, 1, 1, w2, b2)),
            (lattice, "lattice", (y.features, 1, 1, w2, b2))):
        f, w, b = (t.to(cast) for t in (f, w, b))
        R.assert_conv_within(got.features, f, level_map, step, stride, w, b, engine=engine)
    x64 = CADTensor(x.features.double(), plan, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=cast):
        with pytest.raises(TypeError, match="float64, the weight.*autocast"):
            CF.conv2d(x64, w1, b1, stride=2)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("engine", ["auto", "torch", "tuned", "products"] + [pytest.param(
    "spconv", marks=pytest.mark.skipif(not SPCONV, reason="spconv engine unavailable"))])
@pytest.mark.parametrize("k,dilation,stride", [(3, 1, 1), (3, 1, 2), (3, 2, 1), (5, 1, 2),
                                                ((3, 5), (2, 1), 1), (1, 1, 2)])
def test_reference_semantics_conv_matches_its_dense_emulation(case, engine, k, dilation, stride):
    """``semantics="reference"`` (the paper code's centre anchor) against an independent
    emulation (float64): every engine that runs it, both strides, odd grids, per-image masks."""
    L = case[1]
    kh, kw = (k, k) if isinstance(k, int) else k
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(5, 4, kh, kw, generator=gen, dtype=torch.float64)
    b = torch.randn(5, generator=gen, dtype=torch.float64)
    for step in range(L + (stride == 1)):
        x, levels = make_input(case, step, 4, torch.float64, "cpu", seed=step + 11)
        x = CADTensor(x.features, x.plan.with_semantics("reference"), step)
        y = CF.conv2d(x, w, b, stride, dilation, 1, engine)
        want = ref.conv_reference_semantics(x.features, levels, step, stride, w, b, dilation)
        torch.testing.assert_close(y.features, want, rtol=1e-9, atol=1e-10)
        if step > 0 and kh > 1 and L > 0 and (levels >= 1).any():
            paper = CF.conv2d(CADTensor(x.features, x.plan.with_semantics("paper"), step), w, b,
                              stride, dilation, 1, engine)
            assert not torch.allclose(paper.features, y.features)  # the rules really differ


def test_reference_semantics_refuses_the_lattice_engine():
    x, _ = make_input(((9, 9), 1, "keep"), 1, 3, torch.float64, "cpu", seed=1)
    x = CADTensor(x.features, x.plan.with_semantics("reference"), 1)
    with pytest.raises(ValueError, match="Guarantee 2"):
        CF.conv2d(x, torch.randn(3, 3, 3, 3, dtype=torch.float64), engine="lattice")
    CF.conv2d(x, torch.randn(3, 3, 1, 1, dtype=torch.float64), engine="lattice")  # 1x1: no taps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eval_batch_norm_in_place_is_torchs_kernel(dtype):
    """On CPU, with statistics and parameters of the features' dtype, the in-place eval batch
    norm is torch's own kernel written into the features: ``F.batch_norm``'s bits (what the
    dense network computes). With autograd recording, out of place, same values."""
    from cad_spconv.nn import CADBatchNorm2d

    gen = torch.Generator().manual_seed(3)
    bn = torch.nn.BatchNorm2d(12).eval()
    with torch.no_grad():
        for t, (lo, hi) in ((bn.running_mean, (-3, 3)), (bn.running_var, (0.1, 4)),
                            (bn.weight, (-2, 2)), (bn.bias, (-1, 1))):
            t.copy_(torch.rand(12, generator=gen) * (hi - lo) + lo)
    bn = bn.to(dtype)
    cbn = CADBatchNorm2d.from_module(bn, inplace=True).eval()
    f = (torch.randn(37, 12, generator=gen) * 3).to(dtype)
    want = torch.nn.functional.batch_norm(f, bn.running_mean, bn.running_var, bn.weight,
                                          bn.bias, False, 0.0, bn.eps)
    with torch.no_grad():
        g = f.clone()
        out = cbn.normalize(g)
    assert out.data_ptr() == g.data_ptr() and torch.equal(out, want)
    out = cbn.normalize(f)  # the parameters require grad: recorded, out of place
    assert out.requires_grad and out.data_ptr() != f.data_ptr()
    torch.testing.assert_close(out.detach(), want, rtol=0, atol=0)
