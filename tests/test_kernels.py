"""Every kernel backend that runs on CPU (the C++ CPU kernel; Triton through its interpreter)
against the reference, element by element within the SPEC tolerance."""

import math
import os
import subprocess
import sys

import pytest
import torch

import _op_paths
import _sr_paths
from conftest import AVAILABLE, KERNEL_BACKENDS
from fsgld_fused import _backends
from fsgld_fused import reference as R
from fsgld_fused.testing import NOISE_ATOL, assert_step_close, rtol_for

if not KERNEL_BACKENDS:
    pytest.skip("no kernel backend runs here: " + str(AVAILABLE), allow_module_level=True)

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def ops(backend, dtype=torch.float32):
    return _backends.resolve(backend, torch.device("cpu"), dtype).ops


def sizes_for(backend):
    if backend == "triton":  # the interpreter runs programs one by one: keep it small
        return [0, 1, 3, 4, 5, 1023, 4099]
    return [0, 1, 3, 4, 5, 1023, (1 << 20) + 7]


def supported(backend, dtype):
    if AVAILABLE[backend] is not None:  # listed although missing: required here (conftest), so fail
        pytest.fail(f"backend {backend!r} is not available: {AVAILABLE[backend]}")
    try:
        return _backends.resolve(backend, torch.device("cpu"), dtype).name == backend
    except ValueError:
        return False


def make(sizes, dtype, gen_scale=1.0):
    return [(torch.randn(s) * gen_scale).to(dtype) for s in sizes]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4 * (2**32 - 1) - 2])
def test_normals_match_the_reference(backend, offset):
    ext = ops(backend)
    if not hasattr(ext, "normals"):
        pytest.skip("backend exposes no raw stream")
    for n in sizes_for(backend):
        a = ext.normals(2**64 - 7, 3, 11, R.XI, n, offset)
        b = R.normals(2**64 - 7, 3, 11, R.XI, n, offset)
        torch.testing.assert_close(a, b, atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_philox_words_bit_identical(backend):
    ext = ops(backend)
    if not hasattr(ext, "philox_words"):
        pytest.skip("backend exposes no raw words")
    for first in (0, 5, 2**32 - 3):
        words = ext.philox_words(seed=0x0123456789ABCDEF, pid=9, step=2**31 + 5, kind=1, first_block=first, nblocks=37)
        blocks = torch.arange(first, first + 37, dtype=torch.int64)
        ref = R.philox4x32((blocks & 0xFFFFFFFF, blocks >> 32, 2**31 + 5, (9 << 1) | 1), (0x89ABCDEF, 0x01234567))
        assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, torch.stack(ref, dim=1))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_and_restore(backend, dtype):
    if not supported(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    sizes = sizes_for(backend)
    params = make(sizes, dtype)
    ref = [p.clone() for p in params]
    ids, offs = list(range(2, 2 + len(sizes))), [0, 5, 1, 0, 2, 3, 0]
    ops(backend, dtype).perturb_(params, ids, 77, 4, 0.125, offsets=offs)
    R.perturb_(ref, ids, 77, 4, 0.125, offsets=offs)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.125)
    ops(backend, dtype).restore_(params, ids, 77, 4, 0.125, offsets=offs)
    R.restore_(ref, ids, 77, 4, 0.125, offsets=offs)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.25)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_step(backend, dtype, momentum, scaled):
    if not supported(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    sizes = sizes_for(backend)
    params, grads = make(sizes, dtype), make(sizes, dtype, 2.0)
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    ref, ref_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    ids = [7 * i for i in range(len(sizes))]
    scale = torch.tensor([1024.0]) if scaled else None
    for step in range(3):
        args = (ids, 0xFEEDFACECAFEBEEF, step, 0.01, 1e-2, momentum, 3e-3, 0.0 if step == 0 else 0.02, 0.02)
        kw = dict(grad_scale=scale) if scaled else {}
        ops(backend, dtype).fused_step_(params, grads, bufs, *args, **kw)
        R.fused_step_(ref, grads, ref_bufs, *args, **kw)
        for a, b in zip(params, ref):
            assert_step_close(a, b, 0.04 + 3e-3)
        for a, b in zip(bufs, ref_bufs):  # buf = m*buf + g + wd*theta: theta carries the noise error
            # a rounding flip at the operands' magnitude survives cancellation in the sum
            flip = rtol_for(dtype) * (b.abs().max().item() if b.numel() else 0.0)
            assert_step_close(a, b, 1e-2 * 0.02, atol_extra=flip)
        # keep both sides on the same trajectory so errors do not compound over steps
        for a, b in zip(params, ref):
            a.copy_(b)


def _guarded(sizes, dtype, guard=5, fill=None):
    """Tensors of `sizes` that are views into one buffer, `guard` elements of 1234.5 before, between
    and after them (so each view starts off a 16-byte boundary), and the buffer itself."""
    buf = torch.full((sum(sizes) + guard * (len(sizes) + 1),), 1234.5, dtype=dtype)
    views, at = [], guard
    for n in sizes:
        views.append(buf[at:at + n])
        views[-1].copy_(torch.randn(n) if fill is None else torch.full((n,), fill))
        at += n + guard
    return views, buf


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("rademacher", [False, True], ids=["gaussian", "rademacher"])
@pytest.mark.parametrize("masters", [False, True], ids=["", "masters"])
def test_edge_chunks_write_only_their_tensors(backend, rademacher, masters):
    """The edge chunks (a tensor's first chunk at an unaligned offset, its tail, a tensor shorter
    than a Philox block, one that starts and ends in one chunk) write their own elements and none
    of the guard elements around them; params, momentum buffers and masters alike."""
    dtype = torch.bfloat16 if masters else torch.float32
    if not supported(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    sizes, offsets = [3, 1023, 4099, 130], [0, 131, 2 * 4096 + 6, 2**20 + 125]
    ids = [1, 2, 3, 4]
    params, pbuf = _guarded(sizes, dtype)
    bufs, bbuf = _guarded(sizes, torch.float32 if masters else dtype, fill=0.0)
    mst, mbuf = _guarded(sizes, torch.float32) if masters else ([], None)
    for m, p in zip(mst, params):
        m.copy_(p.float())
    grads = make(sizes, dtype, 2.0)
    ref = [p.clone() for p in params]
    ref_bufs, ref_mst = [b.clone() for b in bufs], [m.clone() for m in mst]
    for step in range(2):
        args = (ids, 0xFEEDFACECAFEBEEF, step, 0.01, 1e-2, 0.9, 3e-3, 0.0 if step == 0 else 0.02, 0.02)
        kw = dict(offsets=offsets, masters=mst, restore_rademacher=rademacher, perturb_rademacher=rademacher)
        ops(backend, dtype).fused_step_(params, grads, bufs, *args, **kw)
        R.fused_step_(ref, grads, ref_bufs, *args, **dict(kw, masters=ref_mst))
        for a, b in zip(params, ref):
            assert_step_close(a, b, 0.04 + 3e-3)
        for a, b in zip(mst, ref_mst):
            assert_step_close(a, b, 0.04 + 3e-3)
        for a, b in zip(params, ref):  # the same trajectory on both sides
            a.copy_(b)
        for a, b in zip(bufs + mst, ref_bufs + ref_mst):
            a.copy_(b)
    for whole in (pbuf, bbuf, mbuf):
        if whole is not None:
            outside = torch.ones_like(whole, dtype=torch.bool)
            at = 5
            for n in sizes:
                outside[at:at + n] = False
                at += n + 5
            assert torch.all(whole[outside] == 1234.5), whole[outside]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_with_fp32_masters(backend, dtype):
    if not supported(backend, dtype):
        pytest.skip(f"{backend} does not take {dtype}")
    sizes = sizes_for(backend)
    masters = make(sizes, torch.float32)
    params = [m.to(dtype) for m in masters]
    grads = make(sizes, dtype)
    bufs = [torch.zeros_like(m) for m in masters]
    ref_m, ref_p, ref_b = [m.clone() for m in masters], [p.clone() for p in params], [b.clone() for b in bufs]
    ids = list(range(len(sizes)))
    args = (ids, 5, 3, 1e-3, 0.0, 0.9, 1e-4, 0.0, 0.05)
    ops(backend, dtype).fused_step_(params, grads, bufs, *args, masters=masters)
    R.fused_step_(ref_p, grads, ref_b, *args, masters=ref_m)
    for a, b in zip(masters, ref_m):
        assert_step_close(a, b, 1e-4)
    for a, b in zip(params, ref_p):
        assert_step_close(a, b, 0.05 + 1e-4)
    # restore with masters is an exact copy of the master
    ops(backend, dtype).restore_(params, ids, 5, 4, 0.05, masters=masters)
    for p, m in zip(params, masters):
        assert torch.equal(p, m.to(dtype))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", _op_paths.CASES, ids=lambda c: f"{str(c[0])[6:]}{'-masters' if c[1] else ''}")
def test_every_path_with_offsets_masters_weight_decay_momentum_scale(backend, case):
    """Shard offsets x masters x weight decay x momentum x grad scale, several steps: params,
    masters and buffers after every perturb_ / fused_step_ / restore_ (tests/_op_paths.py)."""
    dtype, master = case
    # the interpreter runs programs one by one: its 1024-element programs are crossed by the
    # 1100-element tensor already, the 4107-element one is there for the CUDA kernels' chunks
    n_tensors = 4 if backend == "triton" else len(_op_paths.SIZES)
    _op_paths.check_case(ops(backend, dtype), dtype, master, n_tensors)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_stochastic_rounding_matches_spec_2c(backend):
    # every tensor, Triton too: the 4107-element one at offset 16 is the only one with unmasked programs
    _sr_paths.check_all(ops(backend, torch.bfloat16))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_found_inf_changes_nothing(backend):
    params, grads = make([100, 37], torch.float32), make([100, 37], torch.float32)
    bufs = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    ops(backend).fused_step_(params, grads, bufs, [0, 1], 1, 0, 0.1, 0.0, 0.9, 0.1, 0.1, 0.1,
                             grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(not b.any() for b in bufs)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mixed_dtypes_in_one_optimizer(backend):
    from fsgld_fused import FSGLD

    dts = [d for d in DTYPES if supported(backend, d)]
    ps = [torch.nn.Parameter(torch.randn(33).to(d)) for d in dts]
    rs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    o1 = FSGLD(ps, lr=1e-2, beta=1e4, sigma=0.01, seed=3, backend=backend)
    o2 = FSGLD(rs, lr=1e-2, beta=1e4, sigma=0.01, seed=3, backend="reference")
    for _ in range(2):
        for p, r in zip(ps, rs):
            p.grad = torch.ones_like(p)
            r.grad = torch.ones_like(r)
        o1.step()
        o2.step()
    for p, r in zip(ps, rs):
        assert_step_close(p.detach(), r.detach(), 0.03 + 2 * (2 * 1e-2 / 1e4) ** 0.5)


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16-stochastic"])
def test_cpu_kernel_is_independent_of_the_thread_count(threads, dtype):
    sizes = [0, 1, 5, (1 << 17) + 3, 40_000]
    params, grads = make(sizes, dtype), make(sizes, dtype)
    expected = [p.clone() for p in params]
    args = (list(range(len(sizes))), 42, 7, 1e-2, 1e-3, 0.0, 1e-2, 0.03, 0.03)
    sr = dict(offsets=[0, 3, 8, 2**35 + 5, 1], stochastic_rounding=dtype == torch.bfloat16)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ops("cpu", dtype).fused_step_(expected, grads, [], *args, **sr)
        ops("cpu", dtype).perturb_(expected, args[0], 42, 8, 0.03, **sr)
        torch.set_num_threads(threads)
        ops("cpu", dtype).fused_step_(params, grads, [], *args, **sr)
        ops("cpu", dtype).perturb_(params, args[0], 42, 8, 0.03, **sr)
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))


_ISA_PATH_CHECK = r"""
import sys
import torch
from fsgld_fused import reference as R
from fsgld_fused._ops import cpu_ops as ext
from fsgld_fused.testing import NOISE_ATOL, assert_step_close
assert torch.ops.fsgld.cpu_isa() == ISA, torch.ops.fsgld.cpu_isa()
n = 4099
torch.testing.assert_close(ext.normals(2**64 - 7, 3, 11, 1, n, 5), R.normals(2**64 - 7, 3, 11, 1, n, 5), atol=NOISE_ATOL, rtol=0)
words = ext.philox_words(seed=7, pid=2, step=9, kind=0, first_block=2**32 - 3, nblocks=40)
blocks = torch.arange(2**32 - 3, 2**32 + 37, dtype=torch.int64)
ref = R.philox4x32((blocks & 0xFFFFFFFF, blocks >> 32, 9, 2 << 1), (7, 0))
assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, torch.stack(ref, dim=1))
ps, gs = [torch.randn(n), torch.randn(3)], [torch.randn(n), torch.randn(3)]
rs = [p.clone() for p in ps]
args = ([0, 1], 42, 7, 1e-2, 1e-3, 0.0, 1e-2, 0.03, 0.03)
ext.fused_step_(ps, gs, [], *args)
R.fused_step_(rs, gs, [], *args)
for a, b in zip(ps, rs):
    assert_step_close(a, b, 0.07)
sys.path.insert(0, TESTS_DIR)
import _op_paths
import _sr_paths
_op_paths.check_all(ext)  # Gaussian: every op, shard offsets, masters, momentum, grad scales
_sr_paths.check_all(ext)  # SPEC 2c: bf16 rounded stochastically, every op
import test_rademacher as TR  # Rademacher: every op bit for bit, boundaries and sub-streams
for case in TR.CASES:
    for substream in (0, 3):
        TR.test_perturb_and_restore_bit_for_bit("cpu", case, substream)
    for momentum in (0.0, 0.9):
        TR.test_fused_step_with_signs_bit_for_bit("cpu", case, momentum)
TR.test_capturable_form_with_signs_bit_for_bit("cpu")
print("isa path ok")
"""


def _run_with_isa(isa, code):
    env = {**os.environ, "FSGLD_CPU_ISA": isa}
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    code = f"TESTS_DIR = {tests_dir!r}\nISA = {isa!r}\n" + code
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


# The widest path is the one every other test runs in this process; the narrower ones (what a CPU
# without AVX-512, or without AVX2, takes) run here, each forced with FSGLD_CPU_ISA.
_ISAS = ["avx512", "avx2", "baseline"]
_BEST_ISA = torch.ops.fsgld.cpu_isa() if "cpu" in KERNEL_BACKENDS else "baseline"


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
@pytest.mark.parametrize("isa", [isa for isa in _ISAS[_ISAS.index(_BEST_ISA) + 1:]] or ["baseline"])
def test_cpu_isa_paths_match_the_reference(isa):
    res = _run_with_isa(isa, _ISA_PATH_CHECK)
    assert res.returncode == 0 and "isa path ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
def test_cpu_isa_refuses_an_unknown_name():
    res = _run_with_isa("sse9", "import torch, fsgld_fused._ops\ntorch.ops.fsgld.cpu_isa()")
    assert res.returncode != 0 and "FSGLD_CPU_ISA=sse9: use avx512, avx2 or baseline" in res.stderr, res.stderr[-2000:]


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="C++ extension not built")
def test_cpu_kernel_rejects_what_it_cannot_index():
    ext = ops("cpu")  # FSGLD hands it contiguous copies of strided params (tests/test_conventions.py)
    with pytest.raises(RuntimeError, match="not contiguous"):
        ext.perturb_([torch.randn(6, 4).t()], [0], 1, 0, 0.1)
    with pytest.raises(RuntimeError, match="param_ids"):
        ext.perturb_([torch.zeros(3)], [0, 1], 1, 0, 0.1)
    with pytest.raises(RuntimeError, match="expected"):
        ext.perturb_([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [0, 1], 1, 0, 0.1)
    with pytest.raises(RuntimeError, match="grad"):
        ext.fused_step_([torch.zeros(3)], [torch.zeros(4)], [], [0], 1, 0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="param id -1"):
        ext.normals(1, -1, 0, 0, 8)
    with pytest.raises(RuntimeError, match="int32"):
        ext.lib.philox_words_(torch.zeros(3, 4), 1, 0, 0, 0, 0)


def test_strided_parameters_work_on_the_reference_backend():
    from fsgld_fused import FSGLD

    base = torch.randn(6, 4)
    w = torch.nn.Parameter(base.clone().t())  # strided
    c = torch.nn.Parameter(base.clone().t().contiguous())
    grad = torch.randn(4, 6)
    for p in (w, c):
        opt = FSGLD([p], lr=1e-3, beta=1.0, sigma=0.1, seed=1, backend="reference")
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(w.detach(), c.detach())  # noise follows the logical row-major order


@pytest.mark.parametrize("backend", ["reference"] + KERNEL_BACKENDS)
def test_capturable_form_reads_step_and_lr_from_tensors(backend):
    """step_t / lr_t replace step / lr; the Langevin std becomes noise_std * sqrt(lr_t)."""
    ext = R if backend == "reference" else ops(backend)
    sizes = [0, 5, 1023]
    params, grads = make(sizes, torch.float32), make(sizes, torch.float32)
    expected = [p.clone() for p in params]
    ids, lr, beta = [0, 1, 2], 0.02, 300.0
    R.fused_step_(expected, grads, [], ids, 9, 41, lr, 1e-3, 0.0, math.sqrt(2 * lr / beta), 0.05, 0.05)
    ext.fused_step_(params, grads, [], ids, 9, 0, 0.0, 1e-3, 0.0, math.sqrt(2 / beta), 0.05, 0.05,
                    step_t=torch.tensor([41]), lr_t=torch.tensor([lr]))
    for a, b in zip(params, expected):
        assert_step_close(a, b, 0.1 + math.sqrt(2 * lr / beta), atol_extra=1e-7)
    R.perturb_(expected, ids, 9, 42, 0.05)
    ext.perturb_(params, ids, 9, 0, 0.05, step_t=torch.tensor([42]))
    for a, b in zip(params, expected):
        assert_step_close(a, b, 0.2 + math.sqrt(2 * lr / beta), atol_extra=1e-7)
