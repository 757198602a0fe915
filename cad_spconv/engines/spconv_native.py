"""Engine ``"spconv"``: spconv's own gather-GEMM-scatter (``indice_conv``) on our rulebooks.

The rulebook's indice pairs (:meth:`~cad_spconv.rulebook.Rulebook.spconv_pairs`) go to spconv's
autograd function in its non-submanifold mode (parent-fill pairs are not symmetric). float16,
float32 and (on CPU) float64; no groups; autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..backend import require_spconv, spconv_status
from ..rulebook import Rulebook
from .base import Engine, EngineUnsupported, register
from .layouts import krsc_filters, tracks_grad

__all__ = ["SpconvEngine", "SPCONV_DTYPES", "SPCONV_CUDA_DTYPES"]

SPCONV_DTYPES = (torch.float16, torch.float32, torch.float64)
#: spconv 2.3's CUDA GEMM tuner has no float64 kernel ("can't find suitable algorithm", seen on
#: an H200 with spconv-cu126 2.3.8)
SPCONV_CUDA_DTYPES = (torch.float16, torch.float32)


def _dtypes(device: torch.device) -> tuple:
    return SPCONV_CUDA_DTYPES if device.type == "cuda" else SPCONV_DTYPES


class SpconvEngine(Engine):
    name = "spconv"
    summary = "spconv's indice_conv on the rulebook's indice pairs (no groups, no bfloat16)"
    sums_half_in_dtype = True  # each tap's GEMM output is added into the float16 output

    def check(self, features, weight, groups, book: Rulebook) -> None:
        if groups != 1:
            raise EngineUnsupported("the spconv engine has no grouped convs; use "
                                    "engine='lattice' or 'torch' (or 'auto')")
        if features.dtype not in _dtypes(features.device):
            where = "on CUDA " if features.device.type == "cuda" else ""
            runs = ", ".join(str(d).replace("torch.", "") for d in _dtypes(features.device))
            raise TypeError(f"the spconv engine has no {features.dtype} kernels {where}(spconv "
                            f"2.3 runs {runs} there); use engine='lattice', 'torch' or 'auto'")
        require_spconv()

    def supports(self, features, weight, groups, book) -> bool:
        # cheap answers first: spconv_status is cached, but import errors are not exceptions
        return (groups == 1 and features.dtype in _dtypes(features.device)
                and spconv_status()[0])

    def prepare(self, book: Rulebook, like: Optional[Rulebook] = None) -> None:
        book.spconv_pairs()

    def conv(self, features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
        functional = require_spconv()
        from spconv.pytorch.core import ConvAlgo

        if book.num_out == 0 or book.num_in == 0:  # spconv asserts on empty tensors
            from .dispatch import empty_conv
            return empty_conv(features, weight, bias)
        pairs, counts = book.spconv_pairs()
        filters = krsc_filters(weight, cache=not tracks_grad(features, weight, None))
        out = functional.indice_conv(features.contiguous(), filters, pairs, counts,
                                     book.num_out, ConvAlgo.Native)
        return out if bias is None else out + bias


register(SpconvEngine())
