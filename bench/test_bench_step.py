"""pytest-benchmark suite: one optimizer step per variant on the same tensors.

    python -m pytest bench/ --benchmark-enable --benchmark-group-by=param:size

Collected only when asked for (tests/ is the default test path); `--benchmark-disable` in the
project's pytest settings makes a plain run execute each step once as a smoke test.
"""

import pytest
import torch

from fsgld_fused import benchmark as bm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [1 << 20, 1 << 24] if DEVICE.type == "cpu" else [1 << 24, 1 << 27]


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s >> 20}M")
def tensors(request):
    return bm.make_tensors(request.param, "transformer", DEVICE)


@pytest.mark.parametrize(
    "variant",
    ["SGD foreach", "SGD fused", "SGD fused m=0.9", "Adam fused", "naive fSGLD (eager)", "FSGLD cpu", "FSGLD cuda",
     "FSGLD triton"],
)
def test_step(benchmark, tensors, variant):
    params, grads = tensors
    factories = bm.variants(params, grads, DEVICE, set())
    if variant not in factories:
        pytest.skip(f"{variant} is not available on {DEVICE}")
    step = factories[variant]()

    def synced():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    synced()  # warm-up (compilation, first perturbation)
    benchmark.pedantic(synced, rounds=5, iterations=1)
