"""Conv execution engines: rulebook + features + weight -> output features.

- ``"lattice"``: the sites on the coarse lattice of the output step form a complete dense grid
  (:class:`~cad_spconv.rulebook.LatticeSplit`), so they are computed by one dense conv
  (oneDNN / cuDNN, channels-last views of the feature matrix, no copy at step 0); only the
  remaining finer sites go through a gather + GEMM. This is the paper's Guarantee 2 (Hesse et
  al., CVPRW 2023, Sec. 3: sites on the coarse grid compute exactly the strided network) used
  as an execution plan: for the 8->16 ResNet the whole stride-16 part of every layer runs on the
  dense conv and 3/4 of the kept sites go to the gather. Every multiply-add it does is one the
  CAD count includes. 1x1 convs are one GEMM on the feature matrix. Handles groups and
  autograd.
- ``"torch"``: gather rows through the full rulebook (a zero row for out-of-grid taps), then one
  GEMM per chunk of output sites (im2col on the sites). Handles groups and autograd; the
  plain baseline.
- ``"spconv"``: spconv's ``indice_conv`` autograd function on the rulebook's indice pairs, in
  its non-submanifold mode (parent-fill pairs are not symmetric). No groups.
- ``"spconv-igemm"``: spconv's masked implicit GEMM fed with tables built from the rulebook
  (:mod:`cad_spconv.igemm`); CUDA, float32 / float16, no groups, inference only (parent-fill
  rulebooks have no per-input backward pairs).
- ``"auto"``: the engine measured fastest for the device (see :func:`select_engine`).
- ``"tuned"``: like ``torch.backends.cudnn.benchmark``: the first call for a device, dtype and
  layer shape times every engine that can run it and keeps the fastest for later calls
  (:func:`tuned_choices`). All engines compute the same values (they pass the same exactness
  tests), so the choice changes speed only.

Weights are in ``torch.nn.Conv2d`` layout ``[C_out, C_in / groups, kh, kw]``.
"""
from __future__ import annotations

import statistics
import threading
import time
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from .backend import require_spconv, spconv_status
from .rulebook import LatticeSplit, Rulebook

__all__ = ["ENGINES", "sparse_conv", "sparse_max", "select_engine", "prepare", "tuned_choices",
           "tuned_engines", "clear_tuned", "weight_layout", "krsc_filters", "cached_bytes"]

ENGINES = ("auto", "tuned", "lattice", "torch", "spconv", "spconv-igemm")
# timed runs per candidate engine when tuning a layer shape (after one warm-up run)
TUNE_REPS = 3

# Upper bound on gathered elements held at once by the torch engine (64 MiB of fp32).
_CHUNK_ELEMENTS = 1 << 24
# Gathered bytes per chunk of the lattice engine's gather + GEMM. CPU: small enough that the
# GEMM reads its im2col block from cache (BENCHMARKS.md, chunk sweep); GPU: large, so that
# each GEMM fills the device.
_GATHER_CHUNK_BYTES = 16 << 20
_GATHER_CHUNK_BYTES_CUDA = 256 << 20


def _check_engine(engine: str):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


def select_engine(device: torch.device, groups: int, book: Rulebook) -> str:
    """Engine that ``"auto"`` uses for a layer.

    Conv rulebooks (they keep their plan) go to ``"lattice"`` on every device: its dense part
    runs on the vendor conv and the rest is the same gather + GEMM as ``"torch"`` without the
    zero-row copy. Measured on CPU (BENCHMARKS.md: faster than ``"torch"`` and ``"spconv"`` at
    every layer width tried); on CUDA the choice awaits a GPU benchmark. Hand-built rulebooks
    go to ``"torch"``.
    """
    del device, groups
    return "lattice" if book.plan is not None else "torch"


def prepare(book: Rulebook, engine: str = "auto", device=None, groups: int = 1) -> str:
    """Build everything ``engine`` reads from ``book`` (what a first forward builds lazily), so
    geometry cost can be timed apart from compute. Returns the engine actually used (for
    ``"tuned"``: the engines tuned layers ran on ``book``, comma-separated)."""
    _check_engine(engine)
    if engine == "tuned":  # what tuned layers ran on this rulebook; else what auto runs
        ran = sorted(_tuned_runs.get(book, ()))
        for name in ran:
            prepare(book, name, device, groups)
        return ",".join(ran) if ran else prepare(book, "auto", device, groups)
    if engine == "auto":
        engine = select_engine(torch.device(device or "cpu"), groups, book)
    if engine == "lattice":
        if book.num_taps == 1:
            if not book.is_identity:
                book.rows()
        else:
            book.lattice()
    elif engine == "spconv":
        book.spconv_pairs()
    elif engine == "spconv-igemm":
        from .igemm import implicit_gemm_pairs

        implicit_gemm_pairs(book)
    elif not book.is_identity:
        book.padded()
    return engine


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
    cast = _autocast_dtype(features.device)
    if cast is not None:  # as autocast does for F.conv2d (the GEMM paths would not cast)
        features, weight, bias = _autocast(features, weight, bias, cast)
    if weight.dtype != features.dtype or (bias is not None and bias.dtype != features.dtype):
        raise TypeError(f"features are {features.dtype}, the weight {weight.dtype}"
                        + ("" if bias is None else f" and the bias {bias.dtype}")
                        + "; give them one dtype (model.to(dtype)) or run under torch.autocast")
    if engine == "tuned":
        return _tuned_conv(features, weight, bias, book, groups)
    return _run_engine(engine, features, weight, bias, book, groups)


def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs convs in on ``device``, or ``None`` where it is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def _autocast(features, weight, bias, cast: torch.dtype):
    """What autocast does to a conv's inputs: every float32 / float16 / bfloat16 tensor to
    ``cast`` (float64 is left alone). Without autograd the cast weight and bias are kept per
    parameter (:func:`weight_layout`), so engines' own layout caches find the same tensor on
    every call."""
    track = _tracks_grad(features, weight, bias)

    def to(t):
        if t is None or t.dtype == cast or t.dtype not in _AUTOCAST_DTYPES:
            return t
        if track or t is features:
            return t.to(cast)
        return weight_layout(t, ("autocast", cast), lambda w: w.to(cast))

    return to(features), to(weight), to(bias)


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _run_engine(engine, features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
    if engine == "auto":
        engine = select_engine(features.device, groups, book)
    if engine == "lattice":
        return _lattice_conv(features, weight, bias, book, groups)
    if engine == "spconv-igemm":
        from .igemm import igemm_conv

        return igemm_conv(features, weight, bias, book, groups)
    if engine == "spconv":
        if groups != 1:
            raise ValueError("the spconv engine has no grouped convs; use engine='lattice' or "
                             "'torch' (or 'auto')")
        out = _spconv_conv(features, weight, book)
    else:
        out = _torch_conv(features, weight, book, groups)
    if bias is not None:
        out = out + bias
    return out


# ---------------------------------------------------------------------- tuned choice
_tuned: dict = {}  # layer key -> (engine, {candidate: median seconds})
# rulebook -> the engines tuned layers ran on it (what `prepare` builds for "tuned")
_tuned_runs: "weakref.WeakKeyDictionary[Rulebook, set]" = weakref.WeakKeyDictionary()


def _tune_key(features, weight, book: Rulebook, groups: int) -> tuple:
    """What the speed of a layer depends on: device, dtype, autograd, weight shape, groups,
    kernel geometry, whether it is an adaptive step, and the output size to within a factor
    of 2 (one tuning per size class, not per image)."""
    return (str(features.device), features.dtype, _tracks_grad(features, weight, bias=None),
            tuple(weight.shape), groups, book.dilation, book.step_out - book.step_in,
            book.plan is not None, max(1, book.num_out).bit_length())


def _candidates(features, weight, groups: int, book: Rulebook) -> list[str]:
    names = ["lattice"] if book.plan is not None else []
    names.append("torch")
    if groups == 1 and features.dtype in _SPCONV_DTYPES and spconv_status()[0]:
        names.append("spconv")
        if (features.is_cuda and features.dtype in (torch.float32, torch.float16)
                and book.num_taps <= 32 and not _tracks_grad(features, weight, None)):
            from .igemm import igemm_status

            if igemm_status()[0]:
                names.append("spconv-igemm")
    return names


def _tuned_conv(features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
    key = _tune_key(features, weight, book, groups)
    known = _tuned.get(key)
    if known is not None:
        engine = known[0]
        _tuned_runs.setdefault(book, set()).add(engine)
        return _run_engine(engine, features, weight, bias, book, groups)
    names = _candidates(features, weight, groups, book)
    outs = {name: _run_engine(name, features, weight, bias, book, groups)  # warm-up, geometry
            for name in names}
    samples = {name: [] for name in names}
    for _ in range(TUNE_REPS):  # candidates in turn, so a change of machine load hits all
        for name in names:
            if features.is_cuda:
                torch.cuda.synchronize(features.device)
            start = time.perf_counter()
            outs[name] = _run_engine(name, features, weight, bias, book, groups)
            if features.is_cuda:
                torch.cuda.synchronize(features.device)
            samples[name].append(time.perf_counter() - start)
    times = {name: statistics.median(s) for name, s in samples.items()}
    engine = min(names, key=times.get)  # ties: the first candidate
    _tuned[key] = (engine, times)
    _tuned_runs.setdefault(book, set()).add(engine)
    return outs[engine]  # engines return fresh tensors (no workspace escapes a call)


def tuned_engines(book: Rulebook) -> list[str]:
    """The engines that ``engine="tuned"`` layers ran on ``book`` (sorted; empty if none)."""
    return sorted(_tuned_runs.get(book, ()))


def tuned_choices() -> list[dict]:
    """What ``engine="tuned"`` chose so far: one entry per layer key with the median time of
    every candidate (seconds)."""
    names = ("device", "dtype", "autograd", "weight_shape", "groups", "dilation", "adaptive_step",
             "planned", "num_out_log2")
    return [dict(zip(names, key), engine=engine, seconds=dict(times))
            for key, (engine, times) in _tuned.items()]


def clear_tuned() -> None:
    """Forget every tuned choice (the next call of each layer shape times the engines again)."""
    _tuned.clear()
    _tuned_runs.clear()


# ---------------------------------------------------------------------- lattice engine
def _lattice_conv(features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
    if book.num_taps == 1:
        return _pointwise_conv(features, weight, bias, book, groups)
    split = book.lattice()
    c_in, c_out = features.shape[1], weight.shape[0]
    kh, kw = book.kernel_size
    dy, dx = book.dilation
    scratch = not _tracks_grad(features, weight, bias)  # intermediates may live in workspaces
    x = features
    if split.in_rows is not None:
        x = (torch.index_select(features, 0, split.in_rows, out=_workspace(
                 features, split.in_rows.shape[0] * c_in, "lattice_in").view(-1, c_in))
             if scratch else features.index_select(0, split.in_rows))
    # the feature matrix of lattice sites is an NHWC map: a channels-last NCHW view, no copy
    x = x.reshape(split.batch, *split.in_grid, c_in).permute(0, 3, 1, 2)
    y = F.conv2d(x, weight, bias, split.stride, (dy * (kh // 2), dx * (kw // 2)), (dy, dx), groups)
    y = y.permute(0, 2, 3, 1).reshape(-1, c_out)
    if split.out_rows is None:  # step 0: every site is on the lattice
        return y
    out = y.new_empty(book.num_out, c_out)
    out.index_copy_(0, split.out_rows, y)
    if split.num_rest:
        out.index_copy_(0, split.rest_rows,
                        _gather_gemm(features, weight, bias, split, groups, scratch))
    return out


def _tracks_grad(features, weight, bias) -> bool:
    return torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def _pointwise_conv(features, weight, bias, book: Rulebook, groups: int) -> torch.Tensor:
    """1x1 conv: one GEMM on the feature matrix (rows picked first for a stride-2 step)."""
    x = features if book.is_identity else features.index_select(0, book.rows())
    c_out = weight.shape[0]
    if groups == 1:
        return _matmul_nk(x, weight.reshape(c_out, -1), bias)
    g, c_in_g = groups, weight.shape[1]
    cols = x.reshape(-1, g, c_in_g).transpose(0, 1)
    w = weight.reshape(g, c_out // g, c_in_g).transpose(1, 2)
    out = _grouped_mm(cols, w)
    return out if bias is None else out + bias


def _gather_gemm(features, weight, bias, split: LatticeSplit, groups: int,
                 scratch: bool = False) -> torch.Tensor:
    """Output rows of the off-lattice sites (``split.rest_rows`` order): im2col by
    ``index_select`` in cache-sized chunks, one GEMM per chunk.

    Without autograd the im2col chunks go into a per-thread workspace that lives across calls
    and the GEMMs write into the output (straight on BLAS, through a copy on oneDNN; itself a
    workspace with ``scratch``, when the caller copies it out before returning): a fresh buffer
    per chunk costs page faults worth a third of the gather (BENCHMARKS.md)."""
    c_in = features.shape[1]
    c_out, c_in_g, kh, kw = weight.shape
    k, g = kh * kw, groups
    track = _tracks_grad(features, weight, bias)
    if g == 1:  # [C_out, K * C_in]: the KRSC filters, columns in the gathered order
        w = krsc_filters(weight, cache=not track).view(c_out, k * c_in)
    else:
        w = _gemm_weight(weight, g, cache=not track)
    budget = _GATHER_CHUNK_BYTES_CUDA if features.is_cuda else _GATHER_CHUNK_BYTES
    rows = max(1, budget // (k * c_in * features.element_size()))
    bounds = []
    for lo, hi in ((0, split.num_inside), (split.num_inside, split.num_rest)):
        bounds += [(s, min(hi, s + rows)) for s in range(lo, hi, rows)]
    if track:
        return torch.cat([_im2col_block(features, w, bias, split, s, e, g, None, None)
                          for s, e in bounds])
    out = (_workspace(features, split.num_rest * c_out, "rest_out").view(-1, c_out) if scratch
           else features.new_empty(split.num_rest, c_out))
    buf = _workspace(features, min(rows, split.num_rest) * k * c_in, "im2col").view(-1, c_in)
    for s, e in bounds:
        _im2col_block(features, w, bias, split, s, e, g, buf[:(e - s) * k], out[s:e])
    return out


def _im2col_block(features, w, bias, split: LatticeSplit, start: int, stop: int, groups: int,
                  cols: Optional[torch.Tensor], out: Optional[torch.Tensor]) -> torch.Tensor:
    """Rows ``start:stop`` of the rest: gather (into ``cols`` if given), zero out-of-grid taps
    of border sites, GEMM (into ``out`` if given)."""
    n, c_in = stop - start, features.shape[1]
    k = split.rest_index.shape[1]
    idx = split.rest_index[start:stop].reshape(-1)
    if cols is None:
        cols = features.index_select(0, idx)
    else:
        torch.index_select(features, 0, idx, out=cols)
    if start >= split.num_inside:  # border sites: zero the out-of-grid taps
        valid = split.border_valid[start - split.num_inside:stop - split.num_inside]
        mask = valid.reshape(-1, 1).to(cols.dtype)
        cols = cols.mul_(mask) if out is not None else cols * mask
    if groups == 1:
        return _matmul_nk(cols.view(n, k * c_in), w, bias, out)
    c_in_g = c_in // groups
    cols = cols.view(n, k, groups, c_in_g).permute(2, 0, 1, 3).reshape(groups, n, k * c_in_g)
    res = _grouped_mm(cols, w)
    res = res if bias is None else res + bias
    return res if out is None else out.copy_(res)


def _matmul_nk(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor],
               out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x [n, K] @ w[N, K].T + bias`` (written into ``out`` if given).

    On CPU, float32 and bfloat16 go through ``F.conv2d`` as a 1x1 conv on channels-last views of
    the two matrices (no input copies; the result is a fresh tensor, copied into ``out``), which
    PyTorch runs on oneDNN, the library of the dense network's convs, once there are more than
    20480 input elements and 2+ threads (else on its own GEMM path): MKL's GEMM took 1.1-2.1x
    as long on the layer shapes of a converted ResNet-101 on an AMD EPYC (BENCHMARKS.md).
    Elsewhere (CUDA, float64) a BLAS GEMM, straight into ``out``."""
    n, k = x.shape
    if n and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES and _ONEDNN:
        y = F.conv2d(x.contiguous().view(1, n, 1, k).permute(0, 3, 1, 2),
                     w.reshape(w.shape[0], k, 1, 1), bias)
        y = y.permute(0, 2, 3, 1).reshape(n, -1)
        return y if out is None else out.copy_(y)
    if out is None:
        return F.linear(x, w, bias)
    if bias is None:
        return torch.mm(x, w.t(), out=out)
    return torch.addmm(bias, x, w.t(), out=out)


_ONEDNN = torch.backends.mkldnn.is_available()
_ONEDNN_DTYPES = (torch.float32, torch.bfloat16)


def _gemm_weight(weight: torch.Tensor, groups: int, cache: bool) -> torch.Tensor:
    """``[G, K * C_in_g, C_out_g]``: the conv weight in the gathered column order (tap-major,
    then channel). The permutation is a copy, so without autograd it is kept per weight
    (:func:`weight_layout`)."""
    c_out, c_in_g, kh, kw = weight.shape
    k = kh * kw

    def pack(w):
        return w.reshape(groups, c_out // groups, c_in_g, k).permute(0, 3, 2, 1).reshape(
            groups, k * c_in_g, -1).contiguous()

    return weight_layout(weight, ("gemm", groups), pack) if cache else pack(weight)


def weight_layout(weight: torch.Tensor, tag, build) -> torch.Tensor:
    """``build(weight)`` (a re-laid-out copy for an engine, without autograd), kept per weight
    tensor and ``tag`` and rebuilt only when the weight changes (its version counter, storage,
    dtype or device). Inference tensors have no version counter: rebuilt every call."""
    if weight.is_inference():
        return build(weight)
    stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device,
             torch.is_inference_mode_enabled())
    key = (id(weight), tag)
    entry = _layouts.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == stamp:
        return entry[2]
    value = build(weight.detach())
    _layouts[key] = (weakref.ref(weight, lambda _, key=key: _layouts.pop(key, None)), stamp, value)
    return value


def cached_bytes(device=None) -> int:
    """Bytes this thread's engines keep between calls (workspaces, weight layouts), on
    ``device`` (all devices if ``None``): memory a forward's peak does not show once warm."""
    device = None if device is None else torch.device(device)
    tensors = list(getattr(_workspaces, "buffers", {}).values())
    tensors += [entry[2] for entry in list(_layouts.values())]
    return sum(t.numel() * t.element_size() for t in tensors
               if device is None or (t.device.type == device.type
                                     and (device.index is None or t.device == device)))


_layouts: dict = {}
_workspaces = threading.local()


def _workspace(like: torch.Tensor, numel: int, slot: str) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements, reused across calls (per thread, slot,
    device and dtype). Only for values consumed before the call that took it returns."""
    store = getattr(_workspaces, "buffers", None)
    if store is None:
        store = _workspaces.buffers = {}
    # an inference-mode tensor cannot be written outside inference mode: separate buffers
    key = (slot, like.device, like.dtype, torch.is_inference_mode_enabled())
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = store[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


# ---------------------------------------------------------------------- torch engine
def _torch_conv(features, weight, book: Rulebook, groups: int) -> torch.Tensor:
    n_in, c_in = features.shape
    c_out, c_in_g, kh, kw = weight.shape
    k = kh * kw
    g = groups
    w = _gemm_weight(weight, groups, cache=False)  # the plain baseline: no packed-weight cache
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


# ---------------------------------------------------------------------- spconv engine
def _spconv_conv(features, weight, book: Rulebook) -> torch.Tensor:
    functional = require_spconv()
    from spconv.pytorch.core import ConvAlgo

    if features.dtype not in _SPCONV_DTYPES:
        raise TypeError(f"the spconv engine has no {features.dtype} kernels (spconv 2.3 runs "
                        "float16, float32 and float64); use engine='lattice' or 'auto'")
    pairs, counts = book.spconv_pairs()
    filters = krsc_filters(weight, cache=not _tracks_grad(features, weight, None))
    return functional.indice_conv(features.contiguous(), filters, pairs, counts, book.num_out,
                                  ConvAlgo.Native)


def krsc_filters(weight: torch.Tensor, cache: bool = False) -> torch.Tensor:
    """``[C_out, C_in, kh, kw]`` -> ``[C_out, kh, kw, C_in]`` contiguous: spconv's filter layout
    and, flattened, the GEMM weight of tap-major im2col columns. ``cache`` (no autograd): kept
    per weight until it changes (:func:`weight_layout`)."""
    if cache:
        return weight_layout(weight, "krsc", krsc_filters)
    return weight.permute(0, 2, 3, 1).contiguous()


_SPCONV_DTYPES = (torch.float16, torch.float32, torch.float64)


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
