"""Engine ``"spconv-igemm"``: spconv's masked implicit GEMM fed with our rulebooks (CUDA only).

spconv 2.3.x has a second conv path besides the gather-GEMM-scatter ``indice_conv``: the
"mask implicit GEMM" kernels (``spconv.pytorch.ops.implicit_gemm``), which read the inputs of
every output row straight from an index table and never materialise gathered columns. Its
forward index format is per output, which is exactly what a parent-fill rulebook is: for output
site ``o`` and tap ``k`` at most one input row (the owner of the tapped cell) or none.

What the kernel reads (spconv 2.3.6 and 2.3.8 have the same Python and C++ code for it; the
kernels come from cumm 0.4 / 0.7):

- ``pair_fwd`` int32 ``[K, N_out]``: input row of output ``o`` at tap ``k``, ``-1`` for none.
  A ``-1`` is never dereferenced (the load is predicated on the index being ``>= 0``), so it
  reads zero. Taps are in row-major kernel order, matching the KRSC filter ``[C_out, kh, kw,
  C_in]``.
- ``pair_mask`` int32 ``[N_out, 1]`` (read as uint32): bit ``k`` set iff tap ``k`` is present,
  **listed in the sorted order**, i.e. entry ``i`` belongs to output row ``mask_argsort[i]``.
  (spconv sorts the masks in place with ``thrust::sort_by_key`` and gets the permutation as the
  values.)
- ``mask_argsort`` int32 ``[N_out]``: a permutation of the output rows. The kernel processes
  the sorted positions in tiles of ``M`` rows (``M`` = the tuned algorithm's tile height); a
  tile visits every tap set in the OR of its masks (AND the per-split ``mask_filter``) and
  writes its results to rows ``mask_argsort[i]``. Any permutation is therefore correct as
  long as ``pair_mask`` follows it; sorting by mask only makes tiles homogeneous (fewer
  wasted taps). A mask bit may be a superset of the present taps (``pair_fwd`` then says -1)
  but never a subset.
- ``masks``: one ``mask_filter`` (numpy uint32 ``[1]``) per split; one split here
  (``ConvAlgo.MaskImplicitGemm``, spconv's default algorithm), all taps: ``0xffffffff``.
- ``is_train=False``: no output-tile masks are saved for a backward pass. ``is_subm`` only
  decides whether the output buffer is zero-filled first; ``False`` here, as for spconv's
  regular (non-submanifold) convs.

There is no backward: spconv's weight and input gradients need the transposed pairs
("pair_bwd": per input row and tap, ONE output row), which a parent-fill rulebook does not have
(an input feeds several outputs through the same tap wherever it owns more than one cell).

Limits taken from spconv's and cumm's code (helper review of 2.3.6 / 2.3.8, cumm 0.4 / 0.7):

- At most 32 taps: more need one mask word per 32 taps and spconv's "dynamic mask" kernels,
  whose tuner-cache entries ``implicit_gemm`` never finds (it looks them up as static-mask
  ones), so every call would tune again.
- Rows are addressed with 32-bit byte offsets: ``max(N_in, N_out) * C_in * itemsize`` must stay
  below 2**31 (cumm asserts it for the output rows; the input offsets overflow silently).
- float16: spconv ignores ``fp32_accum`` (its tuner keeps float16-accumulating kernels among
  the candidates), so results may be accumulated in float16.
- cumm 0.4 (spconv-cu120 and the other spconv 2.3.6 stacks) was built against NumPy 1: its
  ``tensorview.from_numpy``, which ``implicit_gemm`` calls for the mask filters, kills the
  process (SIGFPE) under NumPy 2. :func:`igemm_status` refuses that stack with a clear error
  instead; cumm 0.7 (spconv 2.3.8, e.g. spconv-cu126) works with NumPy 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from ..backend import SpconvUnavailable, installed_builds, spconv_status
from ..rulebook import Rulebook
from .base import Engine, EngineUnsupported, check_bias, register
from .layouts import krsc_filters, tracks_grad

__all__ = ["IGemmEngine", "IGemmPairs", "implicit_gemm_pairs", "igemm_conv",
           "run_implicit_gemm", "igemm_status", "MAX_TAPS", "SUPPORTED_DTYPES"]

MAX_TAPS = 32
SUPPORTED_DTYPES = (torch.float32, torch.float16)
_INT32_MAX = 2 ** 31 - 1


@dataclass(frozen=True)
class IGemmPairs:
    """spconv's forward implicit-GEMM tables for one rulebook (see the module docstring)."""

    pair_fwd: torch.Tensor       # int32 [K, N_out]: input row per (tap, output), -1 = none
    pair_mask: torch.Tensor      # int32 [N_out, 1]: tap bits of row mask_argsort[i], ascending
    mask_argsort: torch.Tensor   # int32 [N_out]: output row of sorted position i
    num_in: int
    num_out: int
    kernel_volume: int

    @property
    def masks(self) -> list:
        """spconv's ``masks`` argument: one ``mask_filter`` per split (one split, all taps)."""
        return [np.array([0xFFFFFFFF], dtype=np.uint32)]

    @property
    def device(self) -> torch.device:
        return self.pair_fwd.device


def implicit_gemm_pairs(book: Rulebook) -> IGemmPairs:
    """spconv implicit-GEMM tables of ``book``, built on the rulebook's device (cached per
    rulebook, for as long as the rulebook lives)."""
    return book.derived("spconv-igemm", lambda: _build_pairs(book))


def _build_pairs(book: Rulebook) -> IGemmPairs:
    k = book.num_taps
    if k > MAX_TAPS:
        raise EngineUnsupported(f"spconv's implicit GEMM engine takes at most {MAX_TAPS} kernel taps "
                         f"(one uint32 tap-mask word per row), this rulebook has {k} "
                         f"({book.kernel_size[0]}x{book.kernel_size[1]}); use engine='lattice'")
    if max(book.num_in, book.num_out) > _INT32_MAX:
        raise ValueError(f"spconv's implicit GEMM indexes rows with int32; {book.num_in} input "
                         f"/ {book.num_out} output rows is too many; use engine='lattice'")
    gather = book.gather
    present = gather >= 0                                           # [N_out, K]
    weights = torch.ones(k, dtype=torch.int64, device=gather.device) << torch.arange(
        k, device=gather.device)
    bits = (present.to(torch.int64) * weights).sum(1)               # unsigned value < 2**32
    sorted_bits, order = torch.sort(bits, stable=True)
    # reinterpret as int32 (spconv views the int32 tensor as uint32)
    sorted_bits = torch.where(sorted_bits > _INT32_MAX, sorted_bits - 2 ** 32, sorted_bits)
    return IGemmPairs(
        pair_fwd=gather.t().to(torch.int32).contiguous(),
        pair_mask=sorted_bits.to(torch.int32).reshape(-1, 1).contiguous(),
        mask_argsort=order.to(torch.int32).contiguous(),
        num_in=book.num_in, num_out=gather.shape[0], kernel_volume=k)


def igemm_conv(features: torch.Tensor, weight: torch.Tensor, bias, book: Rulebook,
               groups: int = 1) -> torch.Tensor:
    """Output features ``[N_out, C_out]`` of the conv described by ``book``, through spconv's
    implicit GEMM. Inference only, CUDA only, float32 / float16, no groups.

    ``weight``: ``torch.nn.Conv2d`` layout ``[C_out, C_in, kh, kw]``; ``bias`` ``[C_out]`` or
    ``None`` (fused into the kernel's epilogue). float16 may be accumulated in float16 (spconv
    picks the kernel; see the module docstring).
    """
    if groups != 1:
        raise EngineUnsupported("the spconv implicit GEMM engine has no grouped convs; use "
                         "engine='lattice' or 'torch'")
    n_in, c_in = features.shape
    _, c_in_w, kh, kw = weight.shape
    if n_in != book.num_in:
        raise ValueError(f"features have {n_in} rows, the rulebook expects {book.num_in}")
    if c_in != c_in_w:
        raise ValueError(f"features have {c_in} channels, the weight expects {c_in_w}")
    if (kh, kw) != book.kernel_size:
        raise ValueError(f"weight kernel {kh}x{kw} does not match the rulebook's "
                         f"{book.kernel_size[0]}x{book.kernel_size[1]}")
    _check_inference(features, weight, bias)
    _check_cuda(features, weight, bias)
    pairs = implicit_gemm_pairs(book)
    if pairs.device != features.device:
        raise ValueError(f"the rulebook lives on {pairs.device}, the features on "
                         f"{features.device}; build the plan on the features' device")
    return run_implicit_gemm(features, weight, bias, pairs)


def run_implicit_gemm(features: torch.Tensor, weight: torch.Tensor, bias,
                      pairs: IGemmPairs) -> torch.Tensor:
    """spconv's ``implicit_gemm`` on given tables (:func:`igemm_conv` without the rulebook;
    tests use it with permuted tables)."""
    c_out, c_in = weight.shape[:2]
    if weight.shape[2] * weight.shape[3] != pairs.kernel_volume:
        raise ValueError(f"weight has {weight.shape[2] * weight.shape[3]} taps, the tables "
                         f"{pairs.kernel_volume}")
    check_bias(bias, c_out)
    if features.shape[0] != pairs.num_in:
        raise ValueError(f"features have {features.shape[0]} rows, the tables expect "
                         f"{pairs.num_in}")
    # the kernel addresses rows of C_in elements with int32 byte offsets (input and output rows)
    rows = max(pairs.num_in, pairs.num_out)
    if rows * c_in * features.element_size() >= _INT32_MAX:
        raise ValueError("spconv's implicit GEMM addresses feature rows with 32-bit byte "
                         f"offsets; {rows} rows x {c_in} {features.dtype} channels reach 2 GiB; "
                         "split the batch or use engine='lattice'")
    _check_inference(features, weight, bias)
    _check_cuda(features, weight, bias)
    if pairs.num_out == 0:
        return features.new_zeros(0, c_out)
    ok, reason = igemm_status()
    if not ok:
        raise SpconvUnavailable(reason)
    from spconv.pytorch import ops

    filters = krsc_filters(weight, cache=True)
    if bias is not None:
        bias = bias.contiguous()
    with torch.cuda.device(features.device):  # spconv uses the current device's stream / arch
        out, _, _ = ops.implicit_gemm(
            features.contiguous(), filters, pairs.pair_fwd, [pairs.pair_mask],
            [pairs.mask_argsort], pairs.num_out, pairs.masks, False, False,
            bias=bias, output_dtype=features.dtype)
    return out


@lru_cache(maxsize=1)
def igemm_status() -> tuple[bool, str]:
    """``(usable, reason)`` for this engine's spconv stack (checked once; says nothing about
    CUDA, which every call checks)."""
    ok, reason = spconv_status()
    if not ok:
        return False, reason
    cumm = installed_builds("cumm")
    return _stack_status(next(iter(cumm.values()), "0"), np.__version__)


def _stack_status(cumm_version: str, numpy_version: str) -> tuple[bool, str]:
    if _major_minor(cumm_version) < (0, 5) and _major_minor(numpy_version) >= (2, 0):
        return False, (f"cumm {cumm_version} (the spconv 2.3.6 stacks, spconv-cu120 among them) "
                       f"was built for NumPy 1 and crashes the process in spconv's implicit GEMM "
                       f"under NumPy {numpy_version}; install spconv-cu126 (spconv 2.3.8 with "
                       "cumm 0.7: `pip uninstall spconv-cu120 cumm-cu120` and `pip install "
                       "'cad-spconv[cu126]'`), or `pip install 'numpy<2'`; engine='lattice' "
                       "needs neither")
    return True, f"cumm {cumm_version}, NumPy {numpy_version}"


def _major_minor(version: str) -> tuple[int, int]:
    parts = (version.split("+")[0].split(".") + ["0", "0"])[:2]
    return tuple(int("".join(ch for ch in p if ch.isdigit()) or 0) for p in parts)


def _check_inference(features, weight, bias):
    if tracks_grad(features, weight, bias):
        raise RuntimeError("the spconv implicit GEMM engine is inference-only (parent-fill "
                           "rulebooks have no per-input backward pairs): run it under "
                           "torch.no_grad() / torch.inference_mode(), or use engine='lattice' "
                           "for training")


def _check_cuda(features, weight, bias):
    tensors = [features, weight] + ([bias] if bias is not None else [])
    if not all(t.is_cuda for t in tensors):
        raise ValueError("spconv's implicit GEMM runs on CUDA only (features, weight and bias "
                         "must be CUDA tensors); on CPU use engine='lattice'")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"features, weight and bias are on different devices: "
                         f"{sorted({str(t.device) for t in tensors})}")
    if features.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the spconv implicit GEMM engine takes float32 or float16 features, "
                        f"got {features.dtype}; use engine='lattice'")
    if any(t.dtype != features.dtype for t in tensors):
        raise TypeError(f"features, weight and bias must share one dtype, got "
                        f"{[str(t.dtype) for t in tensors]}")


class IGemmEngine(Engine):
    name = "spconv-igemm"
    summary = ("spconv's masked implicit GEMM fed with the rulebook (CUDA inference, float32 / "
               "float16, no groups)")
    sums_half_in_dtype = True  # spconv's tuner may pick a float16-accumulating kernel

    def check(self, features, weight, groups, book: Rulebook) -> None:
        if groups != 1:
            raise EngineUnsupported("the spconv implicit GEMM engine has no grouped convs; use "
                                    "engine='lattice' or 'torch'")
        _check_inference(features, weight, None)
        _check_cuda(features, weight, None)
        if book.num_taps > MAX_TAPS:
            raise EngineUnsupported(f"spconv's implicit GEMM engine takes at most {MAX_TAPS} "
                                    f"kernel taps, this rulebook has {book.num_taps}; use "
                                    "engine='lattice'")
        ok, reason = igemm_status()
        if not ok:
            raise SpconvUnavailable(reason)

    def supports(self, features, weight, groups, book) -> bool:
        if not (features.is_cuda and groups == 1 and features.dtype in SUPPORTED_DTYPES
                and book.num_taps <= MAX_TAPS and not tracks_grad(features, weight, None)):
            return False
        return igemm_status()[0]

    def prepare(self, book: Rulebook, like: Optional[Rulebook] = None) -> None:
        implicit_gemm_pairs(book)

    def conv(self, features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
        return igemm_conv(features, weight, bias, book, groups)


register(IGemmEngine())
