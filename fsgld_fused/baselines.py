"""What fsgld-fused is measured against: the naive eager fSGLD step and timing helpers.

`NaiveFSGLD` is how fSGLD is usually written (and how the paper's code does it): a stored
perturbation drawn with `randn_like`, a separate restore pass, an SGLD update with another
`randn_like`. Same algorithm as `FSGLD` (with perturb_ahead), different random stream.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Sequence

import torch


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


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeat: int = 5) -> list[float]:
    """Seconds per call, `repeat` samples after `warmup` calls: CUDA events on a GPU, the host
    clock around the call on a CPU. The one timer of the package (check, bench, auto backend)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)
