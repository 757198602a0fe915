"""Conv execution engines: rulebook + features + weight -> output features.

- ``"torch"``: gather rows through the rulebook (a zero row for out-of-grid taps), then one
  GEMM per chunk of output sites (im2col on the sites). Handles groups; autograd is torch's
  own (a row read by several outputs gets their gradients summed by index backward). Also the
  independent reference of the tests.
- ``"spconv"``: spconv's ``indice_conv`` autograd function on the rulebook's indice pairs, in
  its non-submanifold mode (parent-fill pairs are not symmetric). No groups.
- ``"auto"``: the fastest correct engine for the device and layer (see :func:`select_engine`).

Weights are in ``torch.nn.Conv2d`` layout ``[C_out, C_in / groups, kh, kw]``.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from .backend import require_spconv, spconv_status
from .rulebook import Rulebook

__all__ = ["ENGINES", "sparse_conv", "sparse_max", "select_engine"]

ENGINES = ("auto", "torch", "spconv")

# Upper bound on gathered elements held at once by the torch engine (64 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 24
_warned_fallback = False


def _check_engine(engine: str):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def select_engine(device: torch.device, groups: int, book: Rulebook) -> str:
    """Engine that ``"auto"`` uses for a layer."""
    if book.is_identity or groups != 1:
        return "torch"
    if device.type == "cuda" and spconv_status()[0]:
        return "spconv"
    if device.type == "cuda":
        _warn_fallback()
    # On CPU the chunked gather + one GEMM beats spconv's per-tap gather-GEMM-scatter
    # (BENCHMARKS.md), and it needs no extra package.
    return "torch"


def _warn_fallback():
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn("cad_spconv: spconv engine unavailable, using the torch engine: "
                      + spconv_status()[1], RuntimeWarning, stacklevel=3)


def sparse_conv(features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                book: Rulebook, groups: int = 1, engine: str = "auto") -> torch.Tensor:
    """Output features ``[N_out, C_out]`` of a conv described by ``book``."""
    _check_engine(engine)
    n_in, c_in = features.shape
    c_out, c_in_g, kh, kw = weight.shape
    if n_in != book.num_in:
        raise ValueError(f"features have {n_in} rows, the rulebook expects {book.num_in}")
    if c_in != c_in_g * groups:
        raise ValueError(f"features have {c_in} channels, the weight expects {c_in_g * groups} "
                         f"({c_in_g} x {groups} groups)")
    if (kh, kw) != book.kernel_size:
        raise ValueError(f"weight kernel {kh}x{kw} does not match the rulebook's "
                         f"{book.kernel_size[0]}x{book.kernel_size[1]}")
    if engine == "auto":
        engine = select_engine(features.device, groups, book)
    if engine == "spconv":
        if groups != 1:
            raise ValueError("the spconv engine has no grouped convs; use engine='torch' "
                             "(or 'auto', which picks it for grouped layers)")
        out = _spconv_conv(features, weight, book)
    else:
        out = _torch_conv(features, weight, book, groups)
    if bias is not None:
        out = out + bias
    return out


def _torch_conv(features, weight, book: Rulebook, groups: int) -> torch.Tensor:
    n_in, c_in = features.shape
    c_out, c_in_g, kh, kw = weight.shape
    k = kh * kw
    g, c_out_g = groups, c_out // groups
    # [G, K * C_in_g, C_out_g], matching the gathered column order (tap-major, then channel)
    w = weight.reshape(g, c_out_g, c_in_g, k).permute(0, 3, 2, 1).reshape(g, k * c_in_g, c_out_g)
    if book.is_identity:
        cols = features.reshape(n_in, g, c_in_g).transpose(0, 1)
        return _grouped_mm(cols, w)
    padded = torch.cat([features, features.new_zeros(1, c_in)])
    index = book.padded()
    n_out = book.num_out
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, k * c_in))
    outs = []
    for start in range(0, n_out, rows_per_chunk):
        idx = index[start:start + rows_per_chunk]
        cols = padded[idx]  # [n, K, C_in]
        n = cols.shape[0]
        if g == 1:
            outs.append(cols.reshape(n, k * c_in) @ w[0])
        else:
            cols = cols.reshape(n, k, g, c_in_g).permute(2, 0, 1, 3).reshape(g, n, k * c_in_g)
            outs.append(_grouped_mm(cols, w))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _grouped_mm(cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``cols [G, n, K*C_in_g] @ w [G, K*C_in_g, C_out_g]`` -> ``[n, G*C_out_g]``."""
    if cols.shape[0] == 1:
        return cols[0] @ w[0]
    out = torch.bmm(cols, w)
    return out.transpose(0, 1).reshape(cols.shape[1], -1)


def _spconv_conv(features, weight, book: Rulebook) -> torch.Tensor:
    functional = require_spconv()
    from spconv.pytorch.core import ConvAlgo

    pairs, counts = book.spconv_pairs()
    filters = weight.permute(0, 2, 3, 1).contiguous()  # spconv KRSC: [C_out, kh, kw, C_in]
    return functional.indice_conv(features.contiguous(), filters, pairs, counts, book.num_out,
                                  ConvAlgo.Native)


def sparse_max(features: torch.Tensor, book: Rulebook) -> torch.Tensor:
    """Max over the taps of ``book`` (out-of-grid taps ignored). ``[N_out, C]``."""
    n_in, c = features.shape
    if n_in != book.num_in:
        raise ValueError(f"features have {n_in} rows, the rulebook expects {book.num_in}")
    padded = torch.cat([features, features.new_full((1, c), float("-inf"))])
    index = book.padded()
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, book.num_taps * c))
    outs = [padded[index[s:s + rows_per_chunk]].max(dim=1).values
            for s in range(0, book.num_out, rows_per_chunk)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)
