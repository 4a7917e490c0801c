"""The chain's stationary law on a quadratic: U(theta) = a * theta^2 / 2 per coordinate.

With the gradient taken at theta + sigma*eps, one step is the AR(1) recursion
theta' = (1 - lr*a) theta - lr*a*sigma*eps + sqrt(2 lr / beta) xi, whose stationary variance is
(lr^2 sigma^2 a^2 + 2 lr / beta) / (lr a (2 - lr a)).
"""

import math

import pytest
import torch

from conftest import CPU_BACKENDS
from fsgld_fused import FSGLD


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr,a,beta,sigma", [(0.5, 1.0, 100.0, 0.3), (0.2, 2.0, 20.0, 0.0), (0.1, 4.0, 1e3, 0.5)])
def test_stationary_variance_on_a_quadratic(backend, lr, a, beta, sigma):
    n = 100_000 if backend != "triton" else 4_096  # the Triton interpreter is slow
    p = torch.nn.Parameter(torch.zeros(n))
    opt = FSGLD([p], lr=lr, beta=beta, sigma=sigma, seed=2024, backend=backend)
    rho = 1 - lr * a
    burn_in = int(math.ceil(12 / -math.log(abs(rho))))  # rho^(2*burn_in) < 1e-10 of the start
    gap = int(math.ceil(6 / -math.log(abs(rho))))  # samples this far apart are ~independent
    samples = []
    opt.perturb()
    for k in range(burn_in + 8 * gap):
        p.grad = a * p.detach()  # the gradient at the perturbed weights
        opt.step()
        if k >= burn_in and (k - burn_in) % gap == 0:
            with opt.unperturbed():
                samples.append(p.detach().double().pow(2).mean().item())
    exact = (lr**2 * sigma**2 * a**2 + 2 * lr / beta) / (lr * a * (2 - lr * a))
    est = sum(samples) / len(samples)
    se = exact * math.sqrt(2.0 / n) / math.sqrt(len(samples))  # SE of a variance over n coords, averaged
    assert abs(est - exact) < 5 * se, (est, exact, se)
