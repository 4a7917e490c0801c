"""What the GPU run compiles, timed here without a GPU: the extension's translation units, and
Triton's first-use compile of the kernel variants the run launches.

    python bench/build_times.py [--arch 90] [--source DIR] [--only fsgld_cuda] [--json FILE]
    python bench/build_times.py --triton [--arch 90] [--json FILE]

Each csrc/*.cu file (nvcc, for one arch) and csrc/*.cpp file (the host compiler) of the CUDA
extension is compiled alone, one after another, with the flags of the real build: setup.py's
NVCC_FLAGS and CXX_FLAGS plus what torch's CUDAExtension adds. It prints each file's wall and CPU
seconds (user + sys of the compiler processes: steadier than wall on a shared machine) and the
device build this predicts: ninja runs every file at once on enough cores (the device has 16),
so the longest file sets the compile time. `--source` times another checkout (the "before" of a
change). The pip and link steps around it are not counted: bench/README.md has those.

--triton: `triton.compile` of each fused-step / perturb / normals / words variant for
GPUTarget("cuda", arch, 32) into an empty cache, one after another, as a first launch on the
device would (Triton compiles in the launching process, one variant at a time; its disk cache
then serves every later process of the run).
"""

import argparse
import ast
import glob
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What torch.utils.cpp_extension adds to every nvcc command (COMMON_NVCC_FLAGS, -fPIC, the
# extension's name and API macros) and to every host compile.
TORCH_NVCC = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
              "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr", "--compiler-options", "-fPIC"]
TORCH_COMMON = ["-std=c++20", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]


def setup_constant(source: str, name: str):
    """A list constant of setup.py (read, not imported: importing it runs setup()), or None."""
    tree = ast.parse(open(os.path.join(source, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == name:
            return ast.literal_eval(node.value)
    return None


def commands(source: str, arch: int, workdir: str) -> dict[str, list[str]]:
    """file name -> the compile command of that translation unit."""
    from torch.utils.cpp_extension import include_paths

    # A CPU-only torch wheel ships every c10/cuda header but the one its CUDA build generates.
    shim = os.path.join(workdir, "shim", "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(workdir, 'shim')}",
                                                     f"-I{sysconfig.get_paths()['include']}",
                                                     f"-I{os.path.join(source, 'csrc')}"]
    nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    cxx = os.environ.get("CXX", "c++")
    gencode = [f"-gencode=arch=compute_{arch},code=compute_{arch}", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    out = {}
    for path in sorted(glob.glob(os.path.join(source, "csrc", "*.cu"))):
        obj = os.path.join(workdir, os.path.basename(path) + ".o")
        out[os.path.basename(path)] = [nvcc, *TORCH_COMMON, *setup_constant(source, "NVCC_FLAGS"), *TORCH_NVCC,
                                       *gencode, *includes, "-c", path, "-o", obj]
    cxx_flags = setup_constant(source, "CXX_FLAGS")  # absent in checkouts before issue 21: .cu files only
    for path in sorted(glob.glob(os.path.join(source, "csrc", "*.cpp"))) if cxx_flags is not None else []:
        obj = os.path.join(workdir, os.path.basename(path) + ".o")
        # Python's own CFLAGS (-g -O3 -Wall ...) come first, as setuptools puts them on the host compiler
        python_cflags = shlex.split(sysconfig.get_config_var("CFLAGS") or "")
        out[os.path.basename(path)] = [cxx, *python_cflags, "-fPIC", *TORCH_COMMON, "-DWITH_CUDA", *cxx_flags,
                                       *includes, "-c", path, "-o", obj]
    return out


def time_command(cmd: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    row = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
    if res.returncode != 0:
        row["error"] = res.stderr[-2000:]
    return row


# (kernel, constexprs, num_warps): what the GPU run launches first. The fused step: the Gaussian
# full step (restore, noise, next perturbation; wd 0) at the four configs the block tuning times,
# then at the usual winner the Rademacher step, AMP (scale, found_inf) with momentum, bf16 with
# fp32 masters (Gaussian and Rademacher), and the capturable step at the capture-time default.
_STEP = dict(P_DTYPE="fp32", B_DTYPE="fp32", P_SOFT=False, B_SOFT=False, HAS_STEP_T=False, HAS_LR_T=False,
             HAS_MASTER=False, HAS_MOMENTUM=False, HAS_SCALE=False, HAS_FOUND_INF=False, RESTORE=True, NOISE=True,
             AHEAD=True, WEIGHT_DECAY=False, RESTORE_SIGNS=False, AHEAD_SIGNS=False)
TRITON_VARIANTS = [
    *((f"step fp32 gaussian B{b}", "_fused_step_kernel", {**_STEP, "BLOCK": b}, w)
      for b, w in ((256, 4), (512, 4), (1024, 8), (2048, 8))),
    ("step fp32 rademacher B1024", "_fused_step_kernel",
     {**_STEP, "RESTORE_SIGNS": True, "AHEAD_SIGNS": True, "BLOCK": 1024}, 8),
    ("step fp32 AMP + momentum B1024", "_fused_step_kernel",
     {**_STEP, "HAS_MOMENTUM": True, "HAS_SCALE": True, "HAS_FOUND_INF": True, "BLOCK": 1024}, 8),
    ("step bf16 + masters B1024", "_fused_step_kernel",
     {**_STEP, "P_DTYPE": "bf16", "HAS_MASTER": True, "RESTORE": False, "BLOCK": 1024}, 8),
    ("step bf16 + masters rademacher B1024", "_fused_step_kernel",
     {**_STEP, "P_DTYPE": "bf16", "HAS_MASTER": True, "RESTORE": False, "AHEAD_SIGNS": True, "BLOCK": 1024}, 8),
    ("step fp32 capturable B512", "_fused_step_kernel",
     {**_STEP, "HAS_STEP_T": True, "HAS_LR_T": True, "BLOCK": 512}, 4),
    ("perturb fp32 gaussian B512", "_perturb_kernel",
     dict(P_DTYPE="fp32", P_SOFT=False, HAS_MASTER=False, HAS_STEP_T=False, SIGNS=False, BLOCK=512), 4),
    ("perturb fp32 rademacher B512", "_perturb_kernel",
     dict(P_DTYPE="fp32", P_SOFT=False, HAS_MASTER=False, HAS_STEP_T=False, SIGNS=True, BLOCK=512), 4),
    ("normals B256", "_normals_kernel", dict(BLOCK=256), 4),
    ("words B256", "_words_kernel", dict(BLOCK=256), 4),
]
_TRITON_ARGS = {"out_ptr": "*fp32", "n": "i64", "off": "i64", "tag": "i64", "nblocks": "i64", "first": "i64",
                "sigma": "fp32"}


def triton_times(arch: int) -> dict[str, dict]:
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be decorated for the compiler
    import inspect

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fsgld_fused.kernels import triton_ops as K
    from fsgld_fused.sass import TRITON_TYPES

    types = {**TRITON_TYPES, **_TRITON_ARGS}
    dtypes = {"fp32": tl.float32, "bf16": tl.bfloat16}
    rows = {}
    for name, kernel, constexprs, warps in TRITON_VARIANTS:
        fn = getattr(K, kernel)
        names = list(inspect.signature(fn.fn).parameters)
        values = {k: dtypes.get(v, v) if k.endswith("DTYPE") else v for k, v in constexprs.items()}
        if kernel == "_words_kernel":
            types_here = {**types, "out_ptr": "*i32"}
        else:
            types_here = types
        sig = {n: ("constexpr" if n in values else types_here[n]) for n in names}
        src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in values.items()})
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu0, start = time.process_time(), time.monotonic()
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "enable_fp_fusion": False})
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = time.process_time() - cpu0 + (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        rows[name] = {"wall_s": round(time.monotonic() - start, 2), "cpu_s": round(cpu, 2)}
        print(f"{name:40s} {rows[name]['wall_s']:6.2f} s wall {rows[name]['cpu_s']:6.2f} s cpu", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (the device's: 90 for H100/H200)")
    parser.add_argument("--source", default=ROOT, help="checkout to time (default: this one)")
    parser.add_argument("--only", default="", help="comma-separated file names (without suffix) to time; default all")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--triton", action="store_true", help="time Triton's compile of each kernel variant instead")
    args = parser.parse_args()
    if args.triton:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["TRITON_CACHE_DIR"] = cache  # compile for real, not from an earlier cache
            import triton

            rows = triton_times(args.arch)
        cpu = [r["cpu_s"] for r in rows.values()]
        print(f"{len(rows)} Triton variants, triton {triton.__version__}: {sum(cpu):.1f} s cpu in all, "
              f"{sum(cpu) / len(cpu):.2f} s mean, {max(cpu):.2f} s the longest")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"arch": args.arch, "triton": triton.__version__, "variants": rows,
                           "load_avg": os.getloadavg()}, f, indent=1)
        return 0
    rows = {}
    with tempfile.TemporaryDirectory() as workdir:
        cmds = commands(os.path.abspath(args.source), args.arch, workdir)
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        for name, cmd in cmds.items():
            if only and os.path.splitext(name)[0] not in only:
                continue
            rows[name] = time_command(cmd)
            r = rows[name]
            failed = "  FAILED" if "error" in r else ""
            print(f"{name:28s} {r['wall_s']:7.1f} s wall {r['cpu_s']:7.1f} s cpu{failed}", flush=True)
            if "error" in r:
                print(r["error"], file=sys.stderr)
    ok = [r for r in rows.values() if "error" not in r]
    longest = max((r["cpu_s"] for r in ok), default=0.0)
    total = sum(r["cpu_s"] for r in ok)
    print(f"{len(rows)} translation units, {total:.1f} s cpu in all; the longest {longest:.1f} s cpu: the compile "
          f"time of a parallel build on >= {len(rows)} cores (serial: {total:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "source": os.path.abspath(args.source), "files": rows,
                       "cpu_s_total": total, "cpu_s_longest": longest, "load_avg": os.getloadavg()}, f, indent=1)
    return 1 if len(ok) < len(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
