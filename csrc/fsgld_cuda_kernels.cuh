// fsgld_cuda_kernels.cuh: the CUDA kernels of the fsgld:: ops and the host code that feeds them.
//
// Multi-tensor apply in the style of apex / ATen: the tensor addresses and a (tensor, chunk) list
// travel by value as one kernel argument (CUDA 12.1+ allows 32 KB of arguments on sm_70+, so a
// launch covers up to kMaxTensors tensors and kMaxChunks chunks: far fewer launches than the
// classic 4 KB tables). Every thread owns whole Philox blocks (four consecutive global elements),
// so each random draw is keyed on the element index, never on the thread: aligned and unaligned
// tensors, and shards with any global offset, draw the same stream.
//
// Nothing here needs the CUDA runtime: fsgld_cuda.cu launches these kernels on the GPU, and the
// test suite compiles this file with the host compiler and runs every kernel on the CPU, one
// simulated thread after another (tests/cuda_emulation.cpp), so the indexing, table packing and
// vector/tail paths are executed and checked against the reference on machines without a GPU.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

#include "fsgld_math.h"
#include "fsgld_ops.h"

namespace fsgld {
namespace cuda_kernels {

constexpr int kThreads = 256;
// Philox blocks (of 4 elements) per thread per chunk: 8 halves the per-thread setup (table reads,
// key schedule) per element (sm_90, fp32 Gaussian full step: 4 -> 8 blocks, see bench/README.md).
constexpr int kBlocksPerThread = 8;
constexpr int64_t kChunkBlocks = (int64_t)kThreads * kBlocksPerThread;  // 8192 elements per chunk
constexpr int kMaxTensors = 160;

// Which path a chunk takes (interior or edge): nothing on the GPU; the CPU emulation
// (tests/cuda_emulation.cpp) counts them to check that a layout reaches the fast path.
#ifndef FSGLD_TRACE_CHUNK_PATH
#define FSGLD_TRACE_CHUNK_PATH(interior)
#endif
constexpr int kMaxChunks = 2048;

struct TensorTable {
  void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  void* buf[kMaxTensors];
  float* master[kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t offset[kMaxTensors];  // global element index of element 0 (shards)
  uint32_t pid[kMaxTensors];
  uint8_t aligned[kMaxTensors];  // every pointer 4-element aligned and offset % 4 == 0: vector access
  uint16_t chunk_tensor[kMaxChunks];
  int32_t chunk_index[kMaxChunks];
};
static_assert(sizeof(TensorTable) + 256 < 32764, "kernel arguments must fit in 32 KB");

struct Scalars {
  uint64_t seed;
  int64_t step;
  float lr, weight_decay, momentum, noise_std, restore_sigma, perturb_sigma, sigma;
  const float* grad_scale;  // device scalar or null
  const float* found_inf;   // device scalar or null
  const int64_t* step_t;    // capturable: device step counter (replaces step) or null
  const float* lr_t;        // capturable: device lr (replaces lr; noise_std *= sqrt(lr)) or null
  bool restore, noise, ahead, has_momentum, has_master;
  uint32_t rounding_op;     // perturb_ with stochastic rounding: kRoundPerturb or kRoundRestore
};

template <typename S>
__device__ __forceinline__ float to_f(S x) {
  return static_cast<float>(x);
}

// Four consecutive elements: one 16-byte access for fp32 (8 bytes for bf16/fp16).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

// Loads lanes [lo, hi) of the four elements at x (vector access when `vec`).
template <typename T>
__device__ __forceinline__ Vec4<T> load4(const T* x, bool vec, int lo, int hi) {
  if (vec) return *reinterpret_cast<const Vec4<T>*>(x);
  Vec4<T> r{};
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l >= lo && l < hi) r.v[l] = x[l];
  return r;
}

template <typename T>
__device__ __forceinline__ void store4(T* x, const Vec4<T>& r, bool vec, int lo, int hi) {
  if (vec) {
    if constexpr (sizeof(T) == 2) {  // one 8-byte store: nvcc split the struct copy into 2-byte stores in a block
      uint64_t bits;
      __builtin_memcpy(&bits, &r, sizeof(bits));
      *reinterpret_cast<uint64_t*>(x) = bits;
    } else {
      *reinterpret_cast<Vec4<T>*>(x) = r;
    }
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l >= lo && l < hi) x[l] = r.v[l];
}

// What a fused step kernel does, as template flags: every combination is its own kernel, with no
// runtime branch around a noise stream, so the three streams share one Philox key schedule and
// the per-element code is straight-line (sm_90 SASS: 24 instructions per element fewer than with
// runtime flags). kRestoreSigns / kAheadSigns: that perturbation is Rademacher (SPEC 2b), not
// Gaussian; separate bits, so a step that switches kinds (restore one, draw the other) stays fused.
enum StepFlags : unsigned {
  kRestore = 1, kNoise = 2, kAhead = 4, kMomentum = 8, kMaster = 16, kRestoreSigns = 32, kAheadSigns = 64,
  kStochastic = 128  // SPEC 2c: bf16 without masters, written rounded stochastically
};
constexpr unsigned kAllFlags = 256;

// sigma * eps of one Gaussian block's four elements: normals times sigma, or +-sigma from the
// block's sign nibble (SPEC 2b).
template <bool kSigns>
__device__ __forceinline__ void perturbation4(const Stream& st, uint32_t blk_lo, uint32_t blk_hi, uint32_t nibble,
                                              float sigma, float out[4]) {
  if constexpr (kSigns) {
#pragma unroll
    for (int l = 0; l < 4; ++l) out[l] = signed_sigma(sigma, nibble, l);
  } else {
    normal4(st, blk_lo, blk_hi, out, sigma);  // sigma on r: -1.5 instructions per element per stream
  }
}

// Signs, one Philox call per thread for its 32 elements instead of one per Gaussian block (four):
// a chunk of a sign step starts at a Rademacher block (multi_tensor_apply), so iteration `it` of
// warp w covers Rademacher block r0 + 8 it + w, and lane l needs its word l >> 3. Lane l draws
// block r0 + 8 (l & 7) + w and keeps word l >> 3; at iteration `it` lane (l & ~7) | it holds the
// word lane l needs (one shuffle). The same on the interior and at a tensor's edges (any offset).
static_assert(kThreads == 256 && kBlocksPerThread == 8, "the lane map of warp_sign_word");

__device__ __forceinline__ uint32_t lane_sign_word(const Stream& st, uint64_t r0, unsigned lane, unsigned warp) {
  uint32_t w[4];
  rademacher_words(st, r0 + 8 * (lane & 7) + warp, w);
#if defined(__CUDA_ARCH__)
  // all four words, then selects: left to itself nvcc computes only the kept word's last round in
  // four lane-divergent branches, which the warp issues one after another (+3.3 instr/elem)
  asm("" : "+r"(w[0]), "+r"(w[1]), "+r"(w[2]), "+r"(w[3]));
#endif
  // two levels of selects on the bits of k = lane >> 3 (a chain of k == 0, 1, 2 compiled to branches)
  const uint32_t lo = (lane & 8) ? w[1] : w[0], hi = (lane & 8) ? w[3] : w[2];
  return (lane & 16) ? hi : lo;
}

__device__ __forceinline__ uint32_t warp_sign_word(uint32_t mine, const Stream& st, uint64_t r0, unsigned lane,
                                                   unsigned warp, int it) {
  const unsigned src = (lane & ~7u) | (unsigned)it;
#if defined(__CUDA_ARCH__)
  return __shfl_sync(0xFFFFFFFFu, mine, src);
#else  // the CPU emulation runs the lanes one by one: lane src's word, recomputed
  (void)mine;
  return lane_sign_word(st, r0, src, warp);
#endif
}

// SPEC 2c rounding bits with one Philox call per rounding block (8 elements, two Gaussian blocks):
// a chunk of a stochastic step starts at an even Gaussian block, so lanes 2m and 2m+1 hold the two
// halves of one rounding block at every iteration. The pair splits two iterations: the even lane
// draws the block of iteration `it`, the odd lane that of `it + 1` (its own Gaussian block + kThreads),
// and each hands its partner the two words it needs (word pair 0-1: the even Gaussian block, 2-3:
// the odd one). blk: this lane's Gaussian block at iteration `it`; now / next: its words at it, it + 1.
// sm_90 SASS, bf16 stochastic Gaussian full step: 129.0 instructions per element, against 133.8 with a
// Philox call per lane and Gaussian block.
__device__ __forceinline__ void lane_rounding_words(const Stream& st_xi, uint32_t op, uint64_t blk, unsigned lane,
                                                    uint32_t w[4]) {
  rounding_words(st_xi, op, ((lane & 1u) ? blk + kThreads : blk) >> 1, w);
}

__device__ __forceinline__ void pair_rounding_words(const Stream& st_xi, uint32_t op, uint64_t blk, unsigned lane,
                                                    uint32_t now[2], uint32_t next[2]) {
  const bool odd = lane & 1u;
  uint32_t w[4];
  lane_rounding_words(st_xi, op, blk, lane, w);
  const uint32_t keep0 = odd ? w[2] : w[0], keep1 = odd ? w[3] : w[1];
#if defined(__CUDA_ARCH__)
  const uint32_t recv0 = __shfl_xor_sync(0xFFFFFFFFu, odd ? w[0] : w[2], 1);
  const uint32_t recv1 = __shfl_xor_sync(0xFFFFFFFFu, odd ? w[1] : w[3], 1);
#else  // the CPU emulation runs the lanes one by one: the partner's words, recomputed
  uint32_t v[4];
  lane_rounding_words(st_xi, op, odd ? blk - 1 : blk + 1, lane ^ 1u, v);
  const uint32_t recv0 = odd ? v[2] : v[0], recv1 = odd ? v[3] : v[1];
#endif
  now[0] = odd ? recv0 : keep0, now[1] = odd ? recv1 : keep1;
  next[0] = odd ? keep0 : recv0, next[1] = odd ? keep1 : recv1;
}

// Element l of a Gaussian block written with SPEC 2c stochastic rounding: its 16 bits are half
// l % 2 of word l / 2 of the block's two rounding words.
__device__ __forceinline__ c10::BFloat16 round_stochastic(float x, const uint32_t words[2], int l) {
  const uint32_t r = (l & 1) ? words[l >> 1] >> 16 : words[l >> 1] & 0xFFFFu;
  return c10::BFloat16(bf16_bits_stochastic(x, r), c10::BFloat16::from_bits());
}

// bf16 by 32-bit words, element 2h + 1 in the high half of word h: a bf16 is the high half of a
// float32, so an element is its word shifted or masked (one instruction; c10's conversion of the
// 16-bit member took a PRMT and a shift for the high one), and two results are packed into a word
// by one F2FP (or one PRMT of the stochastic bits) that the store takes as it is, where element-wise
// members were unpacked and repacked by PRMTs (sm_90 instructions per element, Gaussian full step:
// bf16 109.3 -> 106.5, bf16 + master 77.0 -> 74.2, bf16 stochastic 127.2 -> 126.0).
template <typename S>
__device__ __forceinline__ float lane_f(const Vec4<S>& v, int l) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) {
    uint32_t w[2];
    __builtin_memcpy(w, &v, sizeof(w));
    return bits_to_float((l & 1) ? w[l >> 1] & 0xFFFF0000u : w[l >> 1] << 16);
  } else {
    return to_f(v.v[l]);
  }
}

// Four results rounded to bf16 as two words: to nearest, or (kStochastic) as SPEC 2c with the
// block's rounding words.
template <bool kStochastic>
__device__ __forceinline__ void round4_words(const float x[4], const uint32_t rbits[2], uint32_t w[2]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    if constexpr (kStochastic) {
      w[h] = bf16_bits_stochastic(x[2 * h], rbits[h] & 0xFFFFu) |
             ((uint32_t)bf16_bits_stochastic(x[2 * h + 1], rbits[h] >> 16) << 16);
    } else {
      w[h] = bf16_pair_nearest(x[2 * h], x[2 * h + 1]);
    }
  }
}

// store4 of four bf16 given as two words.
__device__ __forceinline__ void store4_words(c10::BFloat16* x, const uint32_t w[2], bool vec, int lo, int hi) {
  if (vec) {
    *reinterpret_cast<uint64_t*>(x) = w[0] | ((uint64_t)w[1] << 32);
    return;
  }
#pragma unroll
  for (int l = 0; l < 4; ++l)
    if (l >= lo && l < hi) x[l] = c10::BFloat16((uint16_t)(w[l >> 1] >> (16 * (l & 1))), c10::BFloat16::from_bits());
}

// One Philox block (four consecutive elements) of the fused step: lanes [lo, hi) are inside the
// tensor; `vec`: 16-byte (fp32) or 8-byte (bf16/fp16) accesses. x + i0 addresses lane 0.
// signs_k / signs_n: the block's sign nibbles of eps_k / eps_{k+1} (read only with kRestoreSigns /
// kAheadSigns). rbits: the block's two rounding words (read only with kStochastic).
template <typename S, typename B, unsigned kFlags>
__device__ __forceinline__ void step_block(S* p, const S* g, B* buf, float* master, int64_t i0, uint32_t blk_lo,
                                           uint32_t blk_hi, bool vec, bool whole, int lo, int hi, const Stream& s_eps,
                                           const Stream& s_xi, const Stream& s_next, uint32_t signs_k,
                                           uint32_t signs_n, const uint32_t rbits[2], const StepCoeffs<float>& c) {
  constexpr bool restore = kFlags & kRestore, noise = kFlags & kNoise, ahead = kFlags & kAhead;
  constexpr bool momentum = kFlags & kMomentum, has_master = kFlags & kMaster, stochastic = kFlags & kStochastic;
  static_assert(!(restore && has_master), "the master is never perturbed: nothing to restore");
  float d_k[4] = {}, xi[4] = {}, d_n[4] = {};  // sigma_k eps_k, xi, sigma_{k+1} eps_{k+1}
  StepCoeffs<float> cf = c;
  cf.has_noise = noise;  // a constant: no runtime branch around the noise term
  cf.noise_std = 1.0f;
  if (restore) perturbation4<(kFlags & kRestoreSigns) != 0>(s_eps, blk_lo, blk_hi, signs_k, c.restore_sigma, d_k);
  // xi comes scaled (noise_std * xi is xi), or unscaled for the per-element std of SPEC 2c
  if (noise) normal4(s_xi, blk_lo, blk_hi, xi, stochastic ? 1.0f : c.noise_std);
  if (ahead) perturbation4<(kFlags & kAheadSigns) != 0>(s_next, blk_lo, blk_hi, signs_n, c.perturb_sigma, d_n);
  Vec4<S> gv;
  Vec4<float> mv{};
  Vec4<S> pv{};
  Vec4<B> bv{};
  const auto load_all = [&](bool v, int l0, int l1) {
    gv = load4(g + i0, v, l0, l1);
    if (has_master) {
      mv = load4(master + i0, v, l0, l1);  // the low-precision param is only written
    } else {
      pv = load4(p + i0, v, l0, l1);
    }
    if (momentum) bv = load4(buf + i0, v, l0, l1);
  };
  // one branch per block on the access kind, not one per access (an edge's whole blocks of
  // unaligned storage take unpredicated scalars; only a block straddling an end checks lanes)
  if (vec) {
    load_all(true, 0, 4);
  } else if (whole) {
    load_all(false, 0, 4);
  } else {
    load_all(false, lo, hi);
  }
  float res[4];
#pragma unroll
  for (int l = 0; l < 4; ++l) {
    float theta = has_master ? mv.v[l] : lane_f(pv, l);
    if (restore) theta = theta - d_k[l];
    const float noise_l = stochastic && noise ? compensated_noise_std(theta, c.noise_std) * xi[l] : xi[l];
    theta = sgld_update<float, B>(theta, lane_f(gv, l), &bv.v[l], noise_l, cf);
    mv.v[l] = theta;
    res[l] = ahead ? theta + d_n[l] : theta;
  }
  constexpr bool words = std::is_same_v<S, c10::BFloat16>;  // bf16: rounded and stored by words
  uint32_t outw[2];
  Vec4<S> out;
  if constexpr (words) {
    round4_words<stochastic>(res, rbits, outw);
  } else {
#pragma unroll
    for (int l = 0; l < 4; ++l) out.v[l] = static_cast<S>(res[l]);
  }
  const auto store_all = [&](bool v, int l0, int l1) {
    if constexpr (words) {
      store4_words(reinterpret_cast<c10::BFloat16*>(p) + i0, outw, v, l0, l1);
    } else {
      store4(p + i0, out, v, l0, l1);
    }
    if (has_master) store4(master + i0, mv, v, l0, l1);
    if (momentum) store4(buf + i0, bv, v, l0, l1);
  };
  if (vec) {
    store_all(true, 0, 4);
  } else if (whole) {
    store_all(false, 0, 4);
  } else {
    store_all(false, lo, hi);
  }
}

// The first Philox block of a tensor's chunk 0: its own first block, or with signs the first block
// of its first Rademacher block (SPEC 2b), so that every chunk draws whole sign words, or with
// stochastic rounding the first of its first rounding block (SPEC 2c), so that lane pairs share one.
__host__ __device__ __forceinline__ int64_t chunk_first_block(int64_t off, bool signs, bool stochastic = false) {
  return signs ? (off >> 7) << 5 : stochastic ? (off >> 3) << 1 : off >> 2;
}

// One (tensor, chunk) per CUDA block; each thread walks Philox blocks of the chunk.
template <typename S, typename B, unsigned kFlags>
__global__ void __launch_bounds__(kThreads) fused_step_kernel(const __grid_constant__ TensorTable tab,
                                                              const Scalars sc) {
  if (sc.found_inf != nullptr && *sc.found_inf != 0.0f) return;  // AMP overflow: change nothing
  const int t = tab.chunk_tensor[blockIdx.x];
  const int64_t n = tab.numel[t], off = tab.offset[t];
  const int64_t first_blk = off >> 2, last_blk = (off + n - 1) >> 2;
  S* p = static_cast<S*>(tab.param[t]);
  const S* g = static_cast<const S*>(tab.grad[t]);
  B* buf = static_cast<B*>(tab.buf[t]);
  float* master = tab.master[t];
  const float lr = sc.lr_t ? *sc.lr_t : sc.lr;
  const float noise_std = sc.lr_t ? sc.noise_std * sqrtf(lr) : sc.noise_std;
  const int64_t step = sc.step_t ? *sc.step_t : sc.step;  // read on the device: graph replays advance
  StepCoeffs<float> c{lr, sc.weight_decay, sc.momentum, noise_std, sc.restore_sigma, sc.perturb_sigma,
                      sc.grad_scale ? 1.0f / *sc.grad_scale : 1.0f, sc.grad_scale != nullptr, (kFlags & kMomentum) != 0,
                      (kFlags & kNoise) != 0};
  const Stream s_eps = make_stream(sc.seed, tab.pid[t], step, kEps);
  const Stream s_xi = make_stream(sc.seed, tab.pid[t], step, kXi);
  const Stream s_next = make_stream(sc.seed, tab.pid[t], step + 1, kEps);
  constexpr bool restore_signs = kFlags & kRestoreSigns, ahead_signs = kFlags & kAheadSigns;
  constexpr bool signs = restore_signs || ahead_signs, stochastic = kFlags & kStochastic;
  constexpr bool lockstep = signs || stochastic;  // warp shuffles: every lane reaches every iteration
  // with signs a chunk starts at a Rademacher block (32 Philox blocks), with stochastic rounding at
  // a rounding block (2), as multi_tensor_apply counts
  const int64_t chunk_first =
      chunk_first_block(off, signs, stochastic) + (int64_t)tab.chunk_index[blockIdx.x] * kChunkBlocks;
  const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
  const uint64_t r0 = (uint64_t)chunk_first >> 5;  // with signs: the chunk's first Rademacher block
  const uint32_t mine_k = restore_signs ? lane_sign_word(s_eps, r0, lane, warp) : 0u;
  const uint32_t mine_n = ahead_signs ? lane_sign_word(s_next, r0, lane, warp) : 0u;
  // The interior of an aligned tensor, decided once per CUDA block: every lane of the chunk's
  // blocks is inside the tensor and the block index's high word is the same across the chunk, so
  // the loop needs no bounds checks and 32-bit indices from per-thread base pointers (sm_90 SASS:
  // about 5 instructions per element fewer).
  if (tab.aligned[t] && chunk_first >= first_blk && chunk_first + kChunkBlocks - 1 < last_blk + ((off + n) % 4 == 0) &&
      (uint32_t)chunk_first <= 0xFFFFFFFFu - (uint32_t)(kChunkBlocks - 1)) {
    const int64_t base = chunk_first * 4 - off + 4 * (int64_t)threadIdx.x;  // >= 0: aligned means off % 4 == 0
    const uint32_t blk_lo = (uint32_t)chunk_first + threadIdx.x, blk_hi = (uint32_t)(chunk_first >> 32);
    S* pt = p + base;
    const S* gt = g + base;
    B* bt = (kFlags & kMomentum) ? buf + base : buf;
    float* mt = (kFlags & kMaster) ? master + base : master;
    FSGLD_TRACE_CHUNK_PATH(true);
    uint32_t rbits[2][2] = {};  // the rounding words of iterations it, it + 1 (kStochastic)
#pragma unroll
    for (int it = 0; it < kBlocksPerThread; ++it) {
      const uint64_t blk = (uint64_t)chunk_first + (uint64_t)(it * kThreads) + threadIdx.x;
      const uint32_t signs_k = restore_signs ? sign_nibble(warp_sign_word(mine_k, s_eps, r0, lane, warp, it), blk) : 0u;
      const uint32_t signs_n = ahead_signs ? sign_nibble(warp_sign_word(mine_n, s_next, r0, lane, warp, it), blk) : 0u;
      if (stochastic && it % 2 == 0) pair_rounding_words(s_xi, kRoundStep, blk, lane, rbits[0], rbits[1]);
      step_block<S, B, kFlags>(pt, gt, bt, mt, (int64_t)(4 * kThreads * it), blk_lo + (uint32_t)(it * kThreads),
                               blk_hi, true, true, 0, 4, s_eps, s_xi, s_next, signs_k, signs_n, rbits[it % 2], c);
    }
    return;
  }
  FSGLD_TRACE_CHUNK_PATH(false);
  // Edges, in the chunk's coordinates: element e of the chunk (global index 4 chunk_first + e) is
  // inside the tensor for lo_e <= e < hi_e, 32-bit compares. A block wholly inside takes whole
  // accesses (vector if aligned, else four unpredicated scalars) at 32-bit offsets from per-thread
  // base pointers, as the interior; only a block straddling an end checks its lanes. Signs come
  // from the same lane words, and so do the rounding bits (every lane takes part in the
  // shuffles, so a lane outside the tensor runs its block with no lane loaded or stored).
  const int64_t start = chunk_first * 4 - off;  // local index of the chunk's element 0 (>= -127)
  // this thread's first element is chunk element 4 threadIdx.x: its lanes inside are [lo_t, hi_t)
  int lo_t = (start < 0 ? (int)-start : 0) - 4 * (int)threadIdx.x;
  int hi_t = (int)(n - start < 4 * kChunkBlocks ? n - start : 4 * kChunkBlocks) - 4 * (int)threadIdx.x;
  const bool aligned = tab.aligned[t];
  int64_t base = start + 4 * (int64_t)threadIdx.x;
#if defined(__CUDA_ARCH__)
  // kept in registers: left to itself nvcc recomputes them from the 64-bit offsets in every block
  asm("" : "+r"(lo_t), "+r"(hi_t), "+l"(base));
#endif
  S* pt = p + base;
  const S* gt = g + base;
  B* bt = (kFlags & kMomentum) ? buf + base : buf;
  float* mt = (kFlags & kMaster) ? master + base : master;
  uint32_t rbits[2][2] = {};
#pragma unroll
  for (int it = 0; it < kBlocksPerThread; ++it) {
    const uint64_t blk = (uint64_t)chunk_first + (uint64_t)(it * kThreads) + threadIdx.x;
    const uint32_t signs_k = restore_signs ? sign_nibble(warp_sign_word(mine_k, s_eps, r0, lane, warp, it), blk) : 0u;
    const uint32_t signs_n = ahead_signs ? sign_nibble(warp_sign_word(mine_n, s_next, r0, lane, warp, it), blk) : 0u;
    if (stochastic && it % 2 == 0) pair_rounding_words(s_xi, kRoundStep, blk, lane, rbits[0], rbits[1]);
    const int lo_it = lo_t - 4 * kThreads * it, hi_it = hi_t - 4 * kThreads * it;
    const int lo = lo_it > 0 ? lo_it : 0, hi = hi_it < 4 ? hi_it : 4;  // lanes [lo, hi) inside
    // a lockstep block outside the tensor (a sign or rounding chunk's first blocks may precede it)
    // runs with no lane loaded or stored, and `whole` is one test for the load and the store
    // dispatch, no skip branch (sm_90 fp32 Rademacher tail 58.1 -> 56.2, unaligned 61.9 -> 59.4
    // instructions per element; Gaussian 112.0 -> 111.2, 115.8 -> 114.4)
    if (!lockstep && lo >= hi) break;
    const bool whole = lo_it <= 0 && hi_it >= 4;
    step_block<S, B, kFlags>(pt, gt, bt, mt, (int64_t)(4 * kThreads * it), (uint32_t)blk, (uint32_t)(blk >> 32),
                             aligned && whole, whole, lo, hi, s_eps, s_xi, s_next, signs_k, signs_n,
                             rbits[it % 2], c);
  }
}

// perturb_: p = (master or p) + sigma * eps_step; eps Gaussian, or signs with kSigns (SPEC 2b);
// kStochastic: written with SPEC 2c stochastic rounding, bits of sc.rounding_op (bf16, no master).
template <typename S, bool kSigns, bool kStochastic = false>
__global__ void __launch_bounds__(kThreads) perturb_kernel(const __grid_constant__ TensorTable tab, const Scalars sc) {
  const int t = tab.chunk_tensor[blockIdx.x];
  const int64_t n = tab.numel[t], off = tab.offset[t];
  const int64_t last_blk = (off + n - 1) >> 2;
  S* p = static_cast<S*>(tab.param[t]);
  const float* master = tab.master[t];
  const int64_t step = sc.step_t ? *sc.step_t : sc.step;
  const Stream st = make_stream(sc.seed, tab.pid[t], step, kEps);
  const Stream st_xi = make_stream(sc.seed, tab.pid[t], step, kXi);  // the rounding bits' stream
  const int64_t chunk_first = (off >> 2) + (int64_t)tab.chunk_index[blockIdx.x] * kChunkBlocks;
#pragma unroll
  for (int it = 0; it < kBlocksPerThread; ++it) {
    const int64_t blk = chunk_first + (int64_t)it * kThreads + threadIdx.x;
    if (blk > last_blk) break;
    float d[4];  // sigma * eps
    perturbation4<kSigns>(st, (uint32_t)blk, (uint32_t)((uint64_t)blk >> 32),
                          kSigns ? sign_nibble(st, (uint64_t)blk) : 0u, sc.sigma, d);
    const int64_t i0 = blk * 4 - off;
    const int lo = i0 < 0 ? (int)-i0 : 0, hi = i0 + 4 > n ? (int)(n - i0) : 4;
    const bool vec = tab.aligned[t] && lo == 0 && hi == 4;
    Vec4<S> pv{};
    Vec4<float> mv{};
    if (sc.has_master) {
      mv = load4(master + i0, vec, lo, hi);
    } else {
      pv = load4(p + i0, vec, lo, hi);
    }
    uint32_t rbits[4];  // perturb_ is off the hot path: each thread draws its block's rounding words
    if constexpr (kStochastic) rounding_words(st_xi, sc.rounding_op, (uint64_t)blk >> 1, rbits);
#pragma unroll
    for (int l = 0; l < 4; ++l) {
      const float clean = sc.has_master ? mv.v[l] : to_f(pv.v[l]);
      if constexpr (kStochastic) {
        pv.v[l] = round_stochastic(clean + d[l], rbits + 2 * (blk & 1), l);
      } else {
        pv.v[l] = static_cast<S>(clean + d[l]);
      }
    }
    store4(p + i0, pv, vec, lo, hi);
  }
}

// Not templates: defined once, in the launchers' file (a fsgld_cuda_step_<type>.cu file defines
// FSGLD_FUSED_STEP_ONLY; a second definition would collide at link time).
#ifndef FSGLD_FUSED_STEP_ONLY
__global__ void normals_kernel(float* out, int64_t n, int64_t off, Stream st) {
  const int64_t blk = (off >> 2) + (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (blk > ((off + n - 1) >> 2)) return;
  float e[4];
  normal4(st, (uint64_t)blk, e);
  for (int lane = 0; lane < 4; ++lane) {
    const int64_t i = blk * 4 + lane - off;
    if (i >= 0 && i < n) out[i] = e[lane];
  }
}

__global__ void words_kernel(uint32_t* out, int64_t nblocks, int64_t first, Stream st) {
  const int64_t b = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= nblocks) return;
  const uint64_t blk = (uint64_t)(first + b);
  uint32_t w0 = (uint32_t)blk, w1 = (uint32_t)(blk >> 32), w2 = st.step, w3 = st.tag;
  philox4x32_10(w0, w1, w2, w3, st.k0, st.k1);
  out[4 * b] = w0, out[4 * b + 1] = w1, out[4 * b + 2] = w2, out[4 * b + 3] = w3;
}
#endif  // FSGLD_FUSED_STEP_ONLY

inline bool aligned4(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % (4 * t.element_size()) == 0;
}

// Packs tensors into tables and launches `launch(table, n_chunks)` once per full table.
template <typename Launch>
void multi_tensor_apply(at::TensorList params, at::TensorList grads, at::TensorList bufs, at::TensorList masters,
                        at::IntArrayRef param_ids, at::IntArrayRef offsets, const Launch& launch,
                        bool signs = false, bool stochastic = false) {
  TensorTable tab;
  int nt = 0, nc = 0;  // tensors and chunks in the current table
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    if (n == 0) continue;
    if (nt == kMaxTensors) {
      launch(tab, nc);
      nt = nc = 0;
    }
    tab.param[nt] = params[i].data_ptr();
    tab.grad[nt] = grads.empty() ? nullptr : grads[i].data_ptr();
    tab.buf[nt] = bufs.empty() ? nullptr : bufs[i].data_ptr();
    tab.master[nt] = masters.empty() ? nullptr : masters[i].data_ptr<float>();
    tab.numel[nt] = n;
    tab.offset[nt] = offsets[i];
    tab.pid[nt] = (uint32_t)param_ids[i];
    tab.aligned[nt] = (offsets[i] & 3) == 0 && aligned4(params[i]) && (grads.empty() || aligned4(grads[i])) &&
                      (bufs.empty() || aligned4(bufs[i])) && (masters.empty() || aligned4(masters[i]));
    const int64_t nblk = ((offsets[i] + n - 1) >> 2) - chunk_first_block(offsets[i], signs, stochastic) + 1;
    const int64_t chunks = (nblk + kChunkBlocks - 1) / kChunkBlocks;
    for (int64_t ch = 0; ch < chunks; ++ch) {
      if (nc == kMaxChunks) {  // table full: launch it; this tensor continues as entry 0
        launch(tab, nc);
        tab.param[0] = tab.param[nt], tab.grad[0] = tab.grad[nt], tab.buf[0] = tab.buf[nt];
        tab.master[0] = tab.master[nt], tab.numel[0] = n, tab.offset[0] = offsets[i], tab.pid[0] = tab.pid[nt];
        tab.aligned[0] = tab.aligned[nt];
        nt = nc = 0;
      }
      tab.chunk_tensor[nc] = (uint16_t)nt;
      tab.chunk_index[nc] = (int32_t)ch;
      ++nc;
    }
    ++nt;
  }
  if (nc > 0) launch(tab, nc);
}

// ---- host side, shared by the GPU launcher and the CPU emulation --------------------------------
// Calls fn(kernel) with the fused step kernel instantiated for `flags`, one of [kFlags, kEnd) (S: the
// param type; with masters the momentum buffer is fp32, else it is S).
template <typename S, unsigned kFlags, unsigned kEnd, typename Fn>
void dispatch_step_flags(unsigned flags, const Fn& fn) {
  if constexpr (kFlags == kEnd) {
    TORCH_CHECK(false, "fsgld: unexpected step flags ", flags);
  } else if (flags != kFlags) {
    dispatch_step_flags<S, kFlags + 1, kEnd>(flags, fn);
  } else if constexpr (((kFlags & kRestore) && (kFlags & kMaster)) || ((kFlags & kRestoreSigns) && !(kFlags & kRestore)) ||
                       ((kFlags & kAheadSigns) && !(kFlags & kAhead)) ||
                       ((kFlags & kStochastic) && (!std::is_same_v<S, c10::BFloat16> || (kFlags & kMaster)))) {
    // the master is never perturbed; a sign bit only qualifies a perturbation that is there; only
    // bf16 without masters rounds stochastically (SPEC 2c)
    TORCH_CHECK(false, "fsgld: invalid step flags ", flags);
  } else {
    using B = std::conditional_t<(kFlags & kMaster) != 0, float, S>;
    fn(fused_step_kernel<S, B, kFlags>);
  }
}

// The fused step kernel of param type S for `flags` (kStochastic set, or not: kStochasticSet).
// fsgld_cuda.cu declares it `extern template` and fsgld_cuda_step_<type>[_sr].cu instantiates it,
// one param type (and rounding) per translation unit: a kernel per flag set, they are most of the
// build, and ninja then compiles the files in parallel (bench/README.md, "Build time"). A host
// function, not the kernels, crosses the files: nvcc 13 makes a template kernel's launch stub local
// to its file (-static-global-template-stub).
using StepKernel = decltype(&fused_step_kernel<float, float, 0u>);
template <typename S, bool kStochasticSet = false>
StepKernel step_kernel(unsigned flags) {
  StepKernel kernel = nullptr;
  constexpr unsigned first = kStochasticSet ? kStochastic : 0u;
  dispatch_step_flags<S, first, first + kStochastic>(flags, [&](StepKernel k) { kernel = k; });
  return kernel;
}


// `launch(kernel, table, n_chunks, scalars)` runs one grid of kThreads-thread blocks.
template <typename Launch>
void fused_step_host(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets, int64_t seed,
                     int64_t step, double lr, double weight_decay, double momentum, double noise_std,
                     double restore_sigma, double perturb_sigma, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& step_t,
                     const std::optional<at::Tensor>& lr_t, bool restore_signs, bool ahead_signs,
                     bool stochastic_rounding, const Launch& launch) {
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, "fsgld: the cuda backend takes fp32/bf16/fp16 params");
  Scalars sc{seed_bits(seed), step, (float)lr, (float)weight_decay, (float)momentum, (float)noise_std,
             (float)restore_sigma, (float)perturb_sigma, 0.0f,
             grad_scale ? grad_scale->data_ptr<float>() : nullptr, found_inf ? found_inf->data_ptr<float>() : nullptr,
             step_t ? step_t->data_ptr<int64_t>() : nullptr, lr_t ? lr_t->data_ptr<float>() : nullptr,
             restore_sigma != 0.0, noise_std != 0.0, perturb_sigma != 0.0, momentum != 0.0, !masters.empty()};
  const bool restore = sc.restore && !sc.has_master;
  const unsigned flags = (restore ? kRestore : 0u) | (sc.noise ? kNoise : 0u) | (sc.ahead ? kAhead : 0u) |
                         (sc.has_momentum ? kMomentum : 0u) | (sc.has_master ? kMaster : 0u) |
                         (restore && restore_signs ? kRestoreSigns : 0u) | (sc.ahead && ahead_signs ? kAheadSigns : 0u) |
                         (rounds_stochastically(params, masters, stochastic_rounding) ? kStochastic : 0u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fsgld::fused_step_", [&] {
    using S = scalar_t;
    if constexpr (!std::is_same_v<S, double>) {  // refused above; not instantiated
      StepKernel kernel;
      if constexpr (std::is_same_v<S, c10::BFloat16>) {  // the only type that rounds stochastically
        kernel = (flags & kStochastic) ? step_kernel<S, true>(flags) : step_kernel<S>(flags);
      } else {
        kernel = step_kernel<S>(flags);
      }
      multi_tensor_apply(params, grads, momentum_buffers, masters, param_ids, offsets,
                         [&](const TensorTable& tab, int nchunks) { launch(kernel, tab, nchunks, sc); },
                         (flags & (kRestoreSigns | kAheadSigns)) != 0, (flags & kStochastic) != 0);
    }
  });
}

template <typename Launch>
void perturb_host(at::TensorList params, at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets,
                  int64_t seed, int64_t step, double sigma, const std::optional<at::Tensor>& step_t, bool signs,
                  int64_t rounding_op, const Launch& launch) {
  TORCH_CHECK(params[0].scalar_type() != at::kDouble, "fsgld: the cuda backend takes fp32/bf16/fp16 params");
  Scalars sc{};
  sc.seed = seed_bits(seed), sc.step = step, sc.sigma = (float)sigma, sc.has_master = !masters.empty();
  sc.step_t = step_t ? step_t->data_ptr<int64_t>() : nullptr;
  const bool stochastic = rounds_stochastically(params, masters, rounding_op >= 0);
  sc.rounding_op = stochastic ? (uint32_t)rounding_op : 0u;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[0].scalar_type(), "fsgld::perturb_", [&] {
    multi_tensor_apply(params, {}, {}, masters, param_ids, offsets, [&](const TensorTable& tab, int nchunks) {
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {  // the only type that rounds stochastically
        if (stochastic) {
          if (signs) {
            launch(perturb_kernel<scalar_t, true, true>, tab, nchunks, sc);
          } else {
            launch(perturb_kernel<scalar_t, false, true>, tab, nchunks, sc);
          }
          return;
        }
      }
      if (signs) {
        launch(perturb_kernel<scalar_t, true>, tab, nchunks, sc);
      } else {
        launch(perturb_kernel<scalar_t, false>, tab, nchunks, sc);
      }
    });
  });
}

// Blocks of kThreads threads covering the Philox blocks of `n` elements from global index `offset`.
inline unsigned normals_grid(int64_t n, int64_t offset) {
  const int64_t nblk = ((offset + n - 1) >> 2) - (offset >> 2) + 1;
  return (unsigned)((nblk + kThreads - 1) / kThreads);
}

// Blocks of kThreads threads, one thread per Philox block, for `n` blocks of raw words.
inline unsigned words_grid(int64_t n) { return (unsigned)((n + kThreads - 1) / kThreads); }

}  // namespace cuda_kernels
}  // namespace fsgld
