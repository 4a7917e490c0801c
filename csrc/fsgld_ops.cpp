// fsgld_ops.cpp: defines the fsgld:: ops from fsgld_schemas.h (one schema, one kernel per backend:
// CPU in fsgld_cpu.cpp, CUDA in fsgld_cuda.cu; fake kernels for torch.compile in
// fsgld_fused/_ops.py), and the empty Python module that loads them.
#include <Python.h>
#include <torch/library.h>

#include "fsgld_schemas.h"

extern "C" {
// `import fsgld_fused._C` only has to load this library: the ops register themselves.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fsgld, m) {
  m.def(fsgld::schema::kPerturb);
  m.def(fsgld::schema::kFusedStep);
  m.def(fsgld::schema::kNormals);
  m.def(fsgld::schema::kPhiloxWords);
}
