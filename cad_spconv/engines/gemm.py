"""The GEMMs engines run on gathered columns, routed to the fastest library per device."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["matmul_nk", "grouped_mm", "onednn_route", "CPU_AVX512", "CPU_AVX512_BF16",
           "CPU_AMX"]

_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
#: The CPU kind the engines' choices depend on (float32 chunk route here, gather cost in
#: ``lattice.gather_cost``): AVX-512 (AMD EPYC measured; Intel AMX Xeons report it too) or not
#: (AVX2-only EPYC measured). One flag, read at call time, so tests can set both kinds.
CPU_AVX512 = torch.backends.cpu.get_cpu_capability() == "AVX512"
#: Intel AMX (bfloat16 tiles; Sapphire Rapids and later Xeons): there ``torch.mm`` beats
#: oneDNN's 1x1 conv on every bfloat16 GEMM shape of the engines (see ``onednn_route``). Read
#: at call time like ``CPU_AVX512``; ``torch.cpu._is_amx_tile_supported`` is private, hence the
#: fallback. AVX512-BF16 too, which every AMX CPU has and the fused kernel uses (a VM that hides
#: it must not get the kernel). ``CPU_AVX512_BF16``: the bfloat16 dot product in AVX-512
#: registers (AMD EPYC Zen 4 and later, AMX Xeons), which the fused kernel's register GEMM runs.
CPU_AVX512_BF16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
CPU_AMX = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
               and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def matmul_nk(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
              out: Optional[torch.Tensor] = None, *, chunk: bool = False) -> torch.Tensor:
    """``x [n, K] @ w[N, K].T + bias``, written into ``out`` where the route can write into a
    given buffer (use the returned tensor: it is ``out`` or a fresh one, never a copy).

    ``chunk``: one of many calls with the same weight (the im2col chunks of a gather). In
    16-bit these go to ``torch.mm``: oneDNN's 1x1 conv reorders the weight on every call
    (bfloat16, AVX512-BF16 EPYC: 1.1 ms for a 512 x 4608 weight, 3.1 ms for 256 x 18432 at 4
    rows, against 0.1 / 0.2 ms for ``torch.mm``), so per chunk it cost up to 2.2x ``torch.mm``
    (the ASPP's 227-row chunks) and never less at 910-3640 rows. float32 chunks keep the conv
    route where the CPU has AVX-512: ``torch.mm`` (MKL) took 1.6-2.4x as long there even in
    chunks. On an AVX2-only EPYC the reverse: oneDNN took 2.6-2.9x as long on the ASPP's
    18432-element rows at 4-910 rows per call (not a per-call cost: it grew with the rows) and
    1.0-1.4x on the backbone's (``python -m experiments.gemm_routes --chunks``).

    On CPU, float32 and bfloat16 go through ``F.conv2d`` as a 1x1 conv on channels-last views
    of the two matrices (no input copies; the result is a fresh tensor, copied into ``out``),
    which PyTorch runs on oneDNN, the library of the dense network's convs, once there are more
    than 20480 input elements and 2+ threads (else on its own GEMM path). float32: MKL's GEMM
    took 1.6-2.2x as long on the layer shapes of a converted ResNet-101 on an AMD EPYC.
    bfloat16: on an AVX512-BF16 EPYC oneDNN's 1x1 conv beat ``torch.mm`` on 6 of 9 of those
    shapes (``python -m experiments.gemm_routes --dtype bfloat16``) and took the backbone at
    edge 0.35 from 0.956 to 0.910 of dense (BENCHMARKS.md), though an earlier session's route
    check had found ``torch.mm`` faster. On an Intel AMX Xeon the reverse (``CPU_AMX``):
    ``torch.mm`` took 0.67-0.89 of oneDNN's 1x1 conv on all nine shapes and the backbone at
    edge 0.35 0.928 of its time on the conv route, so bfloat16 goes to ``torch.mm`` there; its
    float32 routes were even (0.76-1.10), so float32 keeps oneDNN. Elsewhere (CUDA, float64)
    a GEMM straight into ``out``."""
    n, k = x.shape
    if n and onednn_route(x, chunk):
        y = F.conv2d(x.contiguous().view(1, n, 1, k).permute(0, 3, 1, 2),
                     w.reshape(w.shape[0], k, 1, 1), bias)
        return y.permute(0, 2, 3, 1).reshape(n, -1)
    if out is None:
        return F.linear(x, w, bias)
    if bias is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(bias, x, w.t(), out=out)


def onednn_route(x: torch.Tensor, chunk: bool = False) -> bool:
    """Whether :func:`matmul_nk` runs ``x``'s GEMM as oneDNN's 1x1 conv, which needs the weight
    contiguous (elsewhere a column slice of it is read as a view)."""
    if not (x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and _ONEDNN):
        return False
    if x.dtype == torch.bfloat16 and CPU_AMX:  # torch.mm won every shape there; see matmul_nk
        return False
    # float32 chunks: oneDNN's 1x1 conv beat torch.mm 1.6-2.0x with AVX-512 and lost up to
    # 2.9x (the ASPP's 18432-element rows) on an AVX2-only EPYC; see matmul_nk
    return not chunk or (x.dtype == torch.float32 and CPU_AVX512)


def grouped_mm(cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``cols [G, n, K*C_in_g] @ w [G, K*C_in_g, C_out_g]`` -> ``[n, G*C_out_g]``."""
    if cols.shape[0] == 1:
        return cols[0] @ w[0]
    out = torch.bmm(cols, w)
    return out.transpose(0, 1).reshape(cols.shape[1], -1)
