"""A fused gather + GEMM for the lattice engine's off-lattice rows (BENCHMARKS.md, the AMX Xeon).

    python -m experiments.fused_gather_gemm [--threshold 0.35] [--reps 30] [--block-rows 64]
        [--threads 2] [--backbone]

The lattice engine gathers the im2col rows of the off-lattice sites of a 3x3 conv into chunks of
4M elements (8 MiB in bfloat16, beyond a core's L2), multiplies each chunk with ``torch.mm``
(oneDNN's AMX matmul on Intel Xeons) and scatters the result rows into place. The kernel here
does all three per block of ``--block-rows`` sites: it copies their ``9 x C_in`` input rows
into a per-thread buffer that stays in cache, multiplies it with the filters through PyTorch's
``at::native::cpublas::brgemm`` (oneDNN's AMX micro-kernel, the one PyTorch's CPU flash
attention uses; filters packed once per call in 64-column blocks) with a float32 accumulator,
and writes the bfloat16 rows straight to their output rows. It is compiled on first use with
``torch.utils.cpp_extension`` (a C++ compiler with OpenMP needed) and only for bfloat16 on CPUs
where oneDNN packs bfloat16 filters (``cpublas::could_pack``: AMX).

Measured like ``experiments.tiled_phases``: the 3x3 convs of DeepLabV3-ResNet101's layer3 and
layer4 on the edge masks of the frames in ``../shared/data/cityscapes_frames/`` (random features
and weights), the lattice engine as it runs against the same engine with its gather + GEMM
swapped for the kernel (same lattice and phase parts), the median of the paired ratios of
``--reps`` runs taking turns. Each result is first checked against the engine in float64 on the
same bfloat16 inputs, within the rounding bound of a float32 sum rounded once to bfloat16.

``--backbone``: the whole DeepLabV3-ResNet101 backbone instead (random weights, converted
8 -> 16, bfloat16, channels-last, the output densified at stride 8 as the bench does), each
frame's edge mask, the engine and the fused kernel taking turns (the first of each pair
alternating): per frame the median of the paired ratios, and the ratio of the summed medians.
"""
from __future__ import annotations

import contextlib
import glob
import statistics
import time
import weakref

import torch

from cad_spconv.engines import lattice, sparse_conv
from cad_spconv.rulebook import LatticeSplit, conv_rulebook
from experiments.common import ExperimentParser, table_header
from experiments.tiled_phases import FRAMES, LAYERS, edge_plans

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
  TORCH_CHECK(packed.size(0) * NB == N && packed.size(1) == K, "gather_gemm: filter shape");
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
        at::native::cpublas::brgemm(n, NB, K, K, NB, NB, false, A.data(), B + j * K * NB,
                                    acc.data(), true);
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
_module = None
_indices: dict = {}  # id(split) -> (weakref to split, its fused index), dropped with the split


def kernel():
    """The compiled extension (built once per machine, kept in torch's extension cache)."""
    global _module
    if _module is None:
        from torch.utils.cpp_extension import load_inline
        _module = load_inline("cad_fused_gather_gemm", _SOURCE,
                              functions=["could_pack", "pack_filters", "gather_gemm"],
                              extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"])
    return _module


def fused_index(split: LatticeSplit) -> torch.Tensor:
    """``split.rest_index`` with the border sites' out-of-grid taps as -1 (the kernel's zero)."""
    index = split.rest_index.clone()
    index[split.num_inside:].view(-1)[split.border_zeros] = -1
    return index


@contextlib.contextmanager
def fused_rest(block_rows: int):
    """Within the scope the lattice engine's gather + GEMM (its off-lattice rest) runs on the
    fused kernel where it can run it (bfloat16, no bias, no groups; else as before). The filters are packed on every
    call, as ``torch.mm`` packs them on every chunk (a kept packed copy would add a weight's
    size to memory). Yields a count of the rows the kernel wrote."""
    ext, original, written = kernel(), lattice._gather_gemm, {"rows": 0}

    def gather_gemm(features, weight, bias, split, groups, out):
        if features.dtype != torch.bfloat16 or bias is not None or groups != 1:
            return original(features, weight, bias, split, groups, out)
        entry = _indices.get(id(split))
        if entry is None or entry[0]() is not split:  # built once per split, like its rulebook
            entry = _indices[id(split)] = (weakref.ref(split), fused_index(split))
            weakref.finalize(split, _indices.pop, id(split), None)
        filters = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)
        ext.gather_gemm(features, entry[1], ext.pack_filters(filters), out,
                        split.rest_rows.contiguous(), block_rows)
        written["rows"] += split.num_rest

    lattice._gather_gemm = gather_gemm
    try:
        yield written
    finally:
        lattice._gather_gemm = original


def check_within_rounding(got: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                          book) -> None:
    """``got`` (bfloat16) against the engine in float64 on the same inputs: within one
    bfloat16 rounding of the result plus a float32 sum's error over the ``9 C`` products."""
    f, w = features.double(), weight.double()
    want = sparse_conv(f, w, None, book, 1, "lattice")
    mass = sparse_conv(f.abs(), w.abs(), None, book, 1, "lattice")
    terms = w[0].numel()
    bound = 2.0 ** -8 * want.abs() + terms * 2.0 ** -24 * mass * 1.01 + 1e-30
    err = (got.double() - want).abs()
    if not bool((err <= bound).all()):
        raise AssertionError(f"fused kernel off by {float((err / bound).max()):.2f}x the "
                             "rounding bound")


def main(argv=None) -> int:
    parser = ExperimentParser(prog="python -m experiments.fused_gather_gemm",
                              description=__doc__.split("\n\n")[0])
    parser.add_argument("--threshold", type=float, default=0.35)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--block-rows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backbone", action="store_true",
                        help="the whole backbone, engine against fused, instead of layers")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.block_rows < 1:
        parser.error("--reps and --block-rows must be >= 1")
    if not glob.glob(FRAMES):
        parser.error(f"needs the Cityscapes frames in {FRAMES}; none found")
    if not kernel().could_pack():
        parser.error("this CPU has no packed bfloat16 micro-kernel (AMX); nothing to measure")
    torch.set_num_threads(args.threads)
    print(table_header(args))
    print(f"bfloat16, edge {args.threshold}, {args.block_rows} rows per block")
    return (_backbone if args.backbone else _layers)(args)


def _backbone(args) -> int:
    import torchvision

    from adapters import convert_segmentation
    from cad_apps.bench.variants import _tamed
    from experiments.products_first import _frame

    torch.manual_seed(0)
    model = _tamed(torchvision.models.segmentation.deeplabv3_resnet101(  # the bench's model
        weights=None, weights_backbone=None, num_classes=19, aux_loss=False), 0).eval()
    cl = torch.channels_last
    cad = convert_segmentation(model, 8, 16).eval().to(torch.bfloat16).to(memory_format=cl)
    print("| frame | engine [ms] | fused [ms] | fused / engine, paired |")
    print("|---|---|---|---|")
    sums = {"engine": 0.0, "fused": 0.0}
    for path in sorted(glob.glob(FRAMES)):
        image, keep = _frame(path, ["--threshold", str(args.threshold),
                                    "--size", "512", "1024"])
        x = image.to(torch.bfloat16).contiguous(memory_format=cl)
        samples = {"engine": [], "fused": []}
        with torch.inference_mode():
            for rep in range(args.reps + 1):
                for k in (("engine", "fused") if rep % 2 else ("fused", "engine")):
                    with fused_rest(args.block_rows) if k == "fused" else \
                            contextlib.nullcontext():
                        start = time.perf_counter()
                        cad.forward_features(x, keep).dense()
                        elapsed = time.perf_counter() - start
                    if rep:
                        samples[k].append(elapsed)
        ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
        for k in sums:
            sums[k] += ms[k]
        ratio = statistics.median(a / b for a, b in zip(samples["fused"], samples["engine"]))
        print(f"| {path.rsplit('/', 1)[-1]} | {ms['engine']:.0f} | {ms['fused']:.0f} | "
              f"{ratio:.3f} |", flush=True)
    print(f"| sum | {sums['engine']:.0f} | {sums['fused']:.0f} | "
          f"{sums['fused'] / sums['engine']:.3f} (of the sums) |")
    return 0


def _layers(args) -> int:
    gen = torch.Generator().manual_seed(0)
    print("| frame | C | dilation | off-lattice sites | lattice engine [ms] | fused / engine |")
    print("|---|---|---|---|---|---|")
    for name, plan in edge_plans(args.threshold):
        for channels, dilation in LAYERS:
            book = conv_rulebook(plan, (3, 3), (dilation, dilation), 1, 1)
            features = (torch.randn(plan.num_sites(1), channels, generator=gen)
                        / channels ** 0.5).to(torch.bfloat16)
            weight = torch.randn(channels, channels, 3, 3, generator=gen).to(
                torch.bfloat16).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                engine = lambda: sparse_conv(features, weight, None, book, 1, "lattice")
                engine()  # the split the engine runs
                with fused_rest(args.block_rows):
                    check_within_rounding(engine(), features, weight, book)
                samples = {"engine": [], "fused": []}
                for rep in range(args.reps + 1):
                    for k in samples:
                        with fused_rest(args.block_rows) if k == "fused" else \
                                contextlib.nullcontext():
                            start = time.perf_counter()
                            engine()
                            elapsed = time.perf_counter() - start
                        if rep:
                            samples[k].append(elapsed)
            split = book.lattice(*book.lattice_args()[-1])
            ratio = statistics.median(a / b for a, b in zip(samples["fused"], samples["engine"]))
            print(f"| {name} | {channels} | {dilation} | {split.num_rest} | "
                  f"{1e3 * statistics.median(samples['engine']):.1f} | {ratio:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
