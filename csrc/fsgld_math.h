// fsgld_math.h: the element math of fSGLD, written once for the host compiler and for nvcc.
//
// SPEC section 2 (Philox4x32-10 stream, uniform mapping, Box-Muller) and section 3 (the fused
// step per element). The CPU kernel (fsgld_cpu.cpp) and the CUDA kernel (fsgld_cuda.cu) both
// include this file; nothing else implements these formulas in C++.
//
// log / sin / cos are branch-free float32 polynomials (Cephes coefficients) instead of libm:
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
// Odd multiples of 2**-24: exact in float32, never 0 or 1. (w >> 8) | 1 is SPEC's 2 * (w >> 9) + 1
// in one instruction fewer; it is below 2**24, so the signed conversion (which AVX2 has) is exact.
FSGLD_HD float uniform01(uint32_t w) { return (float)(int32_t)((w >> 8) | 1u) * 5.9604644775390625e-8f; }

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

// log(x) for normal positive floats (here x in (0, 1): no sign bit); Cephes logf, branch-free.
FSGLD_HD float log_f32(float x) {
  const uint32_t bits = float_to_bits(x);
  int e = (int)(bits >> 23) - 126;
  float m = bits_to_float((bits & 0x807FFFFFu) | 0x3F000000u);  // m in [0.5, 1)
  // Below sqrt(1/2), use 2m and e-1. Written as adds of a selected term: GCC if-converts and
  // vectorizes that for AVX2 too, not `small ? m + m : m`.
  const int small = m < 0.707106781186547524f;
  e -= small;
  m = (m + (small ? m : 0.0f)) - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = fmadd(y, m, -1.1514610310e-1f);
  y = fmadd(y, m, 1.1676998740e-1f);
  y = fmadd(y, m, -1.2420140846e-1f);
  y = fmadd(y, m, 1.4249322787e-1f);
  y = fmadd(y, m, -1.6668057665e-1f);
  y = fmadd(y, m, 2.0000714765e-1f);
  y = fmadd(y, m, -2.4999993993e-1f);
  y = fmadd(y, m, 3.3333331174e-1f);
  y = y * m * z;
  const float fe = (float)e;
  y = fmadd(fe, -2.12194440e-4f, y);
  y = fmadd(-0.5f, z, y);
  return fmadd(fe, 0.693359375f, m + y);
}

// sin(t) and cos(t) for t in [0, 2*pi]: Cody-Waite reduction by pi/2, Cephes polynomials.
FSGLD_HD void sincos_f32(float t, float* s, float* c) {
  const int qi = (int)fmadd(t, 0.636619772367581343f, 0.5f);  // nearest quadrant, t >= 0
  const float q = (float)qi;
  const float r = fmadd(-q, 7.54978995489188216e-8f, fmadd(-q, 4.837512969970703125e-4f, fmadd(-q, 1.5703125f, t)));
  const float z = r * r;
  const float sp = fmadd(fmadd(fmadd(-1.9515295891e-4f, z, 8.3321608736e-3f), z, -1.6666654611e-1f) * z, r, r);
  const float cp =
      fmadd(fmadd(fmadd(2.443315711809948e-5f, z, -1.388731625493765e-3f), z, 4.166664568298827e-2f) * z, z,
            fmadd(-0.5f, z, 1.0f));
  const float sv = (qi & 1) ? cp : sp;
  const float cv = (qi & 1) ? sp : cp;
  // Sign flips as xors of the sign bit (quadrants 2, 3 for sin; 1, 2 for cos): no selects.
  *s = bits_to_float(float_to_bits(sv) ^ ((uint32_t)(qi & 2) << 30));
  *c = bits_to_float(float_to_bits(cv) ^ ((uint32_t)((qi + 1) & 2) << 30));
}

FSGLD_HD void box_muller(float a, float b, float* n0, float* n1) {
  const float r = sqrtf(-2.0f * log_f32(a));
  float s, c;
  sincos_f32(6.28318530717958647692f * b, &s, &c);
  *n0 = r * c;
  *n1 = r * s;
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

FSGLD_HD void normal4(const Stream& st, uint64_t block, float out[4]) {
  uint32_t w0 = (uint32_t)block, w1 = (uint32_t)(block >> 32), w2 = st.step, w3 = st.tag;
  philox4x32_10(w0, w1, w2, w3, st.k0, st.k1);
  box_muller(uniform01(w0), uniform01(w1), &out[0], &out[1]);
  box_muller(uniform01(w2), uniform01(w3), &out[2], &out[3]);
}

// ---- SPEC section 3, one element -------------------------------------------------------------
// T is the math type: float (double for float64 params). Zero coefficients are skipped so the
// result equals the reference's, which also skips them.
template <typename T>
struct StepCoeffs {
  T lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma, inv_scale;
  bool has_scale, has_momentum;
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
  if (c.noise_std != T(0)) theta = theta + c.noise_std * xi;
  return theta;
}

}  // namespace fsgld
