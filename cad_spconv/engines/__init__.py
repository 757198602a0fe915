"""Conv execution engines: rulebook + features + weight -> output features.

Every engine is one module registering one :class:`~cad_spconv.engines.base.Engine`; the names
users pass (``engine="..."``) are :data:`ENGINES`:

- ``"auto"``: the engine :func:`select_engine` picks for the layer (measured fastest); a conv
  on grids of cells (``LevelPlan.grid_level``) is run by ``cad_spconv.functional.conv2d`` as
  the dense conv, before any engine;
- ``"tuned"``: times every engine that can run a layer shape on its first call and keeps the
  fastest (:mod:`~cad_spconv.engines.tuned`);
- the registered engines, in order: ``"lattice"`` (:mod:`.lattice`), ``"torch"``
  (:mod:`.gather`), ``"spconv"`` (:mod:`.spconv_native`), ``"spconv-igemm"``
  (:mod:`.spconv_igemm`), ``"products"`` (:mod:`.products`). :func:`describe` lists them
  with what each supports.

On CPUs with AMX or AVX512-BF16, by default: :mod:`.fused`, a C++ kernel for the lattice
engine's mixed-level 3x3 convs in bfloat16 and float32 (compiled on first use;
``CAD_SPCONV_FUSED_GATHER=0`` or ``fused.enable(False)`` turns it off, ``=1`` /
``fused.enable()`` makes it required).

All engines compute the same values (one exactness test runs them all against a dense
reference); they differ in speed and in what they support. Weights are in ``torch.nn.Conv2d``
layout ``[C_out, C_in / groups, kh, kw]``.
"""
from __future__ import annotations

# registration order = the order of ENGINES and of the "tuned" candidates
from . import lattice  # noqa: F401  isort:skip
from . import gather  # noqa: F401  isort:skip
from . import spconv_native  # noqa: F401  isort:skip
from . import spconv_igemm  # noqa: F401  isort:skip
from . import products  # noqa: F401  isort:skip
from .base import Engine, EngineUnsupported, check_bias, get_engine, register, registered
from .dispatch import (check_engine, conv_dtype, engine_names, prepare,
                       select_engine, sparse_conv, sparse_max)
from .layouts import (cache_use, cached_bytes, clear_caches, held_bytes, kept_tensors,
                      krsc_filters, weight_layout, weights_epoch, workspace_scope)
from .tuned import clear_tuned, tuned_choices, tuned_engines

__all__ = ["ENGINES", "Engine", "EngineUnsupported", "register", "registered", "get_engine",
           "engine_names", "check_engine", "check_bias", "select_engine", "prepare", "sparse_conv",
           "conv_dtype", "sparse_max", "describe", "tuned_choices", "tuned_engines", "clear_tuned",
           "weight_layout", "krsc_filters", "cached_bytes", "kept_tensors", "cache_use",
           "held_bytes", "workspace_scope", "clear_caches", "weights_epoch"]

#: every valid ``engine=`` value (engines registered later show up in :func:`engine_names`)
ENGINES = engine_names()


def describe() -> str:
    """One line per engine name, for help texts and docs."""
    lines = ["auto: the engine measured fastest for the layer (select_engine)",
             "tuned: times the engines that can run a layer shape once, keeps the fastest"]
    lines += [f"{name}: {engine.summary}" for name, engine in registered().items()]
    return "\n".join(lines)
