"""The engine protocol and the registry every engine name comes from.

An engine computes a conv (and a max pool) given a rulebook: ``features [N_in, C_in]`` +
``weight`` (``torch.nn.Conv2d`` layout ``[C_out, C_in / groups, kh, kw]``) -> ``[N_out, C_out]``.
Each engine lives in its own module and registers one instance here; ``ENGINES``, ``"auto"``,
``"tuned"``, help texts and docs are all derived from the registry, so adding an engine means
writing one module.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..rulebook import Rulebook

__all__ = ["Engine", "EngineUnsupported", "register", "get_engine", "registered",
           "gather_max", "check_bias"]


class EngineUnsupported(ValueError):
    """An engine was asked for something it cannot run (the message names what to use)."""


class Engine:
    """One way of running convs on rulebooks.

    Subclasses set :attr:`name` and :attr:`summary` and implement :meth:`conv`; they override
    :meth:`check` to refuse what they cannot run (raising with a message that names an
    alternative), :meth:`prepare` to build what they read from a rulebook ahead of time, and
    :meth:`max` if they have their own max pool.
    """

    #: the name users pass as ``engine=...``
    name: str = ""
    #: one line for help texts and docs
    summary: str = ""
    #: whether half-precision (float16) convs are summed in the dtype itself rather than in
    #: float32 (spconv's kernels: every tap's GEMM output is added into the output); such
    #: results are less accurate than the others', so ``"tuned"`` leaves these engines out of
    #: half-precision layers
    sums_half_in_dtype: bool = False
    #: whether :meth:`conv` takes ``relu=``, ``residual=`` and ``residual_inplace=`` and may
    #: fuse them into the conv (:mod:`.epilogue`); other engines' outputs get them applied
    #: afterwards
    fuses_epilogue: bool = False
    #: whether :meth:`conv` takes ``out=`` (a ``[N_out, C_out]`` tensor) and returns it with
    #: the result written where it can (else it returns a fresh result, copied into ``out``)
    writes_out: bool = False

    def check(self, features: torch.Tensor, weight: torch.Tensor, groups: int,
              book: Rulebook) -> None:
        """Raise (``EngineUnsupported``, ``TypeError``, ``SpconvUnavailable``, ...) if this
        engine cannot run the call; return ``None`` if it can."""

    def supports(self, features, weight, groups: int, book: Rulebook) -> bool:
        try:
            self.check(features, weight, groups, book)
        except Exception:
            return False
        return True

    def prepare(self, book: Rulebook, like: Optional[Rulebook] = None) -> None:
        """Build everything :meth:`conv` reads from ``book`` (a first call builds it lazily),
        so geometry can be timed apart from compute. ``like``: a rulebook of the same geometry
        that forwards already ran on; where what :meth:`conv` builds depends on the features
        (the lattice split on their dtype and width), build what those forwards built."""
        book.padded()

    def conv(self, features: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             book: Rulebook, groups: int) -> torch.Tensor:
        raise NotImplementedError

    def max(self, features: torch.Tensor, book: Rulebook) -> torch.Tensor:
        """Max over the taps of ``book`` (out-of-grid taps ignored). ``[N_out, C]``."""
        return gather_max(features, book)

    def __repr__(self) -> str:
        return f"<engine {self.name!r}: {self.summary}>"


_REGISTRY: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Add an engine instance under its name (registration order is the order of
    ``ENGINES`` and of the ``"tuned"`` candidates)."""
    if not engine.name or engine.name in ("auto", "tuned"):
        raise ValueError(f"invalid engine name {engine.name!r}")
    if engine.name in _REGISTRY:
        raise ValueError(f"an engine named {engine.name!r} is already registered")
    _REGISTRY[engine.name] = engine
    return engine


def registered() -> dict[str, Engine]:
    """Name -> engine, in registration order."""
    return dict(_REGISTRY)


def get_engine(name: str) -> Engine:
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(("auto", "tuned") + tuple(_REGISTRY))
        raise ValueError(f"unknown engine {name!r}; choose one of {names}") from None


# Upper bound on gathered elements held at once by gather loops (64 MiB of fp32).
CHUNK_ELEMENTS = 1 << 24


def gather_max(features: torch.Tensor, book: Rulebook) -> torch.Tensor:
    """Max over the taps of ``book``; an out-of-grid tap reads ``-inf`` (ignored)."""
    n_in, c = features.shape
    if n_in != book.num_in:
        raise ValueError(f"features have {n_in} rows, the rulebook expects {book.num_in}")
    padded = torch.cat([features, features.new_full((1, c), float("-inf"))])
    index = book.padded()
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, book.num_taps * c))
    outs = [padded[index[s:s + rows_per_chunk]].max(dim=1).values
            for s in range(0, book.num_out, rows_per_chunk)]
    if not outs:
        return features.new_empty(0, c)
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def check_bias(bias: Optional[torch.Tensor], c_out: int) -> None:
    """A conv's bias: ``None`` or one value per output channel, as ``F.conv2d`` requires (some
    engines would broadcast a single value, others fail deep inside)."""
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (c_out,)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias has shape {got}, the weight's {c_out} output channels need "
                         f"({c_out},)")
