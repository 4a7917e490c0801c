"""The one dispatch table: names, availability, and the measured cuda/triton choice of "auto"."""

import pytest
import torch

from conftest import MISSING_REQUIRED, REQUIRED
from fsgld_fused import _backends, available_backends, set_auto_backend


def test_required_backends_are_available():
    """On CI and wherever the package is installed, the C++ CPU kernel and Triton must load: their
    tests would otherwise fail one by one. FSGLD_TEST_ALLOW_MISSING=cpu,triton opts out (see
    tests/conftest.py)."""
    assert not MISSING_REQUIRED, (
        f"required backends are not available: {MISSING_REQUIRED}. Build with "
        "`pip install --no-build-isolation -e .[test]`, or set FSGLD_TEST_ALLOW_MISSING="
        f"{','.join(MISSING_REQUIRED)} for a deliberate partial run (required here: {sorted(REQUIRED)})"
    )


def test_every_backend_reports_usable_or_why_not():
    avail = available_backends()
    assert set(avail) == set(_backends.BACKENDS)
    assert avail["reference"] is None
    for reason in avail.values():
        assert reason is None or (isinstance(reason, str) and reason)


def test_auto_on_cpu_prefers_the_compiled_kernel():
    backend = _backends.resolve("auto", torch.device("cpu"), torch.float32)
    assert backend.name == ("cpu" if available_backends()["cpu"] is None else "reference")


def test_auto_between_cuda_and_triton_is_measured_once_and_overridable(monkeypatch):
    fake = {
        n: _backends.Backend(n, object(), ("cuda",), _backends.KERNEL_DTYPES) for n in ("cuda", "triton")
    }
    monkeypatch.setattr(_backends, "_probe", lambda n: (fake.get(n) or _backends._load_reference(), None))
    calls = []

    def fake_measure(backend, device, dtype, numel=0):
        calls.append(backend.name)
        return {"cuda": 2.0, "triton": 1.0}[backend.name]

    monkeypatch.setattr(_backends, "measure_step_seconds", fake_measure)
    monkeypatch.setattr(_backends, "_AUTO_CHOICE", {})
    dev = torch.device("cuda", 0)
    assert _backends.resolve("auto", dev, torch.bfloat16).name == "triton"
    assert _backends.resolve("auto", dev, torch.bfloat16).name == "triton"
    assert sorted(calls) == ["cuda", "triton"]  # measured once, then cached
    set_auto_backend("cuda", device=dev)
    assert _backends.resolve("auto", dev, torch.bfloat16).name == "cuda"
    assert _backends.resolve("triton", dev, torch.bfloat16).name == "triton"  # an explicit name wins
    set_auto_backend(None, device=dev)
    assert _backends.resolve("auto", dev, torch.float32).name == "triton"


def test_unknown_or_unsupported_combinations_are_refused():
    with pytest.raises(ValueError, match="unknown backend"):
        _backends.check_backend_name("gpu")
    if available_backends()["cpu"] is None:
        with pytest.raises(ValueError, match="cannot run"):
            _backends.resolve("cpu", torch.device("cuda"), torch.float32)
