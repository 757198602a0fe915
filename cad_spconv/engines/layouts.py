"""What engines keep between calls: re-laid-out weights and scratch workspaces.

- :func:`weight_layout`: an engine's copy of a weight in its own layout (tap-major GEMM
  columns, spconv's KRSC filters, an autocast dtype), built once per weight tensor and rebuilt
  only when the weight changes (see :func:`weights_epoch` for the changes PyTorch does not
  version).
- :func:`workspace`: per-thread scratch buffers reused across calls (a fresh buffer per call
  costs page faults worth a third of a gather on CPU, BENCHMARKS.md), held until the outermost
  :func:`workspace_scope` exits (converted models run their sparse part in one), else kept.
- :func:`cached_bytes` (:func:`kept_tensors`): how much of both is held, so that benchmarks
  count it in peak memory; :func:`cache_use` and :func:`held_bytes`: which entries some calls
  read or built, and what those hold (a benchmark charges each variant the caches its own
  runs need).
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["weight_layout", "krsc_filters", "gemm_weight", "workspace", "workspace_scope",
           "cached_bytes", "kept_tensors", "cache_use", "held_bytes", "tracks_grad", "clear_caches",
           "weights_epoch"]

_layouts: dict = {}
_workspaces = threading.local()
_epoch = 0
_used = threading.local()  # .keys: the entries read or built inside cache_use(), else absent


def weights_epoch() -> int:
    """A counter that moves on every optimizer step (any ``torch.optim`` optimizer, through a
    global step hook) and on :func:`clear_caches`; part of every kept weight-derived value's
    stamp. A weight's version counter alone misses two kinds of change: fused optimizers
    (``fused=True``) update parameters without moving it, and neither do writes through
    ``.data`` (``p.data.copy_(...)``), which need a :func:`clear_caches` call."""
    return _epoch


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _epoch
    _epoch += 1


register_optimizer_step_post_hook(_after_optimizer_step)


def tracks_grad(features, weight, bias) -> bool:
    """Whether a conv call records autograd (then nothing may be cached or reused)."""
    return torch.is_grad_enabled() and (features.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def weight_layout(weight: torch.Tensor, tag, build) -> torch.Tensor:
    """``build(weight)`` (a re-laid-out copy for an engine, without autograd), kept per weight
    tensor and ``tag`` and rebuilt only when the weight changes (its version counter, storage,
    dtype or device, or :func:`weights_epoch`). Inference tensors have no version counter:
    rebuilt every call."""
    if weight.is_inference():
        return build(weight)
    stamp = (weight._version, weight.data_ptr(), weight.dtype, weight.device,
             torch.is_inference_mode_enabled(), _epoch)
    key = (id(weight), tag)
    _note_use("layout", key)
    entry = _layouts.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == stamp:
        return entry[2]
    value = build(weight.detach())
    _layouts[key] = (weakref.ref(weight, lambda _, key=key: _layouts.pop(key, None)), stamp, value)
    return value


def krsc_filters(weight: torch.Tensor, cache: bool = False) -> torch.Tensor:
    """``[C_out, C_in, kh, kw]`` -> ``[C_out, kh, kw, C_in]`` contiguous: spconv's filter layout
    and, flattened, the GEMM weight of tap-major im2col columns. A channels-last weight
    (``model.to(memory_format=torch.channels_last)``) is already laid out so: a view, no copy
    and nothing kept. Else ``cache`` (no autograd): a copy kept per weight until it changes
    (:func:`weight_layout`)."""
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return weight.permute(0, 2, 3, 1)
    if cache:
        return weight_layout(weight, "krsc", krsc_filters)
    return weight.permute(0, 2, 3, 1).contiguous()


def gemm_weight(weight: torch.Tensor, groups: int, cache: bool) -> torch.Tensor:
    """``[G, K * C_in_g, C_out_g]``: the conv weight in the gathered column order (tap-major,
    then channel). The permutation is a copy, so without autograd it is kept per weight."""
    c_out, c_in_g, kh, kw = weight.shape
    k = kh * kw

    def pack(w):
        return w.reshape(groups, c_out // groups, c_in_g, k).permute(0, 3, 2, 1).reshape(
            groups, k * c_in_g, -1).contiguous()

    return weight_layout(weight, ("gemm", groups), pack) if cache else pack(weight)


def workspace(like: torch.Tensor, numel: int, slot: str) -> torch.Tensor:
    """A flat scratch tensor of ``numel`` elements, reused across calls (per thread, slot,
    device and dtype). Only for values consumed before the call that took it returns."""
    store = getattr(_workspaces, "buffers", None)
    if store is None:
        store = _workspaces.buffers = {}
    # an inference-mode tensor cannot be written outside inference mode: separate buffers
    key = (slot, like.device, like.dtype, torch.is_inference_mode_enabled())
    _note_use("workspace", key)
    buf = store.get(key)
    if buf is None or buf.numel() < numel:
        buf = store[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


@contextlib.contextmanager
def workspace_scope():
    """Within the scope (usable as a decorator) workspaces are reused as always; when the
    outermost scope of this thread exits they are released. So a model that runs its sparse
    part in a scope holds them only while that part runs, not at the peak of a dense head
    after it nor between forwards; taking them again costs one allocation per forward, not per
    call. Outside any scope workspaces are kept until :func:`clear_caches`."""
    depth = getattr(_workspaces, "depth", 0)
    _workspaces.depth = depth + 1
    try:
        yield
    finally:
        _workspaces.depth = depth
        if depth == 0:
            getattr(_workspaces, "buffers", {}).clear()


def kept_tensors() -> list:
    """What this thread's engines keep between calls: its workspaces and the weight layouts."""
    return (list(getattr(_workspaces, "buffers", {}).values())
            + [entry[2] for entry in list(_layouts.values())])


def cached_bytes(device=None) -> int:
    """Bytes this thread's engines keep between calls (workspaces, weight layouts), on
    ``device`` (all devices if ``None``): memory a forward's peak does not show once warm."""
    return _bytes_on(kept_tensors(), device)


def _bytes_on(tensors, device) -> int:
    device = None if device is None else torch.device(device)
    return sum(t.numel() * t.element_size() for t in tensors
               if device is None or (t.device.type == device.type
                                     and (device.index is None or t.device == device)))


def _note_use(kind: str, key) -> None:
    keys = getattr(_used, "keys", None)
    if keys is not None:
        keys.add((kind, key))


@contextlib.contextmanager
def cache_use():
    """Within: the set (yielded) of the kept entries that this thread's calls read or build
    (weight layouts and workspaces), for :func:`held_bytes`. A nested use sees its own calls;
    the use around it sees them too."""
    outer = getattr(_used, "keys", None)
    _used.keys = keys = set()
    try:
        yield keys
    finally:
        _used.keys = outer
        if outer is not None:
            outer |= keys


def held_bytes(keys, device=None) -> int:
    """Bytes the entries ``keys`` (from :func:`cache_use`) hold now, on ``device`` (all devices
    if ``None``): a released workspace or a dropped layout holds nothing. Entries shared by
    several users count for each of them."""
    buffers = getattr(_workspaces, "buffers", {})
    tensors = []
    for kind, key in keys:
        entry = _layouts.get(key) if kind == "layout" else buffers.get(key)
        if entry is not None:
            tensors.append(entry[2] if kind == "layout" else entry)
    return _bytes_on(tensors, device)


def clear_caches() -> None:
    """Drop every kept weight layout and this thread's workspaces, and invalidate the batch
    norms' kept scale and shift (:func:`weights_epoch`). Call it after changing weights through
    ``.data``, which PyTorch does not record."""
    global _epoch
    _epoch += 1
    _layouts.clear()
    getattr(_workspaces, "buffers", {}).clear()
