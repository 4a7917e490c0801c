"""Build fsgld_fused._C (csrc/) against the installed torch: `pip install --no-build-isolation -e .`

CppExtension on a CPU-only torch, CUDAExtension where torch has CUDA (TORCH_CUDA_ARCH_LIST
respected; without it and without a GPU we default to sm_80 and sm_90, since torch's arch
detection raises IndexError with no device). A failed compile fails the install: there is no
silent fallback to the reference.

The CUDA toolkit is found here, not by torch: torch takes dirname(dirname(which nvcc)), which is
wrong where nvcc on the PATH is a wrapper script (/usr/local/bin/nvcc -> `exec
/usr/local/cuda-13.0/bin/nvcc`), and linking then fails with `cannot find -lcudart`. A CUDA torch
with no usable toolkit fails the build unless FSGLD_FORCE_CPU=1; nvcc beside a CPU-only torch
builds CPU-only with a loud warning (pip shows it with -v; .ci/build-ext prints it always).
"""

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch


# tests/test_cuda_build.py and bench/build_times.py read these lists. No fast-math: sqrtf stays
# correctly rounded (SPEC). No contraction of a*b+c into FMA (host and device): SPEC 3's update
# rounds each float32 op like the reference; the log/sin/cos polynomials ask for their FMAs
# explicitly (fmadd).
NVCC_FLAGS = ["-O3", "-lineinfo", "-fmad=false"]
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-DPy_LIMITED_API=0x030A0000"]

# .ci/build-ext greps the build log for this marker and repeats those lines.
WARNING_MARKER = "FSGLD BUILD WARNING"


def is_cuda_toolkit(home):
    """A toolkit root we can compile and link with: bin/nvcc and a libcudart beside it."""
    if not home or not os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return False
    patterns = ("lib64/libcudart.so*", "lib/libcudart.so*", "targets/*/lib/libcudart.so*", "lib64/libcudart_static.a")
    return any(glob.glob(os.path.join(home, p)) for p in patterns)


def _nvcc_top(nvcc, run=subprocess.run):
    """The toolkit root nvcc itself uses: `nvcc --dryrun` prints `#$ TOP=<root>/bin/..` (no file is read)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = run([nvcc, "--dryrun", "-c", os.path.join(tmp, "probe.cu")], capture_output=True, text=True,
                      timeout=60, cwd=tmp)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", (res.stdout or "") + (res.stderr or ""), re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home(environ=None, which=shutil.which, run=subprocess.run, fallback="/usr/local/cuda"):
    """(toolkit root or None, how it was found, [notes on candidates that were rejected]).

    Order: $CUDA_HOME, $CUDA_PATH (if they hold a toolkit), the root nvcc reports (`--dryrun`'s
    TOP, right through wrapper scripts), nvcc's resolved symlink location, /usr/local/cuda.
    """
    environ = os.environ if environ is None else environ
    rejected = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = environ.get(var)
        if home:
            if is_cuda_toolkit(home):
                return os.path.realpath(home), f"${var}", rejected
            rejected.append(f"${var}={home} has no bin/nvcc with libcudart beside it")
    nvcc = which("nvcc", path=environ.get("PATH"))
    if nvcc:
        for how, home in (("nvcc --dryrun", _nvcc_top(nvcc, run)),
                          ("nvcc's resolved path", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))):
            if is_cuda_toolkit(home):
                return home, f"{how} ({nvcc})", rejected
            if home:
                rejected.append(f"{home} (from {how} of {nvcc}) has no bin/nvcc with libcudart beside it")
    if is_cuda_toolkit(fallback):
        return os.path.realpath(fallback), fallback, rejected
    return None, "not found", rejected


def _warn(*lines):
    bar = "!" * 100
    print("\n".join([bar, *(f"{WARNING_MARKER}: {line}" for line in lines), bar]), file=sys.stderr, flush=True)


def build_plan(environ=None, which=shutil.which, run=subprocess.run, torch_cuda="from torch",
               fallback="/usr/local/cuda"):
    """(use_cuda, cuda_home or None): decided from torch's build, the toolkit and FSGLD_FORCE_CPU.

    Exits with a message where a CUDA torch finds no usable toolkit (unless FSGLD_FORCE_CPU=1).
    """
    environ = os.environ if environ is None else environ
    torch_cuda = torch.version.cuda if torch_cuda == "from torch" else torch_cuda  # None: a CPU-only torch
    force_cpu = environ.get("FSGLD_FORCE_CPU") == "1"
    home, how, rejected = find_cuda_home(environ, which, run, fallback)
    if torch_cuda is None:
        # Select by torch's build, not by nvcc: CUDA kernels need a CUDA torch to link against.
        if home is not None or which("nvcc", path=environ.get("PATH")):
            _warn(f"nvcc is present (toolkit: {home or 'unusable'}) but torch {torch.__version__} is a CPU-only "
                  "build: building the C++ CPU kernels only, no CUDA kernels.",
                  "Install a CUDA build of torch and rebuild to get backend='cuda'.")
        return False, None
    if force_cpu:
        _warn(f"FSGLD_FORCE_CPU=1: building CPU kernels only, although torch has CUDA {torch_cuda}.")
        return False, None
    if home is None:
        _warn(f"torch {torch.__version__} has CUDA {torch_cuda} but no usable CUDA toolkit was found ("
              + ("; ".join(rejected) or "no $CUDA_HOME, $CUDA_PATH, nvcc on the PATH or /usr/local/cuda") + ").",
              "Install the toolkit or set CUDA_HOME to its root; FSGLD_FORCE_CPU=1 builds the CPU kernels only.")
        raise SystemExit("fsgld_fused: no CUDA toolkit for a CUDA torch (see the warning above)")
    print(f"fsgld_fused: CUDA toolkit {home} (found by {how})", file=sys.stderr, flush=True)
    return True, home


def _extension():
    use_cuda, cuda_home = build_plan()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when first imported; set both in case it was.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home
    cpp_sources = sorted(glob.glob("csrc/*.cpp"))
    cu_sources = sorted(glob.glob("csrc/*.cu"))
    extra = {"cxx": list(CXX_FLAGS)}
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
        ), cpp_extension.BuildExtension
    return cpp_extension.CppExtension(
        "fsgld_fused._C",
        cpp_sources,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    ), cpp_extension.BuildExtension


# setuptools' PEP 517 backend execs this file as __main__; tests import it for the toolkit finder.
if __name__ == "__main__":
    from setuptools import setup

    extension, build_ext = _extension()
    setup(
        packages=["fsgld_fused", "fsgld_fused.kernels"],
        package_dir={"fsgld_fused": "fsgld_fused", "fsgld_fused.kernels": "kernels"},
        ext_modules=[extension],
        cmdclass={"build_ext": build_ext},
        options={"bdist_wheel": {"py_limited_api": "cp310"}},
    )
