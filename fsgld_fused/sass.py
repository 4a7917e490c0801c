"""`python -m fsgld_fused sass`: static SASS instruction counts of the step kernels on sm_90.

The fused step draws three normals per element and is compute-bound on Hopper unless its
instruction count per element stays under the issue budget at the memory floor. This compiles
the sm_90 cubins without a GPU (CUDA: nvcc with setup.py's NVCC_FLAGS and the flags torch's
CUDAExtension adds; Triton: `triton.compile` for `GPUTarget("cuda", 90, 32)` with the launch
code's constexprs), disassembles them with `cuobjdump`, and counts, per step-kernel variant, the
instructions one thread issues along the kernel's main path divided by the elements it handles.

How the main path is walked. The kernel's SASS is split at branches into a graph; the walker
takes the entry-to-EXIT path of an interior, aligned chunk, which is the path with
  1. the most vector global accesses (LDG/STG of 64 or 128 bits: every element of the chunk
     moved 8 or 16 bytes at a time, not by the scalar tail code),
  2. then the fewest instructions (the block-uniform interior path over per-thread bounds
     checks; no optional scalar setup such as a grad scale or a device lr).
The step flags (restore, noise, ahead, momentum, masters) are template parameters / constexprs,
so each variant is its own kernel. For a kernel whose flags are runtime branches (the CUDA kernel
before issue 13, counted with --source), rule 2 is preceded by "the most Philox multiplies"
(integer multiplies by 0xD2511F53 or 0xCD9E8D57), so that every noise stream is drawn.
Subroutine calls (the slow paths of IEEE sqrt and division for denormal or special inputs) end
a path as invalid, and a `@P EXIT` may be taken or not. Loops are not re-entered (the kernels'
loops are unrolled). Instructions per element = instructions on that path / elements per
thread: CUDA kBlocksPerThread * 4; Triton 4 * BLOCK / (32 * num_warps).

Classes: int-mul (IMAD/IMUL products; the IMAD.MOV/SHL/IADD forms are moves and count as alu),
alu (integer add, logic, shifts, compares, selects, moves), fp32 (F*, HFMA2 used as a move, and
the I2F/F2I conversions), mufu, memory (global, shared, constant and local loads and stores),
control (branches, EXIT, convergence barriers), uniform (the U* datapath, S2UR, R2UR).

The roofline: at the memory floor a kernel moves `bytes` per element at the copy bandwidth, so
it may issue at most 132 SMs x 128 thread-instructions/clock x clock x bytes / bandwidth
instructions per element (H100 SXM: 1.98 GHz, 3.0 TB/s -> 134 for 12 B; H200: 4.3 TB/s -> 93);
above that budget the kernel is issue-bound and reaches budget / count of the floor. These are
static counts, not GPU timings (no latency, no dual issue, no memory stalls).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections import Counter
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H100 SXM / H200: SMs, issue slots per SM per clock (4 schedulers x 32 lanes), boost clock and
# copy bandwidth (bytes read plus written per second).
SMS, ISSUE_PER_SM, CLOCK_HZ = 132, 128, 1.98e9
BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12}

CLASSES = ("int-mul", "alu", "fp32", "mufu", "memory", "control", "uniform")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One step-kernel configuration: what the launch code would pick for such a call."""

    name: str  # gaussian-full, gaussian-noise-only, rademacher-full
    dtype: str  # float32 | bfloat16
    master: bool  # fp32 master weights (low-precision params)
    restore: bool
    noise: bool
    ahead: bool
    nominal_bytes: int  # bytes per element at the floor: param, grad, master as SPEC 3 counts them
    rademacher: bool = False  # the perturbations (restore, ahead) are signs (SPEC 2b); xi stays Gaussian


VARIANTS = (
    Variant("gaussian-full", "float32", False, True, True, True, 12),
    Variant("gaussian-noise-only", "float32", False, False, True, False, 12),
    Variant("gaussian-full", "bfloat16", False, True, True, True, 6),
    Variant("gaussian-noise-only", "bfloat16", False, False, True, False, 6),
    # with masters the restore is the master itself: no eps_k
    Variant("gaussian-full", "bfloat16", True, False, True, True, 12),
    Variant("gaussian-noise-only", "bfloat16", True, False, True, False, 12),
    Variant("rademacher-full", "float32", False, True, True, True, 12, rademacher=True),
    Variant("rademacher-full", "bfloat16", False, True, True, True, 6, rademacher=True),
    Variant("rademacher-full", "bfloat16", True, False, True, True, 12, rademacher=True),
)


# ---- SASS parsing and the main-path walk ---------------------------------------------------------
_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]\s+)?([A-Z0-9_.]+)\s*([^;]*);")


@dataclasses.dataclass
class Instr:
    addr: int
    pred: Optional[str]
    op: str
    operands: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(text: str) -> list[Instr]:
    out = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            pred = m.group(2).strip() if m.group(2) else None
            if pred in ("@PT", "@UPT"):
                pred = None
            out.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    return out


def classify(ins: Instr) -> str:
    b, op = ins.base, ins.op
    if b in ("IMAD", "IMUL") and not op.startswith(("IMAD.MOV", "IMAD.SHL", "IMAD.IADD")):
        return "int-mul"
    if b == "MUFU":
        return "mufu"
    if b in ("LDG", "STG", "LD", "ST", "LDL", "STL", "LDS", "STS", "LDC", "ATOM", "ATOMG", "RED", "LDSM"):
        return "memory"
    if b in ("BRA", "BRX", "JMP", "EXIT", "CALL", "RET", "BSSY", "BSYNC", "WARPSYNC", "BAR", "NOP", "YIELD"):
        return "control"
    if b.startswith("U") or b in ("S2UR", "R2UR"):
        return "uniform"
    if b.startswith(("F", "HADD", "HMUL", "HFMA")) or b in ("I2F", "F2I", "F2F", "I2FP", "F2IP"):
        return "fp32"
    return "alu"  # IADD3, LOP3, SHF, ISETP, SEL, MOV, PRMT, LEA, IMAD.MOV, S2R, ...


def _mem_bytes(ins: Instr) -> int:
    """Bytes one thread moves with a global load/store (0 for anything else)."""
    if ins.base not in ("LDG", "STG"):
        return 0
    for width, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if width in ins.op:
            return nbytes
    return 4


def _is_vector(ins: Instr) -> bool:
    """A 64- or 128-bit global access of the element data (read-only .CONSTANT loads are tables)."""
    return _mem_bytes(ins) >= 8 and not (ins.base == "LDG" and ".CONSTANT" in ins.op)


# The Philox round multipliers as SASS prints them (signed when the top bit is set) or unsigned.
_PHILOX_MULS = ("-0x2daee0ad", "-0x326172a9", "0xd2511f53", "0xcd9e8d57")


def _is_philox_mul(ins: Instr) -> bool:
    return classify(ins) == "int-mul" and any(m in ins.operands.lower() for m in _PHILOX_MULS)


def main_path(instrs: list[Instr], runtime_flags: bool = False) -> list[Instr]:
    """The entry-to-EXIT path chosen by the rules in the module docstring."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    sys.setrecursionlimit(max(10000, 4 * len(instrs)))
    memo: dict[int, Optional[tuple]] = {}
    on_stack: set[int] = set()

    def best(i: int) -> Optional[tuple]:
        """(score, next index or None) of the best path from instruction i, None if none."""
        if i in memo:
            return memo[i]
        if i in on_stack or i >= len(instrs):
            return None  # a back edge or falling off the end
        on_stack.add(i)
        ins = instrs[i]
        b = ins.base
        succ: list[Optional[int]] = []  # None: the path ends here
        if b == "CALL":
            succ = []
        elif b == "EXIT":
            succ = [None] + ([i + 1] if ins.pred else [])
        elif b in ("BRA", "JMP"):
            target = int(ins.operands.split(",")[-1].strip().split()[0], 16)
            succ = [index[target]] + ([i + 1] if ins.pred else [])
        elif b in ("RET", "BRX"):
            succ = []
        else:
            succ = [i + 1]
        own = (int(_is_vector(ins)), int(runtime_flags and _is_philox_mul(ins)), -1)
        result = None
        for s in succ:
            if s is None:
                cand = (own, None)
            else:
                sub = best(s)
                if sub is None:
                    continue
                cand = (tuple(a + c for a, c in zip(own, sub[0])), s)
            if result is None or cand[0] > result[0]:
                result = cand
        on_stack.discard(i)
        memo[i] = result
        return result

    # Deep kernels: fill the memo from the end so the recursion stays shallow.
    for i in range(len(instrs) - 1, -1, -1):
        best(i)
    path, i = [], 0
    if best(0) is None:
        raise RuntimeError("no entry-to-EXIT path without a subroutine call")
    while i is not None:
        path.append(instrs[i])
        i = memo[i][1]
    return path


def count(path: list[Instr], elements: int) -> dict:
    by_class = Counter(classify(ins) for ins in path)
    return {
        "instructions_per_element": round(len(path) / elements, 2),
        "by_class_per_element": {c: round(by_class.get(c, 0) / elements, 2) for c in CLASSES},
        "global_bytes_per_element": round(sum(_mem_bytes(ins) for ins in path) / elements, 2),
        "path_instructions": len(path),
        "elements_per_thread": elements,
    }


def roofline(instr_per_element: float, nominal_bytes: int) -> dict:
    out = {}
    for gpu, bw in BANDWIDTH.items():
        budget = SMS * ISSUE_PER_SM * CLOCK_HZ * nominal_bytes / bw
        out[gpu] = {"budget": round(budget, 1), "fraction_of_floor": round(min(1.0, budget / instr_per_element), 3)}
    return out


# ---- tools -----------------------------------------------------------------------------------------
def _triton_bin() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return d if os.path.isdir(d) else None


def find_tool(name: str) -> Optional[str]:
    """cuobjdump / nvdisasm: the CUDA toolkit's, else the copy inside the triton wheel."""
    found = shutil.which(name)
    if found:
        return found
    d = _triton_bin()
    if d and os.path.exists(os.path.join(d, name)):
        return os.path.join(d, name)
    return None


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME")
    path = os.path.join(home, "bin", "nvcc") if home else None
    return path if path and os.path.exists(path) else None


def disassemble(cubin: str, function: Optional[str] = None) -> str:
    cmd = [find_tool("cuobjdump"), "-sass"] + (["-fun", function] if function else []) + [cubin]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: str) -> dict[str, dict]:
    """{mangled name: {"registers": R, "spill_bytes": local memory per thread}} from cuobjdump."""
    text = subprocess.run([find_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                          check=True).stdout
    out, name = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and name:
            out[name] = {"registers": int(m.group(1)), "spill_bytes": int(m.group(3)) + int(m.group(2))}
    return out


def _function_names(cubin: str) -> list[str]:
    text = subprocess.run([find_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return re.findall(r"Function : (\S+)", text)


# ---- CUDA --------------------------------------------------------------------------------------------
def nvcc_flags(root: str) -> list[str]:
    """setup.py's NVCC_FLAGS (read, not imported: importing it runs setup())."""
    tree = ast.parse(open(os.path.join(root, "setup.py")).read())
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "NVCC_FLAGS")


_FLAG_BITS = {"restore": 1, "noise": 2, "ahead": 4, "momentum": 8, "master": 16}  # StepFlags in the .cuh
_SIGN_BITS = {"restore": 32, "ahead": 64}  # kRestoreSigns, kAheadSigns: that perturbation is Rademacher


def _cuda_type(v: Variant) -> tuple[str, str]:
    s = {"float32": "float", "bfloat16": "c10::BFloat16"}[v.dtype]
    return s, "float" if v.master or v.dtype == "float32" else s


def _flags(v: Variant) -> int:
    signs = sum(bit for name, bit in _SIGN_BITS.items() if v.rademacher and getattr(v, name))
    return signs + sum(bit for name, bit in _FLAG_BITS.items() if getattr(v, name, False))


def compile_cuda(root: str, workdir: str, variants=VARIANTS, arch: int = 90) -> str:
    """The fused step kernels of csrc/fsgld_cuda_kernels.cuh -> an sm_90 cubin, compiled with the
    flags the extension build uses. A small translation unit instantiates only the counted
    variants (a template kernel's SASS does not depend on the file that instantiates it), which
    takes seconds instead of compiling all 72 step kernels of csrc/fsgld_cuda.cu; a checkout
    whose kernels are not templated on the flags (--source before issue 13) gets the whole file."""
    from torch.utils.cpp_extension import include_paths

    # A CPU-only torch wheel ships every c10/cuda header but the one its CUDA build generates.
    shim = os.path.join(workdir, "shim", "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    kernels = ", ".join("(const void*)&fused_step_kernel<{}, {}, {}u>".format(*_cuda_type(v), _flags(v))
                        for v in variants)
    tu = os.path.join(workdir, "sass_kernels.cu")
    with open(tu, "w") as f:
        f.write('#include "fsgld_cuda_kernels.cuh"\n'
                f"namespace fsgld::cuda_kernels {{ const void* sass_kernels[] = {{{kernels}}}; }}\n")
    cubin = os.path.join(workdir, f"fsgld_cuda.sm_{arch}.cubin")
    base = [find_nvcc(), "-std=c++20", *nvcc_flags(root), "-cubin", f"-arch=sm_{arch}", "-o", cubin]
    base += [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(workdir, 'shim')}",
                                                    f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(root, 'csrc')}"]
    # what torch's CUDAExtension adds
    base += ["--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    res = subprocess.run(base + [tu], capture_output=True, text=True)
    if res.returncode != 0:
        res = subprocess.run(base + [os.path.join(root, "csrc", "fsgld_cuda.cu")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError("nvcc failed:\n" + res.stderr[-4000:])
    return cubin


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    return dict(zip(names, res.stdout.splitlines()))


def _read_constant(root: str, name: str) -> int:
    text = open(os.path.join(root, "csrc", "fsgld_cuda_kernels.cuh")).read()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


def cuda_kernel_for(variant: Variant, demangled: dict[str, str]) -> Optional[str]:
    """The mangled name of the fused step kernel instantiation that runs `variant`: matched on its
    template flags (fused_step_kernel<S, B, Flags>), or the one kernel of its types whose flags are
    runtime arguments (fused_step_kernel<S, B>, before issue 13)."""
    s, b = _cuda_type(variant)
    for mangled, name in demangled.items():
        m = re.search(r"fused_step_kernel<([^,<>]+), ([^,<>]+)(?:, (\d+)u?)?>", name)
        if m and m.group(1).strip() == s and m.group(2).strip() == b:
            if m.group(3) is None or int(m.group(3)) == _flags(variant):
                return mangled
    return None


def count_cuda(root: str, workdir: str, variants=VARIANTS) -> list[dict]:
    cubin = compile_cuda(root, workdir, variants)
    names = _function_names(cubin)
    demangled = _demangle(names)
    usage = resource_usage(cubin)
    elements = 4 * _read_constant(root, "kBlocksPerThread")
    rows = []
    for v in variants:
        fn = cuda_kernel_for(v, demangled)
        if fn is None:
            continue
        runtime_flags = re.search(r"fused_step_kernel<[^<>]*, \d+u?>", demangled[fn]) is None
        path = main_path(parse_sass(disassemble(cubin, fn)), runtime_flags)
        rows.append(_row("cuda", v, demangled[fn], count(path, elements), usage.get(fn, {})))
    return rows


# ---- Triton ------------------------------------------------------------------------------------------
# Argument types as the launch code passes them. Names absent here are constexprs.
TRITON_TYPES = {
    "chunk_tensor_ptr": "*i32", "chunk_index_ptr": "*i32", "numel_ptr": "*i64", "offset_ptr": "*i64",
    "pid_ptr": "*i64", "param_addr": "*i64", "grad_addr": "*i64", "buf_addr": "*i64", "master_addr": "*i64",
    "seed": "u64", "step": "i64", "lr": "fp32", "weight_decay": "fp32", "momentum": "fp32", "noise_std": "fp32",
    "restore_sigma": "fp32", "perturb_sigma": "fp32", "sigma": "fp32", "grad_scale_ptr": "*fp32",
    "found_inf_ptr": "*fp32", "step_ptr": "*i64", "lr_ptr": "*fp32",
}  # fmt: skip
TRITON_CONFIGS = ((256, 4), (1024, 8))  # (BLOCK, num_warps): the smallest and the usual winner


def _load_triton_ops(root: str):
    """kernels/triton_ops.py of `root`, decorated for the compiler (not the interpreter)."""
    os.environ.pop("TRITON_INTERPRET", None)
    path = os.path.join(root, "kernels", "triton_ops.py")
    installed = os.path.join(ROOT, "kernels", "triton_ops.py")
    if os.path.realpath(path) == os.path.realpath(installed):
        from .kernels import triton_ops

        return triton_ops
    spec = importlib.util.spec_from_file_location("fsgld_fused.kernels._sass_triton_ops", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "fsgld_fused.kernels"
    spec.loader.exec_module(mod)
    return mod


def _triton_constexprs(K, v: Variant, block: int) -> dict:
    import inspect

    import triton.language as tl

    p = {"float32": tl.float32, "bfloat16": tl.bfloat16}[v.dtype]
    values = dict(P_DTYPE=p, B_DTYPE=tl.float32 if v.master else p, P_SOFT=False, B_SOFT=False, HAS_STEP_T=False,
                  HAS_LR_T=False, HAS_MASTER=v.master, HAS_MOMENTUM=False, HAS_SCALE=False, HAS_FOUND_INF=False,
                  RESTORE=v.restore, NOISE=v.noise, AHEAD=v.ahead, WEIGHT_DECAY=True, BLOCK=block,
                  RESTORE_SIGNS=v.rademacher and v.restore, AHEAD_SIGNS=v.rademacher and v.ahead)
    names = inspect.signature(K._fused_step_kernel.fn).parameters
    return {k: val for k, val in values.items() if k in names}


def count_triton(root: str, workdir: str, variants=VARIANTS) -> list[dict]:
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ["TRITON_CACHE_DIR"] = os.path.join(workdir, "triton-cache")
    K = _load_triton_ops(root)
    fn = K._fused_step_kernel
    names = list(inspect.signature(fn.fn).parameters)
    rows = []
    for v in variants:
        for block, warps in TRITON_CONFIGS:
            constexprs = _triton_constexprs(K, v, block)
            sig = {n: ("constexpr" if n in constexprs else TRITON_TYPES[n]) for n in names}
            src = ASTSource(fn=fn, signature=sig,
                            constexprs={(names.index(k),): val for k, val in constexprs.items()})
            k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": warps, "enable_fp_fusion": False})
            cubin = os.path.join(workdir, f"triton_{v.dtype}_{v.master}_{v.name}_{block}.cubin")
            with open(cubin, "wb") as f:
                f.write(k.asm["cubin"])
            usage = next(iter(resource_usage(cubin).values()), {})
            path = main_path(parse_sass(disassemble(cubin)))
            elements = 4 * block // (32 * warps)
            rows.append(_row("triton", v, f"_fused_step_kernel BLOCK={block} num_warps={warps}",
                             count(path, elements), usage, block=block))
    return rows


def _row(backend: str, v: Variant, kernel: str, counts: dict, usage: dict, block: Optional[int] = None) -> dict:
    row = {"backend": backend, "dtype": v.dtype, "master_weights": v.master, "variant": v.name, "kernel": kernel}
    if block is not None:
        row["block"] = block
    row.update(counts)
    row["registers"] = usage.get("registers")
    row["spill_bytes"] = usage.get("spill_bytes")
    row["nominal_bytes_per_element"] = v.nominal_bytes
    row["roofline"] = roofline(counts["instructions_per_element"], v.nominal_bytes)
    return row


# ---- CLI ---------------------------------------------------------------------------------------------
MODEL = (
    "Roofline: budget = 132 SMs x 128 issue slots/clock x 1.98 GHz x bytes / copy bandwidth "
    "(H100 3.0 TB/s, H200 4.3 TB/s): 134 / 93 instructions per element at 12 B. Predicted fraction "
    "of the memory floor = min(1, budget / instructions per element). Static SASS counts along the "
    "main path (interior, aligned chunk; see `pydoc fsgld_fused.sass`), not GPU timings."
)


def collect(root: str, backends: list[str], variants=VARIANTS) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    with tempfile.TemporaryDirectory(prefix="fsgld-sass-") as work:
        if find_tool("cuobjdump") is None:
            return [], ["cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)"]
        if "cuda" in backends:
            if find_nvcc() is None:
                skipped.append("cuda: nvcc not found")
            else:
                rows += count_cuda(root, work, variants)
        if "triton" in backends:
            try:
                from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
            except ImportError:
                skipped.append("triton: its NVIDIA backend is not installed")
            else:
                rows += count_triton(root, work, variants)
    return rows, skipped


def print_table(rows: list[dict], out=sys.stdout) -> None:
    head = (f"{'backend':7s} {'variant':38s} {'instr/elem':>10s}  " + " ".join(f"{c:>7s}" for c in CLASSES)
            + f" {'B/elem':>6s} {'regs':>4s} {'spill':>5s} {'H100':>5s} {'H200':>5s}")
    print(head, file=out)
    for r in rows:
        label = f"{r['dtype']}{'+master' if r['master_weights'] else ''} {r['variant']}"
        if "block" in r:
            label += f" B{r['block']}"
        cls = " ".join(f"{r['by_class_per_element'][c]:7.1f}" for c in CLASSES)
        fr = r["roofline"]
        print(f"{r['backend']:7s} {label:38s} {r['instructions_per_element']:10.1f}  {cls} "
              f"{r['global_bytes_per_element']:6.2f} {r['registers'] or 0:4d} {r['spill_bytes'] or 0:5d} "
              f"{fr['H100']['fraction_of_floor']:5.0%} {fr['H200']['fraction_of_floor']:5.0%}", file=out)


BACKENDS = ("cuda", "triton")


def _backend_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(BACKENDS)} (comma-separated)")
    return names


def _source_tree(text: str) -> str:
    root = os.path.abspath(text)
    for need in ("setup.py", os.path.join("csrc", "fsgld_cuda_kernels.cuh")):
        if not os.path.isfile(os.path.join(root, need)):
            raise argparse.ArgumentTypeError(f"{text}: not an fsgld-fused checkout (no {need})")
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from . import _cli

    parser.add_argument("--json", metavar="FILE", type=_cli.output_file,
                        help="also write the counts as JSON (a regular file or a new one)")
    parser.add_argument("--backends", type=_backend_list, default="cuda,triton", help="comma-separated: cuda, triton")
    parser.add_argument("--dtype", choices=sorted({v.dtype for v in VARIANTS}), help="count only this param dtype")
    parser.add_argument("--variant", choices=sorted({v.name for v in VARIANTS}), help="count only this variant")
    parser.add_argument("--source", type=_source_tree, default=ROOT, metavar="DIR",
                        help="a checkout to count (default: this one), e.g. an older commit for before/after")


def main(args: argparse.Namespace) -> int:
    from . import _cli

    variants = [v for v in VARIANTS if args.dtype in (None, v.dtype) and args.variant in (None, v.name)]
    rows, skipped = collect(os.path.abspath(args.source), args.backends, variants)
    print(MODEL)
    print()
    print_table(rows)
    for s in skipped:
        print(f"skipped: {s}")
    if args.json:
        _cli.replace_file(args.json, json.dumps({"model": MODEL, "kernels": rows, "skipped": skipped}, indent=1))
    if not rows:
        print("sass: nothing counted" + (" (see the skipped lines above)" if skipped else ""), file=sys.stderr)
    return 0 if rows else 1
