// fsgld_ops.cpp: the op schemas of the fsgld:: namespace (one schema, one kernel per backend:
// CPU in fsgld_cpu.cpp, CUDA in fsgld_cuda.cu; fake kernels for torch.compile in
// fsgld_fused/_ops.py), and the empty Python module that loads them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fsgld_fused._C` only has to load this library: the ops register themselves.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fsgld, m) {
  // params += sigma * eps_step (SPEC 2, kind 0); with masters: params = round(masters + sigma*eps).
  // A negative sigma restores. `seed` is the 64-bit seed's two's-complement bits.
  m.def(
      "perturb_(Tensor(a!)[] params, Tensor[] masters, int[] param_ids, int[] offsets, int seed, int step, "
      "float sigma, Tensor? step_t=None) -> ()");
  // SPEC 3 over the list: restore (restore_sigma, eps_step), SGLD update (xi_step), perturb
  // ahead (perturb_sigma, eps_{step+1}). Nothing changes if found_inf is nonzero.
  // Capturable form (CUDA graphs): step_t (int64) replaces `step`, lr_t (float32) replaces `lr`,
  // and the Langevin std is then noise_std * sqrt(lr_t) (pass noise_std = sqrt(2 / beta)). The
  // kernels only read them: the caller advances step_t on the device.
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] masters, "
      "int[] param_ids, int[] offsets, int seed, int step, float lr, float weight_decay, float momentum, "
      "float noise_std, float restore_sigma, float perturb_sigma, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? step_t=None, Tensor? lr_t=None) -> ()");
  // Normals of one stream for the elements offset .. offset+out.numel()-1 (tests and benchmarks).
  m.def("normals_(Tensor(a!) out, int seed, int param_id, int step, int kind, int offset) -> ()");
  // The raw Philox words of blocks first_block .. first_block+n-1 into an int32 (n, 4) tensor.
  m.def("philox_words_(Tensor(a!) out, int seed, int param_id, int step, int kind, int first_block) -> ()");
}
