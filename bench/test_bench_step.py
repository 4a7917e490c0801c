"""pytest-benchmark suite: one optimizer step per variant on the same tensors, as `python -m
fsgld_fused bench` times them (the same variants, warm-up and clock: torch.utils.benchmark's,
which synchronises a GPU; the CLI's `baselines.measure` uses CUDA events there instead).

    python -m pytest bench/ --benchmark-only --benchmark-json=bench/results/pytest-bench.json
    FSGLD_BENCH_SIZES=16M,64M python -m pytest bench/ --benchmark-only     # other sizes

Sizes: 64K (host-bound) and 1M transformer-shaped parameters on a CPU (2 cores: a few seconds per
variant), 16M and 128M on a GPU. Not in the default test path (tests/); tests/test_bench_suite.py
runs it at a tiny size. Without the pytest-benchmark plugin it is skipped (bench/conftest.py).
"""

import os

import pytest
import torch

from torch.utils.benchmark.utils.timer import timer as clock

from fsgld_fused import _cli
from fsgld_fused import benchmark as bm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (_cli.size_list(os.environ["FSGLD_BENCH_SIZES"]) if os.environ.get("FSGLD_BENCH_SIZES")
         else [1 << 16, 1 << 20] if DEVICE.type == "cpu" else [1 << 24, 1 << 27])
WARMUP, ROUNDS = 2, 7  # as the CLI: 2 warm-up steps, then --repeat's default


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s >> 20}M" if s >= 1 << 20 else f"{s >> 10}K")
def tensors(request):
    return bm.make_tensors(request.param, "transformer", DEVICE)


@pytest.mark.benchmark(timer=clock, group="step")
@pytest.mark.parametrize(
    "variant",
    ["SGD foreach", "SGD fused", "SGD fused m=0.9", "Adam fused", "naive fSGLD (eager)", "FSGLD auto (defaults)",
     "FSGLD cpu", "FSGLD cpu rademacher", "FSGLD cuda", "FSGLD cuda rademacher", "FSGLD triton"],
)
def test_step(benchmark, tensors, variant):
    params, grads = tensors
    factories = bm.variants(params, grads, DEVICE, set())
    if variant not in factories:
        pytest.skip(f"{variant} is not available on {DEVICE}")
    benchmark.extra_info.update(params=sum(p.numel() for p in params), tensors=len(params), device=str(DEVICE))
    benchmark.pedantic(factories[variant](), warmup_rounds=WARMUP, rounds=ROUNDS, iterations=1)
