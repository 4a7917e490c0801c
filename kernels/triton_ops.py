"""Triton kernels of fsgld-fused: perturb_, restore_ and the fused step (SPEC sections 2 and 3).

Same signatures as `fsgld_fused.reference`. One launch covers a whole (device, dtype) list: a
table of tensor addresses, sizes, parameter ids and global offsets lives on the device (built
once and cached while the addresses are unchanged), and each program handles BLOCK Philox
blocks (4 * BLOCK consecutive elements) of one tensor. Every draw is keyed on the element's
global index, so the stream does not depend on BLOCK, the grid or the tensor's alignment.

On CPU this runs through the Triton interpreter (`TRITON_INTERPRET=1`, set before import).
"""

import contextlib
import hashlib
import json
import math
import os
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .._ops import _offsets, _seed_arg
from ..baselines import median, time_fn
from ..reference import PERTURB_OP, RESTORE_OP, rounds_stochastically

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def _soft_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


# ---- the stream: SPEC's counter layout, all four words used ---------------------------------------
# The same formulas as csrc/fsgld_math.h (see the comments there); measured on sm_90 SASS.
@triton.jit
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Random123) on uint32 tensors and uint32 keys. Each round's multiply is one
    32x32->64 product (sm_90: one IMAD.WIDE.U32 for hi and lo; tl.philox's umulhi + mul costs
    11 instructions per element more in the fused step)."""
    for _ in tl.static_range(10):
        p0 = c0.to(tl.uint64) * 0xD2511F53
        p1 = c2.to(tl.uint64) * 0xCD9E8D57
        c0, c1, c2, c3 = (p1 >> 32).to(tl.uint32) ^ c1 ^ k0, p1.to(tl.uint32), (p0 >> 32).to(tl.uint32) ^ c3 ^ k1, \
            p0.to(tl.uint32)
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _key(seed):
    """The Philox key (low, high word) of the 64-bit seed (an int32, int64 or uint64 scalar)."""
    seed = tl.to_tensor(seed).to(tl.uint64)
    return (seed & 0xFFFFFFFF).to(tl.uint32), ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _minus_two_log_u(w):
    """-2 ln(u(w)): integer reduction, 2**-24 folded into the exponent, ln(1 + m) = m Q(m) with Q of
    degree 6 (fsgld_math.h: the same constants, the same error)."""
    ix = ((w >> 8) | 1).to(tl.int32).to(tl.float32).to(tl.uint32, bitcast=True)
    tmp = ix - (0x3F3504F3 + (24 << 23))
    fe = (tmp.to(tl.int32, bitcast=True) >> 23).to(tl.float32)
    m = (ix - (tmp & 0xFF800000) - (24 << 23)).to(tl.float32, bitcast=True) - 1.0
    q = tl.fma(tl.full(m.shape, -2.0 * 0.11895957589149475, tl.float32), m, -2.0 * -0.1866779923439026)
    q = tl.fma(q, m, -2.0 * 0.20496349036693573)
    q = tl.fma(q, m, -2.0 * -0.24909751117229462)
    q = tl.fma(q, m, -2.0 * 0.3331450819969177)
    q = tl.fma(q, m, -2.0 * -0.500011146068573)
    q = tl.fma(q, m, -2.0 * 1.0000009536743164)
    return tl.fma(fe, -2.0 * 0.693147180559945309, m * q)


@triton.jit
def _sincos_half_turn(w):
    """(sin, cos) of the residual of 2 pi u(w) from its nearest half turn, and the sign bit of an odd
    half turn (which negates both): exact integer reduction, degree-3 polynomials (fsgld_math.h).
    In place of tl.sin / tl.cos (libdevice: 54 instructions per element more in the fused step)."""
    v = (w & 0xFFFFFF00) | 0x100
    r = (v << 1).to(tl.int32, bitcast=True).to(tl.float32) * 7.31459059988282e-10  # 2 pi 2**-33 in fp32
    z = r * r
    sp = tl.fma(tl.fma(tl.fma(tl.fma(tl.full(z.shape, 2.600057086965535e-06, tl.float32), z, -0.0001980661618290469),
                              z, 0.008333017118275166), z, -0.16666656732559204) * z, r, r)
    cp = tl.fma(tl.fma(tl.fma(tl.fma(tl.full(z.shape, 2.3194415916805156e-05, tl.float32), z, -0.0013855928555130959),
                              z, 0.041663989424705505), z, -0.4999993145465851), z, 1.0)
    return sp, cp, (v + 0x40000000) & 0x80000000


@triton.jit
def _sincos_2pi_u(w):
    """(sin, cos) of 2 pi u(w) (fsgld_math.h)."""
    sp, cp, sign = _sincos_half_turn(w)
    return (sp.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True), \
        (cp.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)


@triton.jit
def _sqrt_box_muller(x):
    """sqrt(x), correctly rounded, for x in [1.1e-7, 33.3] (and by scaling any normal x): the fast
    path of the IEEE sqrt (rsqrt, one Newton correction) without its branch for special inputs, as
    in fsgld_math.h."""
    y = tl.rsqrt(x)
    s = x * y
    return tl.fma(tl.fma(-s, s, x), y * 0.5, s)


@triton.jit
def _box_muller(wa, wb, scale):
    """SPEC's box_muller of the words (u(wa), u(wb)), times `scale` (on r: one multiply per pair)."""
    r = scale * _sqrt_box_muller(_minus_two_log_u(wa))
    s, c, sign = _sincos_half_turn(wb)
    rs = (r.to(tl.uint32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)  # one sign for both
    return rs * c, rs * s


@triton.jit
def _stream_words(seed, blk, step, tag):
    """Philox words w0..w3 of blocks blk (int64) of stream (seed, step, tag): SPEC 2's counter."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    k0, k1 = _key(seed)
    return _philox(c0, (blk >> 32).to(tl.uint32), zero + step.to(tl.uint32), zero + tag.to(tl.uint32), k0, k1)


@triton.jit
def _normals(seed, blk, step, tag, scale):
    """[BLOCK, 4] normals of Philox blocks blk (int64 [BLOCK]) of stream (seed, step, tag), times
    `scale` (applied to r, as in fsgld_math.h: fp32 full step -1.5 instructions per element)."""
    w0, w1, w2, w3 = _stream_words(seed, blk, step, tag)
    n0, n1 = _box_muller(w0, w1, scale)
    n2, n3 = _box_muller(w2, w3, scale)
    # element 4*blk + lane takes word `lane`: join stacks on a new last axis, so pair (0,2),(1,3)
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), (blk.shape[0], 4))


# ---- SPEC 2b's signs: one Philox per 128 elements, one bit per element ---------------------------
# Each thread draws its own rows' block (fp32 full step, sm_90, BLOCK 256/1024: 79.6/62.3 per element;
# a [BLOCK // 32] Philox broadcast to rows in memory order: 80.5/65.0; a per-row Philox branch: +7;
# counted with Cephes' log, 76.2/58.9 with the degree-6 one).
@triton.jit
def _sign_rows(BLOCK: tl.constexpr):
    """The row (Philox block of 4 elements, from the program's first) that each of the [BLOCK]
    tensor rows holds when the perturbation is signs: tensor row a * BLOCK/4 + b holds row
    32 (b // 8) + 8 a + b % 8, so rows (a, b) for a = 0..3 make up Rademacher block b // 8.
    Triton's blocked layout spreads b over lanes and warps (a over registers, or warps for small
    blocks): the rows of a thread share their b, so it draws one Philox per 16 of its elements. A
    warp's access still covers whole 128-byte lines (fp32; 64 bytes for bf16)."""
    r = tl.arange(0, BLOCK)
    a = r // (BLOCK // 4)
    b = r % (BLOCK // 4)
    return 32 * (b // 8) + 8 * a + b % 8


@triton.jit
def _pair_rows(BLOCK: tl.constexpr):
    """The row that each tensor row holds when the param is rounded stochastically (SPEC 2c, one
    Philox per 8 elements) without signs: tensor rows j and j + BLOCK/2 hold rows 2j and 2j + 1,
    one rounding block, and Triton's blocked layout gives both to one thread (its rows are a
    thread stride apart, which divides BLOCK/2), so a thread draws each rounding block once (any
    other layout stays correct, at a shuffle's cost). A warp's access covers every other row: two
    accesses of a thread fill each line."""
    r = tl.arange(0, BLOCK)
    return 2 * (r % (BLOCK // 2)) + r // (BLOCK // 2)


@triton.jit
def _program_rows(BLOCK: tl.constexpr, SIGNS: tl.constexpr, PAIRS: tl.constexpr):
    """The row (Philox block) of each tensor row, from the program's first: in order, or with a
    sign perturbation in the order of _sign_rows, or stochastically rounded in that of _pair_rows."""
    if SIGNS:
        return _sign_rows(BLOCK)
    elif PAIRS:
        return _pair_rows(BLOCK)
    else:
        return tl.arange(0, BLOCK)


@triton.jit
def _sigma_signs(sigma, seed, blk0, step, tag, BLOCK: tl.constexpr):
    """[BLOCK, 4] sigma * eps in float32 for the SPEC 2b signs eps of stream (seed, step, tag) at
    the program's rows blk0 + _sign_rows(BLOCK), blk0 a multiple of 32 (chunks start at a
    Rademacher block): row i (elements 4i + c) takes bits 4 (i % 8) + c of word (i % 32) // 8 of
    block i // 32. Exact: sigma * (+-1) is sigma with its sign bit flipped or not."""
    b = tl.arange(0, BLOCK // 4)
    w0, w1, w2, w3 = _stream_words(seed, (blk0 >> 5) + (b // 8).to(tl.int64), step, tag)
    a = tl.arange(0, 4)[:, None]  # tensor row (a, b) takes word a; where a lies in registers the selects fold
    word = tl.where(a < 2, tl.where(a == 0, w0[None, :], w1[None, :]), tl.where(a == 2, w2[None, :], w3[None, :]))
    # bits 4 (b % 8) .. + 3 of the word to 28 .. 31, then element c's bit 28 + c to the sign bit
    top = tl.reshape(word << (28 - 4 * (b % 8)).to(tl.uint32)[None, :], (BLOCK,))
    set_bit = (top[:, None] << (3 - tl.arange(0, 4)[None, :]).to(tl.uint32)) & 0x80000000
    return ((-sigma).to(tl.uint32, bitcast=True) ^ set_bit).to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """float32 -> DTYPE, round to nearest even. The interpreter truncates float32 -> bf16 (seen
    with triton 3.9 and fp_downcast_rounding="rtne"), so there bf16 is rounded by hand."""
    if SOFT_BF16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, (b >> 16) | 0x40, r)  # a NaN stays a NaN
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


# ---- SPEC 2c: stochastic rounding of bf16 params without masters -------------------------------
@triton.jit
def _rounding_bits(seed, blk, step, tag, op):
    """[BLOCK, 4] 16 random bits (uint32) per element of Philox blocks blk (int64 [BLOCK]): the words
    of rounding block blk // 2 (8 elements), sub-stream 0xffff - op in bits 16..31 of counter word 1;
    element 4 blk + lane takes half lane % 2 of word 2 (blk % 2) + lane // 2. Drawn per row (with
    the sign rows a thread's rows do not pair up: twice per rounding block; else _rounding_bits_pairs)."""
    sub = (0xFFFF - tl.to_tensor(op)).to(tl.int64) << 48  # word 1 = (rblk >> 32) | sub >> 32: rblk < 2**48
    w0, w1, w2, w3 = _stream_words(seed, (blk >> 1) | sub, step, tag)
    odd = (blk & 1) != 0
    wa = tl.where(odd, w2, w0)
    wb = tl.where(odd, w3, w1)
    return _halves(wa, wb)


@triton.jit
def _halves(wa, wb):
    """[BLOCK, 4] the four 16-bit halves of words (wa, wb) [BLOCK] of each row, low half first."""
    return tl.reshape(tl.join(tl.join(wa & 0xFFFF, wb & 0xFFFF), tl.join(wa >> 16, wb >> 16)), (wa.shape[0], 4))


@triton.jit
def _rounding_bits_pairs(seed, blk0, step, tag, op, BLOCK: tl.constexpr):
    """_rounding_bits of the rows blk0 + _pair_rows(BLOCK), blk0 even: one Philox per rounding block
    j (rows 2j, 2j + 1 at tensor rows j, j + BLOCK/2), its words broadcast to both rows as
    _sigma_signs does (sm_90, bf16 Gaussian full step: 6 instructions per element fewer)."""
    sub = (0xFFFF - tl.to_tensor(op)).to(tl.int64) << 48
    w0, w1, w2, w3 = _stream_words(seed, ((blk0 >> 1) + tl.arange(0, BLOCK // 2).to(tl.int64)) | sub, step, tag)
    h = tl.arange(0, 2)[:, None]  # tensor row h * BLOCK/2 + j: word pair (w0, w1) for h = 0, (w2, w3) for 1
    wa = tl.reshape(tl.where(h == 0, w0[None, :], w2[None, :]), (BLOCK,))
    wb = tl.reshape(tl.where(h == 0, w1[None, :], w3[None, :]), (BLOCK,))
    return _halves(wa, wb)


@triton.jit
def _round_bf16_stochastic(x, r, SOFT_BF16: tl.constexpr):
    """float32 -> bf16 rounded up or down at random (SPEC 2c, fsgld_math.h bf16_bits_stochastic): the
    16 bits r added below bf16's last bit, then truncated; a non-finite x, or a finite x that would
    become infinite, rounds to nearest. The truncated sum is a bf16 value, so one conversion to
    nearest writes either (and a NaN as the nearest store does)."""
    y = ((x.to(tl.uint32, bitcast=True) + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
    # y is not finite iff x is inf or its rounded magnitude would be, or x is a NaN that did not carry
    # into the sign (x != x for all of them): two float tests on the result instead of an integer
    # range test on |x| + r (sm_90 bf16 stochastic Gaussian full step B512: 127.9 -> 127.2)
    y = tl.where((tl.abs(y) < float("inf")) & (x == x), y, x)
    return _round_to(y, tl.bfloat16, SOFT_BF16)


@triton.jit
def _compensated_noise_std(theta, noise_std):
    """sqrt(max(0, noise_std**2 - ulp(theta)**2 / 6)) per element, rounded as the reference's
    compensated_noise_std: ulp = 2**(e - 7) from theta's exponent bits (a zero exponent gives 0
    where the reference has 2**-133, whose square is 0 in float32 either way)."""
    # (ulp * ulp) * float32(1 / 6) as (p * p) * (2**-14 * float32(1 / 6)), p = 2**e = 2**7 ulp, and the
    # subtraction in the same FMA (csrc/fsgld_math.h's GPU form: the std within an ulp of the
    # reference's, inside the noisy tolerance; 0 where the std is 0)
    p = (theta.to(tl.uint32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)
    v = tl.fma(p * p, -1.0172526344831567e-05, noise_std * noise_std)
    # tl.sqrt: sqrt.approx (one MUFU.SQRT), as the CUDA kernel: the std scales a normal accurate to
    # NOISE_ATOL only (sm_90 bf16 stochastic Gaussian full step B512: 131.6 -> 127.9 instructions per
    # element with the FMA)
    return tl.sqrt(tl.maximum(v, 0.0))


@triton.jit
def _load_clean(p_ptr, master_addr, t, idx, mask, HAS_MASTER: tl.constexpr):
    """The unperturbed weight in float32: the fp32 master if there is one, else the param."""
    if HAS_MASTER:
        m_ptr = tl.load(master_addr + t).to(tl.pointer_type(tl.float32))
        return tl.load(m_ptr + idx, mask=mask, other=0.0)
    else:
        return tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _chunk(chunk_tensor_ptr, chunk_index_ptr, numel_ptr, offset_ptr, pid_ptr, BLOCK: tl.constexpr,
           SIGNS: tl.constexpr, PAIRS: tl.constexpr):
    """This program's tensor, its first Philox block, its rows (from the first: _program_rows) and
    their Philox blocks, local element indices [BLOCK, 4] and mask, and its chunk's index in the
    tensor. With SIGNS the tensor's chunks start at a Rademacher block (128 elements), with PAIRS at
    a rounding block (8), instead of a Philox block (4; _table)."""
    prog = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + prog)
    ch = tl.load(chunk_index_ptr + prog).to(tl.int64)
    n = tl.load(numel_ptr + t)
    off = tl.load(offset_ptr + t)
    pid = tl.load(pid_ptr + t)
    if SIGNS:
        blk0 = (off >> 7 << 5) + ch * BLOCK
    elif PAIRS:  # chunks start at a rounding block
        blk0 = (off >> 3 << 1) + ch * BLOCK
    else:
        blk0 = (off >> 2) + ch * BLOCK
    rows = _program_rows(BLOCK, SIGNS, PAIRS)
    blk = blk0 + rows.to(tl.int64)
    idx = blk[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64) - off
    mask = (idx >= 0) & (idx < n)
    return t, blk0, rows, blk, idx, mask, pid, ch


@triton.jit(do_not_specialize=["seed", "step"])
def _fused_step_kernel(
    chunk_tensor_ptr, chunk_index_ptr, numel_ptr, offset_ptr, pid_ptr,
    param_addr, grad_addr, buf_addr, master_addr,
    seed, step, lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma,
    grad_scale_ptr, found_inf_ptr, step_ptr, lr_ptr,
    P_DTYPE: tl.constexpr, B_DTYPE: tl.constexpr, P_SOFT: tl.constexpr, B_SOFT: tl.constexpr,
    HAS_STEP_T: tl.constexpr, HAS_LR_T: tl.constexpr,
    HAS_MASTER: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    RESTORE: tl.constexpr, NOISE: tl.constexpr, AHEAD: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
    RESTORE_SIGNS: tl.constexpr, AHEAD_SIGNS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0.0:
            return  # AMP overflow: nothing changes
    # Eager Triton passes Python floats as fp32, Inductor as fp64 (which halved throughput in
    # other kernels): fix the arithmetic to fp32 either way.
    lr, weight_decay = tl.cast(lr, tl.float32), tl.cast(weight_decay, tl.float32)
    momentum, noise_std = tl.cast(momentum, tl.float32), tl.cast(noise_std, tl.float32)
    restore_sigma, perturb_sigma = tl.cast(restore_sigma, tl.float32), tl.cast(perturb_sigma, tl.float32)
    if HAS_STEP_T:  # capturable: the counter lives on the device, so graph replays advance it
        step = tl.load(step_ptr)
    if HAS_LR_T:
        lr = tl.load(lr_ptr)
        noise_std = noise_std * tl.sqrt(lr)
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = 1.0 / tl.load(grad_scale_ptr)
    SIGNS: tl.constexpr = (RESTORE and RESTORE_SIGNS) or (AHEAD and AHEAD_SIGNS)  # rows as in _sign_rows
    PAIRS: tl.constexpr = STOCHASTIC and not SIGNS  # rows as in _pair_rows
    # the elements are addressed from the program's first one below (interior and edges alike)
    t, blk0, rows, blk, _, _, pid, ch = _chunk(chunk_tensor_ptr, chunk_index_ptr, numel_ptr, offset_ptr,
                                               pid_ptr, BLOCK, SIGNS, PAIRS)
    # The three streams first (unused ones are zeros the compiler drops), then the memory: each
    # already times its scale (sigma_k, noise_std, sigma_{k+1}; signs as sigma * eps, SPEC 2b).
    e_k = tl.zeros((BLOCK, 4), tl.float32)
    xi = tl.zeros((BLOCK, 4), tl.float32)
    e_n = tl.zeros((BLOCK, 4), tl.float32)
    rbits = tl.zeros((BLOCK, 4), tl.uint32)
    if RESTORE:  # only without masters: the master is never perturbed
        if RESTORE_SIGNS:
            e_k = _sigma_signs(restore_sigma, seed, blk0, step, pid * 2, BLOCK)
        else:
            e_k = _normals(seed, blk, step, pid * 2, restore_sigma)
    if NOISE:
        if STOCHASTIC:  # unit normals: the std is per element (SPEC 2c)
            xi = _normals(seed, blk, step, pid * 2 + 1, 1.0)
        else:
            xi = _normals(seed, blk, step, pid * 2 + 1, noise_std)  # noise_std * xi
    if PAIRS:
        rbits = _rounding_bits_pairs(seed, blk0, step, pid * 2 + 1, 0, BLOCK)
    elif STOCHASTIC:
        rbits = _rounding_bits(seed, blk, step, pid * 2 + 1, 0)
    if AHEAD:
        if AHEAD_SIGNS:
            e_n = _sigma_signs(perturb_sigma, seed, blk0, step + 1, pid * 2, BLOCK)
        else:
            e_n = _normals(seed, blk, step + 1, pid * 2, perturb_sigma)
    p_addr = tl.load(param_addr + t)
    g_addr = tl.load(grad_addr + t)
    b_addr = p_addr
    m_addr = p_addr
    if HAS_MOMENTUM:
        b_addr = tl.load(buf_addr + t)
    if HAS_MASTER:
        m_addr = tl.load(master_addr + t)
    # A program inside an aligned tensor (the usual case) runs without masks, on 32-bit offsets from
    # the program's first element, with 16-byte-aligned bases the compiler can see (vector access).
    n = tl.load(numel_ptr + t)
    off = tl.load(offset_ptr + t)
    if SIGNS or PAIRS:  # chunks start at a Rademacher or rounding block: the first may start before the tensor
        first = blk0 * 4 - off
        inside = (first >= 0) & (first + 4 * BLOCK <= n)
    else:
        first = tl.load(chunk_index_ptr + tl.program_id(0)).to(tl.int64) * (4 * BLOCK)
        inside = first + 4 * BLOCK <= n
    if ((off & 3) == 0) & inside & (((p_addr | g_addr | b_addr | m_addr) & 15) == 0):
        loc = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
        p_ptr, g_ptr = _aligned(p_addr, first, loc, P_DTYPE), _aligned(g_addr, first, loc, P_DTYPE)
        b_ptr, m_ptr = _aligned(b_addr, first, loc, B_DTYPE), _aligned(m_addr, first, loc, tl.float32)
        _step_elements(p_ptr, g_ptr, b_ptr, m_ptr, p_ptr, b_ptr, m_ptr, None,
                       e_k, xi, e_n, rbits, lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma,
                       inv_scale, P_DTYPE, B_DTYPE, P_SOFT, B_SOFT, HAS_MASTER, HAS_MOMENTUM, HAS_SCALE, RESTORE,
                       NOISE, AHEAD, WEIGHT_DECAY, RESTORE_SIGNS, AHEAD_SIGNS, STOCHASTIC, False)
    else:
        # Edges: the elements lo <= loc < hi of the program's 4 * BLOCK (element 0 at local index
        # `start`, negative where the program begins before the tensor). With q = loc - lo the store's
        # mask is one unsigned compare, and q clamped to the last element is a load address inside the
        # tensor, so the loads need no mask (no predicate kept, no zeroing). lo and hi in 32 bits: only
        # chunk 0 starts before its tensor, by under 128 elements.
        start = blk0 * 4 - off
        lo = tl.where(ch == 0, -start.to(tl.int32), 0)
        hi = tl.where(start + 4 * BLOCK <= n, 4 * BLOCK, (n - start).to(tl.int32))
        loc = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
        q = (loc - lo).to(tl.uint32)
        width = (hi - lo).to(tl.uint32)
        qc = tl.minimum(q, width - 1).to(tl.int32)
        # The stores' pointers carry _aligned's hint even where rows are not 16-byte aligned: it only
        # keeps the compute layout at the store (no shuffle through shared memory), as the element
        # mask makes every access scalar; test_sass checks that the edge path has no vector access.
        # (sm_90 fp32 Rademacher full step B512, unaligned: 67.5 -> 62.4 instructions per element,
        # 1.215x -> 1.150x the interior; Gaussian 118.2 -> 113.0, 1.12x -> 1.09x)
        at = start + lo  # element lo, where q counts from
        _step_elements(p_addr.to(tl.pointer_type(P_DTYPE)) + at + qc, g_addr.to(tl.pointer_type(P_DTYPE)) + at + qc,
                       b_addr.to(tl.pointer_type(B_DTYPE)) + at + qc,
                       m_addr.to(tl.pointer_type(tl.float32)) + at + qc,
                       _aligned(p_addr, start, loc, P_DTYPE), _aligned(b_addr, start, loc, B_DTYPE),
                       _aligned(m_addr, start, loc, tl.float32), q < width,
                       e_k, xi, e_n, rbits, lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma,
                       inv_scale, P_DTYPE, B_DTYPE, P_SOFT, B_SOFT, HAS_MASTER, HAS_MOMENTUM, HAS_SCALE, RESTORE,
                       NOISE, AHEAD, WEIGHT_DECAY, RESTORE_SIGNS, AHEAD_SIGNS, STOCHASTIC, True)


@triton.jit
def _aligned(addr, first, loc, DTYPE: tl.constexpr):
    """Pointers to elements first + loc of the tensor at addr, each row of four elements aligned to
    its size when addr is 16-byte aligned (the caller checks): the hint that lets the compiler use
    one vector access per row."""
    ptrs = addr.to(tl.pointer_type(DTYPE)) + first + loc
    ROW: tl.constexpr = DTYPE.primitive_bitwidth // 2  # bytes of four elements
    return tl.max_contiguous(tl.multiple_of(ptrs, [ROW, ROW]), [1, 4])


@triton.jit
def _step_elements(p_load, g_load, b_load, m_load, p_ptr, b_ptr, m_ptr, mask, e_k, xi, e_n, rbits, lr, weight_decay,
                   momentum, noise_std, restore_sigma, perturb_sigma, inv_scale, P_DTYPE: tl.constexpr,
                   B_DTYPE: tl.constexpr, P_SOFT: tl.constexpr, B_SOFT: tl.constexpr, HAS_MASTER: tl.constexpr,
                   HAS_MOMENTUM: tl.constexpr, HAS_SCALE: tl.constexpr, RESTORE: tl.constexpr, NOISE: tl.constexpr,
                   AHEAD: tl.constexpr, WEIGHT_DECAY: tl.constexpr, RESTORE_SIGNS: tl.constexpr,
                   AHEAD_SIGNS: tl.constexpr, STOCHASTIC: tl.constexpr, MASKED: tl.constexpr):
    """SPEC section 3 on the elements of one program: loaded from the *_load pointers (always inside
    the tensor), stored to p_ptr, b_ptr, m_ptr where `mask` holds (MASKED: at the tensor's edges)."""
    if HAS_MASTER:
        theta = tl.load(m_load)
    else:
        theta = tl.load(p_load).to(tl.float32)
    if RESTORE:
        theta = theta - e_k  # sigma_k * eps_k, as drawn
    if STOCHASTIC and NOISE:  # the std from the clean theta; xi was drawn unit
        xi = _compensated_noise_std(theta, noise_std) * xi
    d = tl.load(g_load).to(tl.float32)
    if HAS_SCALE:
        d = d * inv_scale
    if WEIGHT_DECAY:
        d = d + weight_decay * theta
    if HAS_MOMENTUM:
        buf = _round_to(momentum * tl.load(b_load).to(tl.float32) + d, B_DTYPE, B_SOFT)
        _store(b_ptr, buf, mask, MASKED)
        d = buf.to(tl.float32)  # the direction is the buffer as stored
    theta = theta - lr * d
    if NOISE:
        theta = theta + xi  # drawn as noise_std * xi
    if HAS_MASTER:
        _store(m_ptr, theta, mask, MASKED)
    if AHEAD:
        theta = theta + e_n
    if STOCHASTIC:
        _store(p_ptr, _round_bf16_stochastic(theta, rbits, P_SOFT), mask, MASKED)
    else:
        _store(p_ptr, _round_to(theta, P_DTYPE, P_SOFT), mask, MASKED)


@triton.jit
def _store(ptr, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, x, mask=mask)
    else:
        tl.store(ptr, x)


@triton.jit(do_not_specialize=["seed", "step", "rounding_op"])
def _perturb_kernel(
    chunk_tensor_ptr, chunk_index_ptr, numel_ptr, offset_ptr, pid_ptr, param_addr, master_addr,
    seed, step, sigma, step_ptr, rounding_op, P_DTYPE: tl.constexpr, P_SOFT: tl.constexpr, HAS_MASTER: tl.constexpr,
    HAS_STEP_T: tl.constexpr, SIGNS: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    if HAS_STEP_T:
        step = tl.load(step_ptr)
    sigma = tl.cast(sigma, tl.float32)  # fp64 under Inductor, fp32 in eager
    PAIRS: tl.constexpr = STOCHASTIC and not SIGNS
    t, blk0, rows, blk, idx, mask, pid, _ = _chunk(chunk_tensor_ptr, chunk_index_ptr, numel_ptr, offset_ptr, pid_ptr,
                                                BLOCK, SIGNS, PAIRS)
    if SIGNS:
        pert = _sigma_signs(sigma, seed, blk0, step, pid * 2, BLOCK)
    else:
        pert = _normals(seed, blk, step, pid * 2, sigma)
    p_ptr = tl.load(param_addr + t).to(tl.pointer_type(P_DTYPE))
    clean = _load_clean(p_ptr, master_addr, t, idx, mask, HAS_MASTER)
    if PAIRS:  # rounding_op: 1 perturb_, 2 restore_ (SPEC 2c)
        rbits = _rounding_bits_pairs(seed, blk0, step, pid * 2 + 1, rounding_op, BLOCK)
        out = _round_bf16_stochastic(clean + pert, rbits, P_SOFT)
    elif STOCHASTIC:
        out = _round_bf16_stochastic(clean + pert, _rounding_bits(seed, blk, step, pid * 2 + 1, rounding_op), P_SOFT)
    else:
        out = _round_to(clean + pert, P_DTYPE, P_SOFT)
    tl.store(p_ptr + idx, out, mask=mask)


@triton.jit(do_not_specialize=["n", "off", "seed", "step", "tag"])
def _normals_kernel(out_ptr, n, off, seed, step, tag, BLOCK: tl.constexpr):
    blk = (off >> 2) + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    idx = blk[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64) - off
    tl.store(out_ptr + idx, _normals(seed, blk, step, tag, 1.0), mask=(idx >= 0) & (idx < n))


@triton.jit(do_not_specialize=["nblocks", "first", "seed", "step", "tag"])
def _words_kernel(out_ptr, nblocks, first, seed, step, tag, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    w0, w1, w2, w3 = _stream_words(seed, first + b, step, tag)
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK, 4))
    idx = b[:, None] * 4 + tl.arange(0, 4)[None, :].to(tl.int64)
    tl.store(out_ptr + idx, words.to(tl.int32, bitcast=True), mask=idx < nblocks * 4)


# ---- launch configuration ------------------------------------------------------------------------
# Launches pass enable_fp_fusion=False: SPEC 3's update rounds each float32 op like the reference
# (Triton would contract a*b+c into FMA; the C++/CUDA build is compiled the same way).
# Philox blocks per program and warps. The interpreter runs programs one by one in numpy, so it
# takes the smallest block; on a GPU `_tuned_block` times the candidates once per (device, dtype,
# size class) on scratch tensors, outside CUDA-graph capture, and remembers the choice on disk.
# (256, 4) left out: 118.4 instructions per element in the default fp32 Gaussian step (sm_90 SASS,
# 8 elements per thread), over the 110 the H200 floor allows. (2048, 8) left out: at 32 elements per
# thread ptxas parks half the edge masks in registers (P2R), and its unaligned Rademacher step costs
# 1.168x its interior, over issue 25's 1.15x ((2048, 16) 1.157x; these two 1.150x).
_CONFIGS = ((512, 4), (1024, 8))
# Under CUDA-graph capture before any tuning (nothing may be timed then): a mid-sized config.
_DEFAULT_CONFIG = (512, 4)
# The largest scratch the tuning times on: 2 x 64 MB in fp32, past the L2 of an H100/H200 (50/60 MB),
# so larger lists share the choice made at 16M elements.
_TUNE_MAX_LOG2 = 24
_tuned: dict[tuple, tuple[int, int]] = {}


def _on_device(device: torch.device):
    """Launch on the params' GPU: Triton launches on the current device, which may be another."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _tune_cache_path() -> str:
    """The on-disk record of tuned configs: $FSGLD_CACHE_DIR, else ~/.cache/fsgld_fused."""
    root = os.environ.get("FSGLD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser(os.path.join("~", ".cache")), "fsgld_fused")
    return os.path.join(root, "triton_blocks.json")


def _source_hash() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:12]


# An edit of this file (kernels or launch code) invalidates the choices saved on disk.
_SOURCE_HASH = _source_hash()


def _tune_disk_key(device_name: str, dtype: torch.dtype, size_class: int) -> str:
    return f"{device_name}|triton {triton.__version__}|{_SOURCE_HASH}|{dtype}|2^{size_class}"


def _read_tune_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save_tune_choice(path: str, key: str, choice: tuple[int, int]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_tune_cache(path)
        data[key] = list(choice)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent processes never read half a file
    except OSError:
        pass  # a read-only home: the in-memory cache still holds the choice


def _choose_config(key: tuple, disk_key: str, capturing: bool, measure) -> tuple[int, int]:
    """(block, warps) for `key`: remembered, else saved on disk, else the fastest of _CONFIGS by
    `measure(block, warps)` (seconds), remembered and saved. Under CUDA-graph capture nothing is
    timed or remembered: the default config, until a step outside capture tunes."""
    hit = _tuned.get(key)
    if hit is not None:
        return hit
    path = _tune_cache_path()
    saved = _read_tune_cache(path).get(disk_key)
    if isinstance(saved, list) and tuple(saved) in _CONFIGS:
        _tuned[key] = tuple(saved)
        return _tuned[key]
    if capturing:
        return _DEFAULT_CONFIG
    timings = {config: measure(*config) for config in _CONFIGS}
    _tuned[key] = min(timings, key=timings.get)
    _save_tune_choice(path, disk_key, _tuned[key])
    return _tuned[key]


def _tuned_block(device: torch.device, dtype: torch.dtype, total: int) -> tuple[int, int]:
    """Philox blocks per program and warps for a list of `total` elements (call under _on_device)."""
    if INTERPRET or device.type != "cuda":
        return 256, 4
    size_class = max(20, min(_TUNE_MAX_LOG2, int(math.log2(max(total, 1)))))  # 1M .. 16M elements
    scratch = []

    def measure(block, warps):
        # scratch tensors, never the user's weights: the kernel updates in place
        if not scratch:
            n = 1 << size_class
            scratch.extend([torch.randn(n, device=device).to(dtype), torch.randn(n, device=device).to(dtype)])
        p, g = scratch

        def step():
            _launch_step([p], [g], [], [], [0], [0], 1, 0, 1e-6, 0.0, 0.0, 1e-6, 1e-6, 1e-6, None, None, block, warps)

        return median(time_fn(step, device, warmup=2, repeat=5))

    return _choose_config((device.index, dtype, size_class),
                          _tune_disk_key(torch.cuda.get_device_name(device), dtype, size_class),
                          torch.cuda.is_current_stream_capturing(), measure)


# ---- tables: built once per set of addresses, cached ---------------------------------------------
_TABLES: "OrderedDict[tuple, tuple]" = OrderedDict()
_MAX_TABLES = 64


def _table(params, grads, bufs, masters, param_ids, offsets, block, signs=False, pairs=False):
    """The launch's device tables; `signs`: chunks start at a Rademacher block (the kernels' SIGNS),
    `pairs`: at a rounding block (PAIRS)."""
    device = params[0].device
    key = (
        device,
        block,
        signs,
        pairs,
        tuple(p.data_ptr() for p in params),
        tuple(g.data_ptr() for g in grads),
        tuple(b.data_ptr() for b in bufs),
        tuple(m.data_ptr() for m in masters),
        tuple(p.numel() for p in params),
        tuple(param_ids),
        tuple(offsets),
    )
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    chunk_tensor, chunk_index = [], []
    for i, (p, off) in enumerate(zip(params, offsets)):
        n = p.numel()
        if n == 0:
            continue
        first = off // 128 * 32 if signs else off // 8 * 2 if pairs else off // 4  # as blk0 in _chunk
        nblk = (off + n - 1) // 4 - first + 1
        chunks = -(-nblk // block)
        chunk_tensor += [i] * chunks
        chunk_index += list(range(chunks))

    host_buffers = []

    def as_dev(xs):
        host = torch.tensor(list(xs) if len(xs) else [0], dtype=torch.int64)
        if device.type != "cuda":
            return host.to(device)
        # pinned + non_blocking: also legal while a CUDA graph is being captured; the cache entry
        # keeps the host buffer alive for the replays
        host = host.pin_memory()
        host_buffers.append(host)
        return host.to(device, non_blocking=True)

    empty = [0] * len(params)
    hit = (
        len(chunk_tensor),
        as_dev(chunk_tensor).to(torch.int32),
        as_dev(chunk_index).to(torch.int32),
        as_dev([p.numel() for p in params]),
        as_dev(offsets),
        as_dev(param_ids),
        as_dev([p.data_ptr() for p in params]),
        as_dev([g.data_ptr() for g in grads] or empty),
        as_dev([b.data_ptr() for b in bufs] or empty),
        as_dev([m.data_ptr() for m in masters] or empty),
        host_buffers,
    )
    _TABLES[key] = hit
    if len(_TABLES) > _MAX_TABLES:
        _TABLES.popitem(last=False)
    return hit


def _check(params, param_ids, offsets, *lists):
    n = len(params)
    if len(param_ids) != n or len(offsets) != n or any(len(x) not in (0, n) for x in lists):
        raise RuntimeError("fsgld triton: list lengths differ from the number of params")
    for i, p in enumerate(params):
        if not p.is_contiguous():
            raise RuntimeError(f"fsgld triton: param {i} is not contiguous (use backend='reference' for strided params)")
        if p.dtype not in _TL_DTYPE or p.dtype != params[0].dtype or p.device != params[0].device:
            raise RuntimeError(f"fsgld triton: param {i} is {p.dtype} on {p.device}; one fp32/bf16/fp16 list per call")
        if not 0 <= param_ids[i] < 2**31 or offsets[i] < 0:
            raise RuntimeError(f"fsgld triton: param id {param_ids[i]} or offset {offsets[i]} out of range")
        for lst in lists:
            if lst and (lst[i].shape != p.shape or lst[i].device != p.device or not lst[i].is_contiguous()):
                raise RuntimeError(f"fsgld triton: tensor {i} of a companion list does not match its param")


def _launch_step(params, grads, bufs, masters, param_ids, offsets, seed, step, lr, weight_decay, momentum,
                 noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, block, warps, step_t=None, lr_t=None,
                 restore_rademacher=False, perturb_rademacher=False, stochastic=False):
    restore, ahead = restore_sigma != 0.0 and not masters, perturb_sigma != 0.0
    restore_signs, ahead_signs = restore and bool(restore_rademacher), ahead and bool(perturb_rademacher)
    signs = restore_signs or ahead_signs
    n_chunks, *tab, _ = _table(params, grads, bufs, masters, param_ids, offsets, block, signs, stochastic and not signs)
    if n_chunks == 0:
        return
    dummy = tab[0]
    _fused_step_kernel[(n_chunks,)](
        *tab,
        seed, step, float(lr), float(weight_decay), float(momentum), float(noise_std),
        float(restore_sigma), float(perturb_sigma),
        grad_scale if grad_scale is not None else dummy, found_inf if found_inf is not None else dummy,
        step_t if step_t is not None else dummy, lr_t if lr_t is not None else dummy,
        P_DTYPE=_TL_DTYPE[params[0].dtype],
        B_DTYPE=tl.float32 if masters else _TL_DTYPE[params[0].dtype],
        P_SOFT=_soft_bf16(params[0].dtype), B_SOFT=not masters and _soft_bf16(params[0].dtype),
        HAS_STEP_T=step_t is not None, HAS_LR_T=lr_t is not None,
        HAS_MASTER=bool(masters), HAS_MOMENTUM=momentum != 0.0, HAS_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None, RESTORE=restore, NOISE=noise_std != 0.0, AHEAD=ahead,
        WEIGHT_DECAY=weight_decay != 0.0, RESTORE_SIGNS=restore_signs, AHEAD_SIGNS=ahead_signs,
        STOCHASTIC=stochastic, BLOCK=block, num_warps=warps, enable_fp_fusion=False,
    )  # fmt: skip


# ---- ops: opaque to torch.compile ---------------------------------------------------------------
# The launches read data_ptr() and build tables in Python, which Dynamo cannot trace (it failed on
# FakeTensors): as torch.library custom ops they are single nodes in a compiled graph, like the C++
# ops. `seed` crosses the schema as the int64 with the 64-bit seed's bits.
_U64 = (1 << 64) - 1


@torch.library.custom_op("fsgld_triton::perturb_", mutates_args=("params",))
def _perturb_op(params: list[torch.Tensor], masters: list[torch.Tensor], param_ids: list[int], offsets: list[int],
                seed: int, step: int, sigma: float, step_t: Optional[torch.Tensor], rademacher: bool,
                rounding_op: int) -> None:
    with _on_device(params[0].device):
        _launch_perturb(params, masters, param_ids, offsets, seed, step, sigma, step_t, rademacher, rounding_op)


def _launch_perturb(params, masters, param_ids, offsets, seed, step, sigma, step_t, rademacher=False, rounding_op=-1):
    stochastic = rounds_stochastically(params[0], masters, rounding_op >= 0)
    block, warps = _tuned_block(params[0].device, params[0].dtype, sum(p.numel() for p in params))
    n_chunks, chunk_t, chunk_i, numel, offs, pids, p_addr, _, _, m_addr, _ = _table(
        params, [], [], masters, param_ids, offsets, block, rademacher, stochastic and not rademacher
    )
    if n_chunks:
        _perturb_kernel[(n_chunks,)](chunk_t, chunk_i, numel, offs, pids, p_addr, m_addr, seed & _U64, step,
                                     float(sigma), step_t if step_t is not None else chunk_t,
                                     rounding_op if stochastic else 0,
                                     P_DTYPE=_TL_DTYPE[params[0].dtype], P_SOFT=_soft_bf16(params[0].dtype),
                                     HAS_MASTER=bool(masters), HAS_STEP_T=step_t is not None, SIGNS=rademacher,
                                     STOCHASTIC=stochastic, BLOCK=block,
                                     num_warps=warps, enable_fp_fusion=False)


@torch.library.custom_op("fsgld_triton::fused_step_", mutates_args=("params", "momentum_buffers", "masters"))
def _fused_step_op(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                   masters: list[torch.Tensor], param_ids: list[int], offsets: list[int], seed: int, step: int,
                   lr: float, weight_decay: float, momentum: float, noise_std: float, restore_sigma: float,
                   perturb_sigma: float, grad_scale: Optional[torch.Tensor], found_inf: Optional[torch.Tensor],
                   step_t: Optional[torch.Tensor], lr_t: Optional[torch.Tensor], restore_rademacher: bool,
                   perturb_rademacher: bool, stochastic_rounding: bool) -> None:
    with _on_device(params[0].device):
        block, warps = _tuned_block(params[0].device, params[0].dtype, sum(p.numel() for p in params))
        _launch_step(params, grads, momentum_buffers, masters, param_ids, offsets, seed & _U64, step, lr,
                     weight_decay, momentum, noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, block,
                     warps, step_t, lr_t, restore_rademacher, perturb_rademacher,
                     rounds_stochastically(params[0], masters, stochastic_rounding))


@_perturb_op.register_fake
def _(params, masters, param_ids, offsets, seed, step, sigma, step_t, rademacher, rounding_op):
    return None


@_fused_step_op.register_fake
def _(params, grads, momentum_buffers, masters, param_ids, offsets, seed, step, lr, weight_decay, momentum,
      noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, step_t, lr_t, restore_rademacher,
      perturb_rademacher, stochastic_rounding):
    return None


# ---- the backend's face: the reference's signatures ---------------------------------------------
def perturb_(params, param_ids, seed, step, sigma, offsets=None, masters: Sequence[torch.Tensor] = (), step_t=None,
             rademacher=False, stochastic_rounding=False, _op=PERTURB_OP):
    params, masters, offsets = list(params), list(masters), _offsets(params, offsets)
    _check(params, list(param_ids), offsets, masters)
    if params:
        _perturb_op(params, masters, list(param_ids), offsets, _seed_arg(seed), step, float(sigma), step_t,
                    bool(rademacher), _op if stochastic_rounding else -1)


def restore_(params, param_ids, seed, step, sigma, offsets=None, masters: Sequence[torch.Tensor] = (), step_t=None,
             rademacher=False, stochastic_rounding=False):
    if masters:  # the master is the clean weight: copying it back is the exact restore
        torch._foreach_copy_(list(params), list(masters))
        return
    perturb_(params, param_ids, seed, step, -sigma, offsets, step_t=step_t, rademacher=rademacher,
             stochastic_rounding=stochastic_rounding, _op=RESTORE_OP)


def fused_step_(params, grads, momentum_buffers, param_ids, seed, step, lr, weight_decay, momentum, noise_std,
                restore_sigma, perturb_sigma, offsets=None, masters: Sequence[torch.Tensor] = (),
                grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
                step_t: Optional[torch.Tensor] = None, lr_t: Optional[torch.Tensor] = None, restore_rademacher=False,
                perturb_rademacher=False, stochastic_rounding=False):
    params, masters, offsets = list(params), list(masters), _offsets(params, offsets)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    bufs = list(momentum_buffers)
    if len(grads) != len(params) or (momentum != 0.0) != bool(bufs) and params:
        raise RuntimeError("fsgld triton: one grad per param, and one momentum buffer per param iff momentum != 0")
    _check(params, list(param_ids), offsets, grads, bufs, masters)
    if params:
        _fused_step_op(params, grads, bufs, masters, list(param_ids), offsets, _seed_arg(seed), step, float(lr),
                       float(weight_decay), float(momentum), float(noise_std), float(restore_sigma),
                       float(perturb_sigma), grad_scale, found_inf, step_t, lr_t, bool(restore_rademacher),
                       bool(perturb_rademacher), bool(stochastic_rounding))


def normals(seed, pid, step, kind, numel, offset=0, device="cpu"):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        block = 256
        nblk = (offset + numel - 1) // 4 - offset // 4 + 1
        with _on_device(out.device):
            _normals_kernel[(-(-nblk // block),)](out, numel, offset, seed, step, (pid << 1) | kind, BLOCK=block)
    return out


def philox_words(seed, pid, step, kind, first_block, nblocks, device="cpu"):
    out = torch.empty(nblocks, 4, dtype=torch.int32, device=device)
    if nblocks:
        block = 256
        with _on_device(out.device):  # also the Rademacher signs' words (fsgld_fused._backends)
            _words_kernel[(-(-nblocks // block),)](out, nblocks, first_block, seed, step, (pid << 1) | kind,
                                                   BLOCK=block)
    return out
