"""Engine ``"lattice"``: the coarse lattice as one dense conv, only the rest gathered.

The sites on the coarse lattice of the output step form a complete dense grid
(:class:`~cad_spconv.rulebook.LatticeSplit`), so they are computed by one dense conv
(oneDNN / cuDNN, channels-last views of the feature matrix, no copy at step 0); only the
remaining finer sites go through a gather + GEMM. This is the paper's Guarantee 2 (Hesse et
al., CVPRW 2023, Sec. 3: sites on the coarse grid compute exactly the strided network) used as
an execution plan: for the 8->16 ResNet the whole stride-16 part of every layer runs on the
dense conv and 3/4 of the kept sites go to the gather. A stride-1 conv's off-lattice sites
split further into phases (cells at the same offset from the lattice), each of which reads only
its own phase; a phase whose dense conv costs less than gathering its sites runs densely too,
reading the owner of every cell of the phase (:class:`~cad_spconv.rulebook.PhaseConv`): then
it also computes cells that are not sites, which the CAD count does not include. 1x1 convs are
one GEMM on the feature matrix. A stride-1 conv whose input is at least 4x as wide as its
output (the ASPP's 3x3 convs, 2048 -> 256) runs on the products engine instead
(:func:`products_pay`): its gather would copy ``C_in``-wide rows per tap. Groups and autograd.

Where the fused kernel applies (:mod:`.fused`: bfloat16 or float32 on CPUs with AMX or AVX512-BF16,
no autograd), a conv whose output sites are not one grid skips the split: the kernel computes every
site, the lattice ones too (:data:`FUSED_SITES`). Measured on the DeepLabV3-ResNet101 backbone (2
threads): on an AMX Xeon (edge masks 0.15-0.95) 0.92-0.945 of the split's time, and none of the
prepacked bfloat16 filters that the lattice conv keeps (40 MiB for layer3 and layer4),
BENCHMARKS.md, 2026-12-07 11:31; on an AMD EPYC Zen 4 (AVX512-BF16 registers, edge 0.35) 0.985-0.994
per frame (``python -m experiments.fused_gather_gemm --backbone --sites``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..rulebook import ConvRulebook, LatticeSplit, PhaseConv, Rulebook
from .base import Engine, EngineUnsupported, register
from . import epilogue, fused, gemm
from .gemm import grouped_mm, matmul_nk, onednn_route
from .layouts import gemm_weight, krsc_filters, tracks_grad, workspace

__all__ = ["LatticeEngine", "gather_cost", "products_pay", "lattice_conv"]

# Gathered elements per chunk of the gather + GEMM (so rows per GEMM do not depend on the
# dtype; 16 MiB in float32). CPU: small enough that the GEMM reads its im2col block from cache
# (BENCHMARKS.md, chunk sweep); GPU: large, so that each GEMM fills the device.
_GATHER_CHUNK_ELEMENTS = 4 << 20
_GATHER_CHUNK_ELEMENTS_CUDA = 64 << 20
# see gather_cost: on AVX-512 CPUs (and GPUs, not measured), on AVX2-only CPUs, and for
# oneDNN's chunks of fewer than 900 rows
_GATHER_COST_AVX512, _GATHER_COST_AVX2, _GATHER_COST_FEW_ROWS = 1.2, 1.0, 1.5
# see products_pay
_PRODUCTS_MIN_WIDTH_RATIO = 4
# the derived-format tag marking a rulebook whose layer this engine handed to products
_HANDED_OVER = "lattice-handed-to-products"
# the tag marking a rulebook whose layer ran every site on the fused kernel
_FUSED_SITES = "lattice-fused-sites"
#: where the fused kernel applies (:mod:`.fused`), whether it computes every site of a layer
#: whose output sites are not one grid, the lattice sites too
FUSED_SITES = True


#: why the lattice engine refuses ``semantics="reference"`` (also said by ``adapters.convert``)
NEEDS_PAPER_SEMANTICS = ("the lattice engine needs semantics='paper': it relies on Guarantee 2, "
                         "which the reference semantics break; use another engine "
                         "(engine='auto' runs 'torch' there)")


class LatticeEngine(Engine):
    name = "lattice"
    summary = ("coarse-lattice sites as one dense conv (oneDNN / cuDNN), the finer rest by "
               "gather + GEMM (conv rulebooks of a plan; groups, autograd)")

    def check(self, features, weight, groups, book: Rulebook) -> None:
        if not isinstance(book, ConvRulebook):
            raise EngineUnsupported(
                f"the lattice engine needs a conv rulebook of a plan (conv_rulebook), got "
                f"{type(book).__name__}; use engine='torch'")
        if book.plan.semantics != "paper" and book.num_taps > 1:
            raise EngineUnsupported(NEEDS_PAPER_SEMANTICS)

    def prepare(self, book: Rulebook, like: Optional[Rulebook] = None) -> None:
        if isinstance(like, ConvRulebook) and like.has_derived(_HANDED_OVER):
            book.products()  # this engine handed a layer of the forwards to products
        if isinstance(like, ConvRulebook) and like.has_derived(_FUSED_SITES):
            book.gather  # a layer of the forwards ran every site on the fused kernel
        if book.num_taps == 1:
            if not book.is_identity:
                book.rows()
            return
        if like is None and fused.enabled():  # what a layer of 32s of channels reads there
            book.gather
            return
        # the splits the forwards built (none where all its layers ran on products), else the
        # split of a float32 layer on this CPU (the channel count is not known here)
        built = (like.lattice_args() if isinstance(like, ConvRulebook)
                 else [(gather_cost(1, 1), not gemm.CPU_AVX512)])
        for cost, inside_rows in built:
            book.lattice(cost, inside_rows)

    fuses_epilogue = True
    writes_out = True  # the 1x1 convs without an epilogue

    def conv(self, features, weight, bias, book: ConvRulebook, groups: int, relu: bool = False,
             residual: Optional[torch.Tensor] = None, residual_inplace: bool = False,
             out: Optional[torch.Tensor] = None) -> torch.Tensor:
        if book.num_taps == 1:
            return _pointwise_conv(features, weight, bias, book, groups, relu, residual,
                                   residual_inplace, out)
        if residual is not None:  # added before the ReLU: both follow the conv
            return epilogue.apply(self._conv(features, weight, bias, book, groups), relu,
                                  residual, residual_inplace)
        return self._conv(features, weight, bias, book, groups, relu)

    def _conv(self, features, weight, bias, book: ConvRulebook, groups: int,
              relu: bool = False) -> torch.Tensor:
        """The conv, ``relu`` applied by each part to its own rows (as oneDNN's post-op, in
        the fused kernel, or in place on a chunk while it is in cache)."""
        c_in, c_out = features.shape[1], weight.shape[0]
        if products_pay(c_in, c_out, groups, book):
            # imported here so that "lattice" registers before "products" (ENGINES' order)
            from .products import products_conv
            # marked, so that prepare(like=book) builds the products only where this engine
            # used them (a tuned run trying the products engine builds them too)
            book.derived(_HANDED_OVER, lambda: True)
            return epilogue.apply(products_conv(features, weight, bias, book), relu, None)
        if FUSED_SITES and fused.applies(features, weight, bias, groups) and _has_rest(book):
            book.derived(_FUSED_SITES, lambda: True)  # prepare(like=book) builds the gather
            return fused.sites_conv(features, weight, book, bias, relu)
        split = book.lattice(gather_cost(book.num_taps, c_in // groups,
                                         onednn_route(features, chunk=True), features.is_cuda),
                             _reads_inside_rows(features, groups))
        scratch = not tracks_grad(features, weight, bias)  # intermediates may be workspaces
        out = lattice_conv(features, weight, bias, book, split, groups, scratch, relu)
        if split.out_rows is None:  # step 0 or nothing merged: every site was on the lattice
            return out
        for part in split.phases:
            _phase_conv(features, weight, bias, part, book.dilation, groups, out, scratch,
                        relu)
        if split.num_rest:
            _gather_gemm(features, weight, bias, split, groups, out, relu)
        return out


def lattice_conv(features, weight, bias, book: ConvRulebook, split: LatticeSplit, groups: int,
                 scratch: bool, relu: bool = False) -> torch.Tensor:
    """The lattice part of ``split`` as one dense conv: the output rows ``[num_out, C_out]``
    with the lattice sites written (every row where ``split.out_rows`` is ``None``; the others
    are left for the phases and the gather). ``scratch``: no autograd, so the lattice input
    may go into a workspace; ``relu``: with a ReLU (:func:`.epilogue.conv_map`)."""
    c_in, c_out = features.shape[1], weight.shape[0]
    kh, kw = book.kernel_size
    dy, dx = book.dilation
    if split.finest:  # nothing merged: one dense conv on the finest grid, taps 2**t apart
        dy, dx = dy * 2 ** book.step_in, dx * 2 ** book.step_in
    x = features
    if split.in_rows is not None:
        x = (torch.index_select(features, 0, split.in_rows, out=workspace(
                 features, split.in_rows.shape[0] * c_in, "lattice_in").view(-1, c_in))
             if scratch else features.index_select(0, split.in_rows))
    # the feature matrix of lattice sites is an NHWC map: a channels-last NCHW view, no copy
    x = x.reshape(split.batch, *split.in_grid, c_in).permute(0, 3, 1, 2)
    # F.conv2d, or on CPU without autograd oneDNN's conv (the ReLU fused, bfloat16 weights
    # prepacked)
    y = epilogue.conv_map(x, weight, bias, split.stride, (dy * (kh // 2), dx * (kw // 2)),
                          (dy, dx), groups, relu)
    y = y.permute(0, 2, 3, 1).reshape(-1, c_out)
    if split.out_rows is None:
        return y
    out = y.new_empty(book.num_out, c_out)
    _copy_rows(out, split.out_rows, y)
    return out


def _has_rest(book: ConvRulebook) -> bool:
    """Whether the output sites are not one grid (there is a rest off the lattice); else
    the layer is one dense conv on that grid."""
    return book.plan.grid_level(book.step_out) is None


def products_pay(c_in: int, c_out: int, groups: int, book: ConvRulebook) -> bool:
    """Whether a layer runs faster on the products engine than on the lattice split: stride-1
    convs with ``C_in >= 4 * C_out`` whose sites are not one grid (there the split is one
    dense conv). Measured on the sites of a Cityscapes frame's edge mask at step 1 (3x3,
    dilations 1-18, AVX512-BF16 EPYC, 2 threads, BENCHMARKS.md "Products first"): 0.66-0.94
    of the lattice engine's time at 1024 -> 256, 2048 -> 256 and 2048 -> 512 in bfloat16 and
    float32; 512 -> 256 about even in bfloat16; 256 -> 256 1.05-1.11x in bfloat16. (A
    stride-2 step would compute products of input rows no output reads.)"""
    return (groups == 1 and book.step_in == book.step_out
            and c_in >= _PRODUCTS_MIN_WIDTH_RATIO * c_out
            and book.plan.grid_level(book.step_in) is None)


def _phase_conv(features, weight, bias, part: PhaseConv, dilation, groups: int,
                out: torch.Tensor, scratch: bool, relu: bool = False) -> None:
    """Write the sites of an off-lattice phase into ``out``: a dense conv on the phase grid
    filled through the owner map, read at the sites' positions."""
    c_in, c_out = features.shape[1], weight.shape[0]
    kh, kw = weight.shape[-2:]
    dy, dx = dilation
    n = part.in_rows.shape[0]
    x = (torch.index_select(features, 0, part.in_rows,
                            out=workspace(features, n * c_in, "lattice_in").view(-1, c_in))
         if scratch else features.index_select(0, part.in_rows))
    x = x.reshape(-1, *part.grid, c_in).permute(0, 3, 1, 2)
    y = epilogue.conv_map(x, weight, bias, 1, (dy * (kh // 2), dx * (kw // 2)), (dy, dx),
                          groups, relu)  # as lattice_conv's
    y = y.permute(0, 2, 3, 1).reshape(-1, c_out)
    _copy_rows(out, part.out_rows, y.index_select(0, part.positions))


def gather_cost(taps: int, c_in: int, onednn_chunks: bool = False, cuda: bool = False) -> float:
    """What a gathered multiply-add costs against a dense conv's, per gathered row of
    ``taps * c_in`` elements (decides which off-lattice phases run densely, see
    ``ConvRulebook.lattice``). Measured on CPU, 2 threads (``python -m experiments.dense_phases
    layers``, BENCHMARKS.md "Dense phases"): about 1.2 on an AMD EPYC with AVX-512 (float32 and
    bfloat16), 1.0 on an AVX2-only one (float32: its dense convs ran at about the GEMMs' rate);
    1.5 where the im2col chunks go to oneDNN's 1x1 conv (``onednn_chunks``: float32 on AVX-512
    CPUs, see ``matmul_nk``) and hold fewer than 900 rows (the ASPP's 3x3 convs on 2048
    channels, 227 rows), where each chunk pays oneDNN's weight reorder. Not measured on GPUs:
    there every layer gets the AVX-512 figure."""
    if onednn_chunks and _GATHER_CHUNK_ELEMENTS // (taps * c_in) < 900:
        return _GATHER_COST_FEW_ROWS
    return _GATHER_COST_AVX512 if cuda or gemm.CPU_AVX512 else _GATHER_COST_AVX2


def _pointwise_conv(features, weight, bias, book: Rulebook, groups: int, relu: bool = False,
                    residual: Optional[torch.Tensor] = None, residual_inplace: bool = False,
                    out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1x1 conv: one GEMM on the feature matrix (rows picked first for a stride-2 step); its
    epilogue (``relu(conv + residual)``) fused where oneDNN can (:mod:`.epilogue`). ``out``
    (no epilogue): written by the GEMM where it can (see :func:`_matmul_into`)."""
    x = (features if book.is_identity or book.rows_in_order()
         else features.index_select(0, book.rows()))
    if relu or residual is not None:
        y = epilogue.fused_rows(x, weight, bias, groups, relu, residual, residual_inplace)
        if y is not None:
            return y
    c_out = weight.shape[0]
    if groups == 1 and out is not None and not (relu or residual is not None
                                                or tracks_grad(x, weight, bias)):
        return _matmul_into(x, weight, bias, out)
    if groups == 1:
        out = matmul_nk(x, weight.reshape(c_out, -1), bias)
    else:
        g, c_in_g = groups, weight.shape[1]
        cols = x.reshape(-1, g, c_in_g).transpose(0, 1)
        w = weight.reshape(g, c_out // g, c_in_g).transpose(1, 2)
        out = grouped_mm(cols, w)
        out = out if bias is None else out + bias
    return epilogue.apply(out, relu, residual, residual_inplace)


def _matmul_into(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 out: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv's GEMM written into ``out`` (returned; a fresh result where neither route
    below can write it). Where :func:`matmul_nk` takes oneDNN's 1x1 conv, which returns a
    fresh map, that conv adds its result into ``out`` zeroed first (its fused residual add,
    in place): no second output beside ``out``."""
    if onednn_route(x) and out.is_contiguous():
        y = epilogue.fused_rows(x, weight, bias, 1, residual=out.zero_(),
                                residual_inplace=True)
        if y is not None:
            return y
    return matmul_nk(x, weight.reshape(weight.shape[0], -1), bias,
                     out if out.is_contiguous() else None)


def _gather_gemm(features, weight, bias, split: LatticeSplit, groups: int,
                 out: torch.Tensor, relu: bool = False) -> None:
    """Write the off-lattice output rows (``split.rest_rows``) into ``out``: im2col by
    ``index_select`` in cache-sized chunks, one GEMM per chunk, its rows copied into place.

    Where the GEMM reads a column slice of the filters as a view (not oneDNN's conv route,
    which needs them contiguous), a border site's chunk gathers only the kernel rows inside
    the grid (``split.row_groups``) and multiplies by those rows' filter columns: the other
    rows' taps would be zeros (a third to half of an ASPP border site's taps).

    Without autograd the im2col chunks and the GEMM results go into per-thread workspaces
    that live across calls (a fresh buffer per chunk costs page faults worth a third of the
    gather, BENCHMARKS.md); oneDNN's GEMM returns a fresh result, copied into place directly.

    Where the fused kernel applies (:mod:`.fused`: bfloat16 or float32 on CPUs with AMX or
    AVX512-BF16, on by default there),
    it does the gather, the GEMMs and the copies in one C++ kernel instead. ``relu``: on each
    chunk's rows while they are in cache (in the fused kernel, before its rounding)."""
    if fused.applies(features, weight, bias, groups):
        fused.gather_gemm(features, weight, split, out, bias, relu)
        return
    c_in = features.shape[1]
    c_out, c_in_g, kh, kw = weight.shape
    k, g = kh * kw, groups
    track = tracks_grad(features, weight, bias)
    if g == 1:  # [C_out, K * C_in]: the KRSC filters, columns in the gathered order
        w = krsc_filters(weight, cache=not track).view(c_out, k * c_in)
    else:
        w = gemm_weight(weight, g, cache=not track)
    budget = _GATHER_CHUNK_ELEMENTS_CUDA if features.is_cuda else _GATHER_CHUNK_ELEMENTS
    rows = max(1, budget // (k * c_in))
    segments = [(0, split.num_inside, None)]  # (first, stop, taps read: None = all)
    if _reads_inside_rows(features, g):
        segments += [(lo, hi, None if (r0, r1) == (0, kh) else (r0 * kw, r1 * kw))
                     for lo, hi, r0, r1 in split.row_groups]
    else:
        segments.append((split.num_inside, split.num_rest, None))
    bounds = [(s, min(hi, s + rows), taps)
              for lo, hi, taps in segments for s in range(lo, hi, rows)]
    if track:
        rest = torch.cat([_im2col_block(features, w, bias, split, s, e, taps, g, None, None)
                          for s, e, taps in bounds])
        _copy_rows(out, split.rest_rows, torch.relu(rest) if relu else rest)
        return
    chunk = min(rows, split.num_rest)
    buf = workspace(features, chunk * k * c_in, "im2col").view(-1, c_in)
    res = workspace(features, chunk * c_out, "rest_out").view(-1, c_out)
    for s, e, taps in bounds:
        n = (e - s) * (k if taps is None else taps[1] - taps[0])
        y = _im2col_block(features, w, bias, split, s, e, taps, g, buf[:n], res[:e - s])
        _copy_rows(out, split.rest_rows[s:e], torch.relu_(y) if relu else y)


def _copy_rows(out: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    """``out[rows] = src`` for row-major feature matrices. PyTorch's CPU ``index_copy_``
    copies element by element, so where a row splits into 8-byte words (and no autograd
    records the copy) the rows go as ``int64`` views: a bitwise copy, the same result for
    every dtype, in 0.48-0.58 of the time in bfloat16 and 0.96-1.03 in float32 (AMX Xeon,
    2 threads, 1500-5738 rows of 256-2048 channels, ``python -m experiments.row_moves
    scatter``; BENCHMARKS.md)."""
    if (out.device.type == "cpu" and out.element_size() < 8 and _as_words(out)
            and _as_words(src)
            and not (torch.is_grad_enabled() and (out.requires_grad or src.requires_grad))):
        out.view(torch.int64).index_copy_(0, rows, src.view(torch.int64))
    else:
        out.index_copy_(0, rows, src)


def _as_words(x: torch.Tensor) -> bool:
    """Whether a matrix's rows can be viewed as 8-byte words (``x.view(torch.int64)``)."""
    size = x.element_size()
    return (x.dim() == 2 and x.stride(1) == 1 and x.shape[1] * size % 8 == 0
            and x.stride(0) * size % 8 == 0 and x.storage_offset() * size % 8 == 0
            and x.data_ptr() % 8 == 0)


def _reads_inside_rows(features, groups: int) -> bool:
    """Whether the gather reads only a border site's kernel rows inside the grid: where the
    GEMM takes the filters' columns of those rows as a view (not oneDNN's conv route, which
    would copy them per chunk)."""
    return groups == 1 and not onednn_route(features, chunk=True)


def _im2col_block(features, w, bias, split: LatticeSplit, start: int, stop: int,
                  taps: Optional[tuple[int, int]], groups: int, cols: Optional[torch.Tensor],
                  out: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``start:stop`` of the rest, reading every tap or (``taps`` = (first, stop)) that
    range of taps (whole kernel rows): gather (into ``cols`` if given), zero out-of-grid taps
    of border sites, GEMM (into ``out`` where the route writes into a buffer)."""
    n, c_in = stop - start, features.shape[1]
    k_all = split.rest_index.shape[1]
    t0, t1 = taps if taps is not None else (0, k_all)
    k = t1 - t0
    idx = split.rest_index[start:stop, t0:t1].reshape(-1)
    if cols is None:
        cols = features.index_select(0, idx)
    else:
        torch.index_select(features, 0, idx, out=cols)
    if start >= split.num_inside:  # border sites: zero the out-of-grid taps
        a, b = start - split.num_inside, stop - split.num_inside
        zeros, offsets = ((split.border_zeros, split.border_zero_offsets) if taps is None
                          else (split.row_zeros, split.row_zero_offsets))
        lo, hi = offsets[a].item(), offsets[b].item()
        if hi > lo:
            pos = zeros[lo:hi] - a * k_all
            if k != k_all:  # site * K + tap over the gathered taps -> site * k + tap
                pos = pos // k_all * k + pos % k_all
            # a fill, not a multiplication by 0: 0 * inf would be NaN where the dense conv pads 0
            flat = cols.view(n * k, c_in)
            cols = (flat.index_fill_(0, pos, 0) if out is not None
                    else flat.index_fill(0, pos, 0)).view(cols.shape)
    if groups == 1:  # the filter columns of the gathered taps: a view
        return matmul_nk(cols.view(n, k * c_in), w[:, t0 * c_in:t1 * c_in], bias, out,
                         chunk=True)
    c_in_g = c_in // groups
    cols = cols.view(n, k, groups, c_in_g).permute(2, 0, 1, 3).reshape(groups, n, k * c_in_g)
    res = grouped_mm(cols, w)
    return res if bias is None else res + bias


register(LatticeEngine())
