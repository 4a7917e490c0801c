"""The instruction budgets of issue 13, held on the static sm_90 SASS counts of
`python -m fsgld_fused sass` (a deterministic count, not a timing; no GPU needed).

fp32 Gaussian full step (restore + Langevin noise + next perturbation) along the main path of an
interior, aligned chunk: CUDA at most 150 instructions per element, Triton at most 180 (the issue's
targets, 120 and 140, are reported by the command and bench/README.md). bf16 params with fp32
masters stream 12 bytes per element (the CUDA kernel read the bf16 param it never needs: 14). The
fp32 full step with Rademacher perturbations (SPEC 2b, drawn in the kernels, issue 14): CUDA at
most 70, Triton at most 90.
Skipped only where nvcc, cuobjdump or Triton's NVIDIA backend is absent."""

import json
import os
import subprocess
import sys

import pytest

from fsgld_fused import sass

CUDA_MUST, TRITON_MUST = 150, 180
CUDA_RADEMACHER_MUST, TRITON_RADEMACHER_MUST = 70, 90


def _count(tmp_path, *args):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    res = subprocess.run([sys.executable, "-m", "fsgld_fused", "sass", "--json", str(out), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    return {(r["dtype"], r["master_weights"], r["variant"], r.get("block")): r for r in json.load(open(out))["kernels"]}


@pytest.mark.skipif(sass.find_nvcc() is None or sass.find_tool("cuobjdump") is None, reason="nvcc or cuobjdump absent")
def test_cuda_step_kernels_within_budget(tmp_path):
    rows = _count(tmp_path, "--backends", "cuda")
    assert len(rows) == len(sass.VARIANTS)
    full = rows[("float32", False, "gaussian-full", None)]
    assert full["instructions_per_element"] <= CUDA_MUST, full
    for r in rows.values():
        assert r["spill_bytes"] == 0, r
    master = rows[("bfloat16", True, "gaussian-full", None)]
    # 12 B streamed; per-thread scalars (found_inf, a table entry) add 4 B over its 16 elements
    assert master["global_bytes_per_element"] <= 12.5, master
    # noise only draws one normal per element where the full step draws three
    assert rows[("float32", False, "gaussian-noise-only", None)]["instructions_per_element"] < full[
        "instructions_per_element"] / 2
    # issue 14: Rademacher perturbations (one Philox call per thread for 16 elements) put the full step
    # on the memory floor: at most 70 instructions per element (62.8 when written)
    assert rows[("float32", False, "rademacher-full", None)]["instructions_per_element"] <= CUDA_RADEMACHER_MUST


def _require_triton_sass():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    if sass.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump absent")


@pytest.mark.parametrize("variant,must", [("gaussian-full", TRITON_MUST), ("rademacher-full", TRITON_RADEMACHER_MUST)])
def test_triton_step_kernel_within_budget(tmp_path, variant, must):
    """Rademacher: one Philox per thread per 16 elements and no exchange between threads."""
    _require_triton_sass()
    rows = _count(tmp_path, "--backends", "triton", "--dtype", "float32", "--variant", variant)
    assert {key[3] for key in rows} == {block for block, _ in sass.TRITON_CONFIGS}
    for r in rows.values():
        assert r["instructions_per_element"] <= must, r
        assert r["spill_bytes"] == 0, r
        assert r["by_class_per_element"]["memory"] < 3, r  # 16-byte accesses, no shared-memory exchange


def test_walker_takes_the_vector_path_and_skips_slow_paths():
    # A hand-written kernel: an early @P EXIT, a slow-path CALL, a scalar tail and a vector body.
    text = """
        /*0000*/                   S2R R0, SR_TID.X ;
        /*0010*/               @P0 EXIT ;
        /*0020*/              @!P1 BRA 0x60 ;
        /*0030*/                   MOV R2, R3 ;
        /*0040*/                   CALL.REL.NOINC 0x100 ;
        /*0050*/                   BRA 0x70 ;
        /*0060*/                   FMUL R2, R3, R3 ;
        /*0070*/               @P2 BRA 0xa0 ;
        /*0080*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0090*/                   BRA 0xc0 ;
        /*00a0*/                   LDG.E R4, desc[UR4][R2.64] ;
        /*00b0*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;
        /*00c0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00d0*/                   EXIT ;
        /*0100*/                   RET.REL.NODEC R20 0x0 ;
    """
    path = sass.main_path(sass.parse_sass(text))
    assert [i.addr for i in path] == [0x0, 0x10, 0x20, 0x60, 0x70, 0x80, 0x90, 0xC0, 0xD0]
    counts = sass.count(path, 4)
    assert counts["global_bytes_per_element"] == 8.0
    assert counts["by_class_per_element"]["control"] == 5 / 4  # @P0 EXIT, @!P1 BRA, @P2 BRA, BRA, EXIT
