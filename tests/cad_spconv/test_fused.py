"""The fused gather + GEMM kernel (``cad_spconv.engines.fused``): on by default only on CPUs with
AMX or AVX512-BF16, off where turned off, a clear error where asked for and it cannot run (by
default: one warning, and off), and, where it runs, the lattice engine's conv with it equals the
dense reference on the same bfloat16 or float32 inputs within the route's rounding bound, on AMX
tiles and in AVX512-BF16 registers (bfloat16), and with AVX-512 FMAs (float32). The exactness tests
run where the kernel does (a C++ compiler, and AVX512-BF16 for the registers' GEMM, AMX for the
tiles'; the first one builds it, about 40 s on 2 cores, unless torch's extension cache holds it) and
are skipped elsewhere."""
import shutil

import pytest
import torch

from cad_spconv import CADTensor, functional as CF
from cad_spconv.engines import fused, gemm, lattice
from cad_spconv.plan import make_plan
from tests.support import rounding as R
from tests.support.emulation import mixed_masks


@pytest.fixture
def restore_fused():
    was = dict(fused._state)
    yield
    fused._state.update(was)


def _layer(grid=(13, 19), num_levels=1, step=1, c_out=64, c_in=32, dtype=torch.bfloat16,
           seed=0):
    spec, levels = mixed_masks(seed=seed, batch=2, grid=grid, num_levels=num_levels)
    plan = make_plan(spec, grid, num_levels)
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(plan.num_sites(step), c_in, generator=gen).to(dtype)
    weight = (torch.randn(c_out, c_in, 3, 3, generator=gen) / 9).to(dtype)
    return CADTensor(features, plan, step), levels, weight


def test_fused_kernel_is_off_where_turned_off(restore_fused, monkeypatch):
    fused.enable(False)
    x, _, w = _layer()
    assert not fused.enabled() and not fused.applies(x.features, w, None, 1)
    assert fused.describe() == "off"
    calls = []
    monkeypatch.setattr(fused, "gather_gemm", lambda *a: calls.append(a))
    with torch.inference_mode():
        CF.conv2d(x, w, None, 1, 1, 1, "lattice")
    assert not calls


@pytest.mark.parametrize("bf16, avx512", [(False, True), (True, False)])
def test_by_default_the_kernel_is_off_without_bf16_code(restore_fused, monkeypatch, bf16, avx512):
    monkeypatch.setattr(gemm, "CPU_AMX", False)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", bf16)
    monkeypatch.setattr(gemm, "CPU_AVX512", avx512)  # False: an ISA-limited run
    fused._state.update(mode=fused.AUTO, module=None, why_off=None)
    x, _, w = _layer()
    assert not fused.enabled() and not fused.applies(x.features, w, None, 1)
    assert fused.describe() == "auto: off (no AVX512-BF16 or AMX, or AVX2 code only)"
    assert fused._state["module"] is None  # nothing was built


def test_fused_kernel_applies_to_bfloat16_and_float32_without_autograd_or_groups(
        restore_fused):
    fused._state["mode"] = "on"
    x, _, w = _layer()
    f = x.features
    assert fused.applies(f, w, None, 1)
    assert fused.applies(f, w, torch.zeros(64, dtype=torch.bfloat16), 1)  # a folded conv's
    assert fused.applies(f.float(), w.float(), torch.zeros(64), 1)  # its float32 form
    assert not fused.applies(f.half(), w.half(), None, 1)  # float16: the engine's own route
    assert not fused.applies(f.double(), w.double(), None, 1)
    assert not fused.applies(f.float(), w, None, 1)  # mixed types: F.conv2d would refuse
    assert not fused.applies(f, w, torch.zeros(64), 1)  # a float32 bias: F.conv2d would refuse
    assert not fused.applies(f, w[:48], None, 1)  # C_out not a multiple of 32
    assert not fused.applies(f[:, :24], w[:, :24], None, 1)  # C_in not a multiple of 32
    assert not fused.applies(f, w, None, 2)
    assert not fused.applies(f.requires_grad_(True), w, None, 1)


@pytest.mark.parametrize("value, mode", [("1", "on"), ("0", "off"), ("", "auto"), (" 1 ", "on")])
def test_the_environment_variable_is_1_0_or_unset(monkeypatch, value, mode):
    monkeypatch.setenv(fused.ENV, value)
    assert fused._env_mode() == mode


@pytest.mark.parametrize("value", ["yes", "true", "2", "auto"])
def test_another_value_of_the_environment_variable_is_refused(monkeypatch, value):
    monkeypatch.setenv(fused.ENV, value)
    with pytest.raises(ValueError, match="use 1 .*, 0 .*, or leave it unset"):
        fused._env_mode()


def _no_compiler(*args, **kwargs):
    raise RuntimeError("Error building extension: c++: command not found")


def test_a_kernel_asked_for_that_cannot_build_is_a_clear_error(restore_fused, monkeypatch):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load_inline", _no_compiler)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", True)
    fused._state.update(mode="off", module=None, why_off=None)
    with pytest.raises(fused.FusedKernelUnavailable, match="C\\+\\+ compiler") as e:
        fused.enable()
    assert "command not found" in str(e.value) and "enable(False)" in str(e.value)
    assert not fused.enabled() and fused._state["mode"] == "off"  # as it was


def test_by_default_a_kernel_that_cannot_build_warns_once_and_stays_off(restore_fused,
                                                                          monkeypatch):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load_inline", _no_compiler)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", True)
    monkeypatch.setattr(gemm, "CPU_AVX512", True)
    fused._state.update(mode=fused.AUTO, module=None, why_off=None)
    x, _, w = _layer()
    assert fused.enabled()
    with pytest.warns(RuntimeWarning, match="could not be built .* on by default on CPUs with "
                      "AMX or AVX512-BF16") as rec:
        with torch.inference_mode():
            CF.conv2d(x, w, None, 1, 1, 1, "lattice")  # the engine's own route
            CF.conv2d(x, w, None, 1, 1, 1, "lattice")
    assert len(rec) == 1
    assert not fused.enabled() and fused.describe().startswith("off (the fused gather")


@pytest.mark.parametrize("amx, isa", [(True, "AMX"), (False, "AVX512-BF16")])
def test_by_default_the_first_build_is_announced(restore_fused, monkeypatch, caplog, amx, isa):
    import torch.utils.cpp_extension as ext

    asked = []

    class Built:
        @staticmethod
        def amx_ready():  # Linux's AMX permission, asked for on AMX CPUs only
            asked.append(True)
            return True

    monkeypatch.setattr(ext, "load_inline", lambda *a, **k: Built)
    monkeypatch.setattr(fused, "_built", lambda: False)
    monkeypatch.setattr(gemm, "CPU_AMX", amx)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", True)
    monkeypatch.setattr(gemm, "CPU_AVX512", True)
    fused._state.update(mode=fused.AUTO, module=None, why_off=None, tiles=None)
    x, _, w = _layer()
    with caplog.at_level("WARNING", logger="cad_spconv"):
        assert fused.applies(x.features, w, None, 1)
    assert f"building the fused gather + GEMM kernel for this CPU's {isa}" in caplog.text
    assert fused.describe() == f"auto: on ({isa}; float32: AVX-512)"
    assert fused._state["module"] is Built
    assert bool(asked) == amx


def test_amx_tiles_that_linux_does_not_give_leave_the_registers(restore_fused, monkeypatch,
                                                                caplog):
    """An AMX CPU whose tile state Linux refuses (an old kernel, a seccomp filter) runs the
    kernel's GEMM in AVX512-BF16 registers, said once, and with blocks of 64 sites."""
    import torch.utils.cpp_extension as ext

    class Built:
        @staticmethod
        def amx_ready():
            return False

    monkeypatch.setattr(ext, "load_inline", lambda *a, **k: Built)
    monkeypatch.setattr(gemm, "CPU_AMX", True)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", True)
    fused._state.update(mode="off", module=None, why_off=None, tiles=None)
    assert fused.tiles() and fused.block_rows(512, 9 * 512) == 128  # before the build
    with caplog.at_level("WARNING", logger="cad_spconv"):
        fused.enable()
    assert "did not give this process AMX tile state" in caplog.text
    assert "AVX512-BF16 registers instead" in caplog.text
    assert fused.enabled() and not fused.tiles()
    assert fused.describe() == "on (AVX512-BF16; float32: AVX-512)"
    assert fused.block_rows(512, 9 * 512) == 64


@pytest.fixture(scope="module")
def kernel():
    if not gemm.CPU_AVX512_BF16:  # checked first: a build here would take a minute, not to run
        pytest.skip("the fused kernel runs on CPUs with AVX512-BF16 (or AMX); this one has "
                    "neither")
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the fused kernel")
    try:
        fused._module()
    except fused.FusedKernelUnavailable as e:
        pytest.skip(str(e))


def _runs_of_16(index: torch.Tensor) -> int:
    """The (16 sites, tap) tiles of the kernel (sites from 0 in 16s) whose input rows are 16
    consecutive rows: it reads those from the features, not from its gathered block."""
    n = index.shape[0] // 16 * 16
    tiles = index[:n].view(-1, 16, index.shape[1])
    run = (tiles - tiles[:, :1]) == torch.arange(16)[None, :, None]
    return int((run.all(1) & (tiles[:, 0] >= 0)).sum())


@pytest.mark.parametrize("grid, num_levels, step, stride, dilation, block_rows, c_in, c_out", [
    ((13, 19), 1, 1, 1, 1, 32, 32, 128),
    ((17, 22), 2, 1, 1, 2, 32, 64, 96),
    ((17, 22), 2, 2, 1, 1, 64, 96, 128),
    ((17, 22), 2, 0, 2, 1, 32, 64, 64),  # an adaptive step (step 0 -> 1)
    ((37, 41), 2, 1, 1, 1, 128, 32, 64),  # the blocks of layers with large filters
])
@pytest.mark.parametrize("bias, relu", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("every_site", [True, False])
@pytest.mark.parametrize("tiles, dtype", [(True, torch.bfloat16), (False, torch.bfloat16),
                                          (False, torch.float32), (True, torch.float32)],
                         ids=["amx", "avx512_bf16", "float32", "float32_on_amx_cpu"])
def test_fused_kernel_matches_the_dense_reference(kernel, restore_fused, monkeypatch, grid,
                                                  num_levels, step, stride, dilation,
                                                  block_rows, c_in, c_out, bias, relu,
                                                  every_site, tiles, dtype):
    """The kernel's bfloat16 GEMM on AMX tiles (``tiles``; on AMX CPUs) and in AVX512-BF16
    registers (on AMX CPUs too), and its float32 GEMM (AVX-512 FMAs; on AMX CPUs with the
    tiles on, in registers too). Both routes of the lattice engine through it: every output site
    (``every_site``, :func:`fused.sites_conv`), or only the rest off the lattice
    (:func:`fused.gather_gemm`, the lattice sites on a dense conv). With a bias (a folded batch
    norm's) and a ReLU too: ``relu(conv + bias)`` of the float64 reference within the route's
    bound (the ReLU moves no value further from it)."""
    if tiles and not fused.tiles():
        pytest.skip("the kernel's AMX tiles: this CPU has none, or Linux refused their state")
    monkeypatch.setattr(gemm, "CPU_AMX", tiles)  # the kernel's ISA, passed at each call
    assert fused.tiles() == tiles
    x, levels, w = _layer(grid, num_levels, step, c_out, c_in, dtype,
                          seed=step * 10 + dilation)
    b = (torch.randn(c_out, generator=torch.Generator().manual_seed(step)) if bias
         else None)
    b = None if b is None else b.to(dtype)
    rows, runs, run = [], [], fused._run
    monkeypatch.setattr(fused, "_run",
                        lambda f, index, out_rows, *a: (rows.append(out_rows.numel()),
                                                        runs.append(_runs_of_16(index)),
                                                        run(f, index, out_rows, *a)))
    monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)
    monkeypatch.setattr(lattice, "FUSED_SITES", every_site)
    fused.enable()
    with torch.inference_mode():
        got = CF.conv2d(x, w, b, stride, dilation, 1, "lattice", relu=relu)
    num_out = got.features.shape[0]
    assert sum(rows) > block_rows  # the kernel wrote rows, in more than one block
    assert any(r % 32 for r in rows)  # and a last group of fewer than 32 sites
    assert (sum(rows) == num_out) == every_site  # all rows, or the rest only
    if every_site and stride == 1:  # some tiles read their rows from the features directly
        assert sum(runs) > 0
    got = got.features
    if relu:
        assert bool((got >= 0).all()) and bool((got == 0).any())
        want = R.ref.conv(x.features.double(), levels, step, stride, w.double(),
                          None if b is None else b.double(), dilation)
        size = R.conv_size(x.features, levels, step, stride, w, b, dilation)
        bound = R.conv_bound(size, want, dtype, w[0].numel() + bias,
                             **R.engine_route("lattice", dtype, bias))
        R.assert_within(got, torch.relu(want), bound, "fused kernel, relu")
    else:
        R.assert_conv_within(got, x.features, levels, step, stride, w, b, dilation,
                             engine="lattice", what="fused kernel")


def test_block_rows_grow_where_the_filters_outgrow_l2(restore_fused, monkeypatch):
    """64 sites a block; in bfloat16 on AMX tiles 128 where the filters pass 2 MiB (3x3, 512
    channels) and 128 sites' rows fit in 1.5 MiB (not 3x3 on 1024 channels); ``BLOCK_ROWS``
    overrides."""
    monkeypatch.setattr(gemm, "CPU_AMX", False)  # AVX512-BF16's registers: 64 at every size
    assert [fused.block_rows(c, 9 * c) for c in (256, 512, 1024)] == [64, 64, 64]
    monkeypatch.setattr(gemm, "CPU_AMX", True)
    fused._state["tiles"] = None  # not built, or built with the tiles' state given
    assert fused.block_rows(256, 9 * 256) == 64
    assert fused.block_rows(512, 9 * 512) == 128
    assert fused.block_rows(1024, 9 * 1024) == 64
    assert fused.block_rows(512, 9 * 512, torch.float32) == 64  # float32 runs in registers
    monkeypatch.setattr(fused, "BLOCK_ROWS", 96)
    assert fused.block_rows(512, 9 * 512) == 96


@pytest.mark.parametrize("block_rows", [0, -32, 48])
def test_a_block_that_is_not_a_positive_multiple_of_32_is_refused(kernel, restore_fused,
                                                                   monkeypatch, block_rows):
    x, _, w = _layer()
    monkeypatch.setattr(fused, "BLOCK_ROWS", block_rows)  # -32 once wrote nothing, silently
    fused.enable()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"block \(> 0\) multiples"):
        CF.conv2d(x, w, None, 1, 1, 1, "lattice")


def test_a_cpu_without_bf16_dot_products_is_refused_before_a_build(restore_fused, monkeypatch):
    import torch.utils.cpp_extension as ext

    monkeypatch.setattr(ext, "load_inline", _no_compiler)  # a build would fail differently
    monkeypatch.setattr(gemm, "CPU_AMX", False)
    monkeypatch.setattr(gemm, "CPU_AVX512_BF16", False)
    fused._state.update(mode="off", module=None, why_off=None)
    with pytest.raises(fused.FusedKernelUnavailable,
                       match="AMX tiles .* or AVX512-BF16 .* this CPU has neither"):
        fused.enable()


@pytest.mark.parametrize("c_out, c_in, channels_last", [(32, 32, False), (64, 96, True),
                                                        (96, 6, False)])
def test_packed_filters_are_vnni_blocks_of_16_columns(c_out, c_in, channels_last):
    """Element ``(k, n)`` of ``B = W^T`` (``W`` the tap-major filters) sits at ``[n // 16][k //
    2][n % 16][k % 2]`` of the packed filters viewed as ``[C_out / 16, K / 2, 16, 2]``: built
    here element by element from that formula."""
    gen = torch.Generator().manual_seed(c_out + c_in)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen).to(torch.bfloat16)
    if channels_last:  # the KRSC filters are then a view
        w = w.contiguous(memory_format=torch.channels_last)
    k = 9 * c_in
    tap_major = w.permute(0, 2, 3, 1).reshape(c_out, k)
    block, pair, col, half = torch.meshgrid(torch.arange(c_out // 16), torch.arange(k // 2),
                                            torch.arange(16), torch.arange(2), indexing="ij")
    want = tap_major[block * 16 + col, pair * 2 + half]
    got = fused.packed_filters(w)
    assert got.shape == (c_out // 16, k, 16)
    assert torch.equal(got.view(c_out // 16, k // 2, 16, 2), want)


@pytest.mark.parametrize("c_out, c_in, channels_last", [(32, 32, False), (64, 96, True)])
def test_float32_packed_filters_are_blocks_of_16_columns(c_out, c_in, channels_last):
    """In float32 (no pairs): element ``(k, n)`` of ``B = W^T`` at ``[n // 16][k][n % 16]``."""
    gen = torch.Generator().manual_seed(c_out + c_in)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen)
    if channels_last:
        w = w.contiguous(memory_format=torch.channels_last)
    k = 9 * c_in
    tap_major = w.permute(0, 2, 3, 1).reshape(c_out, k)
    block, row, col = torch.meshgrid(torch.arange(c_out // 16), torch.arange(k),
                                     torch.arange(16), indexing="ij")
    got = fused.packed_filters(w)
    assert got.dtype == torch.float32 and got.shape == (c_out // 16, k, 16)
    assert torch.equal(got, tap_major[block * 16 + col, row])


@pytest.mark.parametrize("on", [True, False])
def test_prepare_without_a_forward_builds_what_the_kernel_reads(restore_fused, on):
    """``prepare(book, "lattice")`` with no rulebook of a forward to follow: where the kernel is
    on, the gather table it reads (every layer of the ResNets has 32s of channels), no split;
    where it is off, the split of the engine's own route, no gather table."""
    from cad_spconv.engines import prepare
    from cad_spconv.rulebook import conv_rulebook

    fused._state["mode"] = "on" if on else "off"
    x, _, _ = _layer((17, 22), num_levels=2, seed=3)
    book = conv_rulebook(x.plan, (3, 3), (1, 1), 1, 1)
    assert prepare(book, "lattice") == "lattice"
    assert book.has_derived("gather") == on
    assert bool(book.lattice_args()) != on
