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

    def __init__(self, nearest=False, plain_std=False, restore_op=R.RESTORE_OP, std_after_update=False):
        self.nearest, self.plain_std, self.restore_op = nearest, plain_std, restore_op
        self.std_after_update = std_after_update

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
        if self.std_after_update:  # the std of the updated weight (theta - lr * g), not the clean one
            grads, lr = iter(args[1]), args[6]
            saved = R.compensated_noise_std
            R.compensated_noise_std = lambda theta, std: saved(theta - lr * next(grads).float(), std)
            try:
                return R.fused_step_(*args, **self._sr(kw))
            finally:
                R.compensated_noise_std = saved
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
    (dict(std_after_update=True), _sr_paths.check_std_from_the_clean_theta),
])
def test_the_backend_check_catches(mutant, check):
    with pytest.raises(AssertionError):
        check(_Mutant(**mutant), _sr_paths.SIZES[:4], _sr_paths.OFFSETS[:4], _sr_paths.IDS[:4])


# ---- the FSGLD option: rounding="stochastic" | "nearest" ----------------------------------------------
import copy  # noqa: E402
import warnings  # noqa: E402

from fsgld_fused import FSGLD, TemperatureWarning  # noqa: E402
from fsgld_fused.optimizer import rounding_threshold  # noqa: E402


def _bf16_params(n=(300, 77), scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(k, generator=gen) * scale).to(torch.bfloat16)) for k in n]


def _grads(params, k):
    gen = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def test_rounding_is_validated_and_stochastic_by_default():
    p = _bf16_params()
    assert FSGLD(p, lr=0.1, beta=1.0).defaults["rounding"] == "stochastic"
    for bad in ("up", None, True):
        with pytest.raises(ValueError, match="rounding must be one of"):
            FSGLD(p, lr=0.1, beta=1.0, rounding=bad)
    opt = FSGLD(p[:1], lr=0.1, beta=1.0)
    with pytest.raises(ValueError, match="rounding must be one of"):
        opt.add_param_group({"params": p[1:], "rounding": "down"})


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_each_group_steps_and_perturbs_with_its_rounding(rounding):
    """Two groups, one rounding each; FSGLD's steps, perturb() and restore() equal the reference
    ops called with that group's flag, bit for bit (param ids follow the groups' order)."""
    other = {"stochastic": "nearest", "nearest": "stochastic"}[rounding]
    params = _bf16_params((300, 77, 50))
    ref = [p.detach().clone() for p in params]
    opt = FSGLD([{"params": params[:2], "rounding": rounding}, {"params": params[2:], "rounding": other}],
                lr=1e-3, beta=1e5, sigma=0.01, seed=9, backend="reference")
    flags = [rounding == "stochastic"] * 2 + [other == "stochastic"]
    noise = math.sqrt(2 * 1e-3 / 1e5)
    for k in range(3):
        _grads(params, k)
        opt.step()
        for i, (r, p) in enumerate(zip(ref, params)):
            rr = [r]
            R.fused_step_(rr, [p.grad], [], [i], 9, k, 1e-3, 0.0, 0.0, noise, 0.01 if k else 0.0, 0.01,
                          stochastic_rounding=flags[i])
            assert torch.equal(p.detach().view(torch.int16), r.view(torch.int16)), (k, i)
    opt.restore()  # op 2 for the stochastic group
    for i, (r, p) in enumerate(zip(ref, params)):
        R.restore_([r], [i], 9, 3, 0.01, stochastic_rounding=flags[i])
        assert torch.equal(p.detach().view(torch.int16), r.view(torch.int16)), i
    opt.perturb()  # op 1
    for i, (r, p) in enumerate(zip(ref, params)):
        R.perturb_([r], [i], 9, 3, 0.01, stochastic_rounding=flags[i])
        assert torch.equal(p.detach().view(torch.int16), r.view(torch.int16)), i


def test_rounding_leaves_fp32_and_mastered_params_alone():
    gen = torch.Generator().manual_seed(5)
    runs = []
    for rounding in ("stochastic", "nearest"):
        gen.manual_seed(5)
        fp32 = torch.nn.Parameter(torch.randn(100, generator=gen))
        mastered = torch.nn.Parameter(torch.randn(100, generator=gen).to(torch.bfloat16))
        opt = FSGLD([{"params": [fp32]}, {"params": [mastered], "master_weights": True}], lr=1e-2, beta=1e3,
                    seed=1, rounding=rounding, backend="reference")
        for k in range(2):
            _grads([fp32, mastered], k)
            opt.step()
        runs.append([fp32.detach().clone(), mastered.detach().clone(), opt.state[mastered]["master"].clone()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_rounding_threshold_is_the_first_power_of_two_past_the_langevin_variance():
    for variance in (2.2e-5, 1e-4, 1e-9, 3e-2):
        t = rounding_threshold(variance)
        below, at = R.bf16_ulp(torch.tensor([t * 0.99])), R.bf16_ulp(torch.tensor([t]))
        assert (at**2 / 6).item() > variance >= (below**2 / 6).item(), variance
    assert rounding_threshold(1e-90) == 0.0  # every value, zeros included (ulp 2**-133)


def _step_collecting(opt, params, k=0):
    _grads(params, k)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    return [w for w in caught if issubclass(w.category, TemperatureWarning)]


def test_unreachable_temperature_warns_once_per_threshold_with_the_group_and_fraction():
    params = _bf16_params((4000,), scale=2.0)
    clean = _bf16_params((100,))
    opt = FSGLD([{"params": clean, "rounding": "nearest"}, {"params": params}], lr=1e-3, beta=1e3, sigma=0.0,
                backend="reference")
    threshold = rounding_threshold(2e-3 / 1e3)
    expected = int((params[0].detach().abs() >= threshold).sum())
    (w,) = _step_collecting(opt, params + clean)
    msg = str(w.message)
    assert "param group 1" in msg and f"{expected} of 4000" in msg and f"{expected / 4000:.1%}" in msg
    assert "master_weights=True" in msg
    assert w.filename == __file__  # the caller of step(), not torch's wrappers around it
    assert not _step_collecting(opt, params + clean, 1)  # no new pass: same threshold, same weights
    opt.param_groups[1]["lr"] = 1.1e-3  # the same power of two
    assert not _step_collecting(opt, params + clean, 2)
    opt.param_groups[1]["lr"] = 1e-5  # a lower threshold: checked again
    assert len(_step_collecting(opt, params + clean, 3)) == 1
    opt.param_groups[1]["lr"] = 1e-3  # back up (a cyclical lr): the lowest threshold was checked already
    assert not _step_collecting(opt, params + clean, 4)
    opt.param_groups[1]["lr"] = 1e-5
    assert not _step_collecting(opt, params + clean, 5)
    fresh = _bf16_params((4000,), scale=2.0)
    big = FSGLD(fresh, lr=10.0, beta=1e3, sigma=0.0, backend="reference")
    assert not _step_collecting(big, fresh)  # every weight below the threshold: nothing to say


def test_no_warning_where_the_temperature_is_reachable_or_not_asked_for():
    for kw in (dict(rounding="nearest"), dict(master_weights=True), dict(beta=math.inf), dict(lr=0.0)):
        params = _bf16_params((1000,), scale=4.0)
        opt = FSGLD(params, **{"lr": 1e-3, "beta": 1e6, **kw}, backend="reference")
        assert not _step_collecting(opt, params), kw
    params = _bf16_params((1000,), scale=4.0)
    opt = FSGLD(params, lr=1e-3, beta=1e6, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=TemperatureWarning)  # silenceable by its category
        _grads(params, 0)
        opt.step()


def test_resume_is_bit_identical_and_rounding_switches_after_load():
    def run(opt, params, steps, first):
        for k in range(first, first + steps):
            _grads(params, k)
            opt.step()

    params = _bf16_params()
    opt = FSGLD(params, lr=1e-3, beta=1e5, momentum=0.9, seed=3, backend="reference")
    run(opt, params, 3, 0)
    saved_params, saved = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())
    run(opt, params, 3, 3)
    again = [torch.nn.Parameter(p.clone()) for p in saved_params]
    resumed = FSGLD(again, lr=1e-3, beta=1e5, momentum=0.9, backend="reference", rounding="nearest")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["rounding"] == "stochastic"  # the checkpoint's groups win, as in torch.optim
    run(resumed, again, 3, 3)
    assert all(torch.equal(a.view(torch.int16), b.detach().view(torch.int16)) for a, b in zip(again, params))
    # switched after loading: the next writes round to nearest, the chain (seed, step) goes on
    again = [torch.nn.Parameter(p.clone()) for p in saved_params]
    switched = FSGLD(again, lr=1e-3, beta=1e5, momentum=0.9, backend="reference")
    switched.load_state_dict(saved)
    switched.param_groups[0]["rounding"] = "nearest"
    ref = [p.clone() for p in saved_params]
    bufs = [saved["state"][i]["momentum_buffer"].clone() for i in range(len(ref))]
    run(switched, again, 1, 3)
    noise = math.sqrt(2 * 1e-3 / 1e5)
    sigma = 1e5 ** (-1.1 / 4)
    for i, r in enumerate(ref):
        R.fused_step_([r], [again[i].grad], [bufs[i]], [i], 3, 3, 1e-3, 0.0, 0.9, noise, sigma, sigma)
    assert all(torch.equal(a.detach().view(torch.int16), b.view(torch.int16)) for a, b in zip(again, ref))


def test_the_optimizer_holds_no_tensor_beyond_the_momentum_buffer():
    """Issue 26's memory rule for bf16 without masters: with momentum, one bf16 buffer per param and
    no other tensor; without, no tensor at all (the rounding bits are drawn, never stored)."""
    for momentum in (0.9, 0.0):
        params = _bf16_params()
        opt = FSGLD(params, lr=1e-3, beta=1e5, momentum=momentum, backend="reference")

        def step(k):
            _grads(params, k)
            opt.step()

        # checked after each: a buffer made by the constructor and converted by the first step counts
        for k, action in enumerate((lambda: None, lambda: step(0), lambda: step(1), opt.restore, opt.perturb)):
            action()
            for p in params:
                tensors = {key: v for key, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                if momentum:
                    assert list(tensors) == ["momentum_buffer"], (k, tensors.keys())
                    buf = tensors["momentum_buffer"]
                    assert buf.dtype == torch.bfloat16 and buf.shape == p.shape, (k, buf)
                else:
                    assert not tensors, (k, tensors.keys())


def _checkpoint(master_weights, steps=3):
    params = _bf16_params()
    opt = FSGLD(params, lr=1e-3, beta=1e5, momentum=0.9, seed=3, master_weights=master_weights, backend="reference")
    for k in range(steps):
        _grads(params, k)
        opt.step()
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict()), params, opt


def test_a_checkpoint_without_masters_gains_them_after_restore():
    """none -> masters: master_weights is the checkpoint's (False) after loading; set to True, the
    next step refuses perturbed weights; after restore() it makes each master from the clean bf16
    weights and converts the momentum buffer to fp32, the chain (seed, step) unchanged."""
    saved_params, saved, _, _ = _checkpoint(False)
    params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt = FSGLD(params, lr=1e-3, beta=1e5, momentum=0.9, master_weights=True, backend="reference")
    opt.load_state_dict(saved)
    assert not opt.param_groups[0]["master_weights"]  # the checkpoint's groups win
    opt.param_groups[0]["master_weights"] = True
    _grads(params, 3)
    with pytest.raises(RuntimeError, match="call restore"):
        opt.step()
    opt.restore()
    opt.step()
    sigma, noise = 1e5 ** (-1.1 / 4), math.sqrt(2 * 1e-3 / 1e5)
    for i, (r, p) in enumerate(zip(saved_params, params)):
        R.restore_([r], [i], 3, 3, sigma, stochastic_rounding=True)
        master, buf = r.float(), saved["state"][i]["momentum_buffer"].float()
        R.fused_step_([r], [p.grad], [buf], [i], 3, 3, 1e-3, 0.0, 0.9, noise, 0.0, sigma, masters=[master])
        state = opt.state[p]
        assert state["master"].dtype == torch.float32 and state["momentum_buffer"].dtype == torch.float32
        assert torch.equal(state["master"], master) and torch.equal(state["momentum_buffer"], buf), i
        assert torch.equal(p.detach().view(torch.int16), r.view(torch.int16)), i


def test_a_checkpoint_with_masters_keeps_them_until_deleted():
    """masters -> none: master_weights=False does not drop a master that exists (_plan._new_state):
    the param goes on from its master exactly as before. Deleting state["master"] after restore()
    does: the param goes on from its clean bf16 value, rounded as its group says, and the fp32
    momentum buffer is converted to bf16."""
    saved_params, saved, originals, original = _checkpoint(True)
    params = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt = FSGLD(params, lr=1e-3, beta=1e5, momentum=0.9, backend="reference")
    opt.load_state_dict(saved)
    opt.param_groups[0]["master_weights"] = False
    for k in (3, 4):
        _grads(params, k), _grads(originals, k)
        opt.step(), original.step()
    for p, q in zip(params, originals):  # still mastered, bit for bit the uninterrupted run
        assert torch.equal(opt.state[p]["master"], original.state[q]["master"])
        assert torch.equal(p.detach().view(torch.int16), q.detach().view(torch.int16))
    opt.restore()
    clean = [p.detach().clone() for p in params]
    bufs = [opt.state[p]["momentum_buffer"].to(torch.bfloat16) for p in params]
    for p in params:
        del opt.state[p]["master"]
    _grads(params, 5)
    opt.step()
    sigma, noise = 1e5 ** (-1.1 / 4), math.sqrt(2 * 1e-3 / 1e5)
    for i, (r, p) in enumerate(zip(clean, params)):
        R.fused_step_([r], [p.grad], [bufs[i]], [i], 3, 5, 1e-3, 0.0, 0.9, noise, 0.0, sigma, stochastic_rounding=True)
        assert "master" not in opt.state[p] and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.equal(opt.state[p]["momentum_buffer"], bufs[i]), i
        assert torch.equal(p.detach().view(torch.int16), r.view(torch.int16)), i


# ---- README.md's blocks on rounding and checkpoints ---------------------------------------------------
from _readme import readme_snippet  # noqa: E402


def test_readme_rounding_blocks():
    ns = {"torch": torch, "FSGLD": FSGLD, "model": torch.nn.Linear(4, 3)}
    exec(readme_snippet("rounding"), ns)
    assert ns["model"].weight.dtype == torch.bfloat16 and ns["opt"].param_groups[0]["rounding"] == "stochastic"
    assert not ns["opt"].param_groups[0]["master_weights"]

    def with_opt(master_weights):
        saved_params, saved, _, _ = _checkpoint(master_weights)
        params = [torch.nn.Parameter(p.clone()) for p in saved_params]
        return params, FSGLD(params, lr=1e-3, beta=1e5, momentum=0.9, backend="reference"), saved

    params, opt, saved = with_opt(False)
    exec(readme_snippet("rounding-checkpoint"), {"opt": opt, "checkpoint": {"optimizer": saved}})
    assert opt.param_groups[0]["rounding"] == "nearest" and opt.step_count == 3
    params, opt, saved = with_opt(True)
    opt.load_state_dict(saved)
    exec(readme_snippet("drop-masters"), {"opt": opt})
    _grads(params, 3)
    opt.step()
    assert all(set(opt.state[p]) & {"master"} == set() for p in params)
    assert all(opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in params)


def test_a_checkpoint_from_before_the_option_resumes_rounding_to_nearest():
    params = _bf16_params()
    opt = FSGLD(params, lr=1e-3, beta=1e5, seed=3, backend="reference")
    _grads(params, 0)
    opt.step()
    old = copy.deepcopy(opt.state_dict())
    for group in old["param_groups"]:
        del group["rounding"]  # saved by a version without the option: it rounded to nearest
    resumed = FSGLD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, beta=1e5,
                    backend="reference")
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["rounding"] == "nearest"
    current = FSGLD([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-3, beta=1e5,
                    backend="reference", rounding="nearest")
    current.load_state_dict(copy.deepcopy(opt.state_dict()))  # saved with the option: its value stands
    assert current.param_groups[0]["rounding"] == "stochastic"


# float32 bit patterns where a rounding by bit arithmetic goes wrong: NaNs whose payload carries
# into the sign (0x7fffffff is the GPU's canonical NaN) or past 2**32, the top of the finite range
SPECIAL_BITS = [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF0001, 0x7F800001, 0xFF800001, 0x7FC00000, 0x7F800000, 0xFF800000,
                0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0xFF7F7FFF, 0x7F7F0001, 0x00000001, 0x80000000, 0x3F800001]


try:
    import triton
    import triton.language as tl

    from fsgld_fused.kernels import triton_ops as TK
except ImportError:
    TK = None

if TK is not None:

    @triton.jit
    def _rounding_kernel(x_ptr, r_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, TK._round_bf16_stochastic(tl.load(x_ptr + i), tl.load(r_ptr + i), True))


@pytest.mark.skipif(TK is None or not TK.INTERPRET, reason="needs Triton, run in the interpreter (TRITON_INTERPRET=1)")
def test_triton_rounding_of_special_bit_patterns():
    """The Triton rounding on each pattern with r at the edges of its range equals the reference's
    (a NaN as a NaN): the interpreter's arithmetic keeps bf16 inputs' NaN payloads below 2**16,
    so a kernel step never feeds it the carrying NaNs a GPU makes."""
    rs = [0, 1, 0x7FFF, 0x8000, 0xFFFF]
    bits = torch.tensor([b for b in SPECIAL_BITS for _ in rs], dtype=torch.int64)
    r = torch.tensor(rs * len(SPECIAL_BITS), dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32)  # two's complement wrap of the high patterns
    n = 1 << (len(x) - 1).bit_length()
    xs, rr = torch.zeros(n), torch.zeros(n, dtype=torch.int32)
    xs[: len(x)], rr[: len(x)] = x, r.to(torch.int32)
    out = torch.empty(n, dtype=torch.bfloat16)
    _rounding_kernel[(1,)](xs, rr.view(torch.uint32), out, N=n)
    want = R.round_bf16_stochastic(x, r)
    got = out[: len(x)]
    assert torch.equal(got.isnan(), want.isnan()), (bits[got.isnan() != want.isnan()], r[got.isnan() != want.isnan()])
    same = ~want.isnan()
    assert torch.equal(got[same].view(torch.int16), want[same].view(torch.int16))
