// cuda_emulation.cpp: the CUDA kernels of csrc/fsgld_cuda_kernels.cuh, run on the CPU.
//
// The kernels use no shared memory, no __syncthreads and no atomics: a thread's work depends only
// on (blockIdx, threadIdx), so running the threads of a grid one after another is one legal
// schedule of it. Their one warp shuffle (the Rademacher sign words, warp_sign_word) compiles here
// to a recomputation of the value the source lane holds. Compiled with the host compiler, the same kernel source then executes its
// indexing, table packing (several launches per call), vector and tail paths on CPU tensors,
// where tests/test_cuda_emulation.py compares it with the reference. What it cannot show: the
// GPU's own float rounding of sqrtf, timing, and anything about the hardware.
//
// It defines the ops of fsgld_schemas.h under the namespace fsgld_cuda_emu (CPU tensors), plus
// fsgld_cuda_emu::launches(), the number of grids launched so far.
#include <torch/library.h>

#include <cstdint>
#include <vector>

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
static EmulatedDim3 blockIdx, threadIdx, blockDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__

static int64_t g_chunk_paths[2] = {0, 0};  // chunks that took the edge / the interior path
#define FSGLD_TRACE_CHUNK_PATH(interior) \
  do {                                   \
    if (threadIdx.x == 0) ++g_chunk_paths[(interior) ? 1 : 0]; \
  } while (0)

#include "fsgld_cuda_kernels.cuh"
#include "fsgld_schemas.h"

namespace {

using namespace fsgld;
using namespace fsgld::cuda_kernels;

int64_t g_launches = 0;

// One grid of `nblocks` blocks of kThreads threads, thread after thread.
template <typename Kernel, typename... Args>
void run_grid(unsigned nblocks, Kernel kernel, const Args&... args) {
  ++g_launches;
  blockDim = {(unsigned)kThreads, 1, 1};
  for (unsigned b = 0; b < nblocks; ++b) {
    for (unsigned t = 0; t < (unsigned)kThreads; ++t) {
      blockIdx = {b, 0, 0};
      threadIdx = {t, 0, 0};
      kernel(args...);
    }
  }
}

struct CpuLaunch {
  template <typename Kernel>
  void operator()(Kernel kernel, const TensorTable& tab, int nchunks, const Scalars& sc) const {
    run_grid((unsigned)nchunks, kernel, tab, sc);
  }
};

void fused_step_emu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets, int64_t seed,
                    int64_t step, double lr, double weight_decay, double momentum, double noise_std,
                    double restore_sigma, double perturb_sigma, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& step_t,
                    const std::optional<at::Tensor>& lr_t, bool restore_rademacher, bool perturb_rademacher,
                    bool stochastic_rounding) {
  check_fused_step(c10::DeviceType::CPU, params, grads, momentum_buffers, masters, param_ids, offsets, momentum,
                   grad_scale, found_inf, step_t, lr_t);
  if (params.empty()) return;
  fused_step_host(params, grads, momentum_buffers, masters, param_ids, offsets, seed, step, lr, weight_decay, momentum,
                  noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, step_t, lr_t, restore_rademacher,
                  perturb_rademacher, stochastic_rounding, CpuLaunch{});
}

void perturb_emu(at::TensorList params, at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets,
                 int64_t seed, int64_t step, double sigma, const std::optional<at::Tensor>& step_t,
                 bool rademacher, int64_t rounding_op) {
  check_lists(c10::DeviceType::CPU, params, {}, {}, masters, param_ids, offsets);
  check_rounding_op(rounding_op);
  if (params.empty()) return;
  check_step_tensor(step_t, params[0].device());
  perturb_host(params, masters, param_ids, offsets, seed, step, sigma, step_t, rademacher, rounding_op, CpuLaunch{});
}

void normals_emu(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind, int64_t offset) {
  check_normals(out, c10::DeviceType::CPU, param_id, kind, offset);
  const int64_t n = out.numel();
  if (n == 0) return;
  run_grid(normals_grid(n, offset), normals_kernel, out.data_ptr<float>(), n, offset,
           make_stream(seed_bits(seed), param_id, step, (uint32_t)kind));
}

void philox_words_emu(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind,
                      int64_t first_block) {
  check_words(out, c10::DeviceType::CPU, param_id, kind);
  const int64_t n = out.size(0);
  if (n == 0) return;
  run_grid(words_grid(n), words_kernel, reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()),
           n, first_block, make_stream(seed_bits(seed), param_id, step, (uint32_t)kind));
}

int64_t launches() { return g_launches; }

std::vector<int64_t> chunk_paths() { return {g_chunk_paths[0], g_chunk_paths[1]}; }

}  // namespace

TORCH_LIBRARY(fsgld_cuda_emu, m) {
  m.def(fsgld::schema::kPerturb);
  m.def(fsgld::schema::kFusedStep);
  m.def(fsgld::schema::kNormals);
  m.def(fsgld::schema::kPhiloxWords);
  m.def("launches", &launches);
  m.def("chunk_paths", &chunk_paths);
}

TORCH_LIBRARY_IMPL(fsgld_cuda_emu, CPU, m) {
  m.impl("perturb_", &perturb_emu);
  m.impl("fused_step_", &fused_step_emu);
  m.impl("normals_", &normals_emu);
  m.impl("philox_words_", &philox_words_emu);
}
