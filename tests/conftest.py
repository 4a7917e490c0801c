import os

# The Triton interpreter is read when kernels are decorated (at import): set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fsgld_fused import available_backends  # noqa: E402

AVAILABLE = available_backends()
# Backends that run on CPU tensors here (triton only through the interpreter).
CPU_BACKENDS = [name for name in ("reference", "cpu", "triton") if AVAILABLE[name] is None]
KERNEL_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
