"""Engine ``"torch"``: gather + GEMM on the full rulebook, in plain PyTorch.

Rows are gathered through the rulebook (a zero row appended for out-of-grid taps), then one
GEMM per chunk of output sites (im2col on the sites). Any rulebook, any dtype and device,
groups and autograd: the plain baseline every other engine is measured against.
"""
from __future__ import annotations

import torch

from ..rulebook import Rulebook
from .base import CHUNK_ELEMENTS, Engine, register
from .gemm import grouped_mm
from .layouts import gemm_weight, krsc_filters

__all__ = ["GatherEngine"]


class GatherEngine(Engine):
    name = "torch"
    summary = "gather rows through the rulebook, one GEMM per chunk (any rulebook, autograd)"

    def conv(self, features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
        n_in, c_in = features.shape
        c_out, c_in_g, kh, kw = weight.shape
        k, g = kh * kw, groups
        # the plain baseline keeps no weight copies: groups == 1 reads the KRSC filters, a view
        # of a channels-last weight (a copy per call otherwise); groups a permuted copy
        if g == 1:
            w = krsc_filters(weight).reshape(c_out, k * c_in).t()
        else:
            w = gemm_weight(weight, groups, cache=False)
        if book.is_identity:
            out = (features @ w if g == 1
                   else grouped_mm(features.reshape(n_in, g, c_in_g).transpose(0, 1), w))
        else:
            padded = torch.cat([features, features.new_zeros(1, c_in)])
            index = book.padded()
            rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, k * c_in))
            outs = []
            for start in range(0, book.num_out, rows_per_chunk):
                cols = padded[index[start:start + rows_per_chunk]]  # [n, K, C_in]
                n = cols.shape[0]
                if g == 1:
                    outs.append(cols.reshape(n, k * c_in) @ w)
                else:
                    cols = cols.reshape(n, k, g, c_in_g).permute(2, 0, 1, 3).reshape(
                        g, n, k * c_in_g)
                    outs.append(grouped_mm(cols, w))
            if not outs:
                out = features.new_zeros(0, c_out)
            else:
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out if bias is None else out + bias


register(GatherEngine())
