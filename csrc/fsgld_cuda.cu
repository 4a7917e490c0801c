// fsgld_cuda.cu: the CUDA launchers of the fsgld:: ops (schemas in fsgld_schemas.h). The kernels
// and the tables they read are in fsgld_cuda_kernels.cuh; the fused step's are instantiated in
// fsgld_cuda_step_<type>.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "fsgld_cuda_kernels.cuh"

namespace fsgld {
namespace cuda_kernels {
// The fused step kernels: compiled in fsgld_cuda_step_<type>.cu, one file per param type, so that
// the build compiles them in parallel (not here: this file would then take them all, serially).
extern template StepKernel step_kernel<float>(unsigned);
extern template StepKernel step_kernel<c10::BFloat16>(unsigned);
extern template StepKernel step_kernel<c10::BFloat16, true>(unsigned);
extern template StepKernel step_kernel<c10::Half>(unsigned);
}  // namespace cuda_kernels

namespace {

using namespace cuda_kernels;

// Launches one kernel grid on the current stream of the params' device.
struct GpuLaunch {
  cudaStream_t stream;
  template <typename Kernel>
  void operator()(Kernel kernel, const TensorTable& tab, int nchunks, const Scalars& sc) const {
    kernel<<<nchunks, kThreads, 0, stream>>>(tab, sc);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

void fused_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets, int64_t seed,
                     int64_t step, double lr, double weight_decay, double momentum, double noise_std,
                     double restore_sigma, double perturb_sigma, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& step_t,
                     const std::optional<at::Tensor>& lr_t, bool restore_rademacher, bool perturb_rademacher,
                    bool stochastic_rounding) {
  check_fused_step(c10::DeviceType::CUDA, params, grads, momentum_buffers, masters, param_ids, offsets, momentum,
                   grad_scale, found_inf, step_t, lr_t);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  fused_step_host(params, grads, momentum_buffers, masters, param_ids, offsets, seed, step, lr, weight_decay, momentum,
                  noise_std, restore_sigma, perturb_sigma, grad_scale, found_inf, step_t, lr_t, restore_rademacher,
                  perturb_rademacher, stochastic_rounding, GpuLaunch{c10::cuda::getCurrentCUDAStream()});
}

void perturb_cuda(at::TensorList params, at::TensorList masters, at::IntArrayRef param_ids, at::IntArrayRef offsets,
                  int64_t seed, int64_t step, double sigma, const std::optional<at::Tensor>& step_t,
                  bool rademacher, int64_t rounding_op) {
  check_lists(c10::DeviceType::CUDA, params, {}, {}, masters, param_ids, offsets);
  check_rounding_op(rounding_op);
  if (params.empty()) return;
  check_step_tensor(step_t, params[0].device());
  const c10::cuda::CUDAGuard guard(params[0].device());
  perturb_host(params, masters, param_ids, offsets, seed, step, sigma, step_t, rademacher, rounding_op,
               GpuLaunch{c10::cuda::getCurrentCUDAStream()});
}

void normals_cuda(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind, int64_t offset) {
  check_normals(out, c10::DeviceType::CUDA, param_id, kind, offset);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  normals_kernel<<<normals_grid(n, offset), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<float>(), n, offset, make_stream(seed_bits(seed), param_id, step, (uint32_t)kind));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void philox_words_cuda(at::Tensor out, int64_t seed, int64_t param_id, int64_t step, int64_t kind,
                       int64_t first_block) {
  check_words(out, c10::DeviceType::CUDA, param_id, kind);
  const int64_t n = out.size(0);
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  words_kernel<<<words_grid(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), n, first_block,
      make_stream(seed_bits(seed), param_id, step, (uint32_t)kind));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(fsgld, CUDA, m) {
  m.impl("perturb_", &perturb_cuda);
  m.impl("fused_step_", &fused_step_cuda);
  m.impl("normals_", &normals_cuda);
  m.impl("philox_words_", &philox_words_cuda);
}

}  // namespace fsgld
