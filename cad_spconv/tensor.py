"""The multi-resolution tensor: a ``spconv.pytorch.SparseConvTensor`` that knows its quadtree.

A :class:`CADTensor` is a batch of multi-resolution feature maps: one feature row per active
site, sites on the finest grid. To spconv it is an ordinary ``SparseConvTensor`` (features
``[N, C]``, int32 ``indices`` ``(batch, y, x)``, ``spatial_shape`` = the finest grid,
``batch_size``), so spconv's own pointwise code (``SparseSequential`` with ``nn.ReLU``,
``nn.BatchNorm1d``, ...) runs on it. On top it carries the :class:`~cad_spconv.plan.LevelPlan`
its sites come from, its step (how many adaptive downsamplings it went through) and a
:class:`~cad_spconv.rulebook.RulebookCache` that every tensor derived from it shares, so a
whole network builds each rulebook once per forward. Its rulebooks are inspectable in spconv's
pair format (:meth:`~cad_spconv.rulebook.Rulebook.spconv_pairs`).
"""
from __future__ import annotations

import logging
import sys
from typing import Optional

import torch

from .backend import import_spconv
from .plan import LevelPlan, PlanSpec, make_plan, same_device
from .rulebook import RulebookCache

__all__ = ["CADTensor", "features_with_room"]

SparseConvTensor = import_spconv().SparseConvTensor
# spconv's tensor class uses torch.fx's ProxyableClassMeta, whose first instantiation logs a
# torch.fx API notice ("is_fx_tracing will return true ...") that concerns torch.fx users only
logging.getLogger("torch.fx._symbolic_trace").addFilter(
    lambda record: "is_fx_tracing will return true" not in record.getMessage())


class CADTensor(SparseConvTensor):
    """Features ``[N, C]`` of the sites of ``plan`` at ``step``, in the plan's raster order."""

    def __init__(self, features: torch.Tensor, plan: LevelPlan, step: int,
                 cache: Optional[RulebookCache] = None):
        if not isinstance(features, torch.Tensor) or features.dim() != 2:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a [N, C] tensor, got {shape}")
        n = plan.num_sites(step)
        if features.shape[0] != n:
            raise ValueError(f"features have {features.shape[0]} rows, the plan has {n} sites at "
                             f"step {step}")
        if not same_device(features.device, plan.device):
            raise ValueError(f"features are on {features.device}, the plan on {plan.device}")
        # spconv asserts batch_size > 0; an empty batch is a valid (empty) tensor here
        super().__init__(features, plan.geometry(step).indices, list(plan.grid),
                         max(1, plan.batch_size))
        self.batch_size = plan.batch_size
        self.plan = plan
        self.step = step
        if cache is not None:
            cache.bind(plan)
        self.cache = cache if cache is not None else RulebookCache()

    # ------------------------------------------------------------------ entry / exit
    @classmethod
    def from_dense(cls, x: torch.Tensor, keep: PlanSpec, num_levels: Optional[int] = None
                   ) -> "CADTensor":
        """Enter at step 0 from a dense map ``[B, C, H, W]`` at the finest grid (unlike
        spconv's ``from_dense``, which takes a channels-last map and keeps its nonzeros).

        ``keep``: a :class:`LevelPlan` or anything :func:`~cad_spconv.plan.make_plan` takes
        (then ``num_levels`` is required).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"expected a dense [B, C, H, W] tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if isinstance(keep, LevelPlan):
            num_levels = keep.num_levels if num_levels is None else num_levels
        elif num_levels is None:
            raise ValueError("num_levels is required unless keep is a LevelPlan")
        plan = make_plan(keep, x.shape[-2:], num_levels, batch_size=x.shape[0], device=x.device)
        features = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        return cls(features, plan, 0)

    def dense(self, channels_first: bool = True, *, fill: str = "owner",
              grid: str = "finest", out: Optional[torch.Tensor] = None,
              consume: bool = False) -> torch.Tensor:
        """Densify: ``[B, C, H, W]`` (``[B, H, W, C]`` with ``channels_first=False``).

        ``fill="owner"`` (default, ``SEMANTICS.md``): every finest cell takes its owner site's
        features (parent fill), which is what the next layer reads. ``fill="scatter"``:
        spconv's ``SparseConvTensor.dense``: features at the site cells, zeros elsewhere.
        ``grid="step"`` samples the current step's grid (every ``2**step``-th finest cell),
        where owner fill equals the strided network (Guarantee 2).

        Owner fill is a view where the sites are the cells of one grid (``plan.grid_level``:
        the features are its NHWC map), a nearest upsampling of that map onto the finest grid
        where the cells are blocks, and a gather through the owner map otherwise.

        ``out``: a tensor of the result's shape, dtype and device to write into and return
        (any strides; channels-last is the fast one). A caller that densifies maps of one size
        again and again (a video loop, a benchmark) keeps one: a fresh result of tens of MiB
        costs more in new pages than in copying (``BENCHMARKS.md``).

        ``consume``: this tensor is not used again (its features raise afterwards), so the map
        may be built in place, in the features' own buffer: with owner fill on the finest grid,
        where the features are the first rows of a buffer with room for the map
        (:func:`features_with_room`, ``forward_features(..., room_for_dense=True)`` of the
        converted ResNets) and nothing else holds them. Then the peak is the map alone, not
        the map beside the features. Elsewhere the result is a fresh map, the same values."""
        if not isinstance(channels_first, bool):  # e.g. dense("step"): grid is keyword-only
            raise TypeError(f"channels_first must be a bool, got {channels_first!r}; the grid "
                            "is chosen by keyword: x.dense(grid='step')")
        if grid not in ("finest", "step"):
            raise ValueError(f"grid must be 'finest' or 'step', got {grid!r}")
        if fill not in ("owner", "scatter"):
            raise ValueError(f"fill must be 'owner' or 'scatter', got {fill!r}")
        if not isinstance(consume, bool):
            raise TypeError(f"consume must be a bool, got {consume!r}")
        self.features  # a released tensor: the clear error, not a failure further down
        if consume:
            res = (self._dense_in_place() if fill == "owner" and grid == "finest" and out is None
                   and self.plan.grid_level(self.step) != 0 else None)
            if res is None:
                res = self.dense(channels_first, fill=fill, grid=grid, out=out)
            elif channels_first:
                res = res.permute(0, 3, 1, 2)
            self.release()
            return res
        B, (H, W), C = self.batch_size, self.plan.grid, self.features.shape[1]
        s = 2 ** self.step if grid == "step" else 1
        shape = (B, -(-H // s), -(-W // s), C)  # NHWC
        dst = None if out is None else self._out_nhwc(out, shape, channels_first)
        c = self.plan.grid_level(self.step) if fill == "owner" else None
        if c is not None and (grid == "step" or c == 0):  # a view of the features
            cell = 2 ** c
            res = self.features.reshape(B, -(-H // cell), -(-W // cell), C)
            if grid == "step":  # every 2**step-th finest cell: every 2**(step-c)-th cell
                res = res[:, ::2 ** (self.step - c), ::2 ** (self.step - c)]
            if dst is not None:
                res = dst.copy_(res)
        elif c is not None:  # the cells are 2**c blocks: nearest upsampling
            res = _nearest_into(self.features.new_empty(shape) if dst is None else dst,
                                self.features.reshape(B, -(-H // 2 ** c), -(-W // 2 ** c), C),
                                2 ** c)
        elif fill == "owner":
            owner = self.plan.geometry(self.step).owner[:, ::s, ::s].reshape(-1)
            if dst is not None and dst.is_contiguous():
                torch.index_select(self.features, 0, owner, out=dst.view(-1, C))
                res = dst
            else:  # index_select, not advanced indexing: 0.77x the time (2048 channels, 64x128)
                res = self.features.index_select(0, owner).reshape(shape)
                res = res if dst is None else dst.copy_(res)
        else:
            res = self.features.new_zeros(B, H, W, C)
            sites = self.plan.geometry(self.step).coords
            res[sites[:, 0], sites[:, 1], sites[:, 2]] = self.features
            res = res[:, ::s, ::s]
            res = res if dst is None else dst.copy_(res)
        if out is not None:
            return out
        return res.permute(0, 3, 1, 2) if channels_first else res

    def _dense_in_place(self) -> Optional[torch.Tensor]:
        """The owner-filled NHWC map on the finest grid, written over the features' own buffer
        (:meth:`dense` with ``consume``), or ``None`` where it is not this tensor's alone or
        has no room for the map. Cell ``p``'s owner site comes at or before ``p`` in raster
        order (a site's anchor is the top-left cell of the block it owns), so filling cells
        from the last to the first reads every row before it is overwritten: chunk by chunk,
        each chunk's rows gathered before they are written."""
        f = self._features
        B, (H, W), C = self.batch_size, self.plan.grid, f.shape[1]
        rows = B * H * W
        storage = f.untyped_storage()
        # Python references: the attribute and ``f`` (as _REFS_WHEN_EXCLUSIVE counted them on
        # this interpreter); tensors on the storage: ``f`` and the storage object above
        # (another view would be a third)
        if (f.requires_grad or f.grad_fn is not None or not f.is_contiguous()
                or f.storage_offset() != 0 or storage.nbytes() < rows * C * f.element_size()
                or sys.getrefcount(f) != _REFS_WHEN_EXCLUSIVE or _storage_users(storage) != 2):
            return None
        owner = self.plan.geometry(self.step).owner.reshape(-1)
        if bool((owner > torch.arange(rows, device=owner.device)).any()):
            return None  # a site order other than the plan's raster order: not safe in place
        buf = torch.empty(0, dtype=f.dtype, device=f.device).set_(storage, 0, (rows, C))
        chunk = max(1, _IN_PLACE_CHUNK_BYTES // max(1, C * f.element_size()))
        tmp = f.new_empty(min(chunk, rows), C)
        for stop in range(rows, 0, -chunk):
            start = max(0, stop - chunk)
            part = torch.index_select(f, 0, owner[start:stop], out=tmp[:stop - start])
            buf[start:stop].copy_(part)
        return buf.view(B, H, W, C)

    def _out_nhwc(self, out, shape, channels_first: bool) -> torch.Tensor:
        """``out`` checked against the result (``shape``: NHWC), as an NHWC view."""
        want = (shape[0], shape[3], shape[1], shape[2]) if channels_first else shape
        f = self.features
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a tensor, got {type(out).__name__}")
        if tuple(out.shape) != want or out.dtype != f.dtype or out.device != f.device:
            raise ValueError(
                f"out must be a {list(want)} {f.dtype} tensor on {f.device} (the densified "
                f"map), got {list(out.shape)} {out.dtype} on {out.device}; pass back an earlier "
                "result of the same call, or allocate one of that shape")
        if out.numel() and out.untyped_storage().data_ptr() == f.untyped_storage().data_ptr():
            raise ValueError("out shares memory with the features it would be filled from; "
                             "pass a separate buffer")
        return out.permute(0, 2, 3, 1) if channels_first else out

    # ------------------------------------------------------------------ derived tensors
    def replace_feature(self, feature: torch.Tensor, step: Optional[int] = None) -> "CADTensor":
        """A tensor with new features on the same plan, sharing the rulebook cache (``step``:
        the step of the new features, default this one's). spconv's modules call it with one
        argument."""
        step = self.step if step is None else step
        if (type(feature) is not torch.Tensor or feature.dim() != 2 or self._features is None
                or feature.device != self._features.device):
            return CADTensor(feature, self.plan, step, self.cache)  # full checks, clear errors
        # every op derives a tensor: built without the constructor (spconv's fx metaclass call,
        # its asserts and the device checks cost ~20 us each, ~5 ms per ResNet-101 forward)
        geo = self.plan.geometry(step)
        if feature.shape[0] != geo.num_sites:
            raise ValueError(f"features have {feature.shape[0]} rows, the plan has "
                             f"{geo.num_sites} sites at step {step}")
        new = object.__new__(CADTensor)
        new.__dict__.update(self.__dict__)
        new._features = feature
        new.indices = geo.indices
        new.step = step
        return new

    def shadow_copy(self) -> "CADTensor":
        return self.replace_feature(self.features)

    def select_by_index(self, valid_indices):
        raise NotImplementedError("a CADTensor's sites are fixed by its plan (a quadtree); "
                                  "select on x.dense() instead")

    def check_same_sites(self, other: "CADTensor", what: str = "operands"):
        if not isinstance(other, CADTensor):
            raise TypeError(f"{what}: expected a CADTensor, got {type(other).__name__}")
        if other.plan is not self.plan or other.step != self.step:
            raise ValueError(f"{what} must have the same sites (same plan object and step); got "
                             f"steps {self.step} and {other.step}")

    def __add__(self, other: "CADTensor") -> "CADTensor":
        self.check_same_sites(other, "residual add")
        return self.replace_feature(self.features + other.features)

    __radd__ = __add__

    def __iadd__(self, other: "CADTensor") -> "CADTensor":
        """In-place residual add (``out += identity``, as torchvision's blocks): no new feature
        matrix. Same autograd rules as an in-place add on a dense tensor."""
        self.check_same_sites(other, "residual add")
        self.features.add_(other.features)
        return self

    # ------------------------------------------------------------------ properties
    @property
    def features(self) -> torch.Tensor:
        f = self._features
        if f is None:
            raise RuntimeError("this CADTensor's features were released (by dense(consume=True), "
                               "which may overwrite them, or by release()): use what took them "
                               "(dense's map), or densify without consume to keep the tensor")
        return f

    @features.setter
    def features(self, value: torch.Tensor) -> None:
        self._features = value

    def release(self) -> None:
        """Drop this tensor's reference to its features, for a caller that owns the tensor
        and is done with it (their memory is freed once nothing else holds them); reading
        them afterwards raises."""
        self._features = None

    @property
    def num_sites(self) -> int:
        return self.features.shape[0]

    @property
    def num_channels(self) -> int:
        return self.features.shape[1]

    @property
    def device(self) -> torch.device:
        return self.features.device

    @property
    def dtype(self) -> torch.dtype:
        return self.features.dtype

    def __repr__(self) -> str:
        H, W = self.plan.grid
        if self._features is None:
            return (f"CADTensor(released, step={self.step}/{self.plan.num_levels}, grid={H}x{W}, "
                    f"batch={self.batch_size})")
        return (f"CADTensor(sites={self.num_sites}, channels={self.num_channels}, step={self.step}"
                f"/{self.plan.num_levels}, grid={H}x{W}, batch={self.batch_size}, "
                f"dtype={self.dtype}, device={self.device})")


# rows per chunk of the in-place densification: this many bytes (a scratch chunk in cache)
_IN_PLACE_CHUNK_BYTES = 1 << 20


class _Holder:
    _features = None


def _refs_when_exclusive() -> int:
    """``sys.getrefcount`` of a tensor held by one attribute and read into a local, as
    :meth:`CADTensor._dense_in_place` reads it (interpreters count borrowed references
    differently)."""
    holder = _Holder()
    holder._features = torch.empty(0)
    f = holder._features
    return sys.getrefcount(f)


_REFS_WHEN_EXCLUSIVE = _refs_when_exclusive()


def _storage_users(storage) -> Optional[int]:
    """How many tensors and storage objects hold ``storage`` (``None`` where this torch does
    not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else count(storage._cdata)


def features_with_room(plan: LevelPlan, step: int, channels: int, dtype: torch.dtype,
                       device=None) -> torch.Tensor:
    """An uninitialized ``[N, channels]`` feature matrix for the sites of ``plan`` at ``step``,
    the first rows of a buffer with room for their densified map on the finest grid: a
    tensor whose features are written into it can be densified in place
    (:meth:`CADTensor.dense` with ``consume``)."""
    B, (H, W) = plan.batch_size, plan.grid
    n = plan.num_sites(step)
    device = plan.device if device is None else device
    buffer = torch.empty(max(n, B * H * W), channels, dtype=dtype, device=device)
    # set_, not a slice: a slice would keep the whole tensor alive as its base (autograd's
    # view tracking), a second holder of the buffer
    return buffer.new_empty(0).set_(buffer.untyped_storage(), 0, (n, channels))


def _nearest_into(dst: torch.Tensor, cells: torch.Tensor, cell: int) -> torch.Tensor:
    """Nearest upsampling of the NHWC map ``cells`` by ``cell`` into the NHWC ``dst`` (cropped
    to its size): one broadcast copy per part (full blocks, the last partial block row and
    column, their corner), no intermediate."""
    B, H, W, C = dst.shape
    rows = [(0, H // cell, cell)] + ([(H // cell, 1, H % cell)] if H % cell else [])
    cols = [(0, W // cell, cell)] + ([(W // cell, 1, W % cell)] if W % cell else [])
    for i, n, h in rows:  # (first cell, cells, rows per cell)
        for j, m, w in cols:
            if n and m:
                part = dst[:, i * cell:i * cell + n * h, j * cell:j * cell + m * w]
                part.unflatten(1, (n, h)).unflatten(3, (m, w)).copy_(
                    cells[:, i:i + n, None, j:j + m, None].expand(B, n, h, m, w, C))
    return dst
