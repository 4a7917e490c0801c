"""What fsgld-fused is measured against: the naive eager fSGLD step, and the timing core.

`NaiveFSGLD` is how fSGLD is usually written (and how the paper's code does it): a stored
perturbation drawn with `randn_like`, a separate restore pass, an SGLD update with another
`randn_like`. Same algorithm as `FSGLD` (with perturb_ahead), different random stream.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import torch
from torch.utils.benchmark import Measurement
from torch.utils.benchmark.utils.common import TaskSpec
from torch.utils.benchmark.utils.timer import timer as clock


class NaiveFSGLD:
    def __init__(self, params: Sequence[torch.Tensor], lr: float, beta: float, sigma: float, weight_decay: float = 0.0):
        self.params = list(params)
        self.lr, self.beta, self.sigma, self.wd = lr, beta, sigma, weight_decay
        self.eps: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self) -> None:
        noise_std = math.sqrt(2.0 * self.lr / self.beta)
        if self.eps is not None:  # restore from the stored perturbation
            for p, e in zip(self.params, self.eps):
                p.sub_(e, alpha=self.sigma)
        for p in self.params:
            d = p.grad if self.wd == 0.0 else p.grad.add(p, alpha=self.wd)
            p.sub_(d, alpha=self.lr).add_(torch.randn_like(p), alpha=noise_std)
        self.eps = [torch.randn_like(p) for p in self.params]  # next step's perturbation, stored
        for p, e in zip(self.params, self.eps):
            p.add_(e, alpha=self.sigma)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5,
            label: str = "step") -> Measurement:
    """`repeat` timed calls of `fn` after `warmup` untimed ones, as a torch.utils.benchmark
    Measurement (median, IQR, significant figures; printable with benchmark.Compare). The timing
    core of the package: check, bench, the pytest-benchmark suite's clock, the auto backend.

    Our loop, not Timer's: Timer.timeit adds 2 warm-up calls per sample and blocked_autorange picks
    its own count, while a bench row needs exactly `repeat` calls of a step that may take seconds.
    The clock is torch.utils.benchmark's (it synchronises an accelerator) on a CPU; CUDA events on a
    GPU, so that a sample is device time without a host synchronise in it."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return Measurement(number_per_run=1, raw_times=times, task_spec=TaskSpec(stmt=label, setup="", num_threads=
                       torch.get_num_threads()))


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> list[float]:
    """Seconds per call: measure(...)'s samples."""
    return measure(fn, device, warmup, repeat).times


def spread_hides_difference(a: Measurement, b: Measurement) -> bool:
    """True when the two spreads (IQRs) together exceed the difference of the medians: a ratio of
    the two is not resolved by this run (a loaded machine, too few samples)."""
    return a.iqr + b.iqr > abs(a.median - b.median)


median = statistics.median
