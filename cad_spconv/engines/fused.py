"""The lattice engine's gather + GEMM + scatter as one C++ kernel, for bfloat16 and float32 on
CPUs with AMX or AVX512-BF16.

On by default where the CPU computes bfloat16 dot products natively (:data:`AUTO`): on AMX
tiles (Intel Xeon 4th generation and later) or, without tiles, with AVX512-BF16's dot product
in zmm registers (AMD EPYC Zen 4 and later). The first layer it applies to compiles it
with ``torch.utils.cpp_extension`` (a C++ compiler with OpenMP and AMX and AVX512-BF16
intrinsics, GCC 11 or Clang 12 and later, and PyTorch's headers; about 40 s on 2 cores, logged,
then kept in torch's extension cache). Where it does not build, one warning, and the engine
keeps its own route; where Linux refuses the process AMX tile state, one warning, and the
registers' GEMM. ``CAD_SPCONV_FUSED_GATHER=0`` (or :func:`enable` ``(False)``) turns it off;
``=1`` (or :func:`enable`) asks for it, and then a kernel that cannot run is an error
(:class:`FusedKernelUnavailable`). Once built, the lattice engine runs every site of a layer on
mixed levels through it (:func:`sites_conv`; with ``lattice.FUSED_SITES`` off, only the
off-lattice rows, :func:`gather_gemm`) where it applies (:func:`applies`: bfloat16 or float32
on CPU, no autograd, no groups, a bias of the same type or none, ``C_in`` and ``C_out``
multiples of 32); it adds the bias and applies a ReLU (the conv's epilogue) before rounding.

Per block of 64 sites (128 for filters beyond L2, :func:`block_rows`) it copies their ``9 x C_in``
input rows (but where 16 sites read 16 consecutive rows at a tap, a run in a row of one level: those
the tiles read in place) into a per-thread buffer that stays in cache, laid out as AMX tiles read it
(per 32 sites and 32 values, one block: 2 KB in bfloat16), multiplies them with the filters
(:func:`packed_filters`) on AMX tiles of its own, 32 sites x 32 filter columns at a time with all
``9 C_in`` products summed in float32 inside the tiles (without AMX: in zmm registers, 8 sites x 32
filter columns per pass, with AVX512-BF16's dot product of pairs of values), and writes the sums, in
bfloat16 rounded once, straight to their output rows: no 8 MiB im2col chunk in memory, no separate
scatter, and no per-tap call into a library micro-kernel. Same rounding as the engine's ``torch.mm``
route (one float32 sum per output, rounded once to nearest even; sums below ``2^-126`` flush to
zero, as the bfloat16 dot products of AMX and AVX512-BF16 flush them).

In float32 the same kernel (same blocks, gather and writes) computes its GEMM with AVX-512 fused
multiply-adds in zmm registers, 8 sites x 32 filter columns per pass, each input value broadcast
against 16 filter values (filters packed 16 columns wide, without pairs); the ``9 C_in`` products of
each output summed in float32 in tap order. It runs wherever the kernel does (a CPU with
AVX512-BF16, AMX Xeons included, where it is not yet measured; a CPU with AVX-512 but not BF16 could
run this form but is not offered it). On an AMD EPYC Zen 4 (2 threads, 2026-12-07 23:10): 3x3 convs
of 256 and 512 channels on a 64 x 64 grid at 0.96-0.99 of oneDNN's dense float32 conv rate (215-219
against 223-225 GFLOP/s), the layer3 and layer4 convs' off-lattice rows in 0.84-0.99 of the engine's
split route, the backbone at edge 0.35 in 0.955 of the engine's time; against the compiled dense
stride-8 network float32 edge 0.35 went from 0.901 to 0.852 of its time (eff 0.87 -> 0.92;
BENCHMARKS.md, 2026-12-07 23:03).

Measured on an Intel AMX Xeon, 2 threads (BENCHMARKS.md, 2026-12-06 08:31): the
DeepLabV3-ResNet101 backbone at edge 0.35 in 0.895 of the engine's time, 0.924 of the time of
this kernel's previous form (one oneDNN ``brgemm`` call per tap); per off-lattice site about
1.0-1.3x the dense conv's time per cell (``python -m experiments.fused_gather_gemm --backbone``).
Since 2026-12-07 its gather stores whole aligned cache lines, block by block (0.65x the
kernel's time at 256 channels, 0.82x at 512), and every site of a layer goes through it.
On an AMD EPYC Zen 4 (AVX512-BF16, no AMX; 2 threads, 2026-12-07 20:30): 3x3 convs of 256
and 512 channels on a 64 x 64 grid at 0.95-1.0 of oneDNN's dense conv rate in two runs (450
against 460 GFLOP/s, then 388-402 against 410-403; ``--grid``), the backbone at edge 0.35 in
0.950 of the engine's time (eager; per frame 0.952).
"""
from __future__ import annotations

import glob
import logging
import os
import warnings
import weakref
from typing import Optional

import torch

from . import gemm
from .layouts import krsc_filters, tracks_grad

__all__ = ["FusedKernelUnavailable", "AUTO", "enable", "enabled", "tiles", "describe",
           "applies", "packed_filters", "block_rows", "gather_gemm", "sites_conv"]

#: the environment variable that sets the kernel's mode for a process (``1`` on, ``0`` off)
ENV = "CAD_SPCONV_FUSED_GATHER"
_NAME = "cad_spconv_fused_gather_gemm"
#: sites per block, a multiple of 32, for every layer; ``None`` (default): per layer,
#: :func:`block_rows`
BLOCK_ROWS: Optional[int] = None
_TILE = 32  # values per tile row (bfloat16), sites and filter columns per tile pair
_FILTER_BLOCK = 16  # filter columns per packed block: one tile's width in float32 sums


class FusedKernelUnavailable(RuntimeError):
    """The fused kernel was asked for (:func:`enable`, ``CAD_SPCONV_FUSED_GATHER=1``) and cannot
    run here: it does not build, or the CPU has neither AMX tiles nor AVX512-BF16. (Where
    Linux does not let the process use the AMX tiles it has, the kernel runs in AVX512-BF16
    registers; float32 always runs in registers.)"""


_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cstring>
#include <vector>
using at::BFloat16;

// Linux gives a process AMX tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM,
// XFEATURE_XTILEDATA); oneDNN asks as well, and asking twice is harmless.
bool amx_ready() { return syscall(SYS_arch_prctl, 0x1023, 18) == 0; }

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Every tile 16 rows x 64 bytes. 0-3: float32 sums of 32 sites x 32 filter columns (2 x 2
// tiles of 16 x 16); 4, 5: 16 sites x 32 values each; 6, 7: 32 values x 16 columns each.
__attribute__((target("amx-tile"))) static void configure_tiles() {
  TileConfig cfg{};
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
  // GCC's _tile_loadconfig tells the compiler it reads 8 bytes; without this barrier the
  // stores above are dropped as dead and ldtilecfg faults on a half-written configuration
  asm volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) static void release_tiles() { _tile_release(); }

// Where the tile of 16 sites (half a group) reads a tap's values (plan_pieces): base, then
// + step bytes per 32 values, rows stride bytes apart; direct: from the features, not from A.
struct Piece { const char* base; int64_t step, stride; bool direct; };

// sums [32 x 32] = the im2col rows of a group of 32 sites (two tiles of 16, read through
// their pieces, T taps of 32 * steps values) @ the filters' two 16-column blocks b0, b1
// ([K / 2][16][2], VNNI). All K summed in the tiles, then stored once.

__attribute__((target("amx-tile,amx-bf16")))
static void tile_gemm(const Piece* pieces, int64_t T, int64_t steps, const BFloat16* b0,
                      const BFloat16* b1, float* sums) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int64_t t = 0; t < T; ++t) {
    const Piece p0 = pieces[t], p1 = pieces[T + t];
    for (int64_t c = 0; c < steps; ++c) {
      const int64_t k = (t * steps + c) * 32;
      _tile_loadd(4, p0.base + c * p0.step, p0.stride);
      _tile_loadd(6, b0 + k * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b1 + k * 16, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, p1.base + c * p1.step, p1.stride);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, sums, 128); _tile_stored(1, sums + 16, 128);
  _tile_stored(2, sums + 512, 128); _tile_stored(3, sums + 528, 128);
}

// tile_gemm's sums on AVX512-BF16 instead of AMX tiles (AMD Zen 4 and other CPUs with the
// bfloat16 dot product in zmm registers but no tiles): per 8 sites of the group (registers:
// 8 x 2 float32 sums of 16 filter columns, two filter vectors), every K pair at once: one
// filter vector pair of rows k, k + 1 (the VNNI blocks' row of 16 words) against each site's
// word of the same two values, broadcast. Same rounding as the tiles' (one float32 sum per
// output; VDPBF16PS flushes denormal inputs and sums, as AMX's dot products).
__attribute__((target("avx512f,avx512bf16")))
static void zmm_gemm(const Piece* pieces, int64_t T, int64_t steps, const BFloat16* b0,
                     const BFloat16* b1, float* sums) {
  for (int64_t q = 0; q < 4; ++q) {  // 8 sites: half q / 2, its sites from 8 (q % 2)
    __m512 acc[8][2];
    for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const Piece p = pieces[(q / 2) * T + t];
      const int64_t ld = p.stride / 2;  // values between two sites' rows
      for (int64_t c = 0; c < steps; ++c) {
        const BFloat16* a =
            reinterpret_cast<const BFloat16*>(p.base + c * p.step) + (q % 2) * 8 * ld;
        const BFloat16* w0 = b0 + (t * steps + c) * 32 * 16;
        const BFloat16* w1 = b1 + (t * steps + c) * 32 * 16;
#pragma GCC unroll 4
        for (int64_t k = 0; k < 16; ++k) {  // pairs of values k2, k2 + 1
          const __m512bh f0 = (__m512bh)_mm512_loadu_si512(w0 + k * 32);
          const __m512bh f1 = (__m512bh)_mm512_loadu_si512(w1 + k * 32);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) {
            int32_t word;
            std::memcpy(&word, a + i * ld + 2 * k, 4);
            const __m512bh x = (__m512bh)_mm512_set1_epi32(word);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], x, f0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], x, f1);
          }
        }
      }
    }
    float* s = sums + q * 8 * 32;
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(s + i * 32, acc[i][0]);
      _mm512_storeu_ps(s + i * 32 + 16, acc[i][1]);
    }
  }
}

// The float32 form: the same 32 sites x 32 filter columns, per 8 sites 8 x 2 sums of 16
// columns, each input value broadcast against a row of 16 filters (the blocks b0, b1 are
// [K][16]) in one fused multiply-add: one rounding per product and sum, the K products summed
// in order (tap, channel).
__attribute__((target("avx512f")))
static void zmm_gemm_f32(const Piece* pieces, int64_t T, int64_t steps, const float* b0,
                         const float* b1, float* sums) {
  for (int64_t q = 0; q < 4; ++q) {  // as zmm_gemm
    __m512 acc[8][2];
    for (int i = 0; i < 8; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; ++t) {
      const Piece p = pieces[(q / 2) * T + t];
      const int64_t ld = p.stride / 4;
      for (int64_t c = 0; c < steps; ++c) {
        const float* a = reinterpret_cast<const float*>(p.base + c * p.step) + (q % 2) * 8 * ld;
        const float* w0 = b0 + (t * steps + c) * 32 * 16;
        const float* w1 = b1 + (t * steps + c) * 32 * 16;
#pragma GCC unroll 4
        for (int64_t k = 0; k < 32; ++k) {
          const __m512 f0 = _mm512_loadu_ps(w0 + k * 16), f1 = _mm512_loadu_ps(w1 + k * 16);
#pragma GCC unroll 8
          for (int i = 0; i < 8; ++i) {
            const __m512 x = _mm512_set1_ps(a[i * ld + k]);
            acc[i][0] = _mm512_fmadd_ps(x, f0, acc[i][0]);
            acc[i][1] = _mm512_fmadd_ps(x, f1, acc[i][1]);
          }
        }
      }
    }
    float* s = sums + q * 8 * 32;
    for (int i = 0; i < 8; ++i) {
      _mm512_storeu_ps(s + i * 32, acc[i][0]);
      _mm512_storeu_ps(s + i * 32 + 16, acc[i][1]);
    }
  }
}

// out[rows[i], :32] = sums[i] (+ bias, then max(0, .) with relu), in bfloat16 rounded to
// nearest even (as c10 rounds; sums below 2^-126 flush to zero, as AMX's dot products flush
// them) or in float32; bias: 32 float32 values or null. max_ps(0, x) returns x where x is NaN
// (the second operand), as torch.relu keeps NaN.
__attribute__((target("avx512f,avx512bf16")))
static void store_row(BFloat16* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

__attribute__((target("avx512f")))
static void store_row(float* dst, __m512 lo, __m512 hi) {
  _mm512_storeu_ps(dst, lo);
  _mm512_storeu_ps(dst + 16, hi);
}

template <typename E>  // bfloat16's store_row inlined: the kernel runs on AVX512-BF16 CPUs only
__attribute__((target("avx512f,avx512bf16")))
static void write_rows(const float* sums, int64_t n, E* out, const int64_t* rows, int64_t ld,
                       const float* bias, bool relu) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512 b0 = bias ? _mm512_loadu_ps(bias) : zero;
  const __m512 b1 = bias ? _mm512_loadu_ps(bias + 16) : zero;
  for (int64_t i = 0; i < n; ++i) {
    __m512 lo = _mm512_loadu_ps(sums + i * 32), hi = _mm512_loadu_ps(sums + i * 32 + 16);
    if (bias) { lo = _mm512_add_ps(lo, b0); hi = _mm512_add_ps(hi, b1); }
    if (relu) { lo = _mm512_max_ps(zero, lo); hi = _mm512_max_ps(zero, hi); }
    store_row(out + rows[i] * ld, lo, hi);
  }
}

// The pieces of a block of n sites (index I [n, T], -1 for a zero tap): per group of 32
// sites, half (16 sites) and tap, where its tile reads. A full half whose sites read 16
// consecutive input rows at the tap (a run of sites in a row of one level) reads them from the
// features; the others from A (the block's im2col rows, 64-byte aligned, per group of 32 sites
// and step of 32 values one block of 1024 values, site-major). Measured on the edge masks'
// layer3 and layer4 convs in bfloat16: 32-74 % of the pieces are runs, and reading them
// directly took the kernel 0.94x its time at 256 channels, 0.97x at 512.
template <typename E>
static void plan_pieces(const E* F, const int64_t* I, int64_t n, int64_t T, int64_t C,
                        int64_t K, E* A, Piece* pieces) {
  const int64_t steps = C / 32, size = sizeof(E);
  for (int64_t h = 0; h < (n + 31) / 32 * 2; ++h)  // both halves of every group the GEMM reads
    for (int64_t t = 0; t < T; ++t) {
      // a half past the block's last site reads no index (past the last block's: none)
      const int64_t first = h * 16, r0 = first + 16 <= n ? I[first * T + t] : -1;
      bool direct = r0 >= 0;
      for (int64_t i = 1; direct && i < 16; ++i) direct = I[(first + i) * T + t] == r0 + i;
      const E* from = direct ? F + r0 * C
                             : A + (h / 2) * 32 * K + t * steps * 1024 + (h % 2) * 512;
      pieces[(h / 2) * 2 * T + (h % 2) * T + t] =
          direct ? Piece{reinterpret_cast<const char*>(from), 32 * size, C * size, true}
                 : Piece{reinterpret_cast<const char*>(from), 1024 * size, 32 * size, false};
    }
}

// A <- the rows of the features F that the pieces not read directly need. Filled per tap,
// site after site, each 64-byte piece of the source row to its own block: every store then
// fills a whole aligned cache line, and each block fills in order (the former fill, site by
// site with memcpy into an unaligned buffer, took the kernel 1/0.65 of this time at 256
// channels, 1/0.82 at 512, in bfloat16).
template <typename E>
__attribute__((target("avx512f")))
static void gather_block(const E* F, const int64_t* I, int64_t n, int64_t T, int64_t C,
                         int64_t K, E* A, const Piece* pieces) {
  const int64_t steps = C / 32, lanes = 64 / sizeof(E);  // values per 64-byte vector
  for (int64_t g = 0; g * 32 < n; ++g) {
    E* group = A + g * 32 * K;
    for (int64_t t = 0; t < T; ++t) {
      E* tap = group + t * steps * 1024;
      for (int64_t i = 0; i < 32 && g * 32 + i < n; ++i) {
        if (pieces[g * 2 * T + (i / 16) * T + t].direct) continue;
        const int64_t src = I[(g * 32 + i) * T + t];
        E* dst = tap + i * 32;
        for (int64_t c = 0; c < steps; ++c)
          for (int64_t v = 0; v < 32; v += lanes)
            _mm512_store_si512(dst + c * 1024 + v, src < 0 ? _mm512_setzero_si512()
                                                           : _mm512_loadu_si512(F + src * C
                                                                                + c * 32 + v));
      }
    }
  }
}

template <typename T> static T* aligned64(std::vector<T>& v) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(v.data()) + 63) & ~uintptr_t(63));
}

// out[rows[i]] = concat_t(F[I[i, t]], or 0 where I < 0) @ W^T (+ bias, relu) through the GEMM
// gemm (of 32 sites x 32 columns), mb sites a block, each thread a run of blocks
template <typename E, typename Gemm>
static void run_blocks(const E* F, const int64_t* I, const E* P, E* O, const int64_t* R,
                       int64_t m, int64_t T, int64_t C, int64_t N, int64_t mb, const float* B,
                       bool relu, bool amx, Gemm gemm) {
  const int64_t K = T * C;
  at::parallel_for(0, (m + mb - 1) / mb, 1, [&](int64_t b0, int64_t b1) {
    // PyTorch's oneDNN micro-kernel wrapper remembers the tile configuration it set last in
    // this thread; forget it, so that it configures afresh after this kernel's own
    if (amx) {
      at::native::cpublas::brgemm_release();
      configure_tiles();
    }
    std::vector<E> a_store(mb * K + 64 / sizeof(E));  // + 64 bytes to align the start
    std::vector<float> sums_store(mb * 32 + 16);
    E* A = aligned64(a_store);
    float* sums = aligned64(sums_store);
    std::vector<Piece> pieces(mb / 16 * T);
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t s = blk * mb, n = std::min(mb, m - s);
      plan_pieces(F, I + s * T, n, T, C, K, A, pieces.data());
      gather_block(F, I + s * T, n, T, C, K, A, pieces.data());
      // a last group of fewer than 32 sites computes stale rows too; they are not written
      for (int64_t j = 0; j < N / 32; ++j) {
        for (int64_t g = 0; g * 32 < n; ++g)
          gemm(pieces.data() + g * 2 * T, T, C / 32, P + j * 32 * K, P + j * 32 * K + 16 * K,
               sums + g * 1024);
        write_rows(sums, n, O + j * 32, R + s, N, B ? B + j * 32 : nullptr, relu);
      }
    }
    if (amx) release_tiles();
  });
}

// out[rows[i]] = concat_t(features[index[i, t]], or 0 where index < 0) @ W^T (+ bias, relu),
// mb sites a block; bias: float32 [C_out], or empty for none. bfloat16 on AMX tiles (amx,
// tile_gemm) or in zmm registers (zmm_gemm, AVX512-BF16); float32 in zmm registers
// (zmm_gemm_f32, AVX-512)
void gather_gemm(torch::Tensor features, torch::Tensor index, torch::Tensor packed,
                 torch::Tensor out, torch::Tensor rows, int64_t mb, torch::Tensor bias,
                 bool relu, bool amx) {
  const auto type = features.scalar_type();
  TORCH_CHECK(features.is_contiguous() && index.is_contiguous() && out.is_contiguous()
              && rows.is_contiguous() && packed.is_contiguous()
              && (type == at::kBFloat16 || type == at::kFloat) && out.scalar_type() == type
              && packed.scalar_type() == type && !(amx && type == at::kFloat),
              "gather_gemm: contiguous features, filters and out of one type, bfloat16 or "
              "float32 (AMX tiles for bfloat16 only)");
  const int64_t m = index.size(0), T = index.size(1), C = features.size(1), K = T * C;
  const int64_t N = out.size(1);
  TORCH_CHECK(C % 32 == 0 && N % 32 == 0 && mb > 0 && mb % 32 == 0 && packed.numel() == N * K,
              "gather_gemm: C_in, C_out and the block (> 0) multiples of 32; "
              "filters [C_out, 9 C_in]");
  TORCH_CHECK(bias.numel() == 0 || (bias.scalar_type() == at::kFloat && bias.is_contiguous()
                                    && bias.numel() == N), "gather_gemm: float32 bias [C_out]");
  const float* B = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const int64_t* I = index.data_ptr<int64_t>();
  const int64_t* R = rows.data_ptr<int64_t>();
  if (type == at::kFloat) {
    run_blocks(features.data_ptr<float>(), I, packed.data_ptr<float>(), out.data_ptr<float>(),
               R, m, T, C, N, mb, B, relu, false, zmm_gemm_f32);
  } else {
    run_blocks(features.data_ptr<BFloat16>(), I, packed.data_ptr<BFloat16>(),
               out.data_ptr<BFloat16>(), R, m, T, C, N, mb, B, relu, amx,
               amx ? tile_gemm : zmm_gemm);
  }
}
"""


def _env_mode() -> str:
    """``CAD_SPCONV_FUSED_GATHER``: ``1`` on, ``0`` off, unset :data:`AUTO`; anything else is
    refused (a typo must not change the route silently)."""
    value = os.environ.get(ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{ENV}={value!r}: use 1 (the fused kernel on), 0 (off), or leave it "
                         "unset (on where the CPU has AMX or AVX512-BF16 and the kernel builds)")
    return {"": AUTO, "0": "off", "1": "on"}[value]


#: the default mode: on where the CPU has AMX or AVX512-BF16, built on first use; where the
#: build fails, one warning and off (asked for with ``1`` / :func:`enable`, it raises instead)
AUTO = "auto"
#: tiles: whether the built kernel runs on AMX tiles (``None`` before the build; ``False`` on
#: an AMX CPU whose tile state Linux refused: the kernel then runs in AVX512-BF16 registers)
_state = {"mode": _env_mode(), "module": None, "why_off": None, "tiles": None}
_indices: dict = {}  # id(split) -> (weakref to split, its kernel index), dropped with the split
_log = logging.getLogger("cad_spconv")


def _module():
    if _state["module"] is None:
        leave_off = (f"leave it off (cad_spconv.engines.fused.enable(False), {ENV}=0): the "
                     "lattice engine runs without it")
        if not gemm.CPU_AVX512_BF16:  # checked first: a build takes a minute, then could not run
            raise FusedKernelUnavailable(
                "the fused gather + GEMM kernel runs on AMX tiles (Intel Xeon 4th generation or "
                "later) or AVX512-BF16 (AMD EPYC Zen 4 or later); this CPU has neither; "
                f"{leave_off}")
        try:
            from torch.utils.cpp_extension import load_inline
            if not _built():
                _log.warning("cad_spconv: building the fused gather + GEMM kernel for this "
                             "CPU's %s (about 40 s on 2 cores, once: kept in torch's extension "
                             "cache; %s=0 skips it)", _isa(), ENV)
            module = load_inline(_NAME, _SOURCE, functions=["amx_ready", "gather_gemm"],
                                 extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
        except Exception as e:  # no compiler, no headers, a build error: one clear message
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise FusedKernelUnavailable(
                f"the fused gather + GEMM kernel could not be built ({type(e).__name__}: "
                f"{first}); it needs a C++ compiler with OpenMP and AMX and AVX512-BF16 "
                f"intrinsics (GCC 11 or Clang 12 and later) and PyTorch's headers; install "
                f"them, or {leave_off}") from None
        granted = gemm.CPU_AMX and bool(module.amx_ready())
        if gemm.CPU_AMX and not granted:  # the registers' GEMM needs no permission
            _log.warning("cad_spconv: Linux did not give this process AMX tile state "
                         "(arch_prctl ARCH_REQ_XCOMP_PERM refused: a kernel before 5.16, a "
                         "seccomp filter, or a too small signal stack); the fused kernel runs "
                         "its GEMM in AVX512-BF16 registers instead")
        _state.update(module=module, tiles=granted)
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
    for, or by default (:data:`AUTO`) on a CPU with AMX or AVX512-BF16 where it has not failed
    to build."""
    mode = _state["mode"]
    return mode == "on" or (mode == AUTO and _bf16_code())


def _bf16_code() -> bool:
    """Whether the CPU has bfloat16 dot products (AVX512-BF16; AMX CPUs have it too) and
    PyTorch runs its AVX-512 code (not an ISA-limited run, ``ATEN_CPU_CAPABILITY=avx2``)."""
    return gemm.CPU_AVX512_BF16 and gemm.CPU_AVX512


def tiles() -> bool:
    """Whether the kernel's GEMM runs on AMX tiles: the CPU has them (``gemm.CPU_AMX``, read
    at call time) and Linux gave the process their state (asked at the build); else in
    AVX512-BF16 registers."""
    return gemm.CPU_AMX and _state["tiles"] is not False


def _isa() -> str:
    """What the kernel's GEMM runs on here: ``AMX`` tiles or ``AVX512-BF16`` registers."""
    return "AMX" if tiles() else "AVX512-BF16"


def describe() -> str:
    """The kernel's state, as benchmark reports record it: ``on (AMX; float32: AVX-512)`` (or
    ``AVX512-BF16``: where its bfloat16 GEMM runs; float32's runs in AVX-512 registers
    everywhere), ``off``, or ``auto: ...``."""
    mode = _state["mode"]
    if mode == "on":
        return f"on ({_isa()}; float32: AVX-512)"
    if mode != AUTO:
        return mode if _state["why_off"] is None else f"off ({_state['why_off']})"
    if not _bf16_code():
        return "auto: off (no AVX512-BF16 or AMX, or AVX2 code only)"
    return f"auto: on ({_isa()}; float32: AVX-512)"


def applies(features, weight, bias, groups: int) -> bool:
    """Whether the off-lattice rows of this layer go through the kernel (building it on first
    use by default: where that fails, one warning, and it stays off): bfloat16 or float32
    features and filters, a bias of their type or none (as ``F.conv2d`` takes it)."""
    if not (enabled() and features.device.type == "cpu"
            and features.dtype == weight.dtype in (torch.bfloat16, torch.float32)
            and (bias is None or bias.dtype == weight.dtype) and groups == 1
            and weight.shape[0] % _TILE == 0 and weight.shape[1] % _TILE == 0
            and not tracks_grad(features, weight, bias)):
        return False
    if _state["mode"] == AUTO and _state["module"] is None:
        try:
            _module()
        except FusedKernelUnavailable as e:  # not asked for: the engine's own route, said once
            _state.update(mode="off", why_off=str(e).split(";")[0])
            warnings.warn(f"{e} (it is on by default on CPUs with AMX or AVX512-BF16; {ENV}=0 "
                          "turns it off without this warning)", RuntimeWarning, stacklevel=2)
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
    """The kernel's filters ``[C_out / 16, K, 16]``: ``B = W^T`` (``W`` the tap-major filters
    ``[C_out, K]``) in blocks of 16 columns (one tile of float32 sums wide), in bfloat16 each in
    the VNNI layout that AMX's bfloat16 dot product reads: the two elements of a 32-bit word
    are rows ``k, k + 1`` of one column. Those are adjacent in a row of ``W``, so the packing is
    a transpose of ``W`` read as 32-bit words (in float32 of ``W`` itself: ``[k][n % 16]``),
    redone per call (a cache would hold a second copy of every filter, against the memory
    target)."""
    n = weight.shape[0]
    rows = krsc_filters(weight, cache=True).reshape(n, -1)
    if weight.dtype == torch.float32:  # one value per element: blocks of W^T as they are
        return rows.view(n // _FILTER_BLOCK, _FILTER_BLOCK, -1).transpose(1, 2).contiguous()
    words = rows.view(torch.int32)
    return (words.view(n // _FILTER_BLOCK, _FILTER_BLOCK, -1).transpose(1, 2).contiguous()
            .view(torch.bfloat16).view(n // _FILTER_BLOCK, -1, _FILTER_BLOCK))


_NO_BIAS = torch.empty(0)
#: the kernel's name in torch's profiler
PROFILER_NAME = "cad_spconv::fused_gather_gemm"


def gather_gemm(features, weight, split, out: torch.Tensor, bias=None,
                relu: bool = False) -> None:
    """Write the off-lattice rows of ``split`` into ``out`` (where :func:`applies`), the
    ``bias`` added to the float32 sums and, with ``relu``, ``max(0, .)`` taken
    before the one rounding (as oneDNN's conv with a bias and a ReLU post-op)."""
    _run(features, _kernel_index(split), split.rest_rows.contiguous(), weight, out, bias, relu)


def sites_conv(features, weight, book, bias=None, relu: bool = False) -> torch.Tensor:
    """The conv of rulebook ``book`` at every output site (where :func:`applies`), read
    through its gather table (an out-of-grid tap, -1 there, is the kernel's zero): no dense
    lattice conv, hence no prepacked copy of the filters kept for it (see
    ``LatticeEngine``), and no copies of the lattice rows in and out. ``bias`` and ``relu``
    as in :func:`gather_gemm`."""
    out = features.new_empty(book.num_out, weight.shape[0])
    rows = torch.arange(book.num_out, device=features.device)
    _run(features, book.gather, rows, weight, out, bias, relu)
    return out


def block_rows(c_out: int, k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Sites per block of a layer with ``k`` products per output (``9 C_in``) and ``c_out``
    filters of ``dtype``: 64, their im2col rows in L2 beside a 32-column slice of the filters;
    in bfloat16 on AMX tiles 128 where the filters outgrow L2 (2 MiB on these Xeons), so that
    each pass over them from L3 serves twice the sites, while the rows stay within 1.5 MiB.
    Measured on the edge masks' rulebooks (2 threads, interleaved): on an AMX Xeon at 512
    channels (4.5 MiB of filters) 128 sites took 0.90-0.93 of 64's time (96: 0.92-0.94, 160:
    about 1.0); at 256 (1.1 MiB) 96 and 128 were within 2 % of 64 (32: 0.94-1.0 of it, not
    tried in the network). On AVX512-BF16 (AMD EPYC Zen 4, 1 MiB of L2) 128 sites took the
    kernel from 0.84-0.86 of the engine's time to 0.93-0.95 at 256 channels and from 0.93-0.95
    to 1.00-1.03 at 512 (one run each); 32 and 64 were within the runs' noise (0.84-1.00) over
    four runs. In float32 on that EPYC (one run each): at 256 channels 64 sites took
    0.84-0.89 of the engine's time, 32 sites 0.89-0.90; at 512 64 took 0.95-0.99, 32
    0.95-0.97 (its rows then fill L2 at 64: 1.2 MiB)."""
    if BLOCK_ROWS is not None:
        return BLOCK_ROWS
    fits = 128 * k * 2 <= 3 << 19
    on_tiles = tiles() and dtype == torch.bfloat16
    return 128 if on_tiles and c_out * k * 2 > 2 << 20 and fits else 64


def _run(features, index, rows, weight, out, bias, relu) -> None:
    b = _NO_BIAS if bias is None else bias.float().contiguous()
    packed = packed_filters(weight)
    args = (features.contiguous(), index.contiguous(), packed, out, rows,
            block_rows(weight.shape[0], packed.shape[1], weight.dtype), b, bool(relu),
            tiles() and weight.dtype == torch.bfloat16)  # float32: in registers everywhere
    if torch.autograd._profiler_enabled():
        # a pybind call is no op the profiler sees: without this range its time would be
        # missing from `cad-spconv bench --profile` (0.04 us to check when no profiler runs)
        with torch.profiler.record_function(PROFILER_NAME):
            _module().gather_gemm(*args)
    else:
        _module().gather_gemm(*args)
