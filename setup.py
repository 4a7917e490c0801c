"""Build fsgld_fused._C (csrc/) against the installed torch: `pip install --no-build-isolation -e .`

CppExtension on a CPU-only torch, CUDAExtension where torch has CUDA and nvcc is present
(TORCH_CUDA_ARCH_LIST respected; without it and without a GPU we default to sm_80 and sm_90,
since torch's arch detection raises IndexError with no device). A failed compile fails the
install: there is no silent fallback to the reference.
"""

import glob
import os

from setuptools import setup

import torch
from torch.utils import cpp_extension


# tests/test_cuda_build.py reads this list. No fast-math: sqrtf stays correctly rounded (SPEC);
# -fmad=false: see the cxx flags below.
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false"]


def _extension():
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    # Select by torch's build, not by nvcc: a CPU-only torch has CUDA_HOME None even with nvcc.
    use_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("FSGLD_FORCE_CPU") == "1":
        use_cuda = False
    # No contraction of a*b+c into FMA (host and device): SPEC 3's update rounds each float32 op
    # like the reference; the log/sin/cos polynomials ask for their FMAs explicitly (fmadd).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DPy_LIMITED_API=0x030A0000"]
    extra = {"cxx": cxx}
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        extra["nvcc"] = NVCC_FLAGS
        return cpp_extension.CUDAExtension(
            "fsgld_fused._C",
            cpp_sources + cu_sources,
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    return cpp_extension.CppExtension(
        "fsgld_fused._C",
        cpp_sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    packages=["fsgld_fused", "fsgld_fused.kernels"],
    package_dir={"fsgld_fused": "fsgld_fused", "fsgld_fused.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
