// The fused step kernels of c10::BFloat16 params rounded stochastically (SPEC 2c; step_kernel in
// fsgld_cuda_kernels.cuh): their own translation unit, compiled in parallel with the others.
#define FSGLD_FUSED_STEP_ONLY  // the other kernels are fsgld_cuda.cu's
#include "fsgld_cuda_kernels.cuh"

template fsgld::cuda_kernels::StepKernel fsgld::cuda_kernels::step_kernel<c10::BFloat16, true>(unsigned);
