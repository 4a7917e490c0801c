"""pytest-benchmark: the host cost of one step (issue 23), 100 and 1000 tensors of 16 elements,
FSGLD next to SGD(fused=True), on the device the suite runs on.

    python -m pytest bench/test_bench_host.py --benchmark-enable --benchmark-group-by=param:count
"""

import pytest
import torch

from fsgld_fused import benchmark as bm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", params=[100, 1000], ids=lambda n: f"{n}x16")
def count(request):
    return request.param


@pytest.mark.parametrize("variant", ["SGD fused", "FSGLD auto (defaults)", "FSGLD cpu", "FSGLD cuda", "FSGLD triton"])
def test_host_step(benchmark, count, variant):
    params, grads = bm.make_tensors(count * bm.HOST_NUMEL, "host", DEVICE)
    factories = bm.variants(params, grads, DEVICE, set())
    if variant not in factories:
        pytest.skip(f"{variant} is not available on {DEVICE}")
    step = factories[variant]()

    def synced():
        step()
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    synced()  # warm-up: the first step creates state and perturbs, the second builds the cached plan
    synced()
    benchmark.pedantic(synced, rounds=15, iterations=1)
