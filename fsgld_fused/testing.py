"""Tolerances for comparing a backend with the reference (SPEC section 2), used by tests and `check`.

Backends may differ from the reference only by the rounding of log, sqrt, cos and sin. A normal
is r * cos(t) with r <= sqrt(-2 ln 2**-24) ~= 5.77 (ulp 2**-21 at that size). Allowing 4 ulp on
r and 4 ulp (of 1) on the trig factor gives |dn| <= 4 * 2**-21 + 5.77 * 4 * 2**-24 ~= 3.3e-6;
NOISE_ATOL rounds that up to 8 ulp of r_max. Observed on the CPU kernel: 7.2e-7 over 1M draws.
"""

from __future__ import annotations

import torch

NOISE_ATOL = 8 * 2.0**-21  # ~3.8e-6


def step_atol(noise_coeffs: float) -> float:
    """Absolute error allowed on a weight that adds `noise_coeffs` (sum of |coefficient|) of noise."""
    return abs(noise_coeffs) * NOISE_ATOL


def rtol_for(dtype: torch.dtype) -> float:
    """Two roundings of the stored dtype: the kernels may round an intermediate differently."""
    return 2 * torch.finfo(dtype).eps


def assert_step_close(actual: torch.Tensor, expected: torch.Tensor, noise_coeffs: float, atol_extra: float = 0.0):
    """Noise error, plus two roundings of the stored dtype at the largest intermediate magnitude:
    a stored intermediate (a perturbed weight) can exceed the result by |noise| <= 6 * coeffs,
    and a one-ulp difference there survives the later subtraction."""
    rtol = rtol_for(expected.dtype)
    torch.testing.assert_close(
        actual.double(),
        expected.double(),
        atol=step_atol(noise_coeffs) + rtol * 6.0 * abs(noise_coeffs) + atol_extra,
        rtol=rtol,
    )
