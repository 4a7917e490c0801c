// fsgld_schemas.h: the op schemas of the fsgld:: namespace, in one place. fsgld_ops.cpp defines
// the ops from them; the CPU emulation of the CUDA kernels (tests/cuda_emulation.cpp) defines a
// twin namespace from the same strings, so both take exactly the same arguments.
#pragma once

namespace fsgld {
namespace schema {

// params += sigma * eps_step (SPEC 2, kind 0); with masters: params = round(masters + sigma*eps).
// A negative sigma restores. `seed` is the 64-bit seed's two's-complement bits. rademacher: eps
// is random signs (SPEC 2b). rounding_op: -1 writes bf16 params rounded to nearest; 1 (perturb_)
// or 2 (restore_) rounds bf16 params without masters stochastically from SPEC 2c's sub-stream
// 0xffff - rounding_op.
constexpr const char* kPerturb =
    "perturb_(Tensor(a!)[] params, Tensor[] masters, int[] param_ids, int[] offsets, int seed, int step, "
    "float sigma, Tensor? step_t=None, bool rademacher=False, int rounding_op=-1) -> ()";

// SPEC 3 over the list: restore (restore_sigma, eps_step), SGLD update (xi_step), perturb
// ahead (perturb_sigma, eps_{step+1}). Nothing changes if found_inf is nonzero.
// Capturable form (CUDA graphs): step_t (int64) replaces `step`, lr_t (float32) replaces `lr`,
// and the Langevin std is then noise_std * sqrt(lr_t) (pass noise_std = sqrt(2 / beta)). The
// kernels only read them: the caller advances step_t on the device. restore_rademacher /
// perturb_rademacher: eps_step / eps_{step+1} are random signs (SPEC 2b); xi is always Gaussian.
// stochastic_rounding (SPEC 2c, op 0): bf16 params without masters get the compensated Langevin
// std per element and are written rounded stochastically; other params ignore it.
constexpr const char* kFusedStep =
    "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, "
    "int[] param_ids, int[] offsets, int seed, int step, float lr, float weight_decay, float momentum, "
    "float noise_std, float restore_sigma, float perturb_sigma, Tensor? grad_scale, Tensor? found_inf, "
    "Tensor? step_t=None, Tensor? lr_t=None, bool restore_rademacher=False, bool perturb_rademacher=False, "
    "bool stochastic_rounding=False) -> ()";

// Normals of one stream for the elements offset .. offset+out.numel()-1 (tests and benchmarks).
constexpr const char* kNormals = "normals_(Tensor(a!) out, int seed, int param_id, int step, int kind, int offset) -> ()";

// The raw Philox words of blocks first_block .. first_block+n-1 into an int32 (n, 4) tensor.
constexpr const char* kPhiloxWords =
    "philox_words_(Tensor(a!) out, int seed, int param_id, int step, int kind, int first_block) -> ()";

// The instruction set the CPU kernels run with: "avx512", "avx2" or "baseline" (FSGLD_CPU_ISA caps it).
constexpr const char* kCpuIsa = "cpu_isa() -> str";

}  // namespace schema
}  // namespace fsgld
