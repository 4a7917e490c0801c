// fsgld_math.h: the element math of fSGLD, written once for the host compiler and for nvcc.
//
// SPEC section 2 (Philox4x32-10 stream, uniform mapping, Box-Muller) and section 3 (the fused
// step per element). The CPU kernel (fsgld_cpu.cpp) and the CUDA kernel (fsgld_cuda.cu) both
// include this file; nothing else implements these formulas in C++.
//
// log / sin / cos are branch-free float32 polynomials (fitted or Cephes coefficients) instead of libm:
// they auto-vectorize on the CPU (libm calls block GCC's vectorizer) and are cheap on the GPU.
// They stay within a few ulp of correctly rounded results, which is the SPEC tolerance.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define FSGLD_HD __host__ __device__ __forceinline__
#else
#define FSGLD_HD inline __attribute__((always_inline))
#endif

namespace fsgld {

enum Kind : uint32_t { kEps = 0, kXi = 1 };  // counter word 3 is (pid << 1) | kind

FSGLD_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
#endif
}

FSGLD_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u;
#endif
}

// ---- Philox4x32-10 (Random123) ---------------------------------------------------------------
// Written once over a lane type V: uint32_t here (scalar code and CUDA threads); the CPU kernel
// adds a Lanes<__m512i> specialisation (16 counters per call) in fsgld_cpu.cpp.
template <typename V>
struct Lanes;

template <>
struct Lanes<uint32_t> {
  static FSGLD_HD uint32_t splat(uint32_t x) { return x; }
  static FSGLD_HD void mulhilo(uint32_t a, uint32_t m, uint32_t* hi, uint32_t* lo) {
#if defined(__CUDA_ARCH__)
    *hi = __umulhi(a, m);
    *lo = a * m;
#else
    const uint64_t p = (uint64_t)a * m;
    *hi = (uint32_t)(p >> 32);
    *lo = (uint32_t)p;
#endif
  }
};

// Ten rounds in place: (c0..c3) counter in, the four output words out.
template <typename V>
FSGLD_HD void philox4x32_10(V& c0, V& c1, V& c2, V& c3, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    V hi0, lo0, hi1, lo1;
    Lanes<V>::mulhilo(c0, 0xD2511F53u, &hi0, &lo0);
    Lanes<V>::mulhilo(c2, 0xCD9E8D57u, &hi1, &lo1);
    c0 = hi1 ^ c1 ^ Lanes<V>::splat(k0);
    c2 = hi0 ^ c3 ^ Lanes<V>::splat(k1);
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// ---- uniform and Box-Muller --------------------------------------------------------------------
// SPEC's u(w) = k * 2**-24 with k = (w >> 8) | 1 (= 2 * (w >> 9) + 1, one instruction fewer): odd,
// below 2**24, so the signed conversion (which AVX2 has) is exact. Box-Muller works on the word
// itself: the 2**-24 is folded into the log's exponent, and sin/cos reduce the word as an integer.

// a * b + c with one rounding, the same on every compiled backend (CPU code gets vfmadd where the
// target has FMA; nvcc's fmaf is the hardware FMA). Only the log/sin/cos polynomials use it: SPEC
// section 3's update keeps separate float32 roundings.
FSGLD_HD float fmadd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return __builtin_fmaf(a, b, c);
#endif
}

// -2 ln(u(w)) = -2 (e ln 2 + ln(1 + m)) with u = 2**e (1 + m), m in [sqrt(1/2) - 1, sqrt(2) - 1]: the
// reduction in integer ops (as musl's logf: no compare or select), 2**-24 folded into the exponent.
// ln(1 + m) = m Q(m), Q of degree 6 fitted for relative error (1.1e-6 in float64; -2 folded into
// its coefficients, a power of two), and ln 2 as one constant: 8 floating-point ops after the
// reduction where Cephes' logf (m - m^2/2 + m^3 P(m), P of degree 8, ln 2 split in two) takes 15
// (sm_90, fp32 full step: 129.1 -> 118.6 instructions per element). The normal stays within 1.1e-6
// of float64 Box-Muller, as with Cephes: the sin/cos error dominates the bound (degree 5 would reach
// 3.5e-6 against NOISE_ATOL's 3.8e-6). tests/test_math_sweep.py checks every input.
FSGLD_HD float minus_two_log_u(uint32_t w) {
  const uint32_t ix = float_to_bits((float)(int32_t)((w >> 8) | 1u));  // k, exact
  const uint32_t tmp = ix - (0x3F3504F3u + (24u << 23));  // sqrt(1/2); exponent e - 24 of u = k 2**-24
  const float fe = (float)((int32_t)tmp >> 23);
  const float m = bits_to_float(ix - (tmp & 0xFF800000u) - (24u << 23)) - 1.0f;  // exact (Sterbenz)
  float q = -2.0f * 0.11895957589149475f;
  q = fmadd(q, m, -2.0f * -0.1866779923439026f);
  q = fmadd(q, m, -2.0f * 0.20496349036693573f);
  q = fmadd(q, m, -2.0f * -0.24909751117229462f);
  q = fmadd(q, m, -2.0f * 0.3331450819969177f);
  q = fmadd(q, m, -2.0f * -0.500011146068573f);
  q = fmadd(q, m, -2.0f * 1.0000009536743164f);
  // ln 2 as one constant (Cephes splits it): its rounding, 2**-25 relative, is far below Q's error
  return fmadd(fe, -2.0f * 0.693147180559945309f, m * q);
}

// sin(2 pi u(w)) and cos(2 pi u(w)), as a sign and the sin and cos of a residual. In units of
// 2**-32 turns u is v = (w & ~0xff) | 0x100, so the nearest half turn is bit 31 of v + 2**30 and the
// residual the low 31 bits of v, signed: the reduction is exact, |r| <= pi/2 with one rounding. An
// odd half turn negates both (one sign for the pair); no quadrant swap of sin and cos, which cost
// two selects, a parity test and a second sign (sm_90 fp32 full step: -6 instructions per element
// for one more term in each polynomial than on [-pi/4, pi/4]). sin: r + r z S(z), cos: 1 + z C(z),
// S and C of degree 3 fitted for absolute error on [0, pi/2] (1.7e-8 and 7.2e-8 in float64);
// tests/test_math_sweep.py checks every input.
FSGLD_HD uint32_t sincos_half_turn(uint32_t w, float* sp, float* cp) {
  const uint32_t v = (w & 0xFFFFFF00u) | 0x100u;
  // (int32)(v << 1) is 2 * residual: 23 significant bits, so the conversion is exact
  const float r = (float)(int32_t)(v << 1) * (6.28318530717958647692f * 0x1p-33f);
  const float z = r * r;
  *sp = fmadd(fmadd(fmadd(fmadd(2.600057086965535e-06f, z, -0.0001980661618290469f), z, 0.008333017118275166f), z,
                    -0.16666656732559204f) * z, r, r);
  *cp = fmadd(fmadd(fmadd(fmadd(2.3194415916805156e-05f, z, -0.0013855928555130959f), z, 0.041663989424705505f), z,
                    -0.4999993145465851f), z, 1.0f);
  return (v + 0x40000000u) & 0x80000000u;  // the sign bit of an odd half turn
}

FSGLD_HD void sincos_2pi_u(uint32_t w, float* s, float* c) {
  float sp, cp;
  const uint32_t sign = sincos_half_turn(w, &sp, &cp);
  *s = bits_to_float(float_to_bits(sp) ^ sign);
  *c = bits_to_float(float_to_bits(cp) ^ sign);
}

// sqrtf for x in [1.1e-7, 33.3] (what -2 ln u takes). On the GPU: the fast path of sqrtf itself
// (rsqrt, then one Newton correction, as nvcc's correctly rounded sqrt does), without its branch
// for denormal, huge or negative x, which never holds here: the same result in 5 instructions
// instead of 10 (sm_90 SASS: 7.5 instructions per element of the fused step).
FSGLD_HD float sqrt_box_muller(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  const float s = __fmul_rn(x, y), h = __fmul_rn(y, 0.5f);
  return __fmaf_rn(__fmaf_rn(-s, s, x), h, s);
#else
  return sqrtf(x);
#endif
}

// (r cos t, r sin t) with r = sqrt(-2 ln u(wa)), t = 2 pi u(wb): SPEC's box_muller of the words.
// With `scale`: scale * (r cos t, r sin t), rounded as (scale * r) * cos t (one multiply per pair
// instead of one per normal; within NOISE_ATOL * scale like the product of the rounded normal).
FSGLD_HD void box_muller(uint32_t wa, uint32_t wb, float* n0, float* n1, float scale = 1.0f) {
  const float r = scale * sqrt_box_muller(minus_two_log_u(wa));
  float s, c;
  const uint32_t sign = sincos_half_turn(wb, &s, &c);
  const float rs = bits_to_float(float_to_bits(r) ^ sign);  // (-r) c = -(r c): one sign for both
  *n0 = rs * c;
  *n1 = rs * s;
}

// The four normals of Philox block `block` (elements 4*block .. 4*block+3) of one stream.
struct Stream {
  uint32_t k0, k1;  // seed low / high words
  uint32_t step;    // counter word 2
  uint32_t tag;     // counter word 3: (pid << 1) | kind
};

FSGLD_HD Stream make_stream(uint64_t seed, int64_t pid, int64_t step, uint32_t kind) {
  return Stream{(uint32_t)seed, (uint32_t)(seed >> 32), (uint32_t)step, ((uint32_t)pid << 1) | kind};
}

// The block index as its two counter words: a kernel whose chunk never crosses 2**32 blocks keeps
// `hi` uniform across the chunk.
FSGLD_HD void normal4(const Stream& st, uint32_t lo, uint32_t hi, float out[4], float scale = 1.0f) {
  uint32_t w0 = lo, w1 = hi, w2 = st.step, w3 = st.tag;
  philox4x32_10(w0, w1, w2, w3, st.k0, st.k1);
  box_muller(w0, w1, &out[0], &out[1], scale);
  box_muller(w2, w3, &out[2], &out[3], scale);
}

FSGLD_HD void normal4(const Stream& st, uint64_t block, float out[4]) {
  normal4(st, (uint32_t)block, (uint32_t)(block >> 32), out);
}

// ---- SPEC 2b: Rademacher signs ----------------------------------------------------------------
// One Philox call (kind eps) serves 128 elements: element i is bit i % 32 of word (i % 128) / 32
// of Rademacher block i / 128. In the kernels' layout of Philox blocks of four elements ("Gaussian
// blocks" blk), blk's four signs are bits 4 (blk & 7) .. 4 (blk & 7) + 3 of word (blk & 31) >> 3 of
// Rademacher block blk >> 5: a Gaussian block never straddles two Rademacher blocks.

// The four Philox words of Rademacher block `rblock` of a stream (kind eps).
FSGLD_HD void rademacher_words(const Stream& st, uint64_t rblock, uint32_t w[4]) {
  w[0] = (uint32_t)rblock, w[1] = (uint32_t)(rblock >> 32), w[2] = st.step, w[3] = st.tag;
  philox4x32_10(w[0], w[1], w[2], w[3], st.k0, st.k1);
}

// The signs of Gaussian block `blk` in bits 0..3 (bit l: element 4 blk + l; set means +1).
FSGLD_HD uint32_t sign_nibble(uint32_t word, uint64_t blk) { return word >> (4 * (uint32_t)(blk & 7)); }

FSGLD_HD uint32_t sign_nibble(const Stream& st, uint64_t blk) {
  uint32_t w[4];
  rademacher_words(st, blk >> 5, w);
  const uint32_t k = (uint32_t)(blk & 31) >> 3;
  return sign_nibble(k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3], blk);
}

// sigma * eps for the sign in bit `l` of `nibble`: sigma itself or -sigma, exactly as the product
// with +-1.0 rounds, in one logic op (the sign bit flipped where the bit is clear) instead of a
// conversion and a multiply.
FSGLD_HD float signed_sigma(float sigma, uint32_t nibble, int l) {
  return bits_to_float(float_to_bits(sigma) ^ (~(nibble << (31 - l)) & 0x80000000u));
}

// ---- SPEC 2c: stochastic rounding of bf16 params without masters ------------------------------
// The `op` of each call's rounding sub-stream: the fused step, perturb_, restore_.
enum RoundingOp : uint32_t { kRoundStep = 0, kRoundPerturb = 1, kRoundRestore = 2 };

// The four Philox words of rounding block `rblock` (elements 8 rblock .. 8 rblock + 7) for `op`:
// the Langevin stream `st_xi` with sub-stream 0xffff - op in bits 16..31 of counter word 1, which
// no other draw uses. Element e of the block takes bits 16 (e % 2) .. +15 of word e / 2.
FSGLD_HD uint32_t rounding_substream(uint32_t op) { return (0xFFFFu - op) << 16; }  // or-ed into word 1

FSGLD_HD void rounding_words(const Stream& st_xi, uint32_t op, uint64_t rblock, uint32_t w[4]) {
  w[0] = (uint32_t)rblock, w[1] = (uint32_t)(rblock >> 32) | rounding_substream(op), w[2] = st_xi.step;
  w[3] = st_xi.tag;
  philox4x32_10(w[0], w[1], w[2], w[3], st_xi.k0, st_xi.k1);
}

// float32 -> bf16 bits rounded to nearest even, NaN -> 0x7fc0: c10::BFloat16's conversion (on the
// GPU the hardware's, one F2FP, as c10::BFloat16's there: NaN -> 0x7fff).
FSGLD_HD uint16_t bf16_bits_nearest(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint16_t b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(x));
  return b;
#else
  const uint32_t u = float_to_bits(x);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

// Two float32 -> bf16 bits rounded to nearest even, `lo` in the low half of the word, `hi` in the
// high half (on the GPU one F2FP for both).
FSGLD_HD uint32_t bf16_pair_nearest(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t w;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w) : "f"(hi), "f"(lo));
  return w;
#else
  return bf16_bits_nearest(lo) | ((uint32_t)bf16_bits_nearest(hi) << 16);
#endif
}

// float32 -> bf16 bits, rounded away from zero with probability (distance to the lower neighbour)
// / ulp: the 16 random bits `r` added below bf16's last mantissa bit, then truncated. Non-finite
// x, or a finite x that would become infinite, rounds to nearest (SPEC 2c). Both cases are
// |x| + r >= 0x7f800000 in bits, and there |x| >= 0x7f7f0001 (an odd bf16 mantissa, so nearest
// is + 0x8000, truncated) unless x is NaN. The CPU form below, with an integer-clamp form of
// the rounding variance (since replaced by the CUDA side's mask form, equal on every exponent, not
// re-timed), took the CPU step's loop from 0.34 to 0.244 perf samples per sample of its normal
// fills; each form was checked against the first one exhaustively (every exponent, every x with
// six r values, all r near the top; the GPU form on 392M (x, r) pairs).
FSGLD_HD uint16_t bf16_bits_stochastic(float x, uint32_t r) {
#if defined(__CUDA_ARCH__)
  // s's exponent is 0xff where x is inf or NaN or (s >> 16) infinite, except a NaN whose mantissa
  // carries into the sign: two float compares (|s| not below inf, x unordered) instead of three
  // integer ops (sm_90 SASS, bf16 stochastic Gaussian full step: 129.9 -> 129.0 instructions per element)
  const uint32_t u = float_to_bits(x), s = u + r;
  const bool special = !(fabsf(bits_to_float(s)) < INFINITY) || x != x;
  const uint16_t nearest = bf16_bits_nearest(x);  // a select, not a lane-divergent branch on the GPU
  return special ? nearest : (uint16_t)(s >> 16);
#else  // one integer range test and selects, which the CPU loop vectorizes (an early return is
       // control flow GCC's vectorizer refuses)
  const uint32_t u = float_to_bits(x);
  const uint32_t nearest = x != x ? 0x7FC0u : (u + 0x8000u) >> 16;
  return (uint16_t)((u & 0x7FFFFFFFu) + r >= 0x7F800000u ? nearest : (u + r) >> 16);
#endif
}

// The Langevin std that leaves room for the rounding's variance: sqrt(max(0, std**2 - ulp**2 / 6)),
// ulp = 2**(e - 7) (e: theta's unbiased float32 exponent; 2**-133 below 2**-126).
FSGLD_HD float compensated_noise_std(float theta, float std) {
  // p = 2**e, |theta| truncated to its power of two by a mask (0 below 2**-126, where the reference's
  // 2**-133 squares to 0 all the same): ulp**2 / 6 = (p * p) * (2**-14 * float32(1/6)), the
  // reference's one rounding of (ulp * ulp) * float32(1/6) for 2**-75 <= |theta| < 2**64 (p * p
  // exact); outside, both are below 2**-149 or both above any std**2 under 2**110
  const float p = bits_to_float(float_to_bits(theta) & 0x7F800000u);
  constexpr float k = 0x1p-14f * (1.0f / 6.0f);
#if defined(__CUDA_ARCH__)
  // the subtraction in the same FMA: one rounding fewer than the reference's, so the std may differ
  // by an ulp, inside the noisy tolerance (it is 0 where std is; sm_90 bf16 stochastic Gaussian
  // full step: 129.2 -> 127.2 instructions per element)
  const float v = __fmaf_rn(p * p, -k, std * std);
#else
  const float v = std * std - (p * p) * k;
#endif
#if defined(__CUDA_ARCH__)
  // sqrt.approx (one MUFU.SQRT): the std scales a normal that is itself accurate to NOISE_ATOL only;
  // sqrtf's correctly rounded form calls a slow-path subroutine (for 0 and denormals) on every element
  float s;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(s) : "f"(v > 0.0f ? v : 0.0f));
  return s;
#else
  return sqrtf(v > 0.0f ? v : 0.0f);
#endif
}

// ---- SPEC section 3, one element -------------------------------------------------------------
// T is the math type: float (double for float64 params). Zero coefficients are skipped so the
// result equals the reference's, which also skips them.
template <typename T>
struct StepCoeffs {
  T lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma, inv_scale;
  bool has_scale, has_momentum;
  bool has_noise;  // noise_std != 0; the CUDA kernels set it from their template flags (no branch)
};

// Takes the clean weight (already restored, or the master) and returns the updated clean weight.
// B is the momentum buffer's storage type: the direction used is the buffer as stored (rounded),
// as torch.optim.SGD does with a low-precision buffer.
template <typename T, typename B>
FSGLD_HD T sgld_update(T theta, T g, B* buf, T xi, const StepCoeffs<T>& c) {
  T d = c.has_scale ? g * c.inv_scale : g;
  if (c.weight_decay != T(0)) d = d + c.weight_decay * theta;
  if (c.has_momentum) {
    const B stored = static_cast<B>(c.momentum * static_cast<T>(*buf) + d);  // buf starts at 0
    *buf = stored;
    d = static_cast<T>(stored);
  }
  theta = theta - c.lr * d;
  if (c.has_noise) theta = theta + c.noise_std * xi;
  return theta;
}

}  // namespace fsgld
