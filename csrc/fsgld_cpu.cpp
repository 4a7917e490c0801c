// fsgld_cpu.cpp: the CPU kernels of the fsgld:: ops.
//
// One call handles a whole (device, dtype) list of tensors. The list is flattened into one
// element range, split across threads with at::parallel_for, and each thread walks contiguous
// chunks of kChunk elements: it first fills the chunk's noise (four normals per Philox call) into
// small L1-resident buffers, prefetching the chunk's data meanwhile, then runs one vectorized pass
// over the chunk's tensors.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <utility>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

#include "fsgld_math.h"
#include "fsgld_ops.h"
#include "fsgld_schemas.h"

namespace fsgld {
namespace {

// 1024 elements: three noise buffers of 4 KB each stay in L1 next to the tensors' lines.
constexpr int64_t kChunk = 1024;
// Elements per parallel task: amortises scheduling, still balances a few large tensors.
constexpr int64_t kGrain = 1 << 15;

// Filling noise dominates the step's cost. Two compiled paths, picked at run time so that one
// wheel is fast on every x86-64 machine without -march=native; both run the same three stages
// (Philox words of 16 blocks at a time, Box-Muller over the planar word pairs, back to element
// order), because Philox then Box-Muller in one loop iteration is a ~500-instruction dependency
// chain, longer than a core's reorder window, while loops of independent iterations overlap:
//  - AVX-512 (below): Philox in 64-bit lanes with intrinsics, a register transpose at the end.
//  - portable: Philox over plain 16-lane arrays that the compiler vectorizes, one always_inline
//    body compiled for x86-64-v3 (AVX2 + FMA) and for baseline x86-64.
// cpu_isa() picks the path once per process (not GCC's target_clones: its choice cannot be
// overridden, so the baseline path never ran on a machine with AVX2 and no test reached it).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FSGLD_X86 1
#define FSGLD_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define FSGLD_X86 0
#endif

// The widest ISA this CPU has (AVX-512 counts only with what the loops are compiled for: F, BW,
// VL on top of x86-64-v3), capped by FSGLD_CPU_ISA=avx512|avx2|baseline: the tests run every
// path on one machine. Read once per process; a bad value is an error at the first kernel call.
enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if FSGLD_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v3")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  const char* cap = std::getenv("FSGLD_CPU_ISA");
  if (cap == nullptr || *cap == '\0') return best;
  for (int i = 0; i < 3; ++i) {
    if (std::strcmp(cap, kIsaNames[i]) == 0) return std::min(best, static_cast<Isa>(i));
  }
  TORCH_CHECK(false, "FSGLD_CPU_ISA=", cap, ": use avx512, avx2 or baseline (a cap on the CPU's own)");
}

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// Largest fill: a chunk that starts and ends mid-block spans kChunk / 4 + 1 blocks; fills cover
// whole groups of 16 blocks, so buffers hold kGroups of them.
constexpr int64_t kMaxBlocks = kChunk / 4 + 1;
constexpr int64_t kGroups = (kMaxBlocks + 15) / 16;

// The lines a chunk's loop will touch, asked for (into L2) a slice at a time while the chunk's
// first normal fill computes. The fill issues no loads, so without this the memory system idles
// through it and the loop then waits on every line; asked for all at once before the fill, the
// prefetches fill the core's miss queue and stall it. 66.5M params in 96 tensors, two threads,
// alternated in one process (medians): noise-only step 52.2 -> 41.2 ms, Rademacher step
// 57.0 -> 52.1 ms, normals_ of 16M 10.1 -> 8.3 ms (1.6e9 -> 2.0e9 normals/s).
struct PrefetchList {
  const char* ptr[4];
  int64_t bytes[4];
  bool write[4];
  int n = 0;
  void add(const void* p, int64_t nbytes, bool for_write) {
    ptr[n] = static_cast<const char*>(p), bytes[n] = nbytes, write[n++] = for_write;
  }
  // Slice `part` of `parts` of every range (locality 1: into L2, which the chunk's data fits).
  __attribute__((always_inline)) inline void slice(int64_t part, int64_t parts) const {
    for (int k = 0; k < n; ++k) {
      const int64_t lines = (bytes[k] + 63) / 64, a = lines * part / parts, b = lines * (part + 1) / parts;
      if (write[k]) {
        for (int64_t l = a; l < b; ++l) __builtin_prefetch(ptr[k] + 64 * l, 1, 1);
      } else {
        for (int64_t l = a; l < b; ++l) __builtin_prefetch(ptr[k] + 64 * l, 0, 1);
      }
    }
  }
};

// Stage 2, inlined into each ISA's fill so that it is compiled for that ISA. Group g's 32 word
// pairs are (w0, w1) of its 16 blocks, then (w2, w3); nc / ns get the cosine / sine normals.
__attribute__((always_inline)) inline void box_muller_pairs(const uint32_t* __restrict wa,
                                                            const uint32_t* __restrict wb, float* __restrict nc,
                                                            float* __restrict ns, int64_t npairs) {
  for (int64_t i = 0; i < npairs; ++i) box_muller(wa[i], wb[i], &nc[i], &ns[i]);
}

}  // namespace

// Portable lanes: 16 counters, each word in the low half of a 64-bit integer (as in the AVX-512
// lanes below), so the compiler's vector code multiplies with vpmuludq. Portable path compiled for
// AVX2, one Zen 4 core: 0.08e9 normals/s with 32-bit lanes and Box-Muller left scalar by GCC, 0.26e9
// with these lanes and a log it vectorizes (8 lanes a call measured 0.18e9: more spills). The AVX2
// path now has its own intrinsics (Ymm2w below): 3.5x the normals/s of this one on an AVX2 EPYC.
struct U64x16 {
  uint64_t v[16];
};
inline U64x16 operator^(const U64x16& x, const U64x16& y) {
  U64x16 r;
  for (int j = 0; j < 16; ++j) r.v[j] = x.v[j] ^ y.v[j];
  return r;
}
template <>
struct Lanes<U64x16> {
  static inline U64x16 splat(uint32_t x) {
    U64x16 r;
    for (int j = 0; j < 16; ++j) r.v[j] = x;
    return r;
  }
  // lo keeps the product's high half as garbage: multiplies read low halves, xors are lane-wise.
  static inline void mulhilo(const U64x16& x, uint32_t m, U64x16* hi, U64x16* lo) {
    for (int j = 0; j < 16; ++j) {
      const uint64_t p = (uint64_t)(uint32_t)x.v[j] * m;
      hi->v[j] = p >> 32;
      lo->v[j] = p;
    }
  }
};

namespace {

// Fills 16 * ceil(nblocks / 16) blocks (nblocks <= kMaxBlocks): callers leave room for the tail.
// Asks for all of `pf` (may be null) first: this fill is long (about four times the AVX-512 one),
// and a slice per group inside its Philox loop doubled the step (noise-only, 171 -> 356 ms).
__attribute__((always_inline)) inline void fill_normals_portable(Stream st, uint64_t first_block, int64_t nblocks,
                                                                float* __restrict out, const PrefetchList* pf) {
  alignas(64) uint32_t wa[32 * kGroups], wb[32 * kGroups];
  alignas(64) float nc[32 * kGroups], ns[32 * kGroups];
  const int64_t groups = (nblocks + 15) / 16;
  if (pf) pf->slice(0, 1);
  for (int64_t g = 0; g < groups; ++g) {
    U64x16 c0, c1, c2 = Lanes<U64x16>::splat(st.step), c3 = Lanes<U64x16>::splat(st.tag);
    for (int j = 0; j < 16; ++j) {
      c0.v[j] = first_block + (uint64_t)(16 * g + j);  // the 64-bit block index: low word in the low half
      c1.v[j] = c0.v[j] >> 32;
    }
    philox4x32_10(c0, c1, c2, c3, st.k0, st.k1);
    for (int j = 0; j < 16; ++j) {
      wa[32 * g + j] = (uint32_t)c0.v[j], wb[32 * g + j] = (uint32_t)c1.v[j];
      wa[32 * g + 16 + j] = (uint32_t)c2.v[j], wb[32 * g + 16 + j] = (uint32_t)c3.v[j];
    }
  }
  box_muller_pairs(wa, wb, nc, ns, 32 * groups);
  for (int64_t g = 0; g < groups; ++g) {
    for (int j = 0; j < 16; ++j) {
      float* o = out + 64 * g + 4 * j;
      o[0] = nc[32 * g + j], o[1] = ns[32 * g + j], o[2] = nc[32 * g + 16 + j], o[3] = ns[32 * g + 16 + j];
    }
  }
}

}  // namespace


#if FSGLD_X86
// Not always_inline: the generic philox template may not absorb AVX-512 code; once it is inlined
// into the AVX-512 functions below these calls inline there too (checked in the disassembly).
#define FSGLD_AVX512 __attribute__((target("avx512f,fma"))) inline

// Philox lanes for AVX-512: two vectors of 8 counters, each counter word in the low half of a
// 64-bit lane. vpmuludq then yields a lane's whole 32x32->64 product: lo is the product itself
// (its high half is garbage that later multiplies, which read low halves, and xors, lane-wise,
// never mix in) and hi is the product >> 32. That is 3 instructions per multiply against 7 with
// 32-bit lanes (odd lanes shifted, products re-blended), and the two vectors give the scheduler
// independent multiplies: 1.9e9 -> 2.7e9 Philox words/s on one Zen 4 core.
struct Zmm2 {
  __m512i a, b;
};
FSGLD_AVX512 Zmm2 operator^(Zmm2 x, Zmm2 y) { return {_mm512_xor_si512(x.a, y.a), _mm512_xor_si512(x.b, y.b)}; }

template <>
struct Lanes<Zmm2> {
  static FSGLD_AVX512 Zmm2 splat(uint32_t x) {
    const __m512i v = _mm512_set1_epi64((long long)x);
    return {v, v};
  }
  static FSGLD_AVX512 void mulhilo(Zmm2 x, uint32_t m, Zmm2* hi, Zmm2* lo) {
    const __m512i mv = _mm512_set1_epi64((long long)m);
    *lo = {_mm512_mul_epu32(x.a, mv), _mm512_mul_epu32(x.b, mv)};
    *hi = {_mm512_srli_epi64(lo->a, 32), _mm512_srli_epi64(lo->b, 32)};
  }
};
#endif

#if FSGLD_X86
// AVX2 (x86-64-v3) lanes: 16 counters as two vectors of 8 32-bit words, even and odd lanes
// multiplied apart (AVX2 has no 32x32 -> high multiply) and the products' halves re-blended: 7
// instructions a multiply against AVX-512's 3, but four ymm hold a block's state where 64-bit lanes
// (the AVX-512 layout at half width, 8 blocks a call) need eight, and the 16 blocks give the
// scheduler more independent chains: 1.51e9 -> 1.59e9 normals/s on the AVX2 EPYC below.
#define FSGLD_AVX2 __attribute__((target("avx2,fma"))) inline

struct Ymm2w {
  __m256i a, b;
};
FSGLD_AVX2 Ymm2w operator^(Ymm2w x, Ymm2w y) { return {_mm256_xor_si256(x.a, y.a), _mm256_xor_si256(x.b, y.b)}; }
FSGLD_AVX2 void mulhilo8(__m256i x, __m256i mv, __m256i* hi, __m256i* lo) {
  const __m256i pe = _mm256_mul_epu32(x, mv), po = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), mv);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(pe, 32), po, 0xAA);
  *lo = _mm256_blend_epi32(pe, _mm256_slli_epi64(po, 32), 0xAA);
}
template <>
struct Lanes<Ymm2w> {
  static FSGLD_AVX2 Ymm2w splat(uint32_t x) {
    const __m256i v = _mm256_set1_epi32((int)x);
    return {v, v};
  }
  static FSGLD_AVX2 void mulhilo(Ymm2w x, uint32_t m, Ymm2w* hi, Ymm2w* lo) {
    const __m256i mv = _mm256_set1_epi64x((long long)m);
    mulhilo8(x.a, mv, &hi->a, &lo->a);
    mulhilo8(x.b, mv, &hi->b, &lo->b);
  }
};
#endif

namespace {

#if FSGLD_X86
// The words of blocks blk .. blk+15 of a stream: word k of block blk+j is lane j of w[k].
// `word1_or` is or-ed into counter word 1 (SPEC 2c's rounding sub-stream; 0 for every other draw).
FSGLD_AVX512 void philox16(const Stream& st, uint64_t blk, __m512i w[4], uint32_t word1_or = 0) {
  const __m512i base = _mm512_set1_epi64((long long)blk);
  Zmm2 c0{_mm512_add_epi64(base, _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7)),
          _mm512_add_epi64(base, _mm512_setr_epi64(8, 9, 10, 11, 12, 13, 14, 15))};
  const __m512i sub = _mm512_set1_epi64((long long)word1_or);
  Zmm2 c1{_mm512_or_si512(_mm512_srli_epi64(c0.a, 32), sub),  // 64-bit block index: carries for free
          _mm512_or_si512(_mm512_srli_epi64(c0.b, 32), sub)};
  Zmm2 c2 = Lanes<Zmm2>::splat(st.step), c3 = Lanes<Zmm2>::splat(st.tag);
  philox4x32_10(c0, c1, c2, c3, st.k0, st.k1);
  const __m512i low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const Zmm2 c[4] = {c0, c1, c2, c3};
  for (int k = 0; k < 4; ++k) w[k] = _mm512_permutex2var_epi32(c[k].a, low_halves, c[k].b);
}

// Back to block order (word 4j+k of `out` is lane j of n_k): a 4x16 -> 16x4 transpose in registers;
// GCC's own interleaving of scalar stores cost ~15% of the normal generator. `out` may be any
// 64-byte buffer (the stores may alias).
FSGLD_AVX512 void store_block_order(__m512 n0, __m512 n1, __m512 n2, __m512 n3, void* out) {
  const __m512 t0 = _mm512_unpacklo_ps(n0, n1), t1 = _mm512_unpackhi_ps(n0, n1);
  const __m512 t2 = _mm512_unpacklo_ps(n2, n3), t3 = _mm512_unpackhi_ps(n2, n3);
  const __m512 u0 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u1 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t0), _mm512_castps_pd(t2)));
  const __m512 u2 = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 u3 = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t1), _mm512_castps_pd(t3)));
  const __m512 v0 = _mm512_shuffle_f32x4(u0, u1, 0x44), v1 = _mm512_shuffle_f32x4(u2, u3, 0x44);
  const __m512 v2 = _mm512_shuffle_f32x4(u0, u1, 0xEE), v3 = _mm512_shuffle_f32x4(u2, u3, 0xEE);
  float* o = static_cast<float*>(out);
  _mm512_storeu_ps(o + 0, _mm512_shuffle_f32x4(v0, v1, 0x88));
  _mm512_storeu_ps(o + 16, _mm512_shuffle_f32x4(v0, v1, 0xDD));
  _mm512_storeu_ps(o + 32, _mm512_shuffle_f32x4(v2, v3, 0x88));
  _mm512_storeu_ps(o + 48, _mm512_shuffle_f32x4(v2, v3, 0xDD));
}

// Fills 16 * ceil(nblocks / 16) blocks (nblocks <= kMaxBlocks): callers leave room for the tail.
// With the Philox above and FMA in the polynomials: 0.72e9 -> 1.0e9 normals/s on one Zen 4 core.
__attribute__((target("avx512f,fma"))) void fill_normals_avx512(Stream st, uint64_t first_block, int64_t nblocks,
                                                                 float* __restrict out, const PrefetchList* pf) {
  alignas(64) uint32_t wa[32 * kGroups], wb[32 * kGroups];
  alignas(64) float nc[32 * kGroups], ns[32 * kGroups];
  const int64_t groups = (nblocks + 15) / 16;
  for (int64_t g = 0; g < groups; ++g) {
    if (pf) pf->slice(g, groups);  // load ports are idle here: the Philox is vector arithmetic
    __m512i w[4];
    philox16(st, first_block + (uint64_t)(16 * g), w);
    _mm512_store_si512(wa + 32 * g, w[0]);
    _mm512_store_si512(wb + 32 * g, w[1]);
    _mm512_store_si512(wa + 32 * g + 16, w[2]);
    _mm512_store_si512(wb + 32 * g + 16, w[3]);
  }
  box_muller_pairs(wa, wb, nc, ns, 32 * groups);
  for (int64_t g = 0; g < groups; ++g) {
    store_block_order(_mm512_load_ps(nc + 32 * g), _mm512_load_ps(ns + 32 * g), _mm512_load_ps(nc + 32 * g + 16),
                      _mm512_load_ps(ns + 32 * g + 16), out + 64 * g);
  }
}
__attribute__((target("avx512f,fma"))) void words16_avx512(const Stream& st, uint64_t blk, uint32_t* out) {
  __m512i w[4];
  philox16(st, blk, w);
  alignas(64) uint32_t tmp[4][16];
  for (int k = 0; k < 4; ++k) _mm512_store_si512(tmp[k], w[k]);
  for (int j = 0; j < 16; ++j)
    for (int k = 0; k < 4; ++k) out[4 * j + k] = tmp[k][j];
}

#endif

#if FSGLD_X86
// AVX2 fills: Ymm2w lanes (16 blocks a call), normals and words put in block order by shuffles,
// where the portable path's stores had GCC extract lanes one by one (perf on an AVX2-only EPYC, the
// portable 64-bit lanes of 16 counters: 51% of the normal fill in the Philox with its spills, 37%
// in packing the words and ordering the normals).
// The words of blocks blk .. blk+15 of a stream: word k of block blk+8h+j is lane j of w[k] half h
// (a, b); `word1_or` as in philox16.
FSGLD_AVX2 void philox16_avx2(const Stream& st, uint64_t blk, Ymm2w w[4], uint32_t word1_or = 0) {
  const __m256i j = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), lo = _mm256_set1_epi32((int)(uint32_t)blk);
  const __m256i hi = _mm256_set1_epi32((int)(uint32_t)(blk >> 32)), flip = _mm256_set1_epi32((int)0x80000000u);
  Ymm2w c0{_mm256_add_epi32(lo, j), _mm256_add_epi32(lo, _mm256_add_epi32(j, _mm256_set1_epi32(8)))};
  // the 64-bit index's carry: a low word that wrapped is below blk's (unsigned, as signed with the top bit flipped)
  const __m256i wrap_a = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, flip), _mm256_xor_si256(c0.a, flip));
  const __m256i wrap_b = _mm256_cmpgt_epi32(_mm256_xor_si256(lo, flip), _mm256_xor_si256(c0.b, flip));
  const __m256i sub = _mm256_set1_epi32((int)word1_or);
  Ymm2w c1{_mm256_or_si256(_mm256_sub_epi32(hi, wrap_a), sub), _mm256_or_si256(_mm256_sub_epi32(hi, wrap_b), sub)};
  Ymm2w c2 = Lanes<Ymm2w>::splat(st.step), c3 = Lanes<Ymm2w>::splat(st.tag);
  philox4x32_10(c0, c1, c2, c3, st.k0, st.k1);
  w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

// Block order for 8 blocks (word 4j+k of `out` is lane j of n_k): a 4x8 -> 8x4 transpose in registers.
FSGLD_AVX2 void store_block_order8(__m256 n0, __m256 n1, __m256 n2, __m256 n3, void* out) {
  const __m256 t0 = _mm256_unpacklo_ps(n0, n1), t1 = _mm256_unpackhi_ps(n0, n1);
  const __m256 t2 = _mm256_unpacklo_ps(n2, n3), t3 = _mm256_unpackhi_ps(n2, n3);
  const __m256 u0 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u1 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t0), _mm256_castps_pd(t2)));
  const __m256 u2 = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  const __m256 u3 = _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(t1), _mm256_castps_pd(t3)));
  float* o = static_cast<float*>(out);
  _mm256_storeu_ps(o + 0, _mm256_permute2f128_ps(u0, u1, 0x20));
  _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(u2, u3, 0x20));
  _mm256_storeu_ps(o + 16, _mm256_permute2f128_ps(u0, u1, 0x31));
  _mm256_storeu_ps(o + 24, _mm256_permute2f128_ps(u2, u3, 0x31));
}

FSGLD_V3 void fill_normals_avx2(Stream st, uint64_t first_block, int64_t nblocks, float* __restrict out,
                               const PrefetchList* pf) {
  alignas(64) uint32_t wa[32 * kGroups], wb[32 * kGroups];
  alignas(64) float nc[32 * kGroups], ns[32 * kGroups];
  const int64_t groups = (nblocks + 15) / 16;
  for (int64_t g = 0; g < groups; ++g) {
    if (pf) pf->slice(g, groups);
    Ymm2w w[4];
    philox16_avx2(st, first_block + (uint64_t)(16 * g), w);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wa + 32 * g), w[0].a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wa + 32 * g + 8), w[0].b);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 32 * g), w[1].a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 32 * g + 8), w[1].b);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wa + 32 * g + 16), w[2].a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wa + 32 * g + 24), w[2].b);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 32 * g + 16), w[3].a);
    _mm256_store_si256(reinterpret_cast<__m256i*>(wb + 32 * g + 24), w[3].b);
  }
  box_muller_pairs(wa, wb, nc, ns, 32 * groups);
  for (int64_t g = 0; g < groups; ++g) {
    for (int h = 0; h < 2; ++h) {
      const int64_t i = 32 * g + 8 * h;
      store_block_order8(_mm256_load_ps(nc + i), _mm256_load_ps(ns + i), _mm256_load_ps(nc + i + 16),
                         _mm256_load_ps(ns + i + 16), out + 64 * g + 32 * h);
    }
  }
}
#endif

// ---- Rademacher signs (SPEC 2b) as +-1.0: the step's loop multiplies them by sigma, exactly ----
// A chunk spans at most kMaxRBlocks Rademacher blocks (128 elements, one Philox call each).
constexpr int64_t kMaxRBlocks = kChunk / 128 + 1;

// Portable: the words one call at a time, then bit j of each word -> +1.0 / -1.0 in a loop of
// constant trip count that GCC vectorizes (variable shifts in the AVX2 clone).
__attribute__((always_inline)) inline void fill_signs_portable(Stream st, uint64_t first, int64_t nr,
                                                              float* __restrict out) {
  uint32_t words[4 * kMaxRBlocks];
  for (int64_t r = 0; r < nr; ++r) rademacher_words(st, first + (uint64_t)r, words + 4 * r);
  for (int64_t i = 0; i < 4 * nr; ++i) {
    const uint32_t w = words[i];
    uint32_t bits[32];
    for (int j = 0; j < 32; ++j) bits[j] = 0x3F800000u | (~(w >> j) << 31);  // bit clear: -1.0
    __builtin_memcpy(out + 32 * i, bits, sizeof(bits));
  }
}

#if FSGLD_X86
// AVX-512: 16 Rademacher blocks per Philox call of the vector lanes, each word -> two masked blends.
__attribute__((target("avx512f,fma"))) void fill_signs_avx512(Stream st, uint64_t first, int64_t nr,
                                                               float* __restrict out) {
  const __m512 plus = _mm512_set1_ps(1.0f), minus = _mm512_set1_ps(-1.0f);
  for (int64_t g = 0; g < nr; g += 16) {
    __m512i w[4];
    philox16(st, first + (uint64_t)g, w);
    alignas(64) uint32_t tmp[4][16];
    for (int k = 0; k < 4; ++k) _mm512_store_si512(tmp[k], w[k]);
    for (int64_t j = 0; j < std::min<int64_t>(16, nr - g); ++j) {
      for (int k = 0; k < 4; ++k) {
        float* o = out + 128 * (g + j) + 32 * k;
        _mm512_store_ps(o, _mm512_mask_blend_ps((__mmask16)(tmp[k][j] & 0xFFFFu), minus, plus));
        _mm512_store_ps(o + 16, _mm512_mask_blend_ps((__mmask16)(tmp[k][j] >> 16), minus, plus));
      }
    }
  }
}
#endif

#if FSGLD_X86
// AVX2: 16 Rademacher blocks per Philox call of the vector lanes; bit j of a word moved to the sign
// bit by a variable shift, 8 signs at a time (the portable loop, vectorized by GCC through a
// temporary, took 55% of a normal fill's time in the Rademacher step on an AVX2-only EPYC).
FSGLD_V3 void fill_signs_avx2(Stream st, uint64_t first, int64_t nr, float* __restrict out) {
  const __m256i sign = _mm256_set1_epi32((int)0x80000000u), minus_one = _mm256_set1_epi32((int)0xBF800000u);
  const __m256i to_sign[4] = {_mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
                              _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
                              _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
                              _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0)};
  for (int64_t g = 0; g < nr; g += 16) {
    Ymm2w w[4];
    philox16_avx2(st, first + (uint64_t)g, w);
    alignas(32) uint32_t tmp[4][16];
    for (int k = 0; k < 4; ++k) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[k]), w[k].a);
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[k] + 8), w[k].b);
    }
    for (int64_t j = 0; j < std::min<int64_t>(16, nr - g); ++j) {
      for (int k = 0; k < 4; ++k) {
        const __m256i word = _mm256_set1_epi32((int)tmp[k][j]);
        float* o = out + 128 * (g + j) + 32 * k;
        for (int q = 0; q < 4; ++q) {  // bit set: +1.0 (-1.0 with its sign bit flipped)
          const __m256i bit = _mm256_and_si256(_mm256_sllv_epi32(word, to_sign[q]), sign);
          _mm256_storeu_ps(o + 8 * q, _mm256_castsi256_ps(_mm256_xor_si256(bit, minus_one)));
        }
      }
    }
  }
}
#endif
void fill_signs_baseline(Stream st, uint64_t first, int64_t nr, float* __restrict out) {
  fill_signs_portable(st, first, nr, out);
}

void fill_signs(const Stream& st, uint64_t first, int64_t nr, float* __restrict out) {
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512) return fill_signs_avx512(st, first, nr, out);
  if (cpu_isa() == Isa::kAvx2) return fill_signs_avx2(st, first, nr, out);
#endif
  fill_signs_baseline(st, first, nr, out);
}

// ---- SPEC 2c rounding bits: 16 per element, one Philox call per rounding block of 8 elements ----
// Written in element order (element e of block b is half e % 2 of word e / 2: bits[8 b + e]), as
// rounding_words (fsgld_math.h) draws them. Fills cover whole groups of 16 blocks.
constexpr int64_t kMaxRoundingBlocks = kChunk / 8 + 1;
constexpr int64_t kRoundingGroups = (kMaxRoundingBlocks + 15) / 16;

__attribute__((always_inline)) inline void fill_rounding_bits_portable(Stream st_xi, uint32_t op, uint64_t first,
                                                                      int64_t nblocks, uint16_t* __restrict out) {
  for (int64_t g = 0; g < (nblocks + 15) / 16; ++g) {
    U64x16 c0, c1, c2 = Lanes<U64x16>::splat(st_xi.step), c3 = Lanes<U64x16>::splat(st_xi.tag);
    for (int j = 0; j < 16; ++j) {
      c0.v[j] = first + (uint64_t)(16 * g + j);
      c1.v[j] = (c0.v[j] >> 32) | rounding_substream(op);
    }
    philox4x32_10(c0, c1, c2, c3, st_xi.k0, st_xi.k1);
    const U64x16* c[4] = {&c0, &c1, &c2, &c3};
    for (int j = 0; j < 16; ++j) {
      for (int k = 0; k < 4; ++k) {
        uint16_t* o = out + 128 * g + 8 * j + 2 * k;
        o[0] = (uint16_t)c[k]->v[j], o[1] = (uint16_t)(c[k]->v[j] >> 16);
      }
    }
  }
}

#if FSGLD_X86
__attribute__((target("avx512f,fma"))) void fill_rounding_bits_avx512(Stream st_xi, uint32_t op, uint64_t first,
                                                                       int64_t nblocks, uint16_t* __restrict out) {
  for (int64_t g = 0; g < (nblocks + 15) / 16; ++g) {
    __m512i w[4];
    philox16(st_xi, first + (uint64_t)(16 * g), w, rounding_substream(op));
    store_block_order(_mm512_castsi512_ps(w[0]), _mm512_castsi512_ps(w[1]), _mm512_castsi512_ps(w[2]),
                      _mm512_castsi512_ps(w[3]), out + 128 * g);
  }
}
FSGLD_V3 void fill_rounding_bits_avx2(Stream st_xi, uint32_t op, uint64_t first, int64_t nblocks,
                                      uint16_t* __restrict out) {
  for (int64_t g = 0; g < (nblocks + 15) / 16; ++g) {
    Ymm2w w[4];
    philox16_avx2(st_xi, first + (uint64_t)(16 * g), w, rounding_substream(op));
    store_block_order8(_mm256_castsi256_ps(w[0].a), _mm256_castsi256_ps(w[1].a), _mm256_castsi256_ps(w[2].a),
                       _mm256_castsi256_ps(w[3].a), out + 128 * g);
    store_block_order8(_mm256_castsi256_ps(w[0].b), _mm256_castsi256_ps(w[1].b), _mm256_castsi256_ps(w[2].b),
                       _mm256_castsi256_ps(w[3].b), out + 128 * g + 64);
  }
}
#endif
void fill_rounding_bits_baseline(Stream st_xi, uint32_t op, uint64_t first, int64_t nblocks,
                                 uint16_t* __restrict out) {
  fill_rounding_bits_portable(st_xi, op, first, nblocks, out);
}

void fill_rounding_bits(const Stream& st_xi, uint32_t op, uint64_t first, int64_t nblocks, uint16_t* __restrict out) {
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512) return fill_rounding_bits_avx512(st_xi, op, first, nblocks, out);
  if (cpu_isa() == Isa::kAvx2) return fill_rounding_bits_avx2(st_xi, op, first, nblocks, out);
#endif
  fill_rounding_bits_baseline(st_xi, op, first, nblocks, out);
}

// The rounding bits of global elements [g0, g0 + len) for `op` (SPEC 2c; st_xi: the Langevin
// stream of the call's step). Returns where element g0 lands in the buffer. A fill of its own: it
// costs what its Philox calls do (one thread, 0.110 perf samples per sample of the step's three
// normal fills, which make 6x its Philox calls), so folding it into the xi fill would save little.
struct RoundingBits {
  alignas(64) uint16_t data[128 * kRoundingGroups];
  const uint16_t* fill(const Stream& st_xi, RoundingOp op, int64_t g0, int64_t len) {
    const int64_t first = g0 >> 3, last = (g0 + len - 1) >> 3;
    fill_rounding_bits(st_xi, op, (uint64_t)first, last - first + 1, data);
    return data + (g0 & 7);
  }
};

void fill_normals_baseline(Stream st, uint64_t first_block, int64_t nblocks, float* __restrict out,
                           const PrefetchList* pf) {
  fill_normals_portable(st, first_block, nblocks, out, pf);
}

void fill_normals(const Stream& st, uint64_t first_block, int64_t nblocks, float* __restrict out,
                  const PrefetchList* pf) {
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512) return fill_normals_avx512(st, first_block, nblocks, out, pf);
  if (cpu_isa() == Isa::kAvx2) return fill_normals_avx2(st, first_block, nblocks, out, pf);
#endif
  fill_normals_baseline(st, first_block, nblocks, out, pf);
}

// The noise of global elements [g0, g0 + len) of a stream: normals, or Rademacher signs as +-1.0
// (one Philox call per 128 elements; the step's loop multiplies them by sigma, exactly). Returns
// where element g0 lands in the buffer. A normal fill also works through `pf` (may be null).
struct NoiseBuf {
  alignas(64) float data[64 * kGroups + 128];  // normal fills cover whole 16-block groups, signs whole 128s
  const float* fill(const Stream& st, int64_t g0, int64_t len, const PrefetchList* pf = nullptr) {
    const int64_t first = g0 >> 2, last = (g0 + len - 1) >> 2;
    fill_normals(st, (uint64_t)first, last - first + 1, data, pf);
    return data + (g0 & 3);
  }
  const float* fill_rademacher(const Stream& st, int64_t g0, int64_t len) {
    const int64_t first = g0 >> 7, last = (g0 + len - 1) >> 7;
    fsgld::fill_signs(st, (uint64_t)first, last - first + 1, data);
    return data + (g0 & 127);
  }
  // A sign fill is too short to hide prefetches (it ignores pf).
  const float* fill(const Stream& st, int64_t g0, int64_t len, bool signs, const PrefetchList* pf = nullptr) {
    return signs ? fill_rademacher(st, g0, len) : fill(st, g0, len, pf);
  }
};
static_assert(128 * kMaxRBlocks <= 64 * kGroups + 128, "a chunk's signs fit the buffer");

template <typename S>
using math_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

// Calls fn(tensor index, first element, length) over every chunk of the flattened list.
template <typename F>
void for_each_chunk(const std::vector<int64_t>& prefix, const F& fn) {
  const int64_t total = prefix.back();
  if (total == 0) return;
  at::parallel_for(0, total, kGrain, [&](int64_t begin, int64_t end) {
    size_t t = std::upper_bound(prefix.begin(), prefix.end(), begin) - prefix.begin() - 1;
    while (begin < end) {
      while (prefix[t + 1] <= begin) ++t;  // skips empty tensors
      const int64_t stop = std::min(end, prefix[t + 1]);
      for (int64_t s = begin; s < stop; s += kChunk) fn(t, s - prefix[t], std::min(kChunk, stop - s));
      begin = stop;
    }
  });
}

std::vector<int64_t> prefix_numel(at::TensorList ts) {
  std::vector<int64_t> prefix(ts.size() + 1, 0);
  for (size_t i = 0; i < ts.size(); ++i) prefix[i + 1] = prefix[i] + ts[i].numel();
  return prefix;
}

// The chunk loops below are compiled per ISA as well (an always_inline body, wrapped once per
// target): the baseline x86-64 build vectorises them 4 wide with SSE, and over a chunk already in
// L2 that loop cost about as much as its normal fill. 66.5M params in 96 tensors, two threads,
// alternated in one process (medians): noise-only step 58.6 -> 52.2 ms with the AVX-512 loop.
#if FSGLD_X86
#define FSGLD_LOOP_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,fma,prefer-vector-width=512")))
#define FSGLD_LOOP_AVX2 __attribute__((target("avx2,fma")))
#endif

// The stored value of a float result x: S(x), or (kStochastic, bf16 only) x rounded up or down
// with element i's bits of SPEC 2c.
template <typename S, bool kStochastic>
__attribute__((always_inline)) inline S store_as(math_t<S> x, const uint16_t* __restrict rbits, int64_t i) {
  if constexpr (kStochastic) {
    static_assert(std::is_same_v<S, c10::BFloat16>, "SPEC 2c rounds bf16 only");
    return S(bf16_bits_stochastic(x, rbits[i]), S::from_bits());
  } else {
    return S(x);
  }
}

// ---- perturb_ --------------------------------------------------------------------------------
template <typename S, bool kMaster, bool kStochastic>
__attribute__((always_inline)) inline void perturb_chunk(S* __restrict p, const float* __restrict master,
                                                        const float* __restrict eps,
                                                        const uint16_t* __restrict rbits, int64_t n,
                                                        math_t<S> sigma) {
  using T = math_t<S>;
  for (int64_t i = 0; i < n; ++i) {
    const T clean = kMaster ? T(master[i]) : T(p[i]);
    p[i] = store_as<S, kStochastic>(clean + sigma * T(eps[i]), rbits, i);
  }
}

#if FSGLD_X86
template <typename S, bool kMaster, bool kStochastic>
FSGLD_LOOP_AVX512 void perturb_chunk_avx512(S* p, const float* master, const float* eps, const uint16_t* rbits,
                                            int64_t n, math_t<S> sigma) {
  perturb_chunk<S, kMaster, kStochastic>(p, master, eps, rbits, n, sigma);
}
template <typename S, bool kMaster, bool kStochastic>
FSGLD_LOOP_AVX2 void perturb_chunk_avx2(S* p, const float* master, const float* eps, const uint16_t* rbits,
                                        int64_t n, math_t<S> sigma) {
  perturb_chunk<S, kMaster, kStochastic>(p, master, eps, rbits, n, sigma);
}
#endif

template <typename S, bool kMaster, bool kStochastic = false>
void perturb_chunk_isa(S* p, const float* master, const float* eps, const uint16_t* rbits, int64_t n,
                       math_t<S> sigma) {
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512) return perturb_chunk_avx512<S, kMaster, kStochastic>(p, master, eps, rbits, n, sigma);
  if (cpu_isa() == Isa::kAvx2) return perturb_chunk_avx2<S, kMaster, kStochastic>(p, master, eps, rbits, n, sigma);
#endif
  perturb_chunk<S, kMaster, kStochastic>(p, master, eps, rbits, n, sigma);
}

void perturb_cpu(at::TensorList params, at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets,
                 int64_t seed, int64_t step, double sigma, const std::optional<at::Tensor>& step_t, bool rademacher,
                 int64_t rounding_op) {
  check_lists(c10::DeviceType::CPU, params, {}, {}, masters, param_ids, offsets);
  check_rounding_op(rounding_op);
  const bool stochastic = rounds_stochastically(params, masters, rounding_op >= 0);
  if (params.empty()) return;
  check_step_tensor(step_t, params[0].device());
  if (step_t.has_value()) step = step_t->item<int64_t>();
  const auto prefix = prefix_numel(params);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fsgld::perturb_", [&] {
    using S = scalar_t;
    for_each_chunk(prefix, [&](size_t t, int64_t i0, int64_t len) {
      S* p = params[t].data_ptr<S>() + i0;
      const float* master = masters.empty() ? nullptr : masters[t].data_ptr<float>() + i0;
      PrefetchList pf;
      pf.add(p, len * (int64_t)sizeof(S), true);
      if (master) pf.add(master, len * 4, false);
      NoiseBuf eps;
      const Stream st = make_stream(seed_bits(seed), param_ids[t], step, kEps);
      const float* e = eps.fill(st, offsets[t] + i0, len, rademacher, &pf);
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (stochastic) {
          RoundingBits rb;
          const uint16_t* r = rb.fill(make_stream(seed_bits(seed), param_ids[t], step, kXi),
                                      static_cast<RoundingOp>(rounding_op), offsets[t] + i0, len);
          return perturb_chunk_isa<S, false, true>(p, nullptr, e, r, len, math_t<S>(sigma));
        }
      }
      if (master) {
        perturb_chunk_isa<S, true>(p, master, e, nullptr, len, math_t<S>(sigma));
      } else {
        perturb_chunk_isa<S, false>(p, nullptr, e, nullptr, len, math_t<S>(sigma));
      }
    });
  });
}

// ---- fused_step_ -----------------------------------------------------------------------------
// B: momentum buffer storage (the param dtype, or float with masters). An absent noise stream
// reads kZeros: theta - sigma * 0 and theta + 0 * 0 are theta exactly, so restore and the next
// perturbation need no branch, and momentum is a template flag. The loop then vectorizes and
// streams at memory speed (66.5M params, update only: 59 ms with those branches in the loop,
// 27 ms without, torch._foreach_add_ 26 ms, one thread).
alignas(64) const float kZeros[kChunk + 4] = {};

// kStochastic (SPEC 2c, bf16 without masters): the Langevin std compensated per element for the
// rounding's variance, and the result rounded with `rbits`.
template <typename S, typename B, bool kMaster, bool kMomentum, bool kStochastic>
__attribute__((always_inline)) inline void step_chunk(S* __restrict p, const S* __restrict g, B* __restrict buf,
                                                     float* __restrict master, const float* __restrict eps_k,
                                                     const float* __restrict xi, const float* __restrict eps_n,
                                                     const uint16_t* __restrict rbits, int64_t n,
                                                     const StepCoeffs<math_t<S>>& coeffs) {
  using T = math_t<S>;
  StepCoeffs<T> c = coeffs;
  c.has_momentum = kMomentum;  // a constant the compiler can see through sgld_update
  // With kStochastic the std is per element: xi comes scaled and sgld_update's std is 1 (1 * (std * xi)
  // is the reference's std * xi).
  if constexpr (kStochastic) c.noise_std = T(1);
  const auto loop = [&](const StepCoeffs<T>& k) __attribute__((always_inline)) {
    B unused{};
    for (int64_t i = 0; i < n; ++i) {
      T theta = kMaster ? T(master[i]) : T(p[i]) - k.restore_sigma * T(eps_k[i]);
      T noise = T(xi[i]);
      // Its arithmetic here beat a 256-entry table by theta's exponent, a gather (one thread, perf
      // samples of this loop per sample of the normal fills: 0.244 computed, 0.367 looked up).
      if constexpr (kStochastic) noise = compensated_noise_std(theta, coeffs.noise_std) * noise;
      theta = sgld_update<T, B>(theta, T(g[i]), kMomentum ? buf + i : &unused, noise, k);
      if (kMaster) master[i] = float(theta);
      p[i] = store_as<S, kStochastic>(theta + k.perturb_sigma * T(eps_n[i]), rbits, i);
    }
  };
  if constexpr (kStochastic) {
    // GCC unswitches the plain loop on sgld_update's three invariant branches (scale, weight decay,
    // noise) and vectorizes each copy; this larger body it left scalar with all three branches. The
    // default step (no scaler, no weight decay, noise) gets a copy with them constant, vectorized
    // (perf samples of this loop per sample of the normal fills, AVX2: 0.263 -> 0.054; fp32: 0.024).
    if (!c.has_scale && c.weight_decay == T(0) && c.has_noise) {
      StepCoeffs<T> k = c;
      k.has_scale = false, k.weight_decay = T(0), k.has_noise = true;
      loop(k);
      return;
    }
  }
  loop(c);
}

#if FSGLD_X86
template <typename S, typename B, bool kMaster, bool kMomentum, bool kStochastic>
FSGLD_LOOP_AVX512 void step_chunk_avx512(S* p, const S* g, B* buf, float* master, const float* eps_k, const float* xi,
                                         const float* eps_n, const uint16_t* rbits, int64_t n,
                                         const StepCoeffs<math_t<S>>& c) {
  step_chunk<S, B, kMaster, kMomentum, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
}
template <typename S, typename B, bool kMaster, bool kMomentum, bool kStochastic>
FSGLD_LOOP_AVX2 void step_chunk_avx2(S* p, const S* g, B* buf, float* master, const float* eps_k, const float* xi,
                                     const float* eps_n, const uint16_t* rbits, int64_t n,
                                     const StepCoeffs<math_t<S>>& c) {
  step_chunk<S, B, kMaster, kMomentum, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
}
#endif

template <typename S, typename B, bool kMaster, bool kMomentum, bool kStochastic>
void step_chunk_isa(S* p, const S* g, B* buf, float* master, const float* eps_k, const float* xi,
                    const float* eps_n, const uint16_t* rbits, int64_t n, const StepCoeffs<math_t<S>>& c) {
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512)
    return step_chunk_avx512<S, B, kMaster, kMomentum, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
  if (cpu_isa() == Isa::kAvx2)
    return step_chunk_avx2<S, B, kMaster, kMomentum, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
#endif
  step_chunk<S, B, kMaster, kMomentum, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
}

template <typename S, typename B, bool kMaster, bool kStochastic = false>
void step_chunk_dispatch(S* p, const S* g, B* buf, float* master, const float* eps_k, const float* xi,
                         const float* eps_n, const uint16_t* rbits, int64_t n, const StepCoeffs<math_t<S>>& c) {
  if (c.has_momentum) {
    step_chunk_isa<S, B, kMaster, true, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
  } else {
    step_chunk_isa<S, B, kMaster, false, kStochastic>(p, g, buf, master, eps_k, xi, eps_n, rbits, n, c);
  }
}

void fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets, int64_t seed,
                    int64_t step, double lr, double weight_decay, double momentum, double noise_std,
                    double restore_sigma, double perturb_sigma, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& step_t,
                    const std::optional<at::Tensor>& lr_t, bool restore_rademacher, bool perturb_rademacher,
                    bool stochastic_rounding) {
  check_fused_step(c10::DeviceType::CPU, params, grads, momentum_buffers, masters, param_ids, offsets, momentum,
                   grad_scale, found_inf, step_t, lr_t);
  const bool stochastic = rounds_stochastically(params, masters, stochastic_rounding);
  if (params.empty()) return;
  if (step_t.has_value()) step = step_t->item<int64_t>();  // CPU tensors: reading them costs no sync
  if (lr_t.has_value()) {
    const float lr_f = lr_t->item<float>();
    lr = lr_f;
    noise_std = (double)((float)noise_std * sqrtf(lr_f));
  }
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return;  // AMP overflow: change nothing
  const float inv_scale = grad_scale.has_value() ? 1.0f / grad_scale->item<float>() : 1.0f;
  const auto prefix = prefix_numel(params);
  const bool has_master = !masters.empty();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fsgld::fused_step_", [&] {
    using S = scalar_t;
    using T = math_t<S>;
    const StepCoeffs<T> c{T(lr),           T(weight_decay),  T(momentum), T(noise_std),
                          T(restore_sigma), T(perturb_sigma), T(inv_scale), grad_scale.has_value(),
                          momentum != 0.0, noise_std != 0.0};
    const bool restore = restore_sigma != 0.0 && !has_master, noise = noise_std != 0.0,
               ahead = perturb_sigma != 0.0;
    for_each_chunk(prefix, [&](size_t t, int64_t i0, int64_t len) {
      S* p = params[t].data_ptr<S>() + i0;
      const S* g = grads[t].data_ptr<S>() + i0;
      float* master = has_master ? masters[t].data_ptr<float>() + i0 : nullptr;
      void* buf = c.has_momentum ? momentum_buffers[t].data_ptr() : nullptr;
      const int64_t buf_size = c.has_momentum ? momentum_buffers[t].element_size() : 0;
      if (buf) buf = static_cast<char*>(buf) + i0 * buf_size;
      PrefetchList pf;
      pf.add(p, len * (int64_t)sizeof(S), true);
      pf.add(g, len * (int64_t)sizeof(S), false);
      if (master) pf.add(master, len * 4, true);
      if (buf) pf.add(buf, len * buf_size, true);
      // The chunk's first normal fill works through pf. A chunk without one (signs, or no noise)
      // leaves its loads to the hardware: a burst of prefetches before a sign fill slowed the step
      // (32M params, one thread, signs only: 13.5 ms without, 23.9 ms with).
      const PrefetchList* pending = &pf;
      const uint64_t sd = seed_bits(seed);
      const int64_t g0 = offsets[t] + i0;
      auto fill = [&](NoiseBuf& b, const Stream& st, bool signs) {
        return b.fill(st, g0, len, signs, signs ? nullptr : std::exchange(pending, nullptr));
      };
      NoiseBuf b_eps_k, b_xi, b_eps_n;
      const float* eps_k =
          restore ? fill(b_eps_k, make_stream(sd, param_ids[t], step, kEps), restore_rademacher) : kZeros;
      const float* xi = noise ? fill(b_xi, make_stream(sd, param_ids[t], step, kXi), false) : kZeros;
      const float* eps_n =
          ahead ? fill(b_eps_n, make_stream(sd, param_ids[t], step + 1, kEps), perturb_rademacher) : kZeros;
      if constexpr (std::is_same_v<S, c10::BFloat16>) {
        if (stochastic) {
          RoundingBits rb;
          const uint16_t* r = rb.fill(make_stream(sd, param_ids[t], step, kXi), kRoundStep, g0, len);
          return step_chunk_dispatch<S, S, false, true>(p, g, static_cast<S*>(buf), nullptr, eps_k, xi, eps_n, r,
                                                        len, c);
        }
      }
      if (has_master) {
        step_chunk_dispatch<S, float, true>(p, g, static_cast<float*>(buf), master, eps_k, xi, eps_n, nullptr, len, c);
      } else {
        step_chunk_dispatch<S, S, false>(p, g, static_cast<S*>(buf), nullptr, eps_k, xi, eps_n, nullptr, len, c);
      }
    });
  });
}

// ---- normals_ --------------------------------------------------------------------------------
void normals_cpu(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind, int64_t offset) {
  check_normals(out, c10::DeviceType::CPU, param_id, kind, offset);
  const Stream st = make_stream(seed_bits(seed), param_id, step, (uint32_t)kind);
  float* o = out.data_ptr<float>();
  for_each_chunk({0, out.numel()}, [&](size_t, int64_t i0, int64_t len) {
    PrefetchList pf;
    pf.add(o + i0, len * 4, true);
    NoiseBuf nb;
    const float* e = nb.fill(st, offset + i0, len, &pf);
    std::copy(e, e + len, o + i0);
  });
}

// ---- philox_words_ ---------------------------------------------------------------------------
// The raw words, through the same code path as the noise (AVX-512 where present), for tests.
void philox_words_cpu(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind,
                      int64_t first_block) {
  check_words(out, c10::DeviceType::CPU, param_id, kind);
  const Stream st = make_stream(seed_bits(seed), param_id, step, (uint32_t)kind);
  uint32_t* o = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t n = out.size(0);
  int64_t b = 0;
#if FSGLD_X86
  if (cpu_isa() == Isa::kAvx512) {
    for (; b + 16 <= n; b += 16) words16_avx512(st, (uint64_t)(first_block + b), o + 4 * b);
  }
#endif
  for (; b < n; ++b) {
    const uint64_t blk = (uint64_t)(first_block + b);
    uint32_t w0 = (uint32_t)blk, w1 = (uint32_t)(blk >> 32), w2 = st.step, w3 = st.tag;
    philox4x32_10(w0, w1, w2, w3, st.k0, st.k1);
    o[4 * b] = w0, o[4 * b + 1] = w1, o[4 * b + 2] = w2, o[4 * b + 3] = w3;
  }
}

}  // namespace

// The path this process's CPU kernels take (tests assert that FSGLD_CPU_ISA reached it).
std::string cpu_isa_name() { return kIsaNames[static_cast<int>(cpu_isa())]; }

TORCH_LIBRARY_FRAGMENT(fsgld, m) { m.def(fsgld::schema::kCpuIsa, &cpu_isa_name); }

TORCH_LIBRARY_IMPL(fsgld, CPU, m) {
  m.impl("philox_words_", &philox_words_cpu);
  m.impl("perturb_", &perturb_cpu);
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("normals_", &normals_cpu);
}

}  // namespace fsgld
