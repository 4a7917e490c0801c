"""`python -m fsgld_fused sass`: static SASS instruction counts of the step kernels on sm_90.

The fused step draws three normals per element and is compute-bound on Hopper unless its
instruction count per element stays under the budget at the memory floor. This compiles the sm_90
cubins without a GPU (CUDA: nvcc with setup.py's NVCC_FLAGS and the flags torch's CUDAExtension
adds; Triton: `triton.compile` for `GPUTarget("cuda", 90, 32)` with the launch code's constexprs,
at every (BLOCK, num_warps) the launcher tunes over), disassembles them with `cuobjdump`, and
counts the instructions a warp issues along a path of the kernel, divided by the elements one
thread handles: CUDA 4 * kBlocksPerThread, Triton 4 * BLOCK / (32 * num_warps), both from the
launch configuration (the 16-byte accesses on a path then move exactly 12 bytes per fp32 element,
which the tests check).

What is counted: the configuration a default FSGLD launches (Langevin noise on, weight decay 0, no
grad scaler, no capturable tensors; CONFIGS) and the same with weight decay, the same for both
backends. Triton takes these as constexprs. CUDA takes the scalars as kernel arguments: a branch
whose predicate compares one of them (or a null pointer) with zero goes the way the configuration
sends it, the field's constant-bank offset read from a probe kernel compiled with the counted ones.

How a path is walked (`walk`). The SASS is a graph split at branches; loops are unrolled, CALLs
(the slow paths of IEEE sqrt and division) end a path as invalid, `@P EXIT` may be taken or not.
A branch whose predicate may differ between the lanes of a warp (a forward taint of SR_TID /
SR_LANEID, shuffles and loads through such addresses; the uniform datapath never is) is issued on
both sides up to where they join, as the warp issues it. Other branches go one way, ranked by the
path's kind (KEYS):
  interior   the most vector global accesses (LDG/STG of 64 or 128 bits), then the fewest
             instructions: the block-uniform interior of an aligned chunk;
  tail       an aligned tensor's edge chunk: the most vector accesses, then the most lane-dependent
             branches (the bounds checks of the edge loop), then the most Philox multiplies;
  unaligned  every element loaded and stored, by scalar accesses, every block drawn.
Triton's edge programs are one masked path (scalar accesses): its tail and unaligned rows are the
same walk. The edge rows count a warp whose lanes agree on the bounds checks (the bulk of an edge
chunk); the warp straddling a tensor's end issues both sides once.

A real model (`weighted`): the benchmark's transformer layout (66.4M params in 96 tensors), whole
and as FSDP2 shards over 8 ranks, each chunk counted at its path's figure.

Classes: int-mul (IMAD/IMUL products; the IMAD.MOV/SHL/IADD forms are moves and count as alu),
alu (integer add, logic, shifts, compares, selects, moves), fp32 (F*, HFMA2 used as a move, and
the I2F/F2I conversions), mufu (MUFU.RSQ seeds the sqrt's Newton step: one per pair of normals),
memory (global, shared, constant and local loads and stores), control (branches, EXIT,
convergence barriers), uniform (the U* datapath, S2UR, R2UR).

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
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
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
    stochastic: bool = False  # bf16 without masters rounded stochastically (SPEC 2c)


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
    Variant("gaussian-full", "bfloat16", False, True, True, True, 6, stochastic=True),
    Variant("rademacher-full", "bfloat16", False, True, True, True, 6, rademacher=True, stochastic=True),
)


# ---- SASS parsing and the path walk -----------------------------------------------------------------
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

    @property
    def args(self) -> list[str]:
        return [a.strip() for a in self.operands.split(",")] if self.operands else []


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


# ---- which branches are lane-divergent: a forward taint of the thread index --------------------------
# Per-thread (vector) registers R0.. and predicates P0..P6; the uniform datapath (UR, UP) holds one
# value per warp by construction. A register is lane-varying if it may hold a value computed from
# the thread or lane index (S2R SR_TID / SR_LANEID), a shuffle, or a load through such an address.
_REG = re.compile(r"(?<![A-Za-z0-9_])(R\d+|P[0-6])(?:\.(64|128))?(?![0-9])")
_NO_DEST = ("STG", "ST", "STS", "STL", "RED", "BRA", "BRX", "JMP", "EXIT", "CALL", "RET", "BSSY", "BSYNC",
            "WARPSYNC", "BAR", "NOP", "YIELD", "BPT")


def _reg_bits(operand: str, width: int = 1) -> int:
    bits = 0
    for name, suffix in _REG.findall(operand):
        w = {"64": 2, "128": 4}.get(suffix, width)
        if name[0] == "R":
            for k in range(w):
                bits |= 1 << (int(name[1:]) + k)
        else:
            bits |= 1 << (256 + int(name[1:]))
    return bits


def _dests_and_sources(ins: Instr) -> tuple[int, int]:
    """Bit masks (R0..R255 -> bits 0..255, P0..P6 -> 256..262) of registers written and read."""
    args = ins.args
    if ins.base in _NO_DEST or not args:
        return 0, sum(_reg_bits(a) for a in args)
    width = 4 if ".128" in ins.op else 2 if (".64" in ins.op or ".WIDE" in ins.op) else 1
    n_dest = 1
    if re.fullmatch(r"P[0-6T]", args[0]):  # ISETP/FSETP/PLOP3 P, P, ...; LOP3 P, R, ...; SHFL P, R, ...
        n_dest = 2
    elif len(args) > 1 and re.fullmatch(r"P[0-6T]", args[1]):  # a carry out: IADD3 R, P, ...; LEA R, P, ...
        n_dest = 2
    dests = sum(_reg_bits(a, width) for a in args[:n_dest])
    sources = sum(_reg_bits(a) for a in args[n_dest:])
    return dests, sources


def _guard(ins: Instr) -> Optional[str]:
    """The predicate register a conditional BRA / EXIT depends on (None: unconditional or uniform)."""
    if ins.pred and ins.pred.lstrip("@!").startswith("P"):
        return ins.pred.lstrip("@!")
    return None


def _successors(instrs: list[Instr], index: dict[int, int], i: int) -> list[Optional[int]]:
    """Next instructions of i (None: the path ends at an EXIT). CALL ends a path as invalid (no
    successor): the slow paths of IEEE sqrt / division."""
    ins = instrs[i]
    b = ins.base
    if b in ("CALL", "RET", "BRX"):
        return []
    conditional = ins.pred is not None or any(re.fullmatch(r"!?U?P[0-6]", a) for a in ins.args[:-1])
    if b == "EXIT":
        return [None] + ([i + 1] if conditional and i + 1 < len(instrs) else [])
    if b in ("BRA", "JMP"):
        target = int(ins.args[-1].split()[0], 16)
        return [index[target]] + ([i + 1] if conditional and i + 1 < len(instrs) else [])
    return [i + 1] if i + 1 < len(instrs) else []


def divergent_branches(instrs: list[Instr]) -> set[int]:
    """Indices of conditional branches / EXITs whose predicate may differ between the lanes of a warp."""
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    state = [0] * len(instrs)
    out_set = set()
    for i, ins in enumerate(instrs):
        s = state[i]
        dests, sources = _dests_and_sources(ins)
        guard = _guard(ins)
        guard_bits = _reg_bits(guard) if guard else 0
        varying = bool(s & sources) or bool(s & guard_bits) or ins.base == "SHFL" or (
            ins.base in ("S2R", "CS2R") and re.search(r"SR_(TID|LANEID|LTMASK|LEMASK|GTMASK|GEMASK)", ins.operands))
        if ins.base in ("BRA", "EXIT") and ((s & guard_bits) or (s & sources)):
            out_set.add(i)
        out = s if ins.pred else s & ~dests
        if varying:
            out |= dests
        for nxt in _successors(instrs, index, i):
            if nxt is not None and nxt > i:  # loops are unrolled: back edges are not followed
                state[nxt] |= out
    return out_set


def _post_dominators(instrs: list[Instr], index: dict[int, int]) -> list[Optional[int]]:
    """The nearest instruction that every path from i to an EXIT passes (None: only the EXIT)."""
    n = len(instrs)
    pd = [0] * n
    ipdom: list[Optional[int]] = [None] * n
    for i in range(n - 1, -1, -1):
        succ = _successors(instrs, index, i)
        inter = None
        if succ and None not in succ:
            for s in succ:
                if s <= i:
                    continue
                inter = pd[s] if inter is None else inter & pd[s]
        inter = inter or 0
        pd[i] = inter | (1 << i)
        rest = inter >> (i + 1)
        ipdom[i] = i + 1 + ((rest & -rest).bit_length() - 1) if rest else None
    return ipdom


# ---- resolving uniform branches on the kernel's scalar arguments -------------------------------------
_CONST = re.compile(r"c\[0x0\]\[(0x[0-9a-f]+)\]")


def _writer(instrs: list[Instr], j: int, reg: str) -> Optional[int]:
    """The last instruction before j (in address order) that writes `reg` (R3, UR4, P0)."""
    pat = re.compile(rf"(?<![A-Za-z0-9_]){reg}(?![0-9])")
    for k in range(j - 1, -1, -1):
        ins = instrs[k]
        if ins.base in _NO_DEST or not ins.args:
            continue
        args = ins.args
        n_dest = 2 if (re.fullmatch(r"U?P[0-6T]", args[0]) or
                       (len(args) > 1 and re.fullmatch(r"U?P[0-6T]", args[1]))) else 1
        if any(pat.match(a) for a in args[:n_dest]):
            return k
        wide = re.fullmatch(r"(U?R)(\d+)", args[0])
        m = re.fullmatch(r"(U?R)(\d+)", reg)
        if wide and m and wide.group(1) == m.group(1) and ".64" in ins.op and int(m.group(2)) == int(wide.group(2)) + 1:
            return k
    return None


def _scalar_value(instrs: list[Instr], j: int, operand: str, scalars: dict[int, float]):
    """The value of `operand` at instruction j if it is zero or a known kernel scalar, else None."""
    operand = operand.strip()
    if operand in ("RZ", "URZ"):
        return 0
    m = _CONST.fullmatch(operand)
    if m:
        return scalars.get(int(m.group(1), 16))
    m = re.fullmatch(r"(U?R\d+)", operand)
    if not m:
        return None
    k = _writer(instrs, j, operand)
    if k is None:
        return None
    src = instrs[k]
    if src.base not in ("ULDC", "LDC", "MOV", "UMOV", "IMAD") or (src.base == "IMAD" and "MOV" not in src.op):
        return None
    c = _CONST.search(src.operands)
    if not c:
        return None
    off = int(c.group(1), 16)
    if src.args[0] != operand:  # the high word of a .64 load
        off += 4
    return scalars.get(off)


def _predicate_value(instrs: list[Instr], j: int, pred: str, scalars: dict[int, float], depth: int = 0):
    """True / False if predicate `pred` at j is a comparison of known scalars with zero, else None."""
    if pred == "PT":
        return True
    if depth > 4:
        return None
    k = _writer(instrs, j, pred)
    if k is None:
        return None
    ins = instrs[k]
    args = ins.args
    if ins.base not in ("FSETP", "ISETP") or args[0] != pred or len(args) < 5:
        return None
    a, b = _scalar_value(instrs, k, args[2], scalars), _scalar_value(instrs, k, args[3], scalars)
    if a is None or b is None:
        return None
    cmp = ins.op.split(".")[1]
    if cmp not in ("NE", "NEU", "EQ"):
        return None
    v = (a != b) if cmp != "EQ" else (a == b)

    def operand_predicate(p: str):
        if p in ("PT", "!PT"):
            return p == "PT"
        c = _predicate_value(instrs, k, p.lstrip("!"), scalars, depth + 1)
        return None if c is None else c != p.startswith("!")

    if ".EX" in ins.op:  # the high words of a 64-bit compare; the low words' result comes last
        if len(args) < 6 or (lo := operand_predicate(args[5])) is None:
            return None
        v = (v or lo) if cmp != "EQ" else (v and lo)
    c = operand_predicate(args[4])
    if c is None:
        return None
    return (v or c) if ".OR" in ins.op else (v != c) if ".XOR" in ins.op else (v and c)


def _resolved(instrs: list[Instr], i: int, scalars: dict[int, float]) -> Optional[bool]:
    """Whether the conditional BRA / EXIT at i is taken under `scalars` (None: not decidable)."""
    ins = instrs[i]
    guard = _guard(ins)
    if not scalars or guard is None or any(re.fullmatch(r"!?U?P[0-6]", a) for a in ins.args[:-1]):
        return None
    v = _predicate_value(instrs, i, guard, scalars)
    return None if v is None else v != ins.pred.startswith("@!")


# ---- the walk ----------------------------------------------------------------------------------------
# What a path adds up: vector accesses, Philox multiplies, lane-divergent branches, global bytes,
# instructions. A walk ranks paths by a key over these sums (lexicographic, so best paths compose).
_V, _M, _T, _G, _N = range(5)
KEYS = {
    # interior: every element moved by vector accesses, then the fewest instructions
    "interior": lambda t: (t[_V], -t[_N]),
    # interior of a kernel whose flags are runtime branches (before issue 13): every stream drawn
    "interior-runtime-flags": lambda t: (t[_V], t[_M], -t[_N]),
    # an aligned tensor's edge chunk: vector accesses in the bounds-checked loop (its checks are the
    # lane-dependent branches), every block drawn, then the fewest instructions
    "tail": lambda t: (t[_V], t[_T], t[_M], -t[_N]),
    # unaligned storage or offset: every element loaded and stored, without vector accesses, every
    # block drawn, then the fewest instructions
    "unaligned": lambda t: (t[_G], -t[_V], t[_M], -t[_N]),
}


def walk(instrs: list[Instr], key: str = "interior", scalars: Optional[dict[int, float]] = None,
         union: Optional[bool] = None) -> list[Instr]:
    """The entry-to-EXIT path one thread's warp issues (see the module docstring).

    `scalars`: {constant-bank offset: value} of the kernel's scalar arguments in the configuration
    counted; a branch on a comparison of those with zero goes the way the configuration sends it.
    `union` (default: on for the interior): a lane-divergent branch issues both of its sides, up to
    where they join (the warp runs each side with the other lanes masked)."""
    rank = KEYS[key]
    union = key.startswith("interior") if union is None else union
    index = {ins.addr: i for i, ins in enumerate(instrs)}
    divergent = divergent_branches(instrs)
    ipdom = _post_dominators(instrs, index) if union else []
    scalars = scalars or {}
    own = [(int(_is_vector(ins)), int(_is_philox_mul(ins)), int(i in divergent), _mem_bytes(ins), 1)
           for i, ins in enumerate(instrs)]
    memo: dict[tuple, Optional[tuple]] = {}

    def add(*ts):
        return tuple(sum(x) for x in zip(*ts))

    def best(i: Optional[int], stop: Optional[int]):
        """(sums, plan) of the best path from i to `stop` (not included) or to an EXIT."""
        if i == stop:
            return ((0,) * 5, None)
        if i is None:
            return None if stop is not None else ((0,) * 5, None)
        key_ = (i, stop)
        if key_ in memo:
            return memo[key_]
        memo[key_] = None  # a back edge (or a cycle) is no path
        succ = _successors(instrs, index, i)
        taken = _resolved(instrs, i, scalars) if len(succ) == 2 else None
        if taken is not None:
            succ = [succ[0]] if taken else [succ[1]]
        mine = own[i]
        result = None
        if union and i in divergent and len(succ) == 2:
            join = ipdom[i]
            if stop is not None and (join is None or join > stop):
                join = stop
            sides = [best(s, join) for s in succ]
            rest = best(join, stop) if join is not None else ((0,) * 5, None)
            if all(x is not None for x in sides) and rest is not None:
                result = (add(mine, sides[0][0], sides[1][0], rest[0]), ("union", succ, join))
        else:
            for s in succ:
                if s is not None and s <= i:
                    continue
                sub = best(s, stop)
                if sub is None:
                    continue
                cand = (add(mine, sub[0]), ("next", s))
                if result is None or rank(cand[0]) > rank(result[0]):
                    result = cand
        memo[key_] = result
        return result

    # fill the memo from the end so that the recursion stays shallow
    for i in range(len(instrs) - 1, -1, -1):
        best(i, None)
    if best(0, None) is None:
        raise RuntimeError("no entry-to-EXIT path without a subroutine call")

    path: list[Instr] = []
    todo: list[tuple[Optional[int], Optional[int]]] = [(0, None)]
    while todo:
        i, stop = todo.pop()
        while i is not None and i != stop:
            path.append(instrs[i])
            _, plan = memo[(i, stop)]
            if plan is None:
                break
            if plan[0] == "next":
                i = plan[1]
            else:
                _, (a, b), join = plan
                todo.append((join, stop))
                todo.append((b, join))
                todo.append((a, join))
                break
    return path


def main_path(instrs: list[Instr], runtime_flags: bool = False) -> list[Instr]:
    """The interior path (kept for --source counts of older checkouts)."""
    return walk(instrs, "interior-runtime-flags" if runtime_flags else "interior")


def count(path: list[Instr], elements: int) -> dict:
    by_class = Counter(classify(ins) for ins in path)
    return {
        "instructions_per_element": round(len(path) / elements, 2),
        "by_class_per_element": {c: round(by_class.get(c, 0) / elements, 2) for c in CLASSES},
        "global_bytes_per_element": round(sum(_mem_bytes(ins) for ins in path) / elements, 2),
        # the element data moved 16 bytes at a time: 12 for an fp32 step at 4 elements per access,
        # so a wrong elements-per-thread shows here (the launch configuration's, not the SASS's)
        "bytes_128_per_element": round(sum(_mem_bytes(ins) for ins in path if ".128" in ins.op) / elements, 3),
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


_FLAG_BITS = {"restore": 1, "noise": 2, "ahead": 4, "momentum": 8, "master": 16, "stochastic": 128}  # StepFlags
_SIGN_BITS = {"restore": 32, "ahead": 64}  # kRestoreSigns, kAheadSigns: that perturbation is Rademacher


def _cuda_type(v: Variant) -> tuple[str, str]:
    s = {"float32": "float", "bfloat16": "c10::BFloat16"}[v.dtype]
    return s, "float" if v.master or v.dtype == "float32" else s


def _flags(v: Variant) -> int:
    signs = sum(bit for name, bit in _SIGN_BITS.items() if v.rademacher and getattr(v, name))
    return signs + sum(bit for name, bit in _FLAG_BITS.items() if getattr(v, name, False))


# The configuration a row counts: what FSGLD's defaults launch (Langevin noise on, weight decay 0,
# no grad scaler, no capturable tensors, momentum 0), and the same with weight decay. CUDA takes
# these as kernel scalars (its uniform branches on them are resolved, see `walk`); Triton as
# constexprs. Values only matter as zero / nonzero; pointers as null / not null.
CONFIGS = {
    "default": dict(lr=1e-3, weight_decay=0.0, momentum=0.0, noise_std=1e-4, restore_sigma=1e-2, perturb_sigma=1e-2,
                    sigma=1e-2, grad_scale=None, found_inf=None, step_t=None, lr_t=None),
    "weight-decay": dict(lr=1e-3, weight_decay=5e-4, momentum=0.0, noise_std=1e-4, restore_sigma=1e-2,
                         perturb_sigma=1e-2, sigma=1e-2, grad_scale=None, found_inf=None, step_t=None, lr_t=None),
}
# Rows counted beyond the default interior of every variant: (variant name, dtype, master).
FOCUS = (("gaussian-full", "float32", False), ("rademacher-full", "float32", False))


def _scalar_fields(root: str) -> list[str]:
    """The members of `struct Scalars` in the kernel header that CONFIGS sets."""
    text = open(os.path.join(root, "csrc", "fsgld_cuda_kernels.cuh")).read()
    m = re.search(r"struct Scalars \{(.*?)\};", text, re.S)
    names = set(re.findall(r"(\w+)\s*[,;]", re.sub(r"//[^\n]*", "", m.group(1)))) if m else set()
    return [f for f in CONFIGS["default"] if f in names]


def compile_cuda(root: str, workdir: str, variants=VARIANTS, arch: int = 90) -> str:
    """The fused step kernels of csrc/fsgld_cuda_kernels.cuh -> an sm_90 cubin, compiled with the
    flags the extension build uses. A small translation unit instantiates only the counted
    variants (a template kernel's SASS does not depend on the file that instantiates it), plus one
    probe kernel per scalar argument (`sass_probe_<field>`: a branch on that field alone, whose
    SASS names the field's constant-bank offset). A checkout whose kernels are not templated on
    the flags (--source before issue 13) gets its .cu files compiled whole."""
    from torch.utils.cpp_extension import include_paths

    # A CPU-only torch wheel ships every c10/cuda header but the one its CUDA build generates.
    shim = os.path.join(workdir, "shim", "c10", "cuda", "impl")
    os.makedirs(shim, exist_ok=True)
    with open(os.path.join(shim, "cuda_cmake_macros.h"), "w") as f:
        f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    kernels = ", ".join("(const void*)&fused_step_kernel<{}, {}, {}u>".format(*_cuda_type(v), _flags(v))
                        for v in variants)
    probes = "".join(f"__global__ void sass_probe_{f}(const __grid_constant__ TensorTable tab, const Scalars sc) "
                     f'{{ if (sc.{f}) asm volatile("trap;"); }}\n' for f in _scalar_fields(root))
    tu = os.path.join(workdir, "sass_kernels.cu")
    with open(tu, "w") as f:
        f.write('#include "fsgld_cuda_kernels.cuh"\n'
                f"namespace fsgld::cuda_kernels {{ const void* sass_kernels[] = {{{kernels}}};\n{probes}}}\n")
    cubin = os.path.join(workdir, f"fsgld_cuda.sm_{arch}.cubin")
    base = [find_nvcc(), "-std=c++20", *nvcc_flags(root), "-cubin", f"-arch=sm_{arch}", "-o", cubin]
    base += [f"-I{p}" for p in include_paths()] + [f"-I{os.path.join(workdir, 'shim')}",
                                                    f"-I{sysconfig.get_paths()['include']}", f"-I{os.path.join(root, 'csrc')}"]
    # what torch's CUDAExtension adds
    base += ["--expt-relaxed-constexpr", "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
             "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
    res = subprocess.run(base + [tu], capture_output=True, text=True)
    if res.returncode != 0:  # an older checkout: its own translation units (the file layout may vary)
        for cu in sorted(glob.glob(os.path.join(root, "csrc", "*.cu"))):
            if "fused_step_kernel" in open(cu).read():
                res = subprocess.run(base + [cu], capture_output=True, text=True)
                break
    if res.returncode != 0:
        raise RuntimeError("nvcc failed:\n" + res.stderr[-4000:])
    return cubin


def scalar_offsets(cubin: str, names: list[str]) -> dict[str, int]:
    """{field: constant-bank offset} of the Scalars members, read from the probe kernels."""
    out = {}
    for mangled in names:
        m = re.search(r"sass_probe_(\w+?)E", mangled)
        if not m:
            continue
        offs = {int(x, 16) for x in _CONST.findall(disassemble(cubin, mangled))} - {0x28, 0x208}
        if len(offs) == 1:
            out[m.group(1)] = offs.pop()
    return out


def _scalars(config: dict, offsets: dict[str, int]) -> dict[int, float]:
    """{constant-bank offset: value} of a configuration: 32-bit scalars, and both words of a pointer."""
    out = {}
    for name, off in offsets.items():
        value = config[name]
        if name in ("grad_scale", "found_inf", "step_t", "lr_t"):
            out[off] = out[off + 4] = 0 if value is None else 1
        else:
            out[off] = value
    return out


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


def _walks(v: Variant, backend: str) -> list[tuple[str, str, str]]:
    """(path, config, walk key) rows of a variant: the default interior everywhere; for the focus
    variants also weight decay, the edge chunk of an aligned tensor and unaligned storage. Triton's
    edge is its masked path (scalar accesses), the same code for both."""
    rows = [("interior", "default", "interior")]
    if (v.name, v.dtype, v.master) in FOCUS:
        rows += [("interior", "weight-decay", "interior"),
                 ("tail", "default", "tail" if backend == "cuda" else "unaligned"),
                 ("unaligned", "default", "unaligned")]
    return rows


def _in_big_stack(fn, *args):
    """fn(*args) on a thread with a deep stack: the walk recurses along long straight-line code."""
    result, error = [], []

    def run():
        try:
            result.append(fn(*args))
        except BaseException as e:  # noqa: BLE001 - re-raised below
            error.append(e)

    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(200000)
    old_size = threading.stack_size(512 * 1024 * 1024)
    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        threading.stack_size(old_size)
        sys.setrecursionlimit(old_limit)
    if error:
        raise error[0]
    return result[0]


def count_cuda(root: str, workdir: str, variants=VARIANTS) -> list[dict]:
    cubin = compile_cuda(root, workdir, variants)
    names = _function_names(cubin)
    demangled = _demangle(names)
    usage = resource_usage(cubin)
    offsets = scalar_offsets(cubin, names)
    elements = 4 * _read_constant(root, "kBlocksPerThread")
    rows = []
    for v in variants:
        fn = cuda_kernel_for(v, demangled)
        if fn is None:
            continue
        runtime_flags = re.search(r"fused_step_kernel<[^<>]*, \d+u?>", demangled[fn]) is None
        instrs = parse_sass(disassemble(cubin, fn))
        divergent = {instrs[i].addr for i in divergent_branches(instrs)}
        for path_name, config, key in _walks(v, "cuda"):
            if runtime_flags and key == "interior":
                key = "interior-runtime-flags"
            path = _in_big_stack(walk, instrs, key, _scalars(CONFIGS[config], offsets))
            rows.append(_row("cuda", v, demangled[fn], count(path, elements), usage.get(fn, {}), path_name, config,
                             path, divergent))
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


def triton_configs(K) -> tuple[tuple[int, int], ...]:
    """(BLOCK, num_warps) the launcher may pick: every config it tunes over (kernels/triton_ops.py)."""
    return tuple(K._CONFIGS)


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


def _triton_constexprs(K, v: Variant, block: int, config: dict) -> dict:
    import inspect

    import triton.language as tl

    p = {"float32": tl.float32, "bfloat16": tl.bfloat16}[v.dtype]
    values = dict(P_DTYPE=p, B_DTYPE=tl.float32 if v.master else p, P_SOFT=False, B_SOFT=False,
                  HAS_STEP_T=config["step_t"] is not None, HAS_LR_T=config["lr_t"] is not None, HAS_MASTER=v.master,
                  HAS_MOMENTUM=config["momentum"] != 0.0, HAS_SCALE=config["grad_scale"] is not None,
                  HAS_FOUND_INF=config["found_inf"] is not None, RESTORE=v.restore, NOISE=v.noise, AHEAD=v.ahead,
                  WEIGHT_DECAY=config["weight_decay"] != 0.0, BLOCK=block,
                  RESTORE_SIGNS=v.rademacher and v.restore, AHEAD_SIGNS=v.rademacher and v.ahead,
                  STOCHASTIC=v.stochastic)
    names = inspect.signature(K._fused_step_kernel.fn).parameters
    return {k: val for k, val in values.items() if k in names}


def triton_elements_per_thread(block: int, warps: int) -> int:
    """Elements one thread handles: a program covers 4 * BLOCK elements with 32 * num_warps threads."""
    return 4 * block // (32 * warps)


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
        for block, warps in triton_configs(K):
            for config in dict.fromkeys(c for _, c, _ in _walks(v, "triton")):
                constexprs = _triton_constexprs(K, v, block, CONFIGS[config])
                sig = {n: ("constexpr" if n in constexprs else TRITON_TYPES[n]) for n in names}
                src = ASTSource(fn=fn, signature=sig,
                                constexprs={(names.index(k),): val for k, val in constexprs.items()})
                k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                   options={"num_warps": warps, "enable_fp_fusion": False})
                cubin = os.path.join(workdir,
                                     f"triton_{v.dtype}_{v.master}_{v.stochastic}_{v.name}_{block}_{config}.cubin")
                with open(cubin, "wb") as f:
                    f.write(k.asm["cubin"])
                usage = next(iter(resource_usage(cubin).values()), {})
                instrs = parse_sass(disassemble(cubin))
                divergent = {instrs[i].addr for i in divergent_branches(instrs)}
                for path_name, cfg, key in _walks(v, "triton"):
                    if cfg != config:
                        continue
                    path = _in_big_stack(walk, instrs, key)
                    rows.append(_row("triton", v, f"_fused_step_kernel BLOCK={block} num_warps={warps}",
                                     count(path, triton_elements_per_thread(block, warps)), usage, path_name, config,
                                     path, divergent, block=block, warps=warps))
    return rows


def _row(backend: str, v: Variant, kernel: str, counts: dict, usage: dict, path_name: str, config: str,
         path: list[Instr], divergent: set[int], block: Optional[int] = None, warps: Optional[int] = None) -> dict:
    row = {"backend": backend, "dtype": v.dtype, "master_weights": v.master, "stochastic": v.stochastic,
           "variant": v.name, "path": path_name, "config": config, "kernel": kernel}
    if block is not None:
        row["block"], row["num_warps"] = block, warps
    row.update(counts)
    # lane-dependent branches on the path (each issued both ways where `walk` unions them)
    row["divergent_branches"] = sum(1 for ins in path if ins.addr in divergent)
    row["registers"] = usage.get("registers")
    row["spill_bytes"] = usage.get("spill_bytes")
    row["nominal_bytes_per_element"] = v.nominal_bytes
    row["roofline"] = roofline(counts["instructions_per_element"], v.nominal_bytes)
    return row


# ---- a real model: weighted over the chunks of a layout ----------------------------------------------
def _cuda_chunks(n: int, off: int, signs: bool, chunk_blocks: int):
    """(elements, interior) of each CUDA block over a tensor (csrc/fsgld_cuda_kernels.cuh: chunks start
    at the first Philox block, or with signs at the first Rademacher block; the interior test)."""
    first_blk, last_blk = off >> 2, (off + n - 1) >> 2
    k = ((off >> 7) << 5) if signs else first_blk
    while k <= last_blk:
        elems = min(off + n, 4 * (k + chunk_blocks)) - max(off, 4 * k)
        interior = off % 4 == 0 and k >= first_blk and k + chunk_blocks - 1 < last_blk + ((off + n) % 4 == 0)
        yield elems, interior
        k += chunk_blocks


def _triton_chunks(n: int, off: int, signs: bool, block: int):
    """The same for Triton programs of 4 * BLOCK elements (kernels/triton_ops.py: _chunk, `inside`)."""
    k = ((off >> 7) << 5) if signs else off >> 2
    while k <= (off + n - 1) >> 2:
        first = 4 * k - off
        elems = min(n, first + 4 * block) - max(0, first)
        yield elems, off % 4 == 0 and first >= 0 and first + 4 * block <= n
        k += block


def model_layouts(total: int = 1 << 26, ranks: int = 8) -> dict[str, list[tuple[int, int]]]:
    """(numel, global offset) of the tensors of the benchmark's transformer layout (66.4M params in 96
    tensors), whole and as FSDP2 shards (dim 0 split in `ranks` by torch.chunk) over all ranks."""
    import math

    from .benchmark import transformer_shapes

    shapes = transformer_shapes(total)
    whole = [(math.prod(s), 0) for s in shapes]
    shards = []
    for s in shapes:
        rows, row = s[0], math.prod(s[1:])
        per = -(-rows // ranks)
        for r in range(ranks):
            lo, hi = r * per, min(rows, (r + 1) * per)
            if hi > lo:
                shards.append(((hi - lo) * row, lo * row))
    return {"transformer": whole, f"fsdp2-{ranks}-ranks": shards}


def weighted(rows: list[dict], root: str) -> list[dict]:
    """Instructions per element of the default fp32 focus variants over each model layout: every
    chunk counted at its path's figure (interior, or tail / unaligned at a tensor's edges)."""
    out = []
    layouts = model_layouts()
    chunk_blocks = None
    for backend in ("cuda", "triton"):
        for variant in ("gaussian-full", "rademacher-full"):
            fig = {}
            for r in rows:
                if (r["backend"], r["variant"], r["dtype"], r["master_weights"], r["config"]) == (
                        backend, variant, "float32", False, "default"):
                    fig[(r["path"], r.get("block"))] = r["instructions_per_element"]
            blocks = sorted({b for _, b in fig})
            for block in blocks:
                if not all((p, block) in fig for p in ("interior", "tail", "unaligned")):
                    continue
                for name, tensors in layouts.items():
                    instr = elems = tail_elems = 0
                    signs = variant.startswith("rademacher")
                    if backend == "cuda":
                        chunk_blocks = chunk_blocks or (_read_constant(root, "kThreads") *
                                                        _read_constant(root, "kBlocksPerThread"))
                    for n, off in tensors:
                        chunks = (_cuda_chunks(n, off, signs, chunk_blocks) if backend == "cuda"
                                  else _triton_chunks(n, off, signs, block))
                        for e, interior in chunks:
                            path = "interior" if interior else "tail" if off % 4 == 0 else "unaligned"
                            instr += e * fig[(path, block)]
                            elems += e
                            tail_elems += 0 if interior else e
                    row = {"backend": backend, "variant": variant, "layout": name, "tensors": len(tensors),
                           "elements": elems, "edge_fraction": round(tail_elems / elems, 4),
                           "instructions_per_element": round(instr / elems, 2)}
                    if block is not None:
                        row["block"] = block
                    out.append(row)
    return out


# ---- CLI ---------------------------------------------------------------------------------------------
MODEL = (
    "Roofline: budget = 132 SMs x 128 issue slots/clock x 1.98 GHz x bytes / copy bandwidth "
    "(H100 3.0 TB/s, H200 4.3 TB/s): 134 / 93 instructions per element at 12 B. Predicted fraction "
    "of the memory floor = min(1, budget / instructions per element). Static SASS counts of the path "
    "a warp issues (default config: Langevin noise on, weight decay 0, no scaler; lane-divergent "
    "branches count both sides; see `pydoc fsgld_fused.sass`), not GPU timings."
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
    head = (f"{'backend':7s} {'variant':38s} {'path':9s} {'config':12s} {'instr/elem':>10s}  "
            + " ".join(f"{c:>7s}" for c in CLASSES)
            + f" {'B/elem':>6s} {'regs':>4s} {'spill':>5s} {'div':>3s} {'H100':>5s} {'H200':>5s}")
    print(head, file=out)
    for r in rows:
        label = (f"{r['dtype']}{'+master' if r['master_weights'] else ''}{'+sr' if r.get('stochastic') else ''} "
                 f"{r['variant']}")
        if "block" in r:
            label += f" B{r['block']}/w{r['num_warps']}"
        cls = " ".join(f"{r['by_class_per_element'][c]:7.1f}" for c in CLASSES)
        fr = r["roofline"]
        print(f"{r['backend']:7s} {label:38s} {r['path']:9s} {r['config']:12s} {r['instructions_per_element']:10.1f}  "
              f"{cls} {r['global_bytes_per_element']:6.2f} {r['registers'] or 0:4d} {r['spill_bytes'] or 0:5d} "
              f"{r['divergent_branches']:3d} {fr['H100']['fraction_of_floor']:5.0%} "
              f"{fr['H200']['fraction_of_floor']:5.0%}", file=out)


def print_weighted(rows: list[dict], out=sys.stdout) -> None:
    if not rows:
        return
    print("\nWeighted over a real model (fp32, default config; edge chunks at their tail/unaligned figure):",
          file=out)
    for r in rows:
        label = f"{r['backend']} {r['variant']}" + (f" B{r['block']}" if "block" in r else "")
        print(f"  {label:32s} {r['layout']:16s} {r['tensors']:4d} tensors  edge {r['edge_fraction']:6.1%}  "
              f"{r['instructions_per_element']:6.1f} instr/elem", file=out)


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
    root = os.path.abspath(args.source)
    rows, skipped = collect(root, args.backends, variants)
    model = weighted(rows, root)
    print(MODEL)
    print()
    print_table(rows)
    print_weighted(model)
    for s in skipped:
        print(f"skipped: {s}")
    if args.json:
        _cli.replace_file(args.json, json.dumps({"model": MODEL, "kernels": rows, "weighted": model,
                                                 "skipped": skipped}, indent=1))
    if not rows:
        print("sass: nothing counted" + (" (see the skipped lines above)" if skipped else ""), file=sys.stderr)
    return 0 if rows else 1
