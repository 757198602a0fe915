"""Rulebooks (indice pairs) for convs and pools on multi-resolution tensors.

A rulebook says, for every output site and kernel tap, which input site is read. It is built
from the plan's owner map with the dilation-scaled submanifold rule of ``SEMANTICS.md``:
output site ``p`` reads ``q = p + D*o`` with ``D = d * 2**step_in``; out-of-grid taps read zero
(``-1``), in-grid taps read the owner of ``q`` (parent-patch fill). All vectorized.

Two kinds, one base class:

- :class:`ConvRulebook` (:func:`conv_rulebook`): a conv or overlapping pool on a plan. It keeps
  its plan and builds its gather table on first use; it can also be split along the coarse
  lattice (:meth:`ConvRulebook.lattice`): at step ``t`` every finest cell whose coordinates are
  multiples of ``2**t`` is itself a site (a block of level ``<= t`` always has a site at its
  top-left corner), so those sites form a complete dense grid at stride ``f * 2**t``, on which
  the layer is an ordinary dense conv with the layer's own dilation.
- :class:`GatherRulebook`: an explicit gather table (the 2x2 window pool, hand-built tables).

Rulebooks depend only on the plan and the layer geometry, so they are cached in a
:class:`RulebookCache` under typed keys (:class:`ConvKey`, :class:`Pool2Key`) that know how to
build their rulebook; the cache travels with every tensor derived from the same input, so a
ResNet builds a handful per forward, not one per layer. Formats an engine derives from a
rulebook (spconv's pairs, implicit-GEMM tables, ...) are cached on the rulebook itself
(:meth:`Rulebook.derived`) and die with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .plan import LevelPlan

__all__ = ["Rulebook", "ConvRulebook", "GatherRulebook", "RulebookCache", "LatticeSplit",
           "PhaseConv", "TapProducts",
           "ConvKey", "Pool2Key", "RulebookKey", "conv_rulebook", "pool2_rulebook"]


@dataclass(frozen=True)
class PhaseConv:
    """The sites of one off-lattice phase of a stride-1 conv at step ``t >= 1``, computed as a
    dense conv on that phase's grid (see :class:`LatticeSplit`).

    A phase is the sub-grid of finest cells at ``(a + 2**t * i, b + 2**t * j)``. The taps of a
    stride-1 conv at step ``t`` are ``D = d * 2**t`` apart, so a site of the phase reads only
    cells of its own phase: on the phase grid ``[B, *grid]``, filled with the owner of every
    cell (``in_rows``, raster order over ``[images, *grid]`` for the images whose phase runs
    densely), the layer is an ordinary dense conv with the layer's own dilation, zero padding
    included (a tap leaves the phase grid exactly where it leaves the finest grid). Its output
    at ``positions`` (flat, over ``[images, *grid]``) are the output rows ``out_rows``."""

    offset: tuple[int, int]
    grid: tuple[int, int]
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class LatticeSplit:
    """A conv rulebook split into a dense part on the coarse lattice and a gathered rest.

    The dense part reads the input sites on the lattice of ``step_in`` (``in_rows``, raster
    order over ``[B, *in_grid]``; ``None`` when they are all input rows in order, as at step 0)
    and writes the output sites on the lattice of ``step_out`` (``out_rows`` over
    ``[B, *out_grid]``, ``None`` likewise): a dense conv with ``stride`` (1, or 2 for an adaptive
    step), the layer's ``dilation`` and same padding.

    ``finest``: every input and output site is a finest-grid cell (nothing merged: the feature
    matrices are the NHWC maps of the whole grid), so the layer is one dense conv on the finest
    grid with its taps ``dilation * 2**step_in`` apart and stride 1, no lattice and no rest.

    The rest are the output sites off that lattice: ``rest_rows`` (sites whose taps all lie in
    the grid first, ``num_inside`` of them, then the border sites), read through
    ``rest_index`` ``[R, K]`` (in-grid input rows; a border site's out-of-grid taps point at an
    input row of its own image, so nothing of another image is ever read, and are zeroed after
    the gather). ``border_zeros`` lists those taps as ascending positions ``site * K + tap`` in
    the im2col rows of the border sites (site counted from the first border site), and
    ``border_zero_offsets`` (CPU, ``[R - num_inside + 1]``) where each site's positions start,
    so a chunk of sites finds its taps without a device sync.

    The border sites are ordered by the kernel rows they have inside the grid (a tap's row
    leaves the grid for all of its columns at once): ``row_groups`` lists ``(start, stop,
    first_row, stop_row)`` over the rest rows, covering ``num_inside..R``, the sites of a group
    having kernel rows ``first_row..stop_row - 1`` inside. A gather may read only those rows'
    taps (the ASPP's wide rates put a third to half of a border site's taps on outside rows);
    ``row_zeros`` / ``row_zero_offsets`` are then the taps to zero, like ``border_zeros`` but
    only those on inside rows, as ``site * K + tap - first_row * kw``.

    ``phases``: off-lattice phases of a stride-1 conv at step >= 1 whose sites are computed by a
    dense conv on the phase grid (:class:`PhaseConv`) instead of the gather; their sites are not
    in the rest. Chosen where the dense conv costs less (:meth:`ConvRulebook.lattice`): densely
    kept regions and wide dilated convs (the ASPP, where most taps of a site are padding).
    """

    batch: int
    in_grid: tuple[int, int]
    out_grid: tuple[int, int]
    in_rows: Optional[torch.Tensor]
    out_rows: Optional[torch.Tensor]
    stride: int
    rest_rows: torch.Tensor
    rest_index: torch.Tensor
    num_inside: int
    border_zeros: torch.Tensor
    border_zero_offsets: torch.Tensor
    finest: bool = False
    phases: tuple[PhaseConv, ...] = ()
    row_groups: tuple[tuple[int, int, int, int], ...] = ()
    row_zeros: Optional[torch.Tensor] = None
    row_zero_offsets: Optional[torch.Tensor] = None

    @property
    def num_rest(self) -> int:
        return self.rest_rows.shape[0]


@dataclass(frozen=True)
class TapProducts:
    """A conv rulebook in the products-first order (engine ``"products"``): every input row
    times the filters of every tap first, then each output site sums the products its taps read.

    A site ``D`` cells away through a kernel row reads, in raster order, one range of each
    image's input rows (the rows from ``D`` on, or up to ``H - D``): ``pieces`` lists
    ``(kernel_row, start, stop)`` per kernel row and image, and a piece's products are
    ``features[start:stop] @ W_t`` for each tap ``t`` of that kernel row (``W_t`` ``[C_in,
    C_out]``), no gather. Stacked piece after piece and, within a piece, tap after tap, they
    form ``num_rows * kw`` rows of ``C_out``, then a zero row; output site ``i`` is the sum of
    the rows ``index[i]`` (``[N_out, K]``; an out-of-grid tap reads the zero row).

    What it saves: the gather of ``K * C_in`` elements per site becomes a gather of ``K *
    C_out`` products, so it pays where ``C_in`` is several times ``C_out`` (the ASPP's
    2048 -> 256). What it spends: the products of rows a piece holds but a tap does not read
    (input rows within ``D`` of the left and right edges, for the taps that would leave the
    grid there), which a dense conv skips."""

    pieces: tuple[tuple[int, int, int], ...]
    num_rows: int
    index: torch.Tensor


class Rulebook:
    """Input row per (output site, tap): :attr:`gather` ``[N_out, K]`` int64, ``-1`` for a tap
    that reads zero (outside the grid). Taps are in row-major kernel order, matching
    ``weight.flatten(2)`` of a ``torch.nn.Conv2d`` and spconv's ``[C_out, kh, kw, C_in]``
    filters."""

    def __init__(self, num_in: int, kernel_size: tuple[int, int], step_in: int, step_out: int):
        self.num_in = int(num_in)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.step_in = int(step_in)
        self.step_out = int(step_out)
        self._derived: dict[Any, Any] = {}

    # ------------------------------------------------------------------ the table
    @property
    def gather(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def num_out(self) -> int:
        return self.gather.shape[0]

    @property
    def num_taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def is_identity(self) -> bool:
        """A 1x1 conv on the same site set: output row i reads input row i."""
        return self.num_taps == 1 and self.step_in == self.step_out

    @property
    def device(self) -> torch.device:
        return self.gather.device

    def __repr__(self) -> str:
        kh, kw = self.kernel_size
        return (f"{type(self).__name__}({kh}x{kw}, steps {self.step_in}->{self.step_out}, "
                f"in={self.num_in}, out={self.num_out})")

    # ------------------------------------------------------------------ derived formats
    def derived(self, tag, build: Callable[[], Any]):
        """``build()`` once per rulebook and ``tag``, kept for the rulebook's lifetime: the home
        of every format an engine derives from the table."""
        value = self._derived.get(tag)
        if value is None:
            value = self._derived[tag] = build()
        return value

    def has_derived(self, tag) -> bool:
        """Whether the format ``tag`` was built (by :meth:`derived`) on this rulebook."""
        return tag in self._derived

    def rows(self) -> torch.Tensor:
        """1x1 rulebooks: the input row of every output site, contiguous (``gather[:, 0]``)."""
        if self.num_taps != 1:
            raise ValueError(f"rows() is for 1x1 rulebooks; this one has {self.num_taps} taps")
        return self.derived("rows", lambda: self.gather[:, 0].contiguous())

    def rows_in_order(self) -> bool:
        """1x1 rulebooks: output row i reads input row i (an adaptive step that merged
        nothing), so the rows need no gather."""
        def check():
            rows = self.rows()
            return bool(self.num_in == self.num_out and torch.equal(
                rows, torch.arange(self.num_out, device=rows.device)))
        return self.derived("rows_in_order", check)

    def padded(self) -> torch.Tensor:
        """``gather`` with ``-1`` replaced by ``num_in`` (a zero / sentinel row appended)."""
        return self.derived("padded", lambda: torch.where(self.gather < 0, self.num_in,
                                                          self.gather))

    def num_pairs(self) -> int:
        """Number of (input, output, tap) reads: what a gather-GEMM-scatter engine multiplies."""
        return int((self.gather >= 0).sum())

    def spconv_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """spconv's native format: ``indice_pairs`` int32 ``[2, K, N_out]`` (row 0 input, row 1
        output, valid entries first per tap, rest ``-1``) and ``indice_pair_num`` int32 ``[K]``
        (what ``spconv.pytorch.functional.indice_conv`` reads)."""
        return self.derived("spconv_pairs", self._build_spconv_pairs)

    def _build_spconv_pairs(self):
        gather = self.gather
        valid = gather >= 0
        # stable sort puts the valid rows of each tap first, keeping output order
        order = torch.sort((~valid).to(torch.int8), dim=0, stable=True).indices
        inp = torch.gather(gather, 0, order)
        counts = valid.sum(0)
        rows = torch.arange(self.num_out, device=gather.device)[:, None]
        used = rows < counts[None, :]
        out = torch.where(used, order, -1)
        inp = torch.where(used, inp, -1)
        pairs = torch.stack([inp.t(), out.t()]).to(torch.int32).contiguous()
        return pairs, counts.to(torch.int32)


class GatherRulebook(Rulebook):
    """A rulebook given by its gather table ``[N_out, K]`` (``-1`` = reads zero)."""

    def __init__(self, gather: torch.Tensor, num_in: int, kernel_size: tuple[int, int],
                 step_in: int = 0, step_out: int = 0):
        if not isinstance(gather, torch.Tensor) or gather.dim() != 2:
            raise ValueError("gather must be an int64 tensor [N_out, K]")
        super().__init__(num_in, kernel_size, step_in, step_out)
        if gather.shape[1] != self.num_taps:
            raise ValueError(f"gather has {gather.shape[1]} taps per row, a "
                             f"{self.kernel_size[0]}x{self.kernel_size[1]} kernel has "
                             f"{self.num_taps}")
        self._gather = gather

    @property
    def gather(self) -> torch.Tensor:
        return self._gather


class ConvRulebook(Rulebook):
    """The rulebook of a conv (or overlapping pool) on a plan, read from step ``step_in`` and
    written to the sites of ``step_out``. The gather table and the lattice split are built on
    first use, so an engine that only needs the split never builds the full table."""

    def __init__(self, plan: LevelPlan, kernel_size: tuple[int, int], dilation: tuple[int, int],
                 step_in: int, step_out: int):
        super().__init__(plan.num_sites(step_in), kernel_size, step_in, step_out)
        self.plan = plan
        self.dilation = (int(dilation[0]), int(dilation[1]))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", dilation={self.dilation})"

    @property
    def gather(self) -> torch.Tensor:
        return self.derived("gather", self._build_gather)

    @property
    def num_out(self) -> int:
        return self.plan.num_sites(self.step_out)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    def lattice(self, gather_cost: float = 1.0, inside_rows: bool = False) -> LatticeSplit:
        """The coarse-lattice split (cached per argument); see :class:`LatticeSplit`. Only
        under the paper's semantics: there the lattice sites compute the strided network
        (Guarantee 2).

        ``gather_cost``: what a gathered multiply-add costs against a dense conv's (the
        engine's estimate for the layer's channels); an off-lattice phase of a stride-1 conv
        runs densely where the dense conv's multiply-adds over the phase grid, padded taps
        skipped as oneDNN / cuDNN skip them, are at most ``gather_cost`` times the gather's:
        the phase's sites times every tap or, with ``inside_rows`` (the engine gathers only a
        site's kernel rows inside the grid, ``LatticeSplit.row_groups``), times the taps of
        the phase grid's mean number of inside kernel rows."""
        if self.plan.semantics != "paper":
            raise ValueError(f"a lattice split needs the paper's semantics (Guarantee 2); this "
                             f"plan has semantics={self.plan.semantics!r}")
        gather_cost, inside_rows = float(gather_cost), bool(inside_rows)
        return self.derived(("lattice", gather_cost, inside_rows),
                            lambda: self._build_lattice(gather_cost, inside_rows))

    def products(self) -> TapProducts:
        """The products-first form of this rulebook (cached); see :class:`TapProducts`."""
        return self.derived("products", self._build_products)

    def lattice_args(self) -> tuple[tuple[float, bool], ...]:
        """The ``(gather_cost, inside_rows)`` of every lattice split built so far."""
        return tuple(tag[1:] for tag in self._derived if tag[0] == "lattice")

    # ------------------------------------------------------------------ internals
    def _offsets(self, device):
        spacing = (self.dilation[0] * 2 ** self.step_in, self.dilation[1] * 2 ** self.step_in)
        return _tap_offsets(self.kernel_size, spacing, device)

    def _reads(self, coords: torch.Tensor) -> torch.Tensor:
        """Input rows read by the output sites at ``coords`` (``[N, K]``, -1 outside)."""
        oy, ox = self._offsets(coords.device)
        anchor = None
        if self.plan.semantics == "reference" and self.num_taps > 1:  # a 1x1 conv is per site
            # the paper's code measures a site's taps from the centre cell 2**l // 2 of its
            # block, l its level where the conv runs (step_in: an adaptive step computes at
            # the step_in site in the top-left corner of the merged block, then keeps it)
            level = self.plan.levels[coords[:, 0], coords[:, 1], coords[:, 2]]
            anchor = (1 << level.clamp(max=self.step_in)) >> 1
        return _read_owner(self.plan, self.step_in, coords, oy, ox, anchor)

    def _build_gather(self) -> torch.Tensor:
        return self._reads(self.plan.geometry(self.step_out).coords)

    def _build_lattice(self, gather_cost: float, inside_rows: bool) -> LatticeSplit:
        plan = self.plan
        B, (H, W) = plan.batch_size, plan.grid
        s_in, s_out = 2 ** self.step_in, 2 ** self.step_out
        in_grid = (-(-H // s_in), -(-W // s_in))
        out_grid = (-(-H // s_out), -(-W // s_out))
        geo_out = plan.geometry(self.step_out)
        cells = B * H * W
        if plan.num_sites(self.step_in) == cells and geo_out.num_sites == cells:
            empty = geo_out.coords.new_empty(0)
            return LatticeSplit(batch=B, in_grid=(H, W), out_grid=(H, W), in_rows=None,
                                out_rows=None, stride=1, rest_rows=empty,
                                rest_index=empty.view(0, self.num_taps), num_inside=0,
                                border_zeros=empty,
                                border_zero_offsets=torch.zeros(1, dtype=torch.long),
                                finest=True, row_zeros=empty,
                                row_zero_offsets=torch.zeros(1, dtype=torch.long))
        # every lattice cell is a site of its step, so the owner there is the site itself; when
        # the lattice cells are all the sites, raster order makes them the rows as they are
        in_rows = None
        if self.step_in > 0 and plan.num_sites(self.step_in) != B * in_grid[0] * in_grid[1]:
            in_rows = plan.geometry(self.step_in).owner[:, ::s_in, ::s_in].reshape(-1)
        out_rows = None
        if self.step_out > 0 and geo_out.num_sites != B * out_grid[0] * out_grid[1]:
            out_rows = geo_out.owner[:, ::s_out, ::s_out].reshape(-1)
        coords = geo_out.coords
        off = ((coords[:, 1] | coords[:, 2]) & (s_out - 1)) != 0
        phases = ()
        if self.step_in == self.step_out > 0:
            phases, dense = self._dense_phases(coords, off, gather_cost, inside_rows)
            off &= ~dense
        rest_rows = off.nonzero()[:, 0]
        gather = self._reads(coords[rest_rows])
        valid = gather >= 0
        inside = valid.all(1)
        kh, kw = self.kernel_size
        rows_in = valid.view(-1, kh, kw).any(2)  # kernel rows inside the grid: one range
        first = rows_in.to(torch.int8).argmax(1)
        stop = kh - rows_in.flip(1).to(torch.int8).argmax(1)
        # inside sites first, then the border sites by row group (all rows inside first)
        group = torch.where(inside, -1, first * (kh + 1) + (kh - stop))
        order = torch.argsort(group, stable=True)
        rest_rows, gather, valid = rest_rows[order], gather[order], valid[order]
        num_inside = int(inside.sum())
        first, stop, rows_in = first[order][num_inside:], stop[order][num_inside:], rows_in[order]
        # an out-of-grid tap reads (and then zeroes) the row of the centre tap, which lies in
        # the site's own image: zeroing by multiplication turns an inf / NaN read into NaN, so
        # a row of another image must never be read
        centre = (self.kernel_size[0] // 2) * self.kernel_size[1] + self.kernel_size[1] // 2
        index = torch.where(valid, gather, gather[:, centre:centre + 1])
        # zeroing only the out-of-grid tap rows of the im2col block (index_fill_) is several
        # times cheaper than a masked fill over the whole block: the ASPP's wide taps make most
        # of its sites border sites
        outside = ~valid[num_inside:]
        zeros = outside.reshape(-1).nonzero()[:, 0]
        offsets = torch.zeros(outside.shape[0] + 1, dtype=torch.long)
        offsets[1:] = outside.sum(1).cumsum(0).cpu()
        # the same for gathers of only the inside kernel rows
        on_rows = outside & rows_in[num_inside:].repeat_interleave(kw, 1)
        site, tap = on_rows.nonzero().unbind(1)
        row_zeros = site * self.num_taps + tap - first[site] * kw
        row_offsets = torch.zeros(outside.shape[0] + 1, dtype=torch.long)
        row_offsets[1:] = on_rows.sum(1).cumsum(0).cpu()
        keys, counts = torch.unique_consecutive(first * (kh + 1) + stop, return_counts=True)
        groups, start = [], num_inside
        for key, n in zip(keys.tolist(), counts.tolist()):  # a few groups: small CPU loop
            groups.append((start, start + n, key // (kh + 1), key % (kh + 1)))
            start += n
        return LatticeSplit(
            batch=B, in_grid=in_grid, out_grid=out_grid, in_rows=in_rows, out_rows=out_rows,
            stride=s_out // s_in, rest_rows=rest_rows, rest_index=index,
            num_inside=num_inside, border_zeros=zeros, border_zero_offsets=offsets,
            phases=phases, row_groups=tuple(groups), row_zeros=row_zeros,
            row_zero_offsets=row_offsets)

    def _build_products(self) -> TapProducts:
        kh, kw = self.kernel_size
        B = self.plan.batch_size
        taps = self.gather.view(-1, kh, kw)
        device = taps.device
        valid = taps >= 0
        # the piece of every tap: kernel row * B + the image of its output site (a site reads
        # only its own image)
        image = self.plan.geometry(self.step_out).coords[:, 0]
        piece = torch.arange(kh, device=device)[None, :, None] * B + image[:, None, None]
        piece = piece.expand_as(taps)
        start = torch.full((kh * B,), self.num_in, dtype=torch.long, device=device)
        stop = torch.zeros(kh * B, dtype=torch.long, device=device)
        start.scatter_reduce_(0, piece[valid], taps[valid], "amin")
        stop.scatter_reduce_(0, piece[valid], taps[valid] + 1, "amax")
        size = (stop - start).clamp(min=0)
        first = torch.cumsum(size, 0) - size  # where each piece's products begin
        bounds = torch.stack([start, stop], 1).tolist()  # the one sync, at build
        pieces = tuple((p // B, a, b) for p, (a, b) in enumerate(bounds) if b > a)
        num_rows = sum(b - a for _, a, b in pieces)
        column = torch.arange(kw, device=device)
        index = (first * kw - start)[piece] + column * size[piece] + taps
        index = torch.where(valid, index, num_rows * kw).view(-1, kh * kw)
        return TapProducts(pieces=pieces, num_rows=num_rows, index=index)

    def _dense_phases(self, coords: torch.Tensor, off: torch.Tensor, gather_cost: float,
                      inside_rows: bool):
        """The off-lattice phases computed densely (:class:`PhaseConv`; see :meth:`lattice`)
        and a mask of their sites over ``coords``. Decided per image and phase, so how an
        image's sites are computed (hence their rounding) never depends on another image."""
        plan, s = self.plan, 2 ** self.step_in
        B, (H, W) = plan.batch_size, plan.grid
        phase = (coords[:, 1] & (s - 1)) * s + (coords[:, 2] & (s - 1))
        key = coords[:, 0] * (s * s) + phase
        counts = torch.bincount(key[off], minlength=B * s * s).view(B, s * s).cpu()  # one sync
        owner = plan.geometry(self.step_in).owner
        dense = torch.zeros_like(off)
        parts = []
        for p in range(1, s * s):
            a, b = divmod(p, s)
            grid = (-(-(H - a) // s), -(-(W - b) // s))
            if min(grid) <= 0:
                continue
            (kh, kw), (dh, dw) = self.kernel_size, self.dilation
            inside_kh = _mean_taps_in_grid(grid[0], kh, dh)  # mean kernel rows inside
            taps = inside_kh * _mean_taps_in_grid(grid[1], kw, dw)
            gathered = inside_kh * kw if inside_rows else self.num_taps
            n = counts[:, p]
            chosen = ((n > 0) & (taps * grid[0] * grid[1] <= gather_cost * n * gathered)
                      ).nonzero()[:, 0]
            if not chosen.numel():
                continue
            images = chosen.to(coords.device)
            slot = torch.full((B,), -1, dtype=torch.long, device=coords.device)
            slot[images] = torch.arange(images.numel(), device=coords.device)
            sites = off & (phase == p) & (slot[coords[:, 0]] >= 0)
            rows = sites.nonzero()[:, 0]
            c = coords[rows]
            positions = ((slot[c[:, 0]] * grid[0] + (c[:, 1] - a) // s) * grid[1]
                         + (c[:, 2] - b) // s)
            parts.append(PhaseConv(offset=(a, b), grid=grid,
                                   in_rows=owner[images, a::s, b::s].reshape(-1),
                                   out_rows=rows, positions=positions))
            dense |= sites
        return tuple(parts), dense


def _mean_taps_in_grid(size: int, k: int, d: int) -> float:
    """Mean over the positions of a grid axis of ``size`` of the taps (``k`` of them, ``d``
    apart, centred) that fall inside the axis."""
    i = torch.arange(size)[:, None] + d * torch.arange(-(k // 2), k // 2 + 1)[None]
    return float(((i >= 0) & (i < size)).sum()) / size


# ---------------------------------------------------------------------- typed keys
@dataclass(frozen=True)
class ConvKey:
    """Cache key of a conv rulebook: kernel, dilation, steps. ``build(plan)`` makes it."""

    kernel_size: tuple[int, int]
    dilation: tuple[int, int]
    step_in: int
    step_out: int

    def build(self, plan: LevelPlan) -> ConvRulebook:
        return conv_rulebook(plan, self.kernel_size, self.dilation, self.step_in, self.step_out)


@dataclass(frozen=True)
class Pool2Key:
    """Cache key of the 2x2/2 window-pool rulebook read from ``step_in``."""

    step_in: int

    def build(self, plan: LevelPlan) -> GatherRulebook:
        return pool2_rulebook(plan, self.step_in)


RulebookKey = Union[ConvKey, Pool2Key]


class RulebookCache:
    """Rulebooks of one plan, keyed by :data:`RulebookKey`, shared by all tensors derived from
    one input. It belongs to the first plan it serves; another plan is refused (the keys do not
    name the plan, so its rulebooks would read the wrong sites)."""

    def __init__(self):
        self._books: dict[RulebookKey, Rulebook] = {}
        self.plan: Optional[LevelPlan] = None
        self.builds = 0  # how many rulebooks were built (for tests and profiling)

    def bind(self, plan: LevelPlan) -> None:
        """Tie the cache to ``plan``; raises if it already serves another plan."""
        if self.plan is None:
            self.plan = plan
        elif plan is not self.plan:
            raise ValueError("this RulebookCache holds the rulebooks of another plan; a tensor "
                             "on a new plan needs its own cache (leave cache= out)")

    def get(self, key: RulebookKey, plan: LevelPlan) -> Rulebook:
        self.bind(plan)
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = key.build(plan)
            self.builds += 1
        return book

    def keys(self) -> list[RulebookKey]:
        return list(self._books)

    def items(self) -> list[tuple[RulebookKey, Rulebook]]:
        return list(self._books.items())

    def __len__(self) -> int:
        return len(self._books)


# ---------------------------------------------------------------------- building
def _tap_offsets(kernel_size, spacing, device):
    kh, kw = kernel_size
    dy, dx = spacing
    oy = (torch.arange(kh, device=device) - kh // 2) * dy
    ox = (torch.arange(kw, device=device) - kw // 2) * dx
    return oy.repeat_interleave(kw), ox.repeat(kh)


def _read_owner(plan: LevelPlan, step_in: int, coords: torch.Tensor, oy: torch.Tensor,
                ox: torch.Tensor, anchor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Input row read at ``coords (+ anchor) + (oy, ox)`` per tap; ``-1`` outside the grid.
    Reads a ``-1``-padded owner map, so the taps need no bounds checks."""
    reach = int(anchor.max()) if anchor is not None and anchor.numel() else 0
    py = max(int(oy.abs().max()) if oy.numel() else 0, 0) + reach
    px = max(int(ox.abs().max()) if ox.numel() else 0, 0) + reach
    owner = plan.padded_owner(step_in, (py, px))
    qy = coords[:, 1:2] + (oy + py)[None]
    qx = coords[:, 2:3] + (ox + px)[None]
    if anchor is not None:
        qy = qy + anchor[:, None]
        qx = qx + anchor[:, None]
    return owner[coords[:, 0:1], qy, qx]


def conv_rulebook(plan: LevelPlan, kernel_size: tuple[int, int], dilation: tuple[int, int],
                  step_in: int, step_out: int) -> ConvRulebook:
    """Rulebook of a conv (or overlapping pool) read from step ``step_in``, written to the sites
    of ``step_out`` (``step_in`` for stride 1, ``step_in + 1`` for an adaptive step)."""
    kh, kw = kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel size must be odd (same padding), got {kh}x{kw}")
    if step_out not in (step_in, step_in + 1):
        raise ValueError(f"step_out must be step_in or step_in + 1, got {step_in} -> {step_out}")
    return ConvRulebook(plan, (kh, kw), dilation, step_in, step_out)


def pool2_rulebook(plan: LevelPlan, step_in: int) -> GatherRulebook:
    """2x2/2 window pool (VGG): a merged site reads its (up to) four children at spacing
    ``2**step_in``; a site kept at its level passes through (only tap 0)."""
    step_out = step_in + 1
    coords = plan.geometry(step_out).coords
    s = 2 ** step_in
    dev = coords.device
    oy = torch.tensor([0, 0, s, s], device=dev)
    ox = torch.tensor([0, s, 0, s], device=dev)
    gather = _read_owner(plan, step_in, coords, oy, ox)
    merged = plan.levels[coords[:, 0], coords[:, 1], coords[:, 2]] >= step_out
    gather[:, 1:] = torch.where(merged[:, None], gather[:, 1:], -1)
    return GatherRulebook(gather, plan.num_sites(step_in), (2, 2), step_in, step_out)
