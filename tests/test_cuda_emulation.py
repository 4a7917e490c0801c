"""The CUDA kernels (csrc/fsgld_cuda_kernels.cuh) executed on the CPU, thread after thread
(tests/cuda_emulation.cpp), against the reference: words bit-identical, every op element-wise
within the SPEC tolerance, on the vector and tail paths, shard offsets, misaligned storage, and
calls large enough to need several launches. No GPU needed; the GPU run is tests/test_gpu.py."""

import os
import re

import pytest
import torch
from torch.utils import cpp_extension

import _op_paths
import _sr_paths
from fsgld_fused import reference as R
from fsgld_fused._ops import ExtensionOps
from fsgld_fused.testing import NOISE_ATOL, assert_step_close, rtol_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Sizes around the kernels' structure: Philox blocks of 4, chunks of 8192 elements (CHUNK below).
SIZES = [0, 1, 3, 4, 5, 1023, 4096, 3 * 4096 + 5]
OFFSETS = [0, 5, 1, 0, 2, 3, 4096, 0]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    build = tmp_path_factory.mktemp("cuda_emulation")
    try:  # the ninja that pip installed (.[test]) even where its scripts folder is not on PATH
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    cpp_extension.load(
        name="fsgld_cuda_emulation",
        sources=[os.path.join(ROOT, "tests", "cuda_emulation.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O2"],
        build_directory=str(build),
        is_python_module=False,
    )
    return ExtensionOps("fsgld_cuda_emu")


def launches():
    return torch.ops.fsgld_cuda_emu.launches()


def make(sizes, dtype, scale=1.0):
    return [(torch.randn(s) * scale).to(dtype) for s in sizes]


def test_philox_words_bit_identical(emu):
    for first in (0, 5, 2**32 - 3):
        words = emu.philox_words(seed=0x0123456789ABCDEF, pid=9, step=2**31 + 5, kind=1, first_block=first, nblocks=300)
        blocks = torch.arange(first, first + 300, dtype=torch.int64)
        ref = R.philox4x32((blocks & 0xFFFFFFFF, blocks >> 32, 2**31 + 5, (9 << 1) | 1), (0x89ABCDEF, 0x01234567))
        assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, torch.stack(ref, dim=1))


@pytest.mark.parametrize("offset", [0, 1, 2, 3, 4 * (2**32 - 1) - 2])
def test_normals(emu, offset):
    for n in (1, 3, 1029, 5000):
        torch.testing.assert_close(emu.normals(2**64 - 7, 3, 11, R.XI, n, offset),
                                   R.normals(2**64 - 7, 3, 11, R.XI, n, offset), atol=NOISE_ATOL, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_and_restore(emu, dtype):
    params = make(SIZES, dtype)
    ref = [p.clone() for p in params]
    ids = list(range(2, 2 + len(SIZES)))
    emu.perturb_(params, ids, 77, 4, 0.125, offsets=OFFSETS)
    R.perturb_(ref, ids, 77, 4, 0.125, offsets=OFFSETS)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.125)
    emu.restore_(params, ids, 77, 4, 0.125, offsets=OFFSETS)
    R.restore_(ref, ids, 77, 4, 0.125, offsets=OFFSETS)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("scaled", [False, True])
def test_fused_step(emu, dtype, momentum, scaled):
    params, grads = make(SIZES, dtype), make(SIZES, dtype, 2.0)
    bufs = [torch.zeros_like(p) for p in params] if momentum else []
    ref, ref_bufs = [p.clone() for p in params], [b.clone() for b in bufs]
    ids = [7 * i for i in range(len(SIZES))]
    kw = dict(grad_scale=torch.tensor([1024.0])) if scaled else {}
    for step in range(3):
        args = (ids, 0xFEEDFACECAFEBEEF, step, 0.01, 1e-2, momentum, 3e-3, 0.0 if step == 0 else 0.02, 0.02)
        emu.fused_step_(params, grads, bufs, *args, offsets=OFFSETS, **kw)
        R.fused_step_(ref, grads, ref_bufs, *args, offsets=OFFSETS, **kw)
        for a, b in zip(params, ref):
            assert_step_close(a, b, 0.04 + 3e-3)
        for a, b in zip(bufs, ref_bufs):
            flip = rtol_for(dtype) * (b.abs().max().item() if b.numel() else 0.0)
            assert_step_close(a, b, 1e-2 * 0.02, atol_extra=flip)
        for a, b in zip(params, ref):
            a.copy_(b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_step_with_fp32_masters(emu, dtype):
    masters = make(SIZES, torch.float32)
    params = [m.to(dtype) for m in masters]
    grads = make(SIZES, dtype)
    bufs = [torch.zeros_like(m) for m in masters]
    ref_m, ref_p, ref_b = [m.clone() for m in masters], [p.clone() for p in params], [b.clone() for b in bufs]
    args = (list(range(len(SIZES))), 5, 3, 1e-3, 0.0, 0.9, 1e-4, 0.0, 0.05)
    emu.fused_step_(params, grads, bufs, *args, masters=masters, offsets=OFFSETS)
    R.fused_step_(ref_p, grads, ref_b, *args, masters=ref_m, offsets=OFFSETS)
    for a, b in zip(masters, ref_m):
        assert_step_close(a, b, 1e-4)
    for a, b in zip(params, ref_p):
        assert_step_close(a, b, 0.05 + 1e-4)
    for a, b in zip(bufs, ref_b):
        assert_step_close(a, b, 0.0, atol_extra=rtol_for(torch.float32) * b.abs().max().item() if b.numel() else 0.0)


@pytest.mark.parametrize("case", _op_paths.CASES, ids=lambda c: f"{str(c[0])[6:]}{'-masters' if c[1] else ''}")
def test_every_path_with_offsets_masters_weight_decay_momentum_scale(emu, case):
    """Shard offsets (vector and scalar paths, a tensor over two chunks) x masters x weight decay
    x momentum x grad scale, several steps: params, masters and buffers (tests/_op_paths.py)."""
    _op_paths.check_case(emu, *case)


# Rademacher (SPEC 2b): a thread draws one Philox call per stream and hands the words around the
# warp (emulated by recomputing the source lane's word), on the interior and at the edges alike;
# chunks start at a Rademacher block whatever the offset. Sizes span one or two chunks.
RAD_SIZES = [3 * 4096 + 5, 2 * 4096, 4096 + 130, 70, 8192]
RAD_OFFSETS = [0, 128 * 2**32 - 4096, 4, 4 * (2**32 - 1024), 4101]  # 128-aligned, 2**32 carry, 4 mod 128, ...


@pytest.mark.parametrize("dtype,master", [(torch.float32, False), (torch.bfloat16, False), (torch.float16, False),
                                          (torch.bfloat16, True)], ids=["fp32", "bf16", "fp16", "bf16-masters"])
@pytest.mark.parametrize("kinds", [(True, True), (False, True), (True, False)], ids=["r->r", "g->r", "r->g"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_rademacher_fused_step_exact_on_every_path(emu, dtype, master, kinds, momentum):
    """Without Langevin noise the step is exact arithmetic on exact signs: `==` with the reference
    (a Gaussian side of a mixed step is compared within the SPEC tolerance). With noise, the same
    kernels within the SPEC tolerance."""
    gen = torch.Generator().manual_seed(3)
    masters = [torch.randn(n, generator=gen) for n in RAD_SIZES] if master else []
    params = [m.to(dtype) for m in masters] if master else [torch.randn(n, generator=gen).to(dtype) for n in RAD_SIZES]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in RAD_SIZES]
    bufs = [torch.zeros(n, dtype=torch.float32 if master else dtype) for n in RAD_SIZES] if momentum else []
    copies = lambda xs: [x.clone() for x in xs]  # noqa: E731
    ref_p, ref_m, ref_b = copies(params), copies(masters), copies(bufs)
    ids = [1, 4, 0, 2, 3]
    for step, noise in ((5, 0.0), (6, 1e-3)):
        args = (ids, 0xFEEDFACECAFEBEEF, step, 1e-2, 1e-3, momentum, noise, 0.0 if master else 0.05, 0.05)
        kw = dict(offsets=RAD_OFFSETS, restore_rademacher=kinds[0], perturb_rademacher=kinds[1])
        emu.fused_step_(params, grads, bufs, *args, masters=masters, **kw)
        R.fused_step_(ref_p, grads, ref_b, *args, masters=ref_m, **kw)
        exact = noise == 0.0 and (all(kinds) or master and kinds[1])
        for a, b in zip(params + masters + bufs, ref_p + ref_m + ref_b):
            if exact:
                assert torch.equal(a, b)
            else:
                assert_step_close(a, b, 0.1 + noise)
        for a, b in zip(params + masters + bufs, ref_p + ref_m + ref_b):
            a.copy_(b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_perturb_restore_and_step_t_exact(emu, dtype):
    params = [torch.randn(n).to(dtype) for n in RAD_SIZES]
    ref = [p.clone() for p in params]
    ids = list(range(len(RAD_SIZES)))
    step_t = torch.tensor(9, dtype=torch.int64)
    emu.perturb_(params, ids, 42, 0, 0.25, offsets=RAD_OFFSETS, step_t=step_t, rademacher=True)
    R.perturb_(ref, ids, 42, 9, 0.25, offsets=RAD_OFFSETS, rademacher=True)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))
    sub = [o + R.substream_offset(3, True) for o in RAD_OFFSETS]  # n_pert's sub-stream 3
    emu.restore_(params, ids, 42, 9, 0.25, offsets=sub, rademacher=True)
    R.restore_(ref, ids, 42, 9, 0.25, offsets=sub, rademacher=True)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))
    grads = [torch.randn(n).to(dtype) for n in RAD_SIZES]
    emu.fused_step_(params, grads, [], ids, 42, 0, 0.1, 0.0, 0.0, 0.0, 0.25, 0.5, offsets=RAD_OFFSETS,
                    step_t=step_t, restore_rademacher=True, perturb_rademacher=True)
    R.fused_step_(ref, grads, [], ids, 42, 9, 0.1, 0.0, 0.0, 0.0, 0.25, 0.5, offsets=RAD_OFFSETS,
                  restore_rademacher=True, perturb_rademacher=True)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


def test_misaligned_storage_takes_the_scalar_path(emu):
    # data_ptr one element past a 16-byte boundary: the kernels may not use vector access
    base = torch.randn(4 * 4096 + 9)
    p, g = base[1:], torch.randn(4 * 4096 + 8)
    assert p.data_ptr() % 16 != 0
    ref, neighbour = p.clone(), base[0].item()
    emu.fused_step_([p], [g], [], [4], 11, 2, 0.1, 0.0, 0.0, 0.01, 0.03, 0.03)
    R.fused_step_([ref], [g], [], [4], 11, 2, 0.1, 0.0, 0.0, 0.01, 0.03, 0.03)
    assert_step_close(p, ref, 0.07)
    assert base[0].item() == neighbour  # the element before the tensor is not written


def test_stochastic_rounding_matches_spec_2c(emu):
    _sr_paths.check_all(emu)


def test_stochastic_rounding_on_interior_chunks(emu):
    """_sr_paths' tensors are shorter than a chunk: here whole chunks take the interior path, where
    lane pairs share each rounding block's Philox call (at offset 4 the first chunk starts one
    Gaussian block before the tensor, at the start of its rounding block)."""
    sizes, offsets, ids = [2 * CHUNK + 13, CHUNK + 8], [4, 2**32 + 16], [1, 2]
    before = chunk_paths()
    _sr_paths.check_noise_free(emu, sizes, offsets, ids)
    assert chunk_paths()[1] > before[1]
    _sr_paths.check_noisy(emu, sizes, offsets, ids)


def test_found_inf_changes_nothing(emu):
    params, grads = make([100, 37], torch.float32), make([100, 37], torch.float32)
    bufs = [torch.zeros_like(p) for p in params]
    before = [p.clone() for p in params]
    emu.fused_step_(params, grads, bufs, [0, 1], 1, 0, 0.1, 0.0, 0.9, 0.1, 0.1, 0.1,
                    grad_scale=torch.tensor([8.0]), found_inf=torch.tensor([1.0]))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(not b.any() for b in bufs)


def test_capturable_form_reads_step_and_lr_from_tensors(emu):
    params, grads = make([4100, 7], torch.float32), make([4100, 7], torch.float32)
    ref = [p.clone() for p in params]
    beta, lr = 1e4, 0.02
    step_t, lr_t = torch.tensor(6, dtype=torch.int64), torch.tensor([lr])
    std = (2.0 / beta) ** 0.5  # the capturable form scales it by sqrt(lr_t) in the kernel
    emu.fused_step_(params, grads, [], [0, 1], 3, 0, 0.5, 0.0, 0.0, std, 0.01, 0.01, step_t=step_t, lr_t=lr_t)
    R.fused_step_(ref, grads, [], [0, 1], 3, 6, lr, 0.0, 0.0, (2 * lr / beta) ** 0.5, 0.01, 0.01)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.02 + (2 * lr / beta) ** 0.5)
    emu.perturb_(params, [0, 1], 3, 0, 0.5, step_t=step_t)
    R.perturb_(ref, [0, 1], 3, 6, 0.5)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.55)


def test_more_tensors_than_one_table_holds(emu):
    sizes = [1 + (i % 7) for i in range(161)]  # the table holds 160 tensors
    params, grads = make(sizes, torch.float32), make(sizes, torch.float32)
    ref = [p.clone() for p in params]
    ids = list(range(len(sizes)))
    before = launches()
    emu.fused_step_(params, grads, [], ids, 8, 1, 0.1, 0.0, 0.0, 0.01, 0.02, 0.02)
    assert launches() - before == 2
    R.fused_step_(ref, grads, [], ids, 8, 1, 0.1, 0.0, 0.0, 0.01, 0.02, 0.02)
    for a, b in zip(params, ref):
        assert_step_close(a, b, 0.05)


def _kernel_constant(name):
    text = open(os.path.join(ROOT, "csrc", "fsgld_cuda_kernels.cuh")).read()
    return int(re.search(rf"constexpr int {name} = (\d+);", text).group(1))


CHUNK = 4 * _kernel_constant("kThreads") * _kernel_constant("kBlocksPerThread")  # elements per CUDA block


def test_a_tensor_split_across_launches(emu):
    # 2048 chunks fill a table: the big tensor continues in a second launch, its chunk numbering
    # carried over (a wrong carry would redraw or skip part of the stream)
    sizes = [CHUNK * 3 + 1, 2048 * CHUNK + 2 * CHUNK + 3]
    params = make(sizes, torch.float32)
    ref = [p.clone() for p in params]
    before = launches()
    emu.perturb_(params, [0, 1], 21, 5, 1.0, offsets=[0, 2])
    assert launches() - before == 2
    R.perturb_(ref, [0, 1], 21, 5, 1.0, offsets=[0, 2])
    for a, b in zip(params, ref):
        assert_step_close(a, b, 1.0)


def test_rejects_what_the_launcher_rejects(emu):
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        emu.perturb_([torch.zeros(3, dtype=torch.float64)], [0], 1, 0, 0.1)
    with pytest.raises(RuntimeError, match="param_ids"):
        emu.fused_step_([torch.zeros(3)], [torch.zeros(3)], [], [0, 1], 1, 0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0)
    with pytest.raises(RuntimeError, match="kind must be 0"):
        emu.normals(1, 0, 0, 2, 8)
    with pytest.raises(RuntimeError, match=r"shape \(n, 4\)"):
        emu.lib.philox_words_(torch.zeros(3, 4), 1, 0, 0, 0, 0)


def chunk_paths():
    edge, interior = torch.ops.fsgld_cuda_emu.chunk_paths()
    return edge, interior


@pytest.mark.parametrize("signs", [False, True], ids=["gaussian", "rademacher"])
def test_shards_at_any_offset_take_the_fast_path(emu, signs):
    """FSDP2 shards start wherever dim 0 splits: a multiple of 4 but rarely of 128. Every whole chunk
    inside such a shard takes the interior path (signs: chunks start at a Rademacher block, and the
    edge chunks draw their words the same way, one Philox per thread), as fsgld_fused.sass's chunk
    model counts; the result is the reference's, exactly for signs without noise."""
    from fsgld_fused import sass

    sizes = [3 * CHUNK + 8, 2 * CHUNK + 100, 777]
    offsets = [4, 128 * 7 + 36, 260]  # 4 mod 128 and 36 mod 128: one or two Rademacher words straddled
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    ref = [p.clone() for p in params]
    chunk_blocks = _kernel_constant("kThreads") * _kernel_constant("kBlocksPerThread")
    expected = [0, 0]
    for n, off in zip(sizes, offsets):
        for _, interior in sass._cuda_chunks(n, off, signs, chunk_blocks):
            expected[int(interior)] += 1
    assert expected[1] >= 3  # the layout has interior chunks to find
    kw = dict(offsets=offsets, restore_rademacher=signs, perturb_rademacher=signs)
    args = ([3, 1, 2], 0xFEEDFACECAFEBEEF, 6, 1e-2, 0.0, 0.0, 0.0, 0.05, 0.05)
    before = chunk_paths()
    emu.fused_step_(params, grads, [], *args, **kw)
    after = chunk_paths()
    assert [a - b for a, b in zip(after, before)] == expected
    R.fused_step_(ref, grads, [], *args, **kw)
    for a, b in zip(params, ref):
        if signs:
            assert torch.equal(a, b)
        else:
            assert_step_close(a, b, 0.1)
