"""The static sm_90 SASS counts of `python -m fsgld_fused sass` (a deterministic count, not a
timing; no GPU needed), and the counter itself.

What is held (issue 25, H200: 93 instructions per element at the 12-byte memory floor): the fp32
Gaussian full step in the default configuration (Langevin noise on, weight decay 0, no scaler),
interior chunk, CUDA at most CUDA_MUST and Triton at every (BLOCK, num_warps) the launcher may pick
at most TRITON_MUST; Rademacher at most RADEMACHER_MUST; the edge paths at most EDGE_RATIO times
the interior. Each count is also checked from below: the elements per thread from the launch
configuration (16-byte accesses move exactly 12 bytes per fp32 element), the noise drawn (one
rsqrt per pair of normals), weight decay costing its two operations, and no lane-divergent branch
left in an interior. The walker is checked on hand-written SASS whose path is stated exactly.
Skipped only where nvcc, cuobjdump or Triton's NVIDIA backend is absent."""

import json
import os
import re
import subprocess
import sys

import pytest

from fsgld_fused import sass

CUDA_MUST, TRITON_MUST, RADEMACHER_MUST = 105, 110, 60
# SPEC 2c, the bf16 Gaussian full step rounded stochastically, over the fp32 row at the same config:
# held at the measured values (CUDA 126.0 - 103.7; Triton 21.0 / 20.7 at B512 / B1024, session 9; 22.0 /
# 22.6 / 23.9 before, with B2048);
# issue 26's target is 10
CUDA_SR_OVER_FP32, TRITON_SR_OVER_FP32, SR_TARGET_OVER_FP32 = 23, 21.5, 10
# tail (edge chunk of an aligned tensor) and unaligned paths over the interior, per backend
# (measured: CUDA 1.07 / 1.10 Gaussian, 1.09 / 1.148 Rademacher; Triton 1.09, 1.150); issue 25 asks 1.15
EDGE_RATIO = {("cuda", "gaussian-full"): 1.11, ("cuda", "rademacher-full"): 1.15,
              ("triton", "gaussian-full"): 1.10, ("triton", "rademacher-full"): 1.15}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _count(tmp_path, *args):
    out = tmp_path / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, not interpret
    res = subprocess.run([sys.executable, "-m", "fsgld_fused", "sass", "--json", str(out), *args], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    data = json.load(open(out))
    rows = {(r["backend"], r["dtype"], r["master_weights"], r["variant"], r["path"], r["config"], r.get("block"),
             r.get("stochastic", False)): r for r in data["kernels"]}
    return rows, data["weighted"]


@pytest.fixture(scope="module")
def cuda(tmp_path_factory):
    if sass.find_nvcc() is None or sass.find_tool("cuobjdump") is None:
        pytest.skip("nvcc or cuobjdump absent")
    return _count(tmp_path_factory.mktemp("sass-cuda"), "--backends", "cuda")


def _need_triton_sass():
    pytest.importorskip("triton")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    if sass.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump absent")


@pytest.fixture(scope="module")
def triton(tmp_path_factory):
    _need_triton_sass()
    return _count(tmp_path_factory.mktemp("sass-triton"), "--backends", "triton", "--dtype", "float32")


def _rows(counted, backend, variant, path="interior", config="default", dtype="float32", master=False,
          stochastic=False):
    rows, _ = counted
    found = [r for k, r in rows.items() if k[:6] == (backend, dtype, master, variant, path, config)
             and k[7] == stochastic]
    assert found, (backend, variant, path, config)
    return found


@pytest.fixture(scope="module")
def triton_gaussian(tmp_path_factory):
    """The Triton Gaussian full step in fp32 and bf16 (to nearest, stochastic rounding, masters)."""
    _need_triton_sass()
    return _count(tmp_path_factory.mktemp("sass-triton-gaussian"), "--backends", "triton", "--variant", "gaussian-full")


def _sr_rows(counted):
    """(fp32, bf16 to nearest, bf16 stochastic) interior rows of each launcher config."""
    by_block = lambda **kw: {r["block"]: r for r in _rows(counted, "triton", "gaussian-full", **kw)}  # noqa: E731
    fp32, nearest = by_block(), by_block(dtype="bfloat16")
    sr = by_block(dtype="bfloat16", stochastic=True)
    assert set(fp32) == set(nearest) == set(sr) == {b for b, _ in _launcher_configs()}
    return [(fp32[b], nearest[b], sr[b]) for b in sorted(sr)]


def _launcher_configs():
    from fsgld_fused.kernels import triton_ops

    return triton_ops._CONFIGS


def _kernel_constant(name):
    text = open(os.path.join(ROOT, "csrc", "fsgld_cuda_kernels.cuh")).read()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


# ---- the budgets -------------------------------------------------------------------------------------
def test_cuda_default_step_within_budget(cuda):
    (full,) = _rows(cuda, "cuda", "gaussian-full")
    assert full["instructions_per_element"] <= CUDA_MUST, full
    (rad,) = _rows(cuda, "cuda", "rademacher-full")
    assert rad["instructions_per_element"] <= RADEMACHER_MUST, rad
    rows, _ = cuda
    assert all(r["spill_bytes"] == 0 for r in rows.values())
    (master,) = _rows(cuda, "cuda", "gaussian-full", dtype="bfloat16", master=True)
    assert master["global_bytes_per_element"] <= 12.25, master  # 12 B streamed; a table entry per thread
    # noise only draws one normal per element where the full step draws three
    (noise_only,) = _rows(cuda, "cuda", "gaussian-noise-only")
    assert noise_only["instructions_per_element"] < full["instructions_per_element"] / 2


def test_cuda_bf16_stochastic_rounding_counted(cuda):
    """bf16 without masters rounded stochastically (SPEC 2c) is counted on its own kernel: more than
    rounding to nearest (the rounding bits, the compensated std), no spills, no divergent branch."""
    for variant in ("gaussian-full", "rademacher-full"):
        (nearest,) = _rows(cuda, "cuda", variant, dtype="bfloat16")
        (sr,) = _rows(cuda, "cuda", variant, dtype="bfloat16", stochastic=True)
        assert sr["instructions_per_element"] > nearest["instructions_per_element"], (sr, nearest)
        assert sr["spill_bytes"] == 0 and sr["divergent_branches"] == 0, sr
    (fp32,) = _rows(cuda, "cuda", "gaussian-full")
    (sr,) = _rows(cuda, "cuda", "gaussian-full", dtype="bfloat16", stochastic=True)
    assert sr["instructions_per_element"] <= fp32["instructions_per_element"] + CUDA_SR_OVER_FP32, (sr, fp32)


# sm_90: 126.0 against 103.7 + 10. bf16 itself costs 2.8 (unpacking and packing the words); over bf16
# nearest: int-mul +2.4 and most of alu +9.7 are the Philox call per 8 elements that SPEC 2c fixes (5),
# fp32 +6.0 and mufu +1.0 the compensated std (mask, square, FMA, max, sqrt, its product) and the
# rounding's special cases; a shared per-exponent std table measured 125.2 before the FMA form
@pytest.mark.xfail(strict=True, reason="issue 26 target not met: 126.0 instructions per element")
def test_cuda_bf16_stochastic_rounding_within_issue_26_budget(cuda):
    (fp32,) = _rows(cuda, "cuda", "gaussian-full")
    (sr,) = _rows(cuda, "cuda", "gaussian-full", dtype="bfloat16", stochastic=True)
    assert sr["instructions_per_element"] <= fp32["instructions_per_element"] + SR_TARGET_OVER_FP32, (sr, fp32)


def test_triton_default_step_within_budget_at_every_launcher_config(triton):
    from fsgld_fused.kernels import triton_ops

    for variant, must in (("gaussian-full", TRITON_MUST), ("rademacher-full", RADEMACHER_MUST)):
        rows = _rows(triton, "triton", variant)
        assert {(r["block"], r["num_warps"]) for r in rows} == set(triton_ops._CONFIGS)
        for r in rows:
            assert r["instructions_per_element"] <= must, r
            assert r["spill_bytes"] == 0, r
            assert r["by_class_per_element"]["memory"] < 3, r  # 16-byte accesses, no shared-memory exchange


def test_triton_stochastic_rounding_step_within_budget(triton_gaussian):
    """SPEC 2c's bf16 step at every launcher config: what it adds to rounding to nearest is drawn
    (one Philox per 8 elements: 2.5 multiplies per element; the compensated std's sqrt: one per
    element), and the whole stays within TRITON_SR_OVER_FP32 of the fp32 step, without spills."""
    for fp32, nearest, sr in _sr_rows(triton_gaussian):
        assert sr["instructions_per_element"] > nearest["instructions_per_element"], (sr, nearest)
        assert sr["instructions_per_element"] <= fp32["instructions_per_element"] + TRITON_SR_OVER_FP32, (sr, fp32)
        extra = {c: sr["by_class_per_element"][c] - nearest["by_class_per_element"][c] for c in ("int-mul", "mufu")}
        assert abs(extra["int-mul"] - 2.5) <= 0.75, extra  # a Philox per 4 elements would add 5 (B512: 3.0)
        assert extra["mufu"] == 1.0, extra
        assert sr["spill_bytes"] == 0 and sr["divergent_branches"] == 0, sr
        # the same accesses (no shared-memory exchange of the rounding words): the same global bytes, and
        # at most 0.5 memory instructions more (B512 after the edge-path change: 1.81 against 1.38, eight
        # more constant-bank loads (LDC) per thread of 16 elements; the kernel's STS/LDSM counts are equal)
        assert sr["global_bytes_per_element"] == nearest["global_bytes_per_element"], (sr, nearest)
        assert sr["by_class_per_element"]["memory"] <= nearest["by_class_per_element"]["memory"] + 0.5, (sr, nearest)


@pytest.mark.xfail(strict=True, reason="issue 26: the Triton bf16 stochastic step is 21 over fp32, not 10")
def test_triton_stochastic_rounding_step_meets_issue_26_target(triton_gaussian):
    for fp32, _, sr in _sr_rows(triton_gaussian):
        assert sr["instructions_per_element"] <= fp32["instructions_per_element"] + SR_TARGET_OVER_FP32, (sr, fp32)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_edge_paths_counted_and_bounded(backend, request):
    counted = request.getfixturevalue(backend)
    for variant in ("gaussian-full", "rademacher-full"):
        for interior in _rows(counted, backend, variant):
            for path in ("tail", "unaligned"):
                (edge,) = [r for r in _rows(counted, backend, variant, path) if r.get("block") == interior.get("block")]
                ratio = edge["instructions_per_element"] / interior["instructions_per_element"]
                # bounds checks and scalar accesses cost something, and not more than the bound
                assert 1.0 < ratio <= EDGE_RATIO[(backend, variant)], (edge, interior)
                if backend == "triton":  # its edge stores carry the aligned hint: the masks keep them scalar
                    assert edge["bytes_128_per_element"] == 0, edge


# ---- counting the step a default FSGLD launches ---------------------------------------------------------
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_counts_the_default_configuration(backend, request):
    counted = request.getfixturevalue(backend)
    for variant in ("gaussian-full", "rademacher-full"):
        for row in _rows(counted, backend, variant):
            # the Langevin noise is drawn: one rsqrt per pair of normals (3 streams Gaussian, 1 with signs)
            assert row["by_class_per_element"]["mufu"] == (1.5 if variant == "gaussian-full" else 0.5), row
            # a warp issues every side of a lane-dependent branch: the interiors have none left
            assert row["divergent_branches"] == 0, row
            (wd,) = [r for r in _rows(counted, backend, variant, config="weight-decay")
                     if r.get("block") == row.get("block")]
            # weight decay is one multiply and one add per element on top of the default
            assert abs(wd["instructions_per_element"] - row["instructions_per_element"] - 2.0) <= 0.25, (wd, row)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_elements_per_thread_from_the_launch_configuration(backend, request):
    """fp32: the step reads param and grad and writes param, 16 bytes (4 elements) per access, so a
    path moves exactly 12 bytes per element in 128-bit accesses when the elements per thread are the
    launch configuration's: 4 * kBlocksPerThread (CUDA), 4 * BLOCK / (32 * num_warps) (Triton)."""
    counted = request.getfixturevalue(backend)
    rows, _ = counted
    for key, r in rows.items():
        vector_paths = ("interior", "tail") if backend == "cuda" else ("interior",)  # Triton's edge is masked
        if r["dtype"] == "float32" and r["path"] in vector_paths:
            assert r["bytes_128_per_element"] == 12.0, r
        elif r["dtype"] == "float32":
            assert r["bytes_128_per_element"] == 0.0 and r["global_bytes_per_element"] >= 12.0, r
        if backend == "cuda":
            assert r["elements_per_thread"] == 4 * _kernel_constant("kBlocksPerThread"), r
        else:
            assert r["elements_per_thread"] == 4 * r["block"] // (32 * r["num_warps"]), r
    if backend == "cuda":
        (master,) = _rows(counted, "cuda", "gaussian-full", dtype="bfloat16", master=True)
        assert master["bytes_128_per_element"] == 8.0, master  # the fp32 master read and written


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_weighted_over_a_transformer_and_fsdp2_shards(backend, request):
    _, weighted = request.getfixturevalue(backend)
    layouts = sass.model_layouts()
    assert len(layouts["transformer"]) == 96 and sum(n for n, _ in layouts["transformer"]) == 66540032
    assert sum(n for n, _ in layouts["fsdp2-8-ranks"]) == 66540032
    for variant in ("gaussian-full", "rademacher-full"):
        got = {(w["layout"], w.get("block")): w for w in weighted if (w["backend"], w["variant"]) == (backend, variant)}
        assert {layout for layout, _ in got} == set(layouts)
        counted = request.getfixturevalue(backend)
        for (layout, block), w in got.items():
            (interior,) = [r for r in _rows(counted, backend, variant) if r.get("block") == block]
            edges = [r["instructions_per_element"] for p in ("tail", "unaligned")
                     for r in _rows(counted, backend, variant, p) if r.get("block") == block]
            assert 0 < w["edge_fraction"] < 0.05, w
            assert interior["instructions_per_element"] < w["instructions_per_element"] < max(edges), w
        for block in {b for _, b in got}:
            assert got[("fsdp2-8-ranks", block)]["edge_fraction"] > got[("transformer", block)]["edge_fraction"]


def test_chunk_models_cover_every_element_once():
    for n, off in ((1, 0), (5, 3), (8192 * 3 + 7, 104), (70000, 128 * 5), (4096, 2**34 + 4)):
        for signs in (False, True):
            assert sum(e for e, _ in sass._cuda_chunks(n, off, signs, 2048)) == n
            assert sum(e for e, _ in sass._triton_chunks(n, off, signs, 512)) == n
    # an aligned tensor of two whole chunks and a bit: two interior chunks and one edge
    assert [i for _, i in sass._cuda_chunks(2 * 8192 + 4, 0, False, 2048)] == [True, True, False]
    # signs at a shard offset that is not 128-aligned: the chunks start at a Rademacher block
    assert [i for _, i in sass._cuda_chunks(3 * 8192, 4, True, 2048)] == [False, True, True, False]


# ---- the walker on SASS whose path is known exactly -----------------------------------------------------
def _path(text, **kw):
    return [i.addr for i in sass.walk(sass.parse_sass(text), **kw)]


def test_walker_takes_the_vector_path_and_skips_slow_paths():
    # A hand-written kernel: an early @P EXIT, a slow-path CALL, a scalar tail and a vector body.
    text = """
        /*0000*/                   S2R R0, SR_CTAID.X ;
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
    assert counts["global_bytes_per_element"] == 8.0 and counts["bytes_128_per_element"] == 8.0
    assert counts["by_class_per_element"]["control"] == 5 / 4  # @P0 EXIT, @!P1 BRA, @P2 BRA, BRA, EXIT
    # the unaligned walk: every element loaded and stored, by scalar accesses where there are some
    scalar = text.replace("/*00b0*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;",
                          "/*00b0*/                   LDG.E R5, desc[UR4][R2.64+0x4] ;\n"
                          "/*00b4*/                   LDG.E R6, desc[UR4][R2.64+0x8] ;\n"
                          "/*00b8*/                   LDG.E R7, desc[UR4][R2.64+0xc] ;")
    assert _path(scalar, key="unaligned") == [0x0, 0x10, 0x20, 0x60, 0x70, 0xA0, 0xB0, 0xB4, 0xB8, 0xC0, 0xD0]
    assert _path(text, key="unaligned") == [0x0, 0x10, 0x20, 0x60, 0x70, 0x80, 0x90, 0xC0, 0xD0]  # more bytes


# two sides of a branch on lane parity (S2R SR_TID.X through a register), or on a kernel scalar
_BRANCH = """
        /*0000*/                   {source} ;
        /*0010*/                   LOP3.LUT R1, R0, 0x1, RZ, 0xc0, !PT ;
        /*0020*/                   ISETP.NE.AND P0, PT, R1, RZ, PT ;
        /*0030*/               @P0 BRA 0x70 ;
        /*0040*/                   FMUL R2, R2, R2 ;
        /*0050*/                   FMUL R2, R2, R2 ;
        /*0060*/                   BRA 0x80 ;
        /*0070*/                   FADD R2, R2, R2 ;
        /*0080*/                   STG.E desc[UR4][R4.64], R2 ;
        /*0090*/                   EXIT ;
"""


def test_lane_divergent_branch_issues_both_sides():
    text = _BRANCH.format(source="S2R R0, SR_TID.X")
    assert sass.divergent_branches(sass.parse_sass(text)) == {3}
    assert sorted(_path(text)) == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90]  # the union, once each
    assert _path(text, union=False) == [0x0, 0x10, 0x20, 0x30, 0x70, 0x80, 0x90]  # one side: the shorter


def test_uniform_branch_takes_one_side_and_a_known_scalar_decides_it():
    text = _BRANCH.format(source="LDC R0, c[0x0][0x380]")  # a kernel argument: the same in every lane
    assert sass.divergent_branches(sass.parse_sass(text)) == set()
    assert _path(text) == [0x0, 0x10, 0x20, 0x30, 0x70, 0x80, 0x90]  # unknown: the fewest instructions
    # R1 = R0 & 1 is no comparison of the scalar itself with zero: not decided
    assert _path(text, scalars={0x380: 0}) == [0x0, 0x10, 0x20, 0x30, 0x70, 0x80, 0x90]
    direct = text.replace("ISETP.NE.AND P0, PT, R1, RZ, PT", "FSETP.NEU.AND P0, PT, RZ, R0, PT")
    assert _path(direct, scalars={0x380: 0.0}) == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x80, 0x90]
    assert _path(direct, scalars={0x380: 5e-4}) == [0x0, 0x10, 0x20, 0x30, 0x70, 0x80, 0x90]


def test_a_null_pointer_argument_decides_its_64_bit_test():
    # `if (sc.found_inf != nullptr && *sc.found_inf != 0) return;` as nvcc writes it
    text = """
        /*0000*/                   ULDC.64 UR4, c[0x0][0x5368] ;
        /*0010*/                   ISETP.NE.U32.AND P0, PT, RZ, UR4, PT ;
        /*0020*/                   ISETP.NE.AND.EX P0, PT, RZ, UR5, PT, P0 ;
        /*0030*/              @!P0 BRA 0x70 ;
        /*0040*/                   LDC.64 R2, c[0x0][0x5368] ;
        /*0050*/                   LDG.E R2, desc[UR6][R2.64] ;
        /*0060*/                   FSETP.NEU.AND P1, PT, R2, RZ, PT ;
        /*0070*/                   FADD R4, R4, R4 ;
        /*0080*/                   EXIT ;
    """
    null = {0x5368: 0, 0x536C: 0}
    assert _path(text, scalars=null) == [0x0, 0x10, 0x20, 0x30, 0x70, 0x80]
    assert _path(text, scalars={0x5368: 1, 0x536C: 1}) == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]
    assert _path(text, scalars={0x5368: 0, 0x536C: 1}) == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80]


def test_uniform_registers_and_converted_values_are_not_lane_dependent():
    text = _BRANCH.format(source="S2R R9, SR_TID.X").replace(
        "LOP3.LUT R1, R0, 0x1, RZ, 0xc0, !PT", "MOV R1, UR4")  # the lane index is read, not used
    assert sass.divergent_branches(sass.parse_sass(text)) == set()
    loaded = _BRANCH.format(source="S2R R8, SR_TID.X").replace(
        "LOP3.LUT R1, R0, 0x1, RZ, 0xc0, !PT", "LDG.E R1, desc[UR4][R8.64]")  # a per-lane address
    assert sass.divergent_branches(sass.parse_sass(loaded)) == {3}
