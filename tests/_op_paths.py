"""One check that reaches every path of a backend's `perturb_`, `restore_` and `fused_step_`:
shard offsets (not multiples of 4 or 128, one across the 2**32-block boundary, one multiple of 4
for the vector paths) x fp32 masters x weight decay x momentum, over several steps, unscaled and with a grad scale,
comparing params, masters and momentum buffers with the reference after every call.

Used by tests/test_kernels.py (cpu with AVX-512, cpu portable in a subprocess, triton through the
interpreter) and tests/test_cuda_emulation.py (the CUDA kernels on the CPU). Only the public op
signatures of `fsgld_fused.reference` are used.
"""

from __future__ import annotations

import itertools
import math

import torch

from fsgld_fused import reference as R
from fsgld_fused.testing import assert_step_close, rtol_for

# Sizes around the kernels' structure: Philox blocks of 4, the CPU kernel's 1024-element chunks and
# 16-block fills, Triton's 1024-element programs, the CUDA kernels' 4096-element chunks.
SIZES = [0, 3, 70, 1100, 4107]
# Global index of each tensor's first element (FSDP2 shards): odd, 2 mod 4, across block 2**32,
# 3 mod 4 past a CUDA chunk, and a multiple of 4 (the CUDA kernels' vector path).
OFFSETS = [5, 1, 4 * 2**32 - 6, 4099, 12]
IDS = [4, 0, 9, 2, 5]  # param ids out of order
SEED = 0xFEEDFACECAFEBEEF
# (param dtype, fp32 masters)
CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
# weight decay x momentum; every chain takes unscaled and scaled steps (GradScaler's powers of two)
COMBOS = list(itertools.product([0.0, 0.05], [0.0, 0.9]))
SCALES = [None, 512.0, 2.0**-3]  # the grad scale of steps 0..2
LR, BETA = 0.01, 1e4
SIGMAS = [0.05, 0.05, 0.03, 0.03]  # the perturbation scale of steps 0..3: changed before step 2


def _close(what, actual, expected, coeffs, sizes, offsets, atol_extra=0.0, first=0):
    for i, (a, b) in enumerate(zip(actual, expected), start=first):
        try:
            assert_step_close(a, b, coeffs, atol_extra=atol_extra)
        except AssertionError as exc:
            raise AssertionError(f"{what}, tensor {i} (size {sizes[i]}, offset {offsets[i]}): {exc}") from None


def _sync(dst, src):
    for a, b in zip(dst, src):
        a.copy_(b)


def check_chain(ops, dtype, master, weight_decay, momentum, sizes=SIZES, offsets=OFFSETS, ids=IDS, seed=SEED,
                sigmas=SIGMAS, scales=SCALES, lr=LR, beta=BETA, first_ahead=1, data_seed=None):
    """perturb_, then len(scales) fused steps, then restore_. Step k restores sigmas[k] and, from
    step `first_ahead` on, perturbs ahead with sigmas[k + 1] (before that an explicit perturb_
    follows it); scales[k] is its grad scale (None: unscaled). After each call the backend must
    match the reference within the SPEC tolerance (noise rounding only); the reference's values
    are then copied across, so each call is judged on its own."""
    where = f"{dtype} masters={master} weight_decay={weight_decay} momentum={momentum}"
    gen = torch.Generator().manual_seed(len(where) if data_seed is None else data_seed)
    clean = [torch.randn(s, generator=gen) for s in sizes]
    masters = [c.clone() for c in clean] if master else []
    params = [c.to(dtype) for c in clean]
    bufs = [torch.zeros(s, dtype=torch.float32 if master else dtype) for s in sizes] if momentum else []
    ref_p, ref_m, ref_b = [p.clone() for p in params], [m.clone() for m in masters], [b.clone() for b in bufs]
    noise_std = math.sqrt(2 * lr / beta)
    lists = (sizes, offsets)

    ops.perturb_(params, ids, seed, 0, sigmas[0], offsets=offsets, masters=masters)
    R.perturb_(ref_p, ids, seed, 0, sigmas[0], offsets=offsets, masters=ref_m)
    _close(f"perturb_ step 0 [{where}]", params, ref_p, sigmas[0], *lists)
    _sync(params, ref_p)
    for k, scale in enumerate(scales):
        grads = [(torch.randn(s, generator=gen) * (scale or 1.0)).to(dtype) for s in sizes]
        kw = {} if scale is None else dict(grad_scale=torch.tensor([scale]), found_inf=torch.tensor([0.0]))
        ahead = 0.0 if k < first_ahead else sigmas[k + 1]
        args = (ids, seed, k, lr, weight_decay, momentum, noise_std, sigmas[k], ahead)
        ops.fused_step_(params, grads, bufs, *args, offsets=offsets, masters=masters, **kw)
        R.fused_step_(ref_p, grads, ref_b, *args, offsets=offsets, masters=ref_m, **kw)
        restored = 0.0 if master else sigmas[k]  # a master is never perturbed
        _close(f"fused_step_ {k}: params [{where}]", params, ref_p, restored + noise_std + ahead, *lists)
        _close(f"fused_step_ {k}: masters [{where}]", masters, ref_m, noise_std, *lists)
        for i, (a, b) in enumerate(zip(bufs, ref_b)):
            # d = g/s + wd * theta: theta carries the restore's noise error; a rounding flip at the
            # operands' magnitude survives the cancellation in m * buf + d
            flip = rtol_for(b.dtype) * (b.abs().max().item() if b.numel() else 0.0)
            _close(f"fused_step_ {k}: momentum buffers [{where}]", [a], [b], weight_decay * restored, *lists,
                   atol_extra=flip, first=i)
        _sync(params, ref_p), _sync(masters, ref_m), _sync(bufs, ref_b)
        if k < first_ahead:
            ops.perturb_(params, ids, seed, k + 1, sigmas[k + 1], offsets=offsets, masters=masters)
            R.perturb_(ref_p, ids, seed, k + 1, sigmas[k + 1], offsets=offsets, masters=ref_m)
            _close(f"perturb_ step {k + 1} [{where}]", params, ref_p, sigmas[k + 1], *lists)
            _sync(params, ref_p)
    steps = len(scales)
    ops.restore_(params, ids, seed, steps, sigmas[steps], offsets=offsets, masters=masters)
    R.restore_(ref_p, ids, seed, steps, sigmas[steps], offsets=offsets, masters=ref_m)
    _close(f"restore_ step {steps} [{where}]", params, ref_p, 0.0 if master else sigmas[steps], *lists)
    if master:  # restoring from a master is its exact copy
        assert all(torch.equal(p, m.to(dtype)) for p, m in zip(params, masters)), f"restore_ [{where}]"


def check_case(ops, dtype, master, n_tensors=len(SIZES)):
    """Every combination for one (dtype, masters) case, on the first `n_tensors` tensors."""
    for wd, mom in COMBOS:
        check_chain(ops, dtype, master, wd, mom, SIZES[:n_tensors], OFFSETS[:n_tensors], IDS[:n_tensors])


def check_all(ops, n_tensors=len(SIZES)):
    for dtype, master in CASES:
        check_case(ops, dtype, master, n_tensors)
