// The fused step kernels of float params (step_kernel in fsgld_cuda_kernels.cuh): one translation
// unit per param type, compiled in parallel with the others.
#define FSGLD_FUSED_STEP_ONLY  // the other kernels are fsgld_cuda.cu's
#include "fsgld_cuda_kernels.cuh"

template fsgld::cuda_kernels::StepKernel fsgld::cuda_kernels::step_kernel<float>(unsigned);
