"""SPEC 2c on a backend's ops: bf16 params without masters, rounded stochastically, against the
reference (`fsgld_fused.reference`), used by tests/test_kernels.py (cpu at each ISA, triton through
the interpreter) and tests/test_cuda_emulation.py (the CUDA kernels on the CPU).

- Noise-free calls (no Langevin noise; no perturbation, or Rademacher signs, which are exact)
  equal the reference bit for bit, on every path: shard offsets (rounding blocks of 8 across the
  2**32 boundary, odd starts, tails), weight decay, momentum, grad scales, the capturable form, and
  boundary values (signed zeros, subnormals, the largest bf16s, inf, NaN).
- Calls with Gaussian noise are within one bf16 ulp of the reference, and differ on few elements:
  only where the normals' rounding (NOISE_ATOL) moves the float32 result across a rounding point.
  The Langevin std (about 0.6 ulp at |theta| in [1, 2)) is large enough that a kernel drawing the
  uncompensated std, or rounding to nearest, differs on far more.
Each call is judged on its own: the reference's result is copied across after it.
"""

from __future__ import annotations

import itertools
import math

import torch

from fsgld_fused import reference as R

SIZES = [0, 3, 70, 1100, 4107]
# odd, 1 mod 8, rounding block 2**32 - 1 into 2**32, 3 mod 8 past a CUDA chunk, a multiple of 16
OFFSETS = [5, 1, 8 * 2**32 - 21, 4099, 16]
IDS = [4, 0, 9, 2, 5]
SEED = 0xFEEDFACECAFEBEEF
# At the start and the end of each tensor long enough (the interior and the tail paths).
SPECIALS = [0.0, -0.0, 1e-40, -1e-40, 2.0**-126, -(2.0**-126) * 1.5, 3.38e38, -3.38e38, 3.3e38,
            math.inf, -math.inf, math.nan, -3.0, 1.0 + 2**-9]
LR = 0.01
NOISE_STD = 0.6 * 2.0**-7  # 0.6 ulp of bf16 at |theta| in [1, 2)
FLIP_FRACTION = 0.01  # the reference's mutants: uncompensated std 0.095, rounding to nearest 0.25
SIGMA = 0.05


def make_params(sizes, gen, specials=True):
    out = []
    for s in sizes:
        x = torch.randn(s, generator=gen) * 1.5
        if specials and s >= 2 * len(SPECIALS):
            sp = torch.tensor(SPECIALS)
            x[: len(sp)] = sp
            x[-len(sp):] = sp.flip(0)
        out.append(x.to(torch.bfloat16))
    return out


def make_grads(sizes, gen, scale=1.0):
    return [(torch.randn(s, generator=gen) * scale).to(torch.bfloat16) for s in sizes]


def assert_bits_equal(actual, expected, what):
    for i, (a, b) in enumerate(zip(actual, expected)):
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        bad = (nan_a != nan_b) | (~nan_b & (a.view(torch.int16) != b.view(torch.int16)))
        if bad.any():
            j = int(bad.nonzero()[0])
            raise AssertionError(f"{what}, tensor {i}: {int(bad.sum())} of {a.numel()} elements differ; "
                                 f"first at {j}: {a[j].item()!r} != {b[j].item()!r}")


def _ulp(x):
    return R.bf16_ulp(x.float().abs().clamp(max=3.3e38))


def assert_within_one_ulp(actual, expected, what, flip_fraction=FLIP_FRACTION):
    n = flips = 0
    for i, (a, b) in enumerate(zip(actual, expected)):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a)), f"{what}, tensor {i}: non-finite elements differ"
        a32, b32 = a.float()[finite], b.float()[finite]
        diff = (a32 - b32).abs()
        ulp = torch.maximum(_ulp(a32), _ulp(b32))
        assert bool((diff <= ulp).all()), f"{what}, tensor {i}: more than one ulp off (max {(diff / ulp).max()})"
        n, flips = n + b.numel(), flips + int((diff != 0).sum())
    assert flips <= flip_fraction * max(n, 1), f"{what}: {flips} of {n} elements differ (at most {flip_fraction:.0%})"


def _sync(dst, src):
    for a, b in zip(dst, src):
        a.copy_(b)


def check_noise_free(ops, sizes=SIZES, offsets=OFFSETS, ids=IDS, seed=SEED):
    """Every noise-free route of SPEC 2c, bit for bit."""
    gen = torch.Generator().manual_seed(26)
    sr = dict(offsets=offsets, stochastic_rounding=True)
    for wd, mom in itertools.product([0.0, 0.05], [0.0, 0.9]):
        where = f"weight_decay={wd} momentum={mom}"
        params = make_params(sizes, gen)
        bufs = [torch.zeros(s, dtype=torch.bfloat16) for s in sizes] if mom else []
        ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
        for k, scale in enumerate([None, 512.0, None]):
            grads = make_grads(sizes, gen, scale or 1.0)
            kw = {} if scale is None else dict(grad_scale=torch.tensor([scale]), found_inf=torch.tensor([0.0]))
            args = (ids, seed, 3 + k, LR, wd, mom, 0.0, 0.0, 0.0)
            ops.fused_step_(params, grads, bufs, *args, **sr, **kw)
            R.fused_step_(ref_p, grads, ref_b, *args, **sr, **kw)
            assert_bits_equal(params, ref_p, f"fused_step_ {k} [{where}]")
            assert_bits_equal(bufs, ref_b, f"fused_step_ {k} momentum buffers [{where}]")
            _sync(params, ref_p), _sync(bufs, ref_b)
    # Rademacher perturbations are exact: perturb_ (op 1), steps that restore and perturb ahead with
    # signs (op 0), restore_ (op 2), all bit for bit.
    params = make_params(sizes, gen)
    ref_p = [p.clone() for p in params]
    ops.perturb_(params, ids, seed, 0, SIGMA, rademacher=True, **sr)
    R.perturb_(ref_p, ids, seed, 0, SIGMA, rademacher=True, **sr)
    assert_bits_equal(params, ref_p, "perturb_ with signs")
    for k in range(2):
        grads = make_grads(sizes, gen)
        args = (ids, seed, k, LR, 0.0, 0.0, 0.0, SIGMA, SIGMA)
        signs = dict(restore_rademacher=True, perturb_rademacher=True)
        ops.fused_step_(params, grads, [], *args, **signs, **sr)
        R.fused_step_(ref_p, grads, [], *args, **signs, **sr)
        assert_bits_equal(params, ref_p, f"fused_step_ {k} with signs")
        _sync(params, ref_p)
    ops.restore_(params, ids, seed, 2, SIGMA, rademacher=True, **sr)
    R.restore_(ref_p, ids, seed, 2, SIGMA, rademacher=True, **sr)
    assert_bits_equal(params, ref_p, "restore_ with signs")
    # the capturable form: step and lr read from tensors
    grads = make_grads(sizes, gen)
    cap = dict(step_t=torch.tensor([7], dtype=torch.int64), lr_t=torch.tensor([0.02], dtype=torch.float32))
    ops.fused_step_(params, grads, [], ids, seed, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, **cap, **sr)
    R.fused_step_(ref_p, grads, [], ids, seed, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, **cap, **sr)
    assert_bits_equal(params, ref_p, "fused_step_ with step_t and lr_t")


def check_ignored_elsewhere(ops, sizes=SIZES, offsets=OFFSETS, ids=IDS, seed=SEED):
    """fp32 params and bf16 params with masters are not rounded stochastically: the flag changes
    nothing there."""
    gen = torch.Generator().manual_seed(262)
    for dtype, master in ((torch.float32, False), (torch.bfloat16, True)):
        clean = [torch.randn(s, generator=gen) for s in sizes]
        runs = []
        for flag in (False, True):
            params, masters = [c.to(dtype) for c in clean], [c.clone() for c in clean] if master else []
            grads = [torch.ones(s, dtype=dtype) for s in sizes]
            ops.perturb_(params, ids, seed, 0, SIGMA, offsets=offsets, masters=masters, stochastic_rounding=flag)
            ops.fused_step_(params, grads, [], ids, seed, 0, LR, 0.0, 0.0, NOISE_STD, SIGMA, SIGMA, offsets=offsets,
                            masters=masters, stochastic_rounding=flag)
            ops.restore_(params, ids, seed, 1, SIGMA, offsets=offsets, masters=masters, stochastic_rounding=flag)
            runs.append(params + masters)
        assert all(torch.equal(a, b) for a, b in zip(*runs)), f"{dtype} masters={master}: the flag changed the result"


def check_noisy(ops, sizes=SIZES, offsets=OFFSETS, ids=IDS, seed=SEED, momentum=0.0):
    """Gaussian perturbations and Langevin noise: within one ulp of the reference, on few elements."""
    gen = torch.Generator().manual_seed(2626)
    sr = dict(offsets=offsets, stochastic_rounding=True)
    params = make_params(sizes, gen)
    bufs = [torch.zeros(s, dtype=torch.bfloat16) for s in sizes] if momentum else []
    ref_p, ref_b = [p.clone() for p in params], [b.clone() for b in bufs]
    ops.perturb_(params, ids, seed, 0, SIGMA, **sr)
    R.perturb_(ref_p, ids, seed, 0, SIGMA, **sr)
    assert_within_one_ulp(params, ref_p, "perturb_")
    _sync(params, ref_p)
    for k in range(3):
        grads = make_grads(sizes, gen)
        args = (ids, seed, k, LR, 0.01, momentum, NOISE_STD, SIGMA, SIGMA if k < 2 else 0.0)
        ops.fused_step_(params, grads, bufs, *args, **sr)
        R.fused_step_(ref_p, grads, ref_b, *args, **sr)
        assert_within_one_ulp(params, ref_p, f"fused_step_ {k}")
        assert_within_one_ulp(bufs, ref_b, f"fused_step_ {k} momentum buffers")
        _sync(params, ref_p), _sync(bufs, ref_b)
    # noise only (no perturbation): the compensated std is all that differs from plain SGLD
    for k in range(3, 5):
        grads = make_grads(sizes, gen)
        args = (ids, seed, k, LR, 0.0, 0.0, NOISE_STD, 0.0, 0.0)
        ops.fused_step_(params, grads, [], *args, **sr)
        R.fused_step_(ref_p, grads, [], *args, **sr)
        assert_within_one_ulp(params, ref_p, f"fused_step_ {k} (noise only)")
        _sync(params, ref_p)
    ops.perturb_(params, ids, seed, 5, SIGMA, **sr)
    R.perturb_(ref_p, ids, seed, 5, SIGMA, **sr)
    _sync(params, ref_p)
    ops.restore_(params, ids, seed, 5, SIGMA, **sr)
    R.restore_(ref_p, ids, seed, 5, SIGMA, **sr)
    assert_within_one_ulp(params, ref_p, "restore_")


class OnDevice:
    """A backend's ops on `device`, called with the CPU tensors of these checks: every tensor argument
    goes to the device, and every tensor list (params, buffers, masters) comes back into the CPU
    tensors after the call, so the reference keeps running on the CPU."""

    def __init__(self, ops, device):
        self.ops, self.device = ops, torch.device(device)

    def __getattr__(self, name):
        fn = getattr(self.ops, name)

        def call(*args, **kwargs):
            lists = []

            def to_device(x):
                if isinstance(x, torch.Tensor):
                    return x.to(self.device)
                if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
                    lists.append((x, [t.to(self.device) for t in x]))
                    return lists[-1][1]
                return x

            out = fn(*[to_device(a) for a in args], **{k: to_device(v) for k, v in kwargs.items()})
            for cpu, dev in lists:
                for a, b in zip(cpu, dev):
                    a.copy_(b)
            return out

        return call


def check_std_from_the_clean_theta(ops, *_lists, seed=SEED):
    """The compensated std is the clean weight's, before the update (SPEC 2c): weights just below 2
    whose update crosses into the next binade (ulp 2**-7 -> 2**-6) tell it apart from the updated
    weight's (a std of 0.45 ulp of the upper binade: compensated 6.3e-3 from the clean weight, 3.0e-3
    from the updated one)."""
    n = 2000
    params = [torch.full((n,), 2.0 - 2.0**-7, dtype=torch.bfloat16)]
    grads = [torch.full((n,), -2.0, dtype=torch.bfloat16)]
    ref = [params[0].clone()]
    args = ([3], seed, 1, LR, 0.0, 0.0, 0.45 * 2.0**-6, 0.0, 0.0)
    ops.fused_step_(params, grads, [], *args, offsets=[5], stochastic_rounding=True)
    R.fused_step_(ref, grads, [], *args, offsets=[5], stochastic_rounding=True)
    assert_within_one_ulp(params, ref, "fused_step_ across a binade")


def check_all(ops, n_tensors=len(SIZES), device="cpu"):
    """Every check; `device`: where the ops run (their tensors are copied there and back)."""
    if torch.device(device).type != "cpu":
        ops = OnDevice(ops, device)
    lists = (SIZES[:n_tensors], OFFSETS[:n_tensors], IDS[:n_tensors])
    check_noise_free(ops, *lists)
    check_ignored_elsewhere(ops, *lists)
    check_noisy(ops, *lists)
    check_noisy(ops, *lists, momentum=0.9)
    check_std_from_the_clean_theta(ops)
