"""SPEC 2c in the reference: the rounding bits, the rounding itself, the compensated Langevin std,
and whether a bf16 chain then samples at the right temperature; and that the backends' check
(tests/_sr_paths.py) fails on a backend that gets SPEC 2c wrong."""

import math
import os
import sys

import pytest
import torch

from fsgld_fused import reference as R

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "bench"))
import bf16_sampling  # noqa: E402

ALL_BITS = torch.arange(1 << 16, dtype=torch.int64)


def _bf16_neighbours(x: float) -> tuple[float, float]:
    """The bf16 values either side of float32 x, toward zero and away from it (bit patterns)."""
    bits = torch.tensor([x], dtype=torch.float32).view(torch.int32).item() & 0xFFFFFFFF
    down, up = bits & 0xFFFF0000, (bits & 0xFFFF0000) + 0x10000
    as_bf16 = lambda b: torch.tensor([b >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16).item()  # noqa: E731
    return as_bf16(down), as_bf16(up)


def test_rounding_bits_are_halves_of_one_philox_call_per_8_elements():
    seed, pid, step, op = 2**64 - 3, 5, 2**32 + 9, 2
    offset, n = 8 * (2**32) - 11, 40  # across the 2**32-block boundary, not 8-aligned
    got = R.rounding_bits(seed, pid, step, op, n, offset)
    for j in (0, 7, 10, 11, 25, 39):
        i = offset + j
        block = i // 8
        counter = (block & 0xFFFFFFFF, (block >> 32) | ((0xFFFF - op) << 16), step & 0xFFFFFFFF, (pid << 1) | 1)
        words = [int(w) for w in R.philox4x32(counter, (seed & 0xFFFFFFFF, seed >> 32))]
        e = i % 8
        assert got[j].item() == (words[e // 2] >> (16 * (e % 2))) & 0xFFFF, j
    # each op is its own sub-stream; a shard draws its slice of the unsharded bits
    assert not torch.equal(got, R.rounding_bits(seed, pid, step, 1, n, offset))
    whole = R.rounding_bits(seed, pid, step, op, n + 3, offset - 3)
    assert torch.equal(whole[3:], got)


@pytest.mark.parametrize(
    "x",
    [1.0 + 2**-9, -(1.0 + 2**-9), 1.0 + 3 * 2**-10, 3.0, -7.99, 1e-40, -1e-40, 2**-126 * 1.3, 3.3e38, -3.3e38, 0.1],
)
def test_rounding_is_unbiased_over_every_bit_pattern(x):
    """Over all 2**16 bit patterns the result is the lower neighbour (toward zero) or the upper one,
    the upper one exactly (distance to the lower) / ulp of the time: the mean is x exactly."""
    x32 = torch.tensor(x, dtype=torch.float32)
    out = R.round_bf16_stochastic(x32.expand(1 << 16), ALL_BITS).double()
    down, up = _bf16_neighbours(x32.item())
    assert set(out.unique().tolist()) <= {down, up}
    n_up = (out == up).sum().item() if up != down else 0
    assert n_up == round((x32.item() - down) / (up - down) * 65536)
    assert out.mean().item() == pytest.approx(x32.item(), rel=0, abs=abs(up - down) / 65536)
    assert math.isclose(out.mean().item(), x32.double().item(), rel_tol=0, abs_tol=1e-12 * max(1.0, abs(x)))


def test_exact_and_special_values():
    exact = torch.tensor([0.0, -0.0, 1.0, -2.5, 2**-133, float("inf"), float("-inf")])
    for bits in (torch.zeros(7, dtype=torch.int64), torch.full((7,), 0xFFFF)):
        out = R.round_bf16_stochastic(exact, bits)
        assert torch.equal(out.float(), exact) and torch.equal(torch.signbit(out), torch.signbit(exact))
    nan = R.round_bf16_stochastic(torch.tensor([float("nan")] * 2), torch.tensor([0, 0xFFFF]))
    assert nan.isnan().all()
    # the largest finite float32 rounds up to inf only as nearest would; just above the largest bf16
    big = torch.tensor([3.39e38, torch.finfo(torch.float32).max, -torch.finfo(torch.float32).max])
    out = R.round_bf16_stochastic(big, torch.full((3,), 0xFFFF))
    assert torch.equal(out, big.to(torch.bfloat16))
    assert R.round_bf16_stochastic(torch.tensor([3.39e38]), torch.tensor([0])).isfinite().all()


def test_ulp_and_compensated_std():
    theta = torch.tensor([1.0, 1.99, 2.0, -3.0, 0.0, 1e-39, 2**-126, 100.0])
    expected = torch.tensor([2**-7, 2**-7, 2**-6, 2**-6, 2**-133, 2**-133, 2**-133, 2**-1])
    assert torch.equal(R.bf16_ulp(theta), expected)
    std = 0.81 * 2**-7
    got = R.compensated_noise_std(theta, std).double()
    want = (std**2 - expected.double() ** 2 / 6).clamp(min=0).sqrt()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    assert got[-1] == 0.0 and got[0] < std and got[4] == pytest.approx(std)


def test_noise_free_fused_step_is_spec_2c_bit_for_bit():
    """beta = inf, sigma = 0: theta = p - lr * g in float32, then SPEC 2c's rounding with op 0."""
    gen = torch.Generator().manual_seed(3)
    p = (torch.randn(1000, generator=gen) * 3).to(torch.bfloat16)
    g = torch.randn(1000, generator=gen).to(torch.bfloat16)
    seed, step, lr, off = 11, 4, 1e-3, 77
    x = p.float() - lr * g.float()
    bits = R.rounding_bits(seed, 6, step, 0, 1000, off)
    # SPEC 2c written out with neighbours, independently of round_bf16_stochastic
    xb = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    up = ((xb & 0xFFFF) + bits) >= 0x10000
    expected = ((xb >> 16) + up.long()).to(torch.int32).to(torch.int16).view(torch.bfloat16)
    nearest = p.clone()
    R.fused_step_([p], [g], [], [6], seed, step, lr, 0.0, 0.0, 0.0, 0.0, 0.0, offsets=[off], stochastic_rounding=True)
    R.fused_step_([nearest], [g], [], [6], seed, step, lr, 0.0, 0.0, 0.0, 0.0, 0.0, offsets=[off])
    assert torch.equal(p.view(torch.int16), expected.view(torch.int16))
    assert 0 < (p != nearest).sum() < 1000  # it differs from nearest where the bits say so, not everywhere
    # perturb_ (op 1) and restore_ (op 2) round with their own bits
    q, r = p.clone(), p.clone()
    R.perturb_([q], [6], seed, step, 0.01, offsets=[off], stochastic_rounding=True)
    R.restore_([r], [6], seed, step, -0.01, offsets=[off], stochastic_rounding=True)
    assert not torch.equal(q, r)
    sum_q = p.float() + 0.01 * R.normals(seed, 6, step, R.EPS, 1000, off)
    q_bits = R.rounding_bits(seed, 6, step, 1, 1000, off)
    assert torch.equal(q, R.round_bf16_stochastic(sum_q, q_bits))
    assert torch.equal(r, R.round_bf16_stochastic(sum_q, R.rounding_bits(seed, 6, step, 2, 1000, off)))


def test_only_bf16_without_masters_is_rounded_stochastically():
    gen = torch.Generator().manual_seed(1)
    for dtype, masters in [(torch.float32, False), (torch.bfloat16, True), (torch.float16, False)]:
        m = [torch.randn(300, generator=gen)] if masters else []
        p = m[0].to(dtype) if masters else torch.randn(300, generator=gen).to(dtype)
        g = torch.randn(300, generator=gen).to(dtype)
        a, b = p.clone(), p.clone()
        ma, mb = [x.clone() for x in m], [x.clone() for x in m]
        R.fused_step_([a], [g], [], [0], 5, 1, 1e-2, 0.0, 0.0, 1e-3, 0.0, 0.01, masters=ma, stochastic_rounding=True)
        R.fused_step_([b], [g], [], [0], 5, 1, 1e-2, 0.0, 0.0, 1e-3, 0.0, 0.01, masters=mb)
        assert torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ma, mb)), (dtype, masters)


def test_bf16_chain_samples_at_the_right_temperature():
    """Issue 26's first regime (Langevin std 0.81 ulp): stochastic rounding with the compensated std
    gives the exact stationary variance; round to nearest heats the chain. Where the temperature
    is below the rounding's own (0.026 ulp), nearest freezes the chain."""
    rows = {s: bf16_sampling.stationary_moments(s, 0.81, chains=2048, steps=500, skip=50)
            for s in ("fp32", "bf16 nearest", "bf16 stochastic")}
    for storage in ("fp32", "bf16 stochastic"):
        assert 0.93 < rows[storage]["var_ratio"] < 1.07, rows[storage]
        assert abs(rows[storage]["mean_bias_sd"]) < 0.1, rows[storage]
    assert 1.08 < rows["bf16 nearest"]["var_ratio"] < 1.3, rows["bf16 nearest"]
    frozen = bf16_sampling.stationary_moments("bf16 nearest", 0.026, chains=1024, steps=200, skip=50)
    assert frozen["moved"] < 0.01, frozen


# ---- the backend check (tests/_sr_paths.py) can fail -----------------------------------------------
import _sr_paths  # noqa: E402


class _Mutant:
    """The reference with one thing wrong, as a backend's ops."""

    def __init__(self, nearest=False, plain_std=False, restore_op=R.RESTORE_OP):
        self.nearest, self.plain_std, self.restore_op = nearest, plain_std, restore_op

    def _sr(self, kw):
        if self.nearest:
            kw["stochastic_rounding"] = False
        return kw

    def perturb_(self, *args, **kw):
        R.perturb_(*args, **self._sr(kw))

    def restore_(self, params, ids, seed, step, sigma, **kw):
        kw = self._sr(kw)
        if kw.get("masters"):
            return R.restore_(params, ids, seed, step, sigma, **kw)
        R.perturb_(params, ids, seed, step, -sigma, _op=self.restore_op, **kw)

    def fused_step_(self, *args, **kw):
        if self.plain_std:
            saved, R.compensated_noise_std = R.compensated_noise_std, lambda theta, std: std
            try:
                return R.fused_step_(*args, **self._sr(kw))
            finally:
                R.compensated_noise_std = saved
        R.fused_step_(*args, **self._sr(kw))


def test_the_backend_check_passes_the_reference():
    _sr_paths.check_all(_Mutant(), n_tensors=4)


@pytest.mark.parametrize("mutant, check", [
    (dict(nearest=True), _sr_paths.check_noise_free),
    (dict(restore_op=R.PERTURB_OP), _sr_paths.check_noise_free),
    (dict(nearest=True), _sr_paths.check_noisy),
    (dict(plain_std=True), _sr_paths.check_noisy),
])
def test_the_backend_check_catches(mutant, check):
    with pytest.raises(AssertionError):
        check(_Mutant(**mutant), _sr_paths.SIZES[:4], _sr_paths.OFFSETS[:4], _sr_paths.IDS[:4])
