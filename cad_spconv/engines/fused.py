"""The lattice engine's off-lattice gather + GEMM + scatter as one C++ kernel, for bfloat16 on
CPUs with AMX.

On by default where the CPU has AMX (:data:`AUTO`): the first bfloat16 layer it applies to
compiles it with ``torch.utils.cpp_extension`` (a C++ compiler with OpenMP and PyTorch's
headers; about 40 s on 2 cores, logged, then kept in torch's extension cache). Where it does not
build, one warning, and the engine keeps its own route. ``CAD_SPCONV_FUSED_GATHER=0`` (or
:func:`enable` ``(False)``) turns it off; ``=1`` (or :func:`enable`) asks for it, and then a
kernel that cannot run is an error (:class:`FusedKernelUnavailable`). Once built, the lattice
engine runs the off-lattice rows of a layer through
it where it applies (:func:`applies`: bfloat16 on CPU, no autograd, no groups, no bias, ``C_in``
even, ``C_out`` a multiple of 64). Per block of 96 sites it copies their ``9 x C_in`` input rows
into a per-thread buffer that stays in cache, multiplies them with the filters through PyTorch's
``at::native::cpublas::brgemm`` (oneDNN's AMX micro-kernel; one call per tap and 64 filter
columns, :func:`packed_filters`) into a float32 accumulator, and writes the rows, rounded once,
straight to their output rows: no 8 MiB im2col chunk in memory and no separate scatter. Same
rounding as the engine's ``torch.mm`` route (one float32 sum per output, rounded once).

Measured on an Intel AMX Xeon, 2 threads (BENCHMARKS.md, 2026-12-06 05:41): the
DeepLabV3-ResNet101 backbone in 0.929-0.952 of the engine's time at edges 0.15, 0.35 and 0.95
(``python -m experiments.fused_gather_gemm --backbone``).
"""
from __future__ import annotations

import glob
import logging
import os
import warnings
import weakref

import torch

from . import gemm
from .layouts import krsc_filters, tracks_grad

__all__ = ["FusedKernelUnavailable", "AUTO", "enable", "enabled", "describe", "applies",
           "packed_filters", "gather_gemm"]

#: the environment variable that sets the kernel's mode for a process (``1`` on, ``0`` off)
ENV = "CAD_SPCONV_FUSED_GATHER"
_NAME = "cad_spconv_fused_gather_gemm"
BLOCK_ROWS = 96  # sites per block: their im2col rows (9 x 512 channels: 885 KB) stay in L2
_FILTER_BLOCK = 64  # filter columns per packed block (oneDNN packs at most 64)


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel was asked for (:func:`enable`, ``CAD_SPCONV_FUSED_GATHER=1``) and cannot
    run here: it does not build, or the CPU has no packed bfloat16 micro-kernel (AMX)."""


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>
using at::BFloat16;
constexpr int64_t NB = 64;  // filter columns per packed block (oneDNN's packing takes <= 64)

bool could_pack() { return at::native::cpublas::could_pack(at::kBFloat16); }

// w [N, K] -> [N / NB, K, NB]: B = w^T in 64-column blocks, each in oneDNN's VNNI layout
// (the tests' reference for packed_filters, which packs the same way without oneDNN)
torch::Tensor pack_filters(torch::Tensor w) {
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.dim() == 2 && w.size(0) % NB == 0
              && w.size(1) % 2 == 0, "pack_filters: bfloat16 [N, K], N % 64 == 0, K even");
  auto b = w.t().contiguous();
  const int64_t K = b.size(0), N = b.size(1);
  auto out = torch::empty({N / NB, K, NB}, b.options());
  for (int64_t j = 0; j < N / NB; ++j)
    at::native::cpublas::pack(K, NB, N, NB, at::kBFloat16, at::kBFloat16,
                              b.data_ptr<BFloat16>() + j * NB, out.data_ptr<BFloat16>() + j * K * NB);
  return out;
}

// out[rows[i]] = concat_t(features[index[i, t]] or 0 where index < 0) @ w^T, in blocks of mb
void gather_gemm(torch::Tensor features, torch::Tensor index, torch::Tensor packed,
                 torch::Tensor out, torch::Tensor rows, int64_t mb) {
  TORCH_CHECK(features.is_contiguous() && index.is_contiguous() && out.is_contiguous()
              && rows.is_contiguous() && features.scalar_type() == at::kBFloat16
              && out.scalar_type() == at::kBFloat16, "gather_gemm: contiguous bfloat16");
  const int64_t m = index.size(0), T = index.size(1), C = features.size(1), K = T * C;
  const int64_t N = out.size(1);
  TORCH_CHECK(packed.size(0) * NB == N && packed.size(1) == K && C % 2 == 0,
              "gather_gemm: filter shape");
  const BFloat16* F = features.data_ptr<BFloat16>();
  const int64_t* I = index.data_ptr<int64_t>();
  const BFloat16* B = packed.data_ptr<BFloat16>();
  BFloat16* O = out.data_ptr<BFloat16>();
  const int64_t* R = rows.data_ptr<int64_t>();
  at::parallel_for(0, (m + mb - 1) / mb, 1, [&](int64_t b0, int64_t b1) {
    std::vector<BFloat16> A(mb * K);
    std::vector<float> acc(mb * NB);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s = blk * mb, n = std::min(mb, m - s);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t t = 0; t < T; ++t) {
          const int64_t src = I[(s + i) * T + t];
          BFloat16* dst = A.data() + i * K + t * C;
          if (src < 0) std::memset(dst, 0, C * sizeof(BFloat16));
          else std::memcpy(dst, F + src * C, C * sizeof(BFloat16));
        }
      for (int64_t j = 0; j < N / NB; ++j) {
        // one call per tap (K = C, summed in the float32 accumulator): the tap's filter block
        // stays in L1; one call over all 9 C was 10 % slower at 512 channels
        for (int64_t t = 0; t < T; ++t)
          at::native::cpublas::brgemm(n, NB, C, K, NB, NB, t > 0, A.data() + t * C,
                                      B + (j * K + t * C) * NB, acc.data(), true);
        for (int64_t i = 0; i < n; ++i) {
          BFloat16* o = O + R[s + i] * N + j * NB;
          const float* a = acc.data() + i * NB;
          for (int64_t c = 0; c < NB; ++c) o[c] = BFloat16(a[c]);
        }
      }
    }
    at::native::cpublas::brgemm_release();
  });
}
"""


def _env_mode() -> str:
    """``CAD_SPCONV_FUSED_GATHER``: ``1`` on, ``0`` off, unset :data:`AUTO`; anything else is
    refused (a typo must not change the route silently)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (the fused kernel on), 0 (off), or leave it "
                         "unset (on where the CPU has AMX and the kernel builds)")
    return {"": AUTO, "0": "off", "1": "on"}[value]


#: the default mode: on where the CPU has AMX, built on first use; where the build fails, one
#: warning and off (asked for with ``1`` / :func:`enable`, it raises instead)
AUTO = "auto"
_state = {"mode": _env_mode(), "module": None, "why_off": None}
_indices: dict = {}  # id(split) -> (weakref to split, its kernel index), dropped with the split
_log = logging.getLogger("cad_spconv")


def _module():
    if _state["module"] is None:
        leave_off = (f"leave it off (cad_spconv.engines.fused.enable(False), {ENV}=0): the "
                     "lattice engine runs without it")
        try:
            from torch.utils.cpp_extension import load_inline
            if not _built():
                _log.warning("cad_spconv: building the fused gather + GEMM kernel for this AMX "
                             "CPU (about 40 s on 2 cores, once: kept in torch's extension "
                             "cache; %s=0 skips it)", ENV)
            module = load_inline(_NAME, _SOURCE,
                                 functions=["could_pack", "pack_filters", "gather_gemm"],
                                 extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no headers, a build error: one clear message
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise FusedKernelUnavailable(
                f"the fused gather + GEMM kernel could not be built ({type(e).__name__}: "
                f"{first}); it needs a C++ compiler with OpenMP and PyTorch's headers; install "
                f"them, or {leave_off}") from None
        if not module.could_pack():
            raise FusedKernelUnavailable(
                "the fused gather + GEMM kernel needs a CPU whose oneDNN packs bfloat16 filters "
                f"(AMX: Intel Xeon 4th generation or later); this one does not; {leave_off}")
        _state["module"] = module
    return _state["module"]


def _built() -> bool:
    """Whether torch's extension cache holds a build of the kernel (then loading it takes a
    second; it is rebuilt where the source changed)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return bool(glob.glob(os.path.join(_get_build_directory(_NAME, False), _NAME + ".*")))
    except Exception:  # a private helper: if it moves, say that a build may come
        return False


def enable(on: bool = True) -> None:
    """Turn the kernel on (building it now: :class:`FusedKernelUnavailable` if it cannot run
    here, and the mode stays as it was) or off, for this process."""
    if on:
        _module()
    _state.update(mode="on" if on else "off", why_off=None)


def enabled() -> bool:
    """Whether the lattice engine sends the layers the kernel applies to through it: asked
    for, or by default (:data:`AUTO`) on a CPU with AMX where it has not failed to build."""
    mode = _state["mode"]
    return mode == "on" or (mode == AUTO and _amx_code())


def _amx_code() -> bool:
    """Whether the CPU has AMX and PyTorch runs its AVX-512 code (not an ISA-limited run,
    ``ATEN_CPU_CAPABILITY=avx2``)."""
    return gemm.CPU_AMX and gemm.CPU_AVX512


def describe() -> str:
    """The kernel's state, as benchmark reports record it: ``on``, ``off``, or ``auto: ...``."""
    mode = _state["mode"]
    if mode != AUTO:
        return mode if _state["why_off"] is None else f"off ({_state['why_off']})"
    if not _amx_code():
        return "auto: off (no AMX, or AVX2 code only)"
    return "auto: on (AMX)"


def applies(features, weight, bias, groups: int) -> bool:
    """Whether the off-lattice rows of this layer go through the kernel (building it on first
    use by default on AMX: where that fails, one warning, and it stays off)."""
    if not (enabled() and features.device.type == "cpu"
            and features.dtype == weight.dtype == torch.bfloat16 and bias is None
            and groups == 1 and weight.shape[0] % _FILTER_BLOCK == 0
            and weight.shape[1] % 2 == 0 and not tracks_grad(features, weight, bias)):
        return False
    if _state["mode"] == AUTO and _state["module"] is None:
        try:
            _module()
        except FusedKernelUnavailable as e:  # not asked for: the engine's own route, said once
            _state.update(mode="off", why_off=str(e).split(";")[0])
            warnings.warn(f"{e} (it is on by default on AMX CPUs; {ENV}=0 turns it off "
                          "without this warning)", RuntimeWarning, stacklevel=2)
            return False
    return True


def _kernel_index(split) -> torch.Tensor:
    """``split.rest_index`` with the border sites' out-of-grid taps as -1 (the kernel's zero),
    built once per split."""
    entry = _indices.get(id(split))
    if entry is None or entry[0]() is not split:
        index = split.rest_index.clone()
        index[split.num_inside:].view(-1)[split.border_zeros] = -1
        entry = _indices[id(split)] = (weakref.ref(split), index)
        weakref.finalize(split, _indices.pop, id(split), None)
    return entry[1]


def packed_filters(weight: torch.Tensor) -> torch.Tensor:
    """The kernel's filters ``[C_out / 64, K, 64]``: ``B = W^T`` (``W`` the tap-major filters
    ``[C_out, K]``) in blocks of 64 columns, each in oneDNN's VNNI layout for bfloat16, where
    the two elements of a 32-bit word are rows ``k, k + 1`` of one column. Those are adjacent
    in a row of ``W``, so the packing is a transpose of ``W`` read as 32-bit words: 0.15 ms at
    256 channels and 0.73 at 512 on the AMX Xeon (2 threads), against 1.0 and 4.5 ms for
    ``cpublas::pack``, whose result it equals (``tests/cad_spconv/test_fused.py``), and nothing
    kept between calls."""
    n = weight.shape[0]
    words = krsc_filters(weight, cache=True).reshape(n, -1).view(torch.int32)
    return (words.view(n // _FILTER_BLOCK, _FILTER_BLOCK, -1).transpose(1, 2).contiguous()
            .view(torch.bfloat16).view(n // _FILTER_BLOCK, -1, _FILTER_BLOCK))


def gather_gemm(features, weight, split, out: torch.Tensor) -> None:
    """Write the off-lattice rows of ``split`` into ``out`` (where :func:`applies`)."""
    _module().gather_gemm(features.contiguous(), _kernel_index(split), packed_filters(weight),
                          out, split.rest_rows.contiguous(), BLOCK_ROWS)
