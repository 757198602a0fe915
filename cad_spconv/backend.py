"""Finding a trustworthy spconv.

spconv comes with the default install (``spconv-cu126``, whose wheels cover CPython 3.11-3.13
and run on CPU too); its ``SparseConvTensor`` is the base of :class:`~cad_spconv.CADTensor`.
The CPU-only ``spconv`` wheel computes wrong convolutions (SubMConv2d vs dense conv max error
~0.8 measured on 2.3.6 and 2.3.8), so its conv engine is refused: the package metadata is
checked, and the first use of the ``"spconv"`` engine runs a small self-check of
``indice_conv`` against a torch gather-GEMM. (Importing spconv takes several seconds on CPU:
it builds its kernel tables in Python.)
"""
from __future__ import annotations

import importlib
import importlib.metadata
import warnings
from functools import lru_cache

__all__ = ["spconv_status", "require_spconv", "import_spconv", "warn_if_cpu_only_wheel",
           "installed_builds", "SpconvUnavailable", "INSTALL_HINT"]

INSTALL_HINT = ("install a CUDA build of spconv, which is also correct on CPU: "
                "`pip install spconv-cu126` (the default of `pip install cad-spconv`, "
                "CPython 3.11-3.13; other CUDA builds such as spconv-cu120 work too); "
                "remove the CPU-only wheel first with `pip uninstall spconv`")


class SpconvUnavailable(RuntimeError):
    """spconv is missing or not trustworthy; the message says what to install."""


def installed_builds(prefix: str) -> dict[str, str]:
    """Installed distributions named ``prefix`` or ``prefix-cuXXX`` (``spconv``, ``cumm``):
    normalised name -> version."""
    found = {}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name == prefix or name.startswith(prefix + "-cu"):
            found[name] = dist.version
    return found


def _installed_spconv_dists() -> list[str]:
    return sorted(installed_builds("spconv"))


def import_spconv():
    """``spconv.pytorch`` (its import warnings silenced), or an ``ImportError`` naming the
    install command."""
    try:
        with warnings.catch_warnings():
            # spconv 2.3 uses deprecated torch.cuda.amp decorators at import time
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            return importlib.import_module("spconv.pytorch")
    except ImportError as e:
        raise ImportError(f"cad_spconv needs spconv ({e}); " + INSTALL_HINT) from e


def _import_spconv():
    import_spconv()
    return importlib.import_module("spconv.pytorch.functional")


def _self_check() -> float:
    """Max error of spconv's indice_conv against a dense torch gather on a tiny problem."""
    import torch

    from spconv.pytorch.core import ConvAlgo

    functional = _import_spconv()
    gen = torch.Generator().manual_seed(0)
    n_in, n_out, c_in, c_out = 24, 20, 4, 3
    feats = torch.randn(n_in, c_in, generator=gen)
    weight = torch.randn(c_out, 3, 3, c_in, generator=gen)
    gather = torch.randint(-1, n_in, (n_out, 9), generator=gen)
    from .rulebook import GatherRulebook

    book = GatherRulebook(gather, n_in, (3, 3))
    pairs, counts = book.spconv_pairs()
    out = functional.indice_conv(feats, weight, pairs, counts, n_out, ConvAlgo.Native)
    padded = torch.cat([feats, feats.new_zeros(1, c_in)])
    ref = torch.einsum("nkc,okc->no", padded[book.padded()], weight.reshape(c_out, 9, c_in))
    return float((out - ref).abs().max())


@lru_cache(maxsize=1)
def spconv_status() -> tuple[bool, str]:
    """``(usable, reason)`` for the spconv engine on this machine (checked once)."""
    dists = _installed_spconv_dists()
    if not dists:
        return False, "spconv is not installed; " + INSTALL_HINT
    if dists == ["spconv"]:
        return False, ("the CPU-only `spconv` wheel is installed and computes wrong "
                       "convolutions; " + INSTALL_HINT)
    if len(dists) > 1:
        return False, (f"several spconv wheels are installed ({', '.join(dists)}); they share "
                       "one module and the result is undefined: keep exactly one CUDA build ("
                       + INSTALL_HINT + ")")
    try:
        _import_spconv()
    except Exception as exc:  # broken install, missing CUDA runtime libs, ...
        return False, f"spconv ({dists[0]}) failed to import: {exc!r}; " + INSTALL_HINT
    try:
        err = _self_check()
    except Exception as exc:
        return False, f"spconv ({dists[0]}) failed its self-check: {exc!r}; " + INSTALL_HINT
    if not err < 1e-4:
        return False, (f"spconv ({dists[0]}) failed its self-check (max error {err:.3g} against "
                       "a dense reference); " + INSTALL_HINT)
    return True, f"{dists[0]} (self-check max error {err:.1e})"


def warn_if_cpu_only_wheel():
    """Import-time check (package metadata only, no spconv import): warn about the CPU-only
    wheel at once rather than at the first conv."""
    if _installed_spconv_dists() == ["spconv"]:
        warnings.warn("cad_spconv: the CPU-only `spconv` wheel is installed and computes wrong "
                      "convolutions; the spconv engine is disabled and convs use the torch engine. "
                      "To use spconv, " + INSTALL_HINT, RuntimeWarning, stacklevel=3)


def require_spconv():
    """Return ``spconv.pytorch.functional`` or raise :class:`SpconvUnavailable`."""
    ok, reason = spconv_status()
    if not ok:
        raise SpconvUnavailable(reason)
    return _import_spconv()
