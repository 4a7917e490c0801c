"""Every .cu file compiles with nvcc for sm_80 and sm_90, even on a machine without a GPU, so a
CUDA syntax or type error fails CI. Skipped only where nvcc is absent. And the build split: each
kernel is compiled in one translation unit only, so that ninja compiles the files in parallel."""

import ast
import glob
import os
import re
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils.cpp_extension import include_paths

from fsgld_fused.sass import find_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_FILES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
# The extension's own nvcc flags, read from setup.py (importing it would run setup()).
_SETUP = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
NVCC_FLAGS = next(ast.literal_eval(n.value) for n in _SETUP.body
                  if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "NVCC_FLAGS")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if "CUDA_HOME" in os.environ else None)
needs_nvcc = pytest.mark.skipif(NVCC is None or not os.path.exists(NVCC), reason="nvcc not installed")
_COMPILED: dict[str, tuple] = {}  # .cu path -> (object path, nvcc's result): each file compiled once


@pytest.fixture(scope="module")
def objdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cu")
    # A CPU-only torch wheel ships every c10/cuda header but the one its CUDA build generates.
    shim = out / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    yield out
    _COMPILED.clear()


def compile_cu(cu, objdir):
    if cu not in _COMPILED:
        obj = objdir / (os.path.basename(cu) + ".o")
        cmd = [NVCC, "-std=c++20", *NVCC_FLAGS, "-c", cu, "-o", str(obj), "--threads", "2"]
        cmd += [f"-I{p}" for p in include_paths()] + [f"-I{objdir / 'shim'}", f"-I{sysconfig.get_paths()['include']}"]
        cmd += [f"-I{os.path.join(ROOT, 'csrc')}", "--expt-relaxed-constexpr", "-Xptxas", "-warn-spills"]
        cmd += ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        cmd += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        _COMPILED[cu] = (obj, subprocess.run(cmd, capture_output=True, text=True, timeout=900))
    return _COMPILED[cu]


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=os.path.basename)
def test_cu_compiles_for_sm80_and_sm90(cu, objdir):
    obj, res = compile_cu(cu, objdir)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "spill" not in res.stderr, res.stderr[-4000:]
    assert obj.stat().st_size > 0


@needs_nvcc
@pytest.mark.skipif(find_tool("cuobjdump") is None or shutil.which("nm") is None, reason="needs cuobjdump and nm")
def test_each_kernel_is_compiled_in_one_file(objdir):
    """The fused step kernels (most of the build) sit in one file per param type (bf16 rounded
    stochastically in a second one) and nowhere else:
    fsgld_cuda.cu only references them, through step_kernel<type>, which exactly one file defines.
    A kernel instantiated in two files would be compiled twice; one missing would not load."""
    kernels, defined, undefined = {}, {}, {}
    for cu in CU_FILES:
        obj, res = compile_cu(cu, objdir)
        assert res.returncode == 0, res.stderr[-4000:]
        sass = subprocess.run([find_tool("cuobjdump"), "-sass", "-arch", "sm_90", str(obj)], capture_output=True,
                              text=True, check=True).stdout
        kernels[os.path.basename(cu)] = re.findall(r"Function : (\S+)", sass)
        symbols = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        for kind, name in re.findall(r"^\s*\S*\s+([A-Za-z])\s+(.*)$", symbols, re.MULTILINE):
            if re.search(r"cuda_kernels::step_kernel<[^>]*>\(unsigned int\)\)", name):  # the function, no lambda
                (undefined if kind == "U" else defined).setdefault(name, []).append(os.path.basename(cu))
    everywhere = [k for names in kernels.values() for k in names]
    twice = sorted({k for k in everywhere if everywhere.count(k) > 1})
    assert everywhere and not twice, twice  # no kernel compiled twice
    step = {f: [k for k in names if "fused_step_kernel" in k] for f, names in kernels.items()}
    types = {"float": "f", "bfloat16": "N3c108BFloat16E", "half": "N3c104HalfE"}  # S in the mangled names
    # bf16 rounded stochastically (SPEC 2c, kStochastic = 128 in the flags) has a file of its own
    files = {f"fsgld_cuda_step_{t}.cu": t for t in types} | {"fsgld_cuda_step_bfloat16_sr.cu": "bfloat16"}
    assert not step.pop("fsgld_cuda.cu")
    assert sorted(step) == sorted(files)
    counts = {len(step[f"fsgld_cuda_step_{t}.cu"]) for t in types}
    assert len(counts) == 1 and counts.pop() > 0, {f: len(n) for f, n in step.items()}  # every type, every flag set
    for f, t in files.items():
        assert step[f] and all(k.startswith(f"_ZN5fsgld12cuda_kernels17fused_step_kernelI{types[t]}") for k in step[f]), f
        flags = [int(re.search(r"Lj(\d+)E", k).group(1)) for k in step[f]]
        assert all(bool(x & 128) == f.endswith("_sr.cu") for x in flags), (f, flags)
    assert sorted(undefined) == sorted(defined) and len(defined) == len(files), (defined, undefined)
    assert all(users == ["fsgld_cuda.cu"] for users in undefined.values()), undefined
    assert sorted(f for users in defined.values() for f in users) == sorted(files)
