"""Engine ``"products"``: the products of every input row and tap first, then a sum per site.

The gather engines copy ``K * C_in`` elements per output site (im2col) before their GEMM.
Multiplying first reverses that: per kernel row and image, one GEMM per tap over the input rows
that the row's taps read (a contiguous range of the raster-ordered rows, so no gather), giving
``kw`` products of ``C_out`` per row; then every output site sums the ``K`` products its taps read
(``F.embedding_bag``, one pass). The gathered width drops from ``C_in`` to ``C_out`` per tap,
so this pays where ``C_in`` is several times ``C_out``: the ASPP's 3x3 convs (2048 -> 256),
whose wide rates also put many taps outside the grid, which the gather engines pay for in
border handling (:class:`~cad_spconv.rulebook.TapProducts`). The lattice engine hands such
layers to this one (``lattice.products_pay``).

Rounding: in float32 and float64 the sum of a site's products is the conv up to the order of
the additions. In bfloat16 / float16 each tap's product is rounded to the dtype before the sum
(CPU GEMMs have no wider output), so the error bound grows from a rounding of the output (and
one more where a bias is added) by a rounding of every product (measured on the ASPP in
bfloat16: 3.3-3.6e-3 of the largest output against 2.3-2.9e-3 for the lattice engine).

Memory: the products of a layer, ``K`` rows of ``C_out`` per input row a piece holds (at most
about ``K * N_in * C_out`` elements, 9x the output; 29 MB for the ASPP on a 512x1024 frame in
bfloat16), live in one workspace, not in chunks as the gather engines' im2col; converted
models release it when their sparse part ends (``workspace_scope``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..rulebook import ConvRulebook, Rulebook
from .base import Engine, EngineUnsupported, register
from .gemm import matmul_nk
from .layouts import krsc_filters, tracks_grad, workspace

__all__ = ["ProductsEngine"]


class ProductsEngine(Engine):
    name = "products"
    summary = ("per tap one GEMM over the input rows its kernel row reads, then each site sums "
               "its taps' products (conv rulebooks of a plan; no groups; autograd); for C_in >> "
               "C_out")

    def check(self, features, weight, groups, book: Rulebook) -> None:
        if not isinstance(book, ConvRulebook):
            raise EngineUnsupported(
                f"the products engine needs a conv rulebook of a plan (conv_rulebook), got "
                f"{type(book).__name__}; use engine='torch'")
        if groups != 1:
            raise EngineUnsupported(f"the products engine has no grouped convs (groups="
                                    f"{groups}); use engine='lattice' or 'torch'")

    def prepare(self, book: Rulebook, like=None) -> None:
        book.products()

    def conv(self, features, weight, bias, book: ConvRulebook, groups: int) -> torch.Tensor:
        return products_conv(features, weight, bias, book)


def products_conv(features, weight, bias, book: ConvRulebook) -> torch.Tensor:
    """The conv of ``book`` in the products-first order (groups 1).

    One GEMM per piece and tap, on the KRSC filters' ``[C_out, C_in]`` slice of the tap: a view
    of a channels-last weight, so no weight copy is kept (for other weights the KRSC copy the
    lattice engine keeps too). One GEMM per kernel row on copied ``[kw * C_out, C_in]``
    filters was no faster (within 3 % on the ASPP, bfloat16 and float32) and its copies
    put the sparse head's peak memory over the dense network's."""
    tables = book.products()
    c_out, _, _, kw = weight.shape
    track = tracks_grad(features, weight, bias)
    filters = krsc_filters(weight, cache=not track)  # [C_out, kh, kw, C_in]
    if track:  # autograd: fresh tensors
        products = torch.cat([matmul_nk(features[a:b], filters[:, r, c], None)
                              for r, a, b in tables.pieces for c in range(kw)]
                             + [features.new_zeros(1, c_out)])
    else:  # into a workspace that lives across calls (as the gather engines' im2col)
        products = workspace(features, (tables.num_rows * kw + 1) * c_out,
                             "products").view(-1, c_out)
        products[-1].zero_()
        at = 0
        for r, a, b in tables.pieces:
            for c in range(kw):
                into = products[at:at + b - a]
                got = matmul_nk(features[a:b], filters[:, r, c], None, into)
                if got is not into:  # oneDNN's route returns a fresh tensor
                    into.copy_(got)
                at += b - a
    out = F.embedding_bag(tables.index, products, mode="sum")
    if bias is None:
        return out
    return out + bias if track else out.add_(bias)


register(ProductsEngine())
