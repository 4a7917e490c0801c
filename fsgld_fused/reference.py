"""The executable specification of fSGLD (SPEC sections 2 and 3) in plain PyTorch.

Slow on purpose and correct by construction: every kernel backend is tested against these
functions element by element. The random stream is Philox4x32-10 done with int64 tensor ops,
so a uint32 word is an int64 in [0, 2**32) and products are split to stay below 2**63.

One step of fSGLD for the weights theta (what `fused_step_` does to each element):

    theta = theta - sigma_k * eps_k                        restore (eps regenerated, not stored)
    d     = g * grad_scale_inv + weight_decay * theta      gradient taken at theta + sigma_k*eps_k
    buf   = momentum * buf + d;  d = buf                   only with momentum (buf starts at 0)
    theta = theta - lr * d + sqrt(2 * lr / beta) * xi_k    SGLD update with Langevin noise
    theta = theta + sigma_k1 * eps_{k+1}                   next step's perturbation (perturb_ahead)

eps is Gaussian (`normals`) or, with `perturbation="rademacher"`, random signs (`rademacher`,
SPEC 2b); the Langevin noise xi is always Gaussian. Sub-stream j of several perturbations per step
(`n_pert`) is the same stream shifted by `substream_offset(j, ...)` elements.

`stochastic_rounding=True` (SPEC 2c; bf16 params without masters only): the float32 result is
rounded to bf16 up or down at random (`round_bf16_stochastic`, bits from `rounding_bits`), and the
Langevin std shrinks per element to leave room for the rounding's own variance
(`compensated_noise_std`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

__all__ = [
    "philox4x32",
    "normals",
    "rademacher",
    "substream_offset",
    "rounding_bits",
    "round_bf16_stochastic",
    "bf16_ulp",
    "compensated_noise_std",
    "rounds_stochastically",
    "perturb_",
    "restore_",
    "fused_step_",
    "EPS",
    "XI",
]

EPS, XI = 0, 1  # the `kind` word of the counter: perturbation, Langevin noise

_MASK32 = 0xFFFFFFFF
_ROUND_MUL = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMP = (0x9E3779B9, 0xBB67AE85)
_TWO_PI_F32 = torch.tensor(2.0 * math.pi, dtype=torch.float32)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product a * m, for a < 2**32, without int64 overflow."""
    p_lo = (a & 0xFFFF) * m  # < 2**48
    p_hi = (a >> 16) * m  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(counter: Sequence, key: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 (Random123). counter: four int64 tensors (or ints) of uint32 words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) for c in counter)
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _ROUND_MUL[0])
        hi1, lo1 = _mulhilo32(c2, _ROUND_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_BUMP[0]) & _MASK32, (k1 + _KEY_BUMP[1]) & _MASK32
    return c0, c1, c2, c3


def _uniform(w: torch.Tensor) -> torch.Tensor:
    """Odd multiples of 2**-24: exact in float32, strictly inside (0, 1)."""
    return ((w >> 9) * 2 + 1).to(torch.float32) * 2.0**-24


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(a))
    t = _TWO_PI_F32 * b
    return r * torch.cos(t), r * torch.sin(t)


def normals(
    seed: int, pid: int, step: int, kind: int, numel: int, offset: int = 0
) -> torch.Tensor:
    """Standard normals of elements offset .. offset+numel-1 of parameter `pid` (float32, CPU).

    `offset` is the global row-major index of the first element: a shard of a larger tensor
    draws exactly its slice of the unsharded stream.
    """
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    first, last = offset // 4, (offset + numel - 1) // 4
    block = torch.arange(first, last + 1, dtype=torch.int64)
    counter = (block & _MASK32, block >> 32, step & _MASK32, ((pid << 1) | kind) & _MASK32)
    w0, w1, w2, w3 = philox4x32(counter, (seed & _MASK32, seed >> 32))
    n0, n1 = _box_muller(_uniform(w0), _uniform(w1))
    n2, n3 = _box_muller(_uniform(w2), _uniform(w3))
    lanes = torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)  # element i -> lane i % 4
    start = offset % 4
    return lanes[start : start + numel]


def rademacher(seed: int, pid: int, step: int, numel: int, offset: int = 0) -> torch.Tensor:
    """Random signs (SPEC 2b) of elements offset .. offset+numel-1 of parameter `pid`: one Philox
    call (kind EPS) per 128 elements, one bit per element."""
    if numel == 0:
        return torch.empty(0, dtype=torch.float32)
    first, last = offset // 128, (offset + numel - 1) // 128
    block = torch.arange(first, last + 1, dtype=torch.int64)
    counter = (block & _MASK32, block >> 32, step & _MASK32, ((pid << 1) | EPS) & _MASK32)
    words = torch.stack(philox4x32(counter, (seed & _MASK32, seed >> 32)), dim=1).reshape(-1)  # block order
    bits = (words.unsqueeze(1) >> torch.arange(32)) & 1  # element i: bit i % 32 of word i // 32
    start = offset - 128 * first
    return bits.reshape(-1)[start : start + numel].to(torch.float32).mul_(2.0).sub_(1.0)


def substream_offset(j: int, rademacher_eps: bool) -> int:
    """Element offset that puts sub-stream j (of `n_pert` perturbations) in bits 16..31 of counter
    word 1 (SPEC 2b): j * 2**48 blocks, of 4 elements (Gaussian) or 128 (Rademacher)."""
    return j << (48 + (7 if rademacher_eps else 2))


# ---- SPEC 2c: stochastic rounding of bf16 params without masters ---------------------------------
FUSED_STEP_OP, PERTURB_OP, RESTORE_OP = 0, 1, 2  # the `op` of each call's rounding sub-stream


def rounding_bits(seed: int, pid: int, step: int, op: int, numel: int, offset: int = 0) -> torch.Tensor:
    """16 random bits (int64 in [0, 2**16)) per element: eight elements per Philox call of the
    Langevin kind, sub-stream 0xffff - op in bits 16..31 of counter word 1 (no other draw uses it)."""
    if numel == 0:
        return torch.empty(0, dtype=torch.int64)
    first, last = offset // 8, (offset + numel - 1) // 8
    block = torch.arange(first, last + 1, dtype=torch.int64)
    counter = (block & _MASK32, (block >> 32) | ((0xFFFF - op) << 16), step & _MASK32, ((pid << 1) | XI) & _MASK32)
    words = torch.stack(philox4x32(counter, (seed & _MASK32, seed >> 32)), dim=1)  # (blocks, 4)
    halves = torch.stack((words & 0xFFFF, words >> 16), dim=2).reshape(-1)  # element e: word e // 2, half e % 2
    start = offset - 8 * first
    return halves[start : start + numel]


def round_bf16_stochastic(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """float32 x -> bf16, up or down with the probability that makes it unbiased: add the 16 random
    bits below bf16's last mantissa bit and truncate. Non-finite x, or a finite x that would become
    infinite, rounds to nearest."""
    x = x.to(torch.float32).contiguous()
    b = ((x.view(torch.int32).to(torch.int64) & _MASK32) + bits.view(x.shape)) & _MASK32
    hi = b >> 16
    out = (hi - ((hi >> 15) << 16)).to(torch.int16).view(torch.bfloat16)  # the top half, as bf16 bits
    finite = torch.isfinite(x)
    return torch.where(~finite | (torch.isinf(out) & finite), x.to(torch.bfloat16), out)


def bf16_ulp(theta: torch.Tensor) -> torch.Tensor:
    """ulp of bf16 at float32 theta: 2**(e - 7), e = theta's unbiased float32 exponent; 2**-133 below
    2**-126 (where the biased exponent is 0, the formula at e = -126 gives the same)."""
    biased = (theta.to(torch.float32).contiguous().view(torch.int32) >> 23) & 0xFF
    return torch.ldexp(torch.ones_like(theta, dtype=torch.float32), biased.clamp(min=1) - 134)


def compensated_noise_std(theta: torch.Tensor, noise_std: float) -> torch.Tensor:
    """sqrt(max(0, noise_std**2 - ulp(theta)**2 / 6)) in float32: the Langevin std that, with the
    rounding's variance (ulp**2 / 6 on average), gives the chain its temperature."""
    std = torch.tensor(noise_std, dtype=torch.float32)
    ulp = bf16_ulp(theta)
    return torch.sqrt(torch.clamp(std * std - ulp * ulp * torch.tensor(1.0 / 6.0, dtype=torch.float32), min=0.0))


def rounds_stochastically(p: torch.Tensor, masters, stochastic_rounding: bool) -> bool:
    """Whether SPEC 2c applies to param p: asked for, bf16, and no masters (elsewhere the flag is
    ignored). Every Python backend and the optimizer's plan ask this one function."""
    return bool(stochastic_rounding) and p.dtype == torch.bfloat16 and not masters


def _write_rounded_(p, theta, seed, pid, step, op, off):
    bits = rounding_bits(seed, pid, step, op, p.numel(), off).to(p.device)
    p.copy_(round_bf16_stochastic(theta, bits).view(p.shape))


def _noise_like(p: torch.Tensor, seed: int, pid: int, step: int, kind: int, offset: int, signs: bool = False):
    draw = rademacher(seed, pid, step, p.numel(), offset) if signs else normals(seed, pid, step, kind, p.numel(), offset)
    return draw.to(p.device).view(p.shape)


def _offsets(params, offsets):
    return [0] * len(params) if offsets is None else list(offsets)


def _math_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def perturb_(
    params: Sequence[torch.Tensor],
    param_ids: Sequence[int],
    seed: int,
    step: int,
    sigma: float,
    offsets: Optional[Sequence[int]] = None,
    masters: Sequence[torch.Tensor] = (),
    step_t: Optional[torch.Tensor] = None,
    rademacher: bool = False,
    stochastic_rounding: bool = False,
    _op: int = PERTURB_OP,
) -> None:
    """theta += sigma * eps_step. With fp32 masters: theta = round(master + sigma * eps_step).
    step_t (capturable form): a one-element int64 tensor that replaces `step`.
    rademacher: eps is random signs (SPEC 2b) instead of normals.
    stochastic_rounding: bf16 params without masters are rounded stochastically (SPEC 2c)."""
    step = step if step_t is None else int(step_t)
    offs = _offsets(params, offsets)
    for i, (p, pid, off) in enumerate(zip(params, param_ids, offs)):
        clean = masters[i] if masters else p.to(_math_dtype(p))
        eps = _noise_like(p, seed, pid, step, EPS, off, rademacher).to(clean.dtype)
        if rounds_stochastically(p, masters, stochastic_rounding):
            _write_rounded_(p, clean + sigma * eps, seed, pid, step, _op, off)
        else:
            p.copy_(clean + sigma * eps)


def restore_(
    params: Sequence[torch.Tensor],
    param_ids: Sequence[int],
    seed: int,
    step: int,
    sigma: float,
    offsets: Optional[Sequence[int]] = None,
    masters: Sequence[torch.Tensor] = (),
    step_t: Optional[torch.Tensor] = None,
    rademacher: bool = False,
    stochastic_rounding: bool = False,
) -> None:
    """Undo perturb_ (same seed, step, sigma, distribution): theta -= sigma * eps_step; with
    masters, copy back. Stochastic rounding (SPEC 2c) draws its own bits (op 2): the restore is
    then exact only in expectation."""
    if masters:
        for p, m in zip(params, masters):
            p.copy_(m)
        return
    perturb_(params, param_ids, seed, step, -sigma, offsets, step_t=step_t, rademacher=rademacher,
             stochastic_rounding=stochastic_rounding, _op=RESTORE_OP)


def fused_step_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    param_ids: Sequence[int],
    seed: int,
    step: int,
    lr: float,
    weight_decay: float,
    momentum: float,
    noise_std: float,
    restore_sigma: float,
    perturb_sigma: float,
    offsets: Optional[Sequence[int]] = None,
    masters: Sequence[torch.Tensor] = (),
    grad_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    step_t: Optional[torch.Tensor] = None,
    lr_t: Optional[torch.Tensor] = None,
    restore_rademacher: bool = False,
    perturb_rademacher: bool = False,
    stochastic_rounding: bool = False,
) -> None:
    """SPEC section 3 for every tensor of the list; math in float32 (float64 params: float64).

    momentum_buffers: empty when momentum == 0, else one zero-initialised buffer per param.
    masters: empty, or one fp32 master per (low-precision) param; the master is never perturbed.
    restore_sigma / perturb_sigma: 0 means "not perturbed" / "do not perturb ahead".
    Capturable form: step_t (int64) replaces `step`; lr_t (float32) replaces `lr`, and the
    Langevin std is then float32(noise_std) * sqrt(lr_t) (pass noise_std = sqrt(2 / beta)).
    restore_rademacher / perturb_rademacher: eps_k / eps_{k+1} are signs (SPEC 2b), not normals.
    stochastic_rounding (SPEC 2c): a bf16 param without a master gets the Langevin std
    `compensated_noise_std(theta, noise_std)` and is written rounded stochastically.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return  # AMP overflow: nothing changes, not even the perturbation
    if step_t is not None:
        step = int(step_t)
    if lr_t is not None:
        lr_f32 = lr_t.float().reshape(())
        lr, noise_std = float(lr_f32), float(torch.tensor(noise_std, dtype=torch.float32) * torch.sqrt(lr_f32))
    inv_scale = None if grad_scale is None else 1.0 / grad_scale.float()
    offs = _offsets(params, offsets)
    for i, (p, g, pid, off) in enumerate(zip(params, grads, param_ids, offs)):
        math_dtype = _math_dtype(p)
        noise = lambda step_, kind, signs=False: _noise_like(p, seed, pid, step_, kind, off, signs).to(math_dtype)  # noqa: E731
        if masters:
            theta = masters[i].to(math_dtype)
        else:
            theta = p.to(math_dtype)
            if restore_sigma != 0.0:
                theta = theta - restore_sigma * noise(step, EPS, restore_rademacher)
        stochastic = rounds_stochastically(p, masters, stochastic_rounding)  # std from the clean theta (SPEC 2c)
        std = compensated_noise_std(theta, noise_std) if stochastic else noise_std
        d = g.to(math_dtype)
        if inv_scale is not None:
            d = d * inv_scale.to(d.device, math_dtype)
        if weight_decay != 0.0:
            d = d + weight_decay * theta
        if momentum != 0.0:
            buf = momentum_buffers[i]
            buf.copy_(momentum * buf.to(math_dtype) + d)
            d = buf.to(math_dtype)
        theta = theta - lr * d
        if noise_std != 0.0:
            theta = theta + std * noise(step, XI)
        if masters:
            masters[i].copy_(theta)
        if perturb_sigma != 0.0:
            theta = theta + perturb_sigma * noise(step + 1, EPS, perturb_rademacher)
        if stochastic:
            _write_rounded_(p, theta, seed, pid, step, FUSED_STEP_OP, off)
        else:
            p.copy_(theta)
