"""Backend lists for the tests, and the rule that no backend drops out silently.

The Triton interpreter (`TRITON_INTERPRET=1`) is read when the kernels are decorated, at import,
so it is set here before anything imports them, and only where no CUDA device is present: on a
GPU machine the Triton tests (tests/test_gpu.py) must run the compiled kernels.

No silent drop-out: on CI (`CI` set) and on any machine where this package is installed (built
with pip), a missing `cpu` or `triton` backend FAILS every test that names it (and
tests/test_backends.py::test_required_backends_are_available says why) instead of leaving them
out. For a deliberate partial run, name what may be missing, comma-separated:

    FSGLD_TEST_ALLOW_MISSING=triton pytest          (or cpu,triton; also cuda for tests/test_gpu.py)
"""

import os

import torch

# torch.cuda.is_available() does not import Triton: the interpreter can still be chosen after it.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import importlib.metadata  # noqa: E402

import pytest  # noqa: E402

from fsgld_fused import available_backends  # noqa: E402

AVAILABLE = available_backends()
ALLOWED_MISSING = {n.strip() for n in os.environ.get("FSGLD_TEST_ALLOW_MISSING", "").split(",") if n.strip()}


def _package_is_installed() -> bool:
    try:
        importlib.metadata.distribution("fsgld-fused")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


# Backends that must be there: the C++ CPU kernel and Triton (on CPU through the interpreter, on a
# GPU compiled; tests/test_gpu.py also requires cuda where a CUDA device is present).
REQUIRED = {"cpu", "triton"} - ALLOWED_MISSING if (os.environ.get("CI") or _package_is_installed()) else set()
MISSING_REQUIRED = {name: AVAILABLE[name] for name in sorted(REQUIRED) if AVAILABLE[name] is not None}


def _listed(name: str) -> bool:
    """Usable here, or required: a required backend that is missing stays in the lists, so the
    tests that use it fail with its reason instead of vanishing."""
    return AVAILABLE[name] is None or name in MISSING_REQUIRED


# Backends that run on CPU tensors here: triton only through the interpreter.
CPU_BACKENDS = ["reference", "cpu"] + (["triton"] if INTERPRET else [])
CPU_BACKENDS = [name for name in CPU_BACKENDS if name == "reference" or _listed(name)]
KERNEL_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
