"""spconv detection: the CPU-only wheel is refused with a clear instruction."""
import pytest
import torch

from cad_spconv import backend
from cad_spconv.backend import SpconvUnavailable, require_spconv, spconv_status


@pytest.fixture
def fresh_status():
    spconv_status.cache_clear()
    yield
    spconv_status.cache_clear()


def test_cpu_only_wheel_is_refused(monkeypatch, fresh_status):
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: ["spconv"])
    ok, reason = spconv_status()
    assert not ok and "CPU-only" in reason and "spconv-cu126" in reason
    with pytest.raises(SpconvUnavailable, match="pip uninstall spconv"):
        require_spconv()


def test_missing_spconv_is_reported(monkeypatch, fresh_status):
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: [])
    ok, reason = spconv_status()
    assert not ok and "not installed" in reason


def test_wrong_results_fail_the_self_check(monkeypatch, fresh_status):
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: ["spconv-cu120"])
    monkeypatch.setattr(backend, "_import_spconv", lambda: None)
    monkeypatch.setattr(backend, "_self_check", lambda: 0.82)
    ok, reason = spconv_status()
    assert not ok and "max error 0.82" in reason


def test_auto_engine_never_needs_spconv_on_cpu(monkeypatch, fresh_status):
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: ["spconv"])
    from cad_spconv import CADTensor, functional as CF
    t = CADTensor.from_dense(torch.randn(1, 2, 5, 5), torch.rand(1, 5, 5) < 0.3, 1)
    w = torch.randn(3, 2, 3, 3)
    # auto picks an engine of this library (lattice on CPU), never spconv
    torch.testing.assert_close(CF.conv2d(t, w, stride=2).features,
                               CF.conv2d(t, w, stride=2, engine="torch").features)
    with pytest.raises(SpconvUnavailable):
        CF.conv2d(t, torch.randn(3, 2, 3, 3), engine="spconv")


def test_import_time_warning_for_cpu_only_wheel(monkeypatch):
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: ["spconv"])
    with pytest.warns(RuntimeWarning, match="CPU-only `spconv` wheel"):
        backend.warn_if_cpu_only_wheel()
    monkeypatch.setattr(backend, "_installed_spconv_dists", lambda: ["spconv-cu120"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend.warn_if_cpu_only_wheel()


def test_the_installed_dependency_passes_its_self_check(fresh_status):
    """spconv is a dependency (``spconv-cu126``): where that build is installed, as in CI, the
    spconv-engine tests must run, not skip because its self-check failed unnoticed."""
    if "spconv-cu126" not in backend._installed_spconv_dists():
        pytest.skip("spconv-cu126 is not installed here (a custom environment)")
    ok, reason = spconv_status()
    assert ok, reason
