"""The CUDA and Triton backends on a real GPU against the reference (skipped without one).

Where a CUDA device is present, an unavailable cuda or triton backend (a broken build, a Triton
import error) FAILS these tests instead of skipping them; FSGLD_TEST_ALLOW_MISSING=cuda (or
triton) skips them deliberately (tests/conftest.py). Triton runs compiled here: conftest sets
TRITON_INTERPRET only where no CUDA device is present.
"""

import math

import pytest
import torch

import _sr_paths
from conftest import ALLOWED_MISSING, AVAILABLE, INTERPRET
from fsgld_fused import FSGLD, _backends
from fsgld_fused import reference as R
from fsgld_fused.testing import NOISE_ATOL, assert_step_close

pytestmark = pytest.mark.gpu
# Tails of every length, and lists of many chunks. Kept small: the reference draws its noise on
# the CPU (3 streams of 4.2M elements took 33 s per step on a 2-core VM); the launches split
# across chunk tables are test_fused_step_across_launches_on_gpu's, checked in windows.
SIZES = [0, 1, 3, 4, 5, 1023, (1 << 16) + 7, 3 << 16]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def ops(backend, dtype=torch.float32):
    reason = AVAILABLE.get(backend)
    if reason is not None:
        if backend in ALLOWED_MISSING:
            pytest.skip(f"{backend} unavailable (allowed by FSGLD_TEST_ALLOW_MISSING): {reason}")
        pytest.fail(f"a CUDA device is present but the {backend} backend is unavailable: {reason}")
    if backend == "triton" and INTERPRET:
        pytest.fail("TRITON_INTERPRET=1 with a CUDA device: the GPU tests need the compiled Triton kernels")
    return _backends.resolve(backend, torch.device("cuda"), dtype).ops


def grad_rounding(lr, steps, grads, terms):
    """What `steps` updates may differ by when the gradients come from other matmul kernels (other
    device, or another cuBLAS algorithm): lr * (the dot products' summation bound terms * eps * |g|)."""
    g = max(x.abs().max().item() for x in grads)
    return steps * lr * terms * torch.finfo(torch.float32).eps * g


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_backend_is_available_with_a_cuda_device(backend):
    assert ops(backend) is not None


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("offset", [0, 1, 3, 4 * (2**32 - 1) - 2])
def test_stream_on_gpu(backend, offset):
    ext = ops(backend)
    for n in SIZES:
        a = ext.normals(2**64 - 7, 3, 11, R.XI, n, offset, device="cuda").cpu()
        torch.testing.assert_close(a, R.normals(2**64 - 7, 3, 11, R.XI, n, offset), atol=NOISE_ATOL, rtol=0)
    words = ext.philox_words(seed=0x0123456789ABCDEF, pid=9, step=5, kind=1, first_block=2**32 - 3, nblocks=37,
                             device="cuda").cpu()
    blocks = torch.arange(2**32 - 3, 2**32 + 34, dtype=torch.int64)
    ref = R.philox4x32((blocks & 0xFFFFFFFF, blocks >> 32, 5, 19), (0x89ABCDEF, 0x01234567))
    assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, torch.stack(ref, dim=1))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("master", [False, True])
def test_fused_step_on_gpu(backend, dtype, momentum, master):
    if master and dtype == torch.float32:
        pytest.skip("masters are for low-precision params")
    ext = ops(backend, dtype)
    masters = [torch.randn(s, device="cuda") for s in SIZES] if master else []
    params = [m.to(dtype) for m in masters] if master else [torch.randn(s, device="cuda").to(dtype) for s in SIZES]
    grads = [torch.randn(s, device="cuda").to(dtype) for s in SIZES]
    bdt = torch.float32 if master else dtype
    bufs = [torch.zeros(s, device="cuda", dtype=bdt) for s in SIZES] if momentum else []
    cpu = lambda xs: [x.cpu() for x in xs]  # noqa: E731
    ref_p, ref_m, ref_b = cpu(params), cpu(masters), cpu(bufs)
    ids, offs = list(range(len(SIZES))), [0, 1, 2, 3, 0, 5, 0, 4]
    scale, found = torch.tensor([64.0], device="cuda"), torch.tensor([0.0], device="cuda")
    args = (ids, 99, 6, 1e-2, 1e-2, momentum, 1e-3, 0.0 if master else 0.02, 0.02)
    ext.fused_step_(params, grads, bufs, *args, offsets=offs, masters=masters, grad_scale=scale, found_inf=found)
    R.fused_step_(ref_p, cpu(grads), ref_b, *args, offsets=offs, masters=ref_m, grad_scale=scale.cpu(),
                  found_inf=found.cpu())
    for a, b in zip(params, ref_p):
        assert_step_close(a.cpu(), b, 0.04 + 1e-3)
    for a, b in zip(masters, ref_m):
        assert_step_close(a.cpu(), b, 0.02 + 1e-3)
    before = [p.clone() for p in params]
    ext.fused_step_(params, grads, bufs, *args, offsets=offs, masters=masters, grad_scale=scale,
                    found_inf=torch.tensor([1.0], device="cuda"))
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_optimizer_on_gpu_matches_cpu_reference(backend):
    ops(backend)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 33).cuda()
    ref = torch.nn.Linear(64, 33)
    ref.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    o1 = FSGLD(model.parameters(), lr=1e-2, beta=1e5, sigma=0.01, seed=5, backend=backend)
    o2 = FSGLD(ref.parameters(), lr=1e-2, beta=1e5, sigma=0.01, seed=5, backend="reference")
    x = torch.randn(8, 64)
    for _ in range(3):
        for m, o, xx in ((model, o1, x.cuda()), (ref, o2, x)):
            o.zero_grad()
            m(xx).pow(2).mean().backward()
            o.step()
    # SPEC: the noise's rounding (restore + Langevin + next perturbation, 3 steps), plus the
    # summation bound of the forward's 64-term and the weight gradient's 8-term dot products
    noise = 3 * (2 * 0.01 + math.sqrt(2 * 1e-2 / 1e5))
    extra = grad_rounding(1e-2, 3, [q.grad for q in ref.parameters()], 64 + 8)
    for p, q in zip(model.parameters(), ref.parameters()):
        assert_step_close(p.detach().cpu(), q.detach(), noise, atol_extra=extra)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_signs_exact_on_gpu(backend, dtype):
    """SPEC 2b on hardware (CUDA's interior path hands sign words around the warp with shuffles):
    perturb_ and a step without Langevin noise are exact arithmetic on exact signs, so `==`."""
    ext = ops(backend, dtype)
    sizes, offsets, ids = [3 * 4096 + 5, 1 << 20, 4096 + 130, 70], [0, 128 * 2**32 - 4096, 4, 4101], [3, 0, 2, 1]
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    grads = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    gpu = [p.cuda() for p in params]
    ext.perturb_(gpu, ids, 2**64 - 9, 7, 0.25, offsets=offsets, rademacher=True)
    R.perturb_(params, ids, 2**64 - 9, 7, 0.25, offsets=offsets, rademacher=True)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, params))
    args = (ids, 2**64 - 9, 7, 1e-2, 1e-3, 0.0, 0.0, 0.25, 0.125)
    ext.fused_step_(gpu, [g.cuda() for g in grads], [], *args, offsets=offsets, restore_rademacher=True,
                    perturb_rademacher=True)
    R.fused_step_(params, grads, [], *args, offsets=offsets, restore_rademacher=True, perturb_rademacher=True)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(gpu, params))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_cuda_graph_replay_draws_fresh_noise_and_matches_eager(backend, perturbation):
    ops(backend)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256).cuda()
    ref = torch.nn.Linear(256, 256).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(64, 256, device="cuda")
    opt = FSGLD(model.parameters(), lr=torch.tensor([1e-2], device="cuda"), beta=1e4, sigma=0.01, seed=1,
                backend=backend, capturable=True, nonfinite="ignore", perturbation=perturbation)
    opt_ref = FSGLD(ref.parameters(), lr=1e-2, beta=1e4, sigma=0.01, seed=1, backend=backend,
                    perturbation=perturbation)

    def train_step(m, o):
        o.zero_grad(set_to_none=True)
        m(x).pow(2).mean().backward()
        o.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: tables, counters, autograd buffers
        for _ in range(3):
            train_step(model, opt)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)  # grads allocated inside the capture are overwritten at replay
    with torch.cuda.graph(graph):
        model(x).pow(2).mean().backward()
        opt.step()
    snapshots = []
    for _ in range(4):
        graph.replay()
        snapshots.append(model.weight.detach().clone())
    assert opt.step_count == 3 + 4  # the counter advanced on the device at every replay
    assert not torch.equal(snapshots[-1], snapshots[-2])
    for _ in range(3 + 4):
        train_step(ref, opt_ref)
    # Same kernels; the capturable form computes the Langevin std as sqrt(2/beta) * sqrt(lr_t) in
    # float32 (a few ulp of it): SPEC's noise tolerance on that std over the 7 steps, plus the
    # summation bound of the 256-term forward and 64-term gradient dot products, in case the
    # capture picks another cuBLAS algorithm
    noise = 7 * math.sqrt(2 * 1e-2 / 1e4)
    extra = grad_rounding(1e-2, 7, [ref.weight.grad], 256 + 64)
    assert_step_close(model.weight.detach().cpu(), ref.weight.detach().cpu(), noise, atol_extra=extra)


def _placed(values, starts):
    """(CPU, GPU) lists of 1-D views holding `values`, each `start` elements into its own buffer (the
    whole buffer copied to the GPU, then sliced there): start % 4 != 0 puts the data pointer off the
    16-byte vector alignment (the kernels' scalar path). `.cuda()` of a view would copy it aligned."""
    bufs = [torch.cat([torch.zeros(s, dtype=v.dtype), v]) for v, s in zip(values, starts)]
    return [b[s:] for b, s in zip(bufs, starts)], [b.cuda()[s:] for b, s in zip(bufs, starts)]


# Shard offsets: aligned (multiples of 4 and 128) and not, one past 2**32 Philox blocks; view
# starts: aligned pointers and not.
VIEW_SIZES, VIEW_STARTS = [3 * 4096 + 5, 1 << 16, 4096 + 130, 70, 4], [0, 1, 2, 4, 3]
VIEW_OFFSETS, VIEW_IDS = [0, 4 * (2**32 - 1) - 2, 4101, 128, 3], [4, 0, 2, 1, 3]


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("master", [False, True])
def test_perturb_and_restore_on_gpu(backend, dtype, master):
    """perturb_ / restore_ (Gaussian) against the reference, on pointers off the vector alignment
    and shard offsets aligned and not; with masters the param is round(master + sigma * eps)."""
    if master and dtype == torch.float32:
        pytest.skip("masters are for low-precision params")
    ext = ops(backend, dtype)
    gen = torch.Generator().manual_seed(2)
    values = [torch.randn(n, generator=gen) for n in VIEW_SIZES]
    masters, gpu_m = _placed(values, VIEW_STARTS) if master else ([], [])
    params, gpu = _placed([v.to(dtype) for v in values], VIEW_STARTS)
    assert any(p.data_ptr() % 16 for p in gpu) and any(p.data_ptr() % 16 == 0 for p in gpu)
    args = (VIEW_IDS, 2**63 + 5, 9, 0.03)
    ext.perturb_(gpu, *args, offsets=VIEW_OFFSETS, masters=gpu_m)
    R.perturb_(params, *args, offsets=VIEW_OFFSETS, masters=masters)
    for a, b in zip(gpu, params):
        assert_step_close(a.cpu(), b, 0.03)
    ext.restore_(gpu, *args, offsets=VIEW_OFFSETS, masters=gpu_m)
    R.restore_(params, *args, offsets=VIEW_OFFSETS, masters=masters)
    for a, b in zip(gpu, params):
        assert_step_close(a.cpu(), b, 2 * 0.03)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_fused_step_unaligned_on_gpu(backend, perturbation):
    """The fused step on pointers off the vector alignment and shard offsets aligned and not
    (params, grads and momentum buffers each at their own start). Rademacher without Langevin
    noise is exact arithmetic on exact signs: compared with `==`."""
    ext = ops(backend)
    signs = perturbation == "rademacher"
    gen = torch.Generator().manual_seed(3)
    params, gpu = _placed([torch.randn(n, generator=gen) for n in VIEW_SIZES], VIEW_STARTS)
    grads, gpu_g = _placed([torch.randn(n, generator=gen) for n in VIEW_SIZES], VIEW_STARTS[::-1])
    bufs, gpu_b = _placed([torch.zeros(n) for n in VIEW_SIZES], [1] * len(VIEW_SIZES))
    args = (VIEW_IDS, 77, 3, 1e-2, 1e-2, 0.9, 0.0 if signs else 1e-3, 0.02, 0.03)
    kw = dict(offsets=VIEW_OFFSETS, restore_rademacher=signs, perturb_rademacher=signs)
    for _ in range(2):  # the second step reads the momentum buffers the first wrote
        ext.fused_step_(gpu, gpu_g, gpu_b, *args, **kw)
        R.fused_step_(params, grads, bufs, *args, **kw)
    for a, b in zip(gpu + gpu_b, params + bufs):
        if signs:
            assert torch.equal(a.cpu(), b)
        else:
            assert_step_close(a.cpu(), b, 2 * (0.02 + 0.03 + 1e-3))


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_grad_scaler_on_gpu(backend):
    """AMP through the optimizer: GradScaler hands FSGLD its device scale and found_inf (no host
    sync); a scaled run equals an unscaled one bit for bit (power-of-two scale), and an overflow
    changes nothing: not the weights, not the perturbation, not the step count."""
    ops(backend)
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)).cuda()
    m2 = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)).cuda()
    m2.load_state_dict(m1.state_dict())
    o1 = FSGLD(m1.parameters(), lr=1e-2, beta=1e5, sigma=1e-2, seed=3, backend=backend, momentum=0.9)
    o2 = FSGLD(m2.parameters(), lr=1e-2, beta=1e5, sigma=1e-2, seed=3, backend=backend, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", init_scale=1024.0)
    x = torch.randn(16, 32, device="cuda")
    for _ in range(3):
        o1.zero_grad()
        scaler.scale(m1(x).pow(2).mean()).backward()
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        m2(x).pow(2).mean().backward()
        o2.step()
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    before = [p.detach().clone() for p in m1.parameters()]
    o1.zero_grad()
    scaler.scale(m1(x).pow(2).mean()).backward()
    m1[0].weight.grad[0, 0] = math.inf
    scaler.step(o1)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(m1.parameters(), before))
    assert o1.step_count == 3 and o1.skipped_steps == 1 and scaler.get_scale() == 512.0


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_fused_step_across_launches_on_gpu(backend):
    """A list of more chunks than one CUDA launch's table holds (kMaxChunks x 4096 elements), so
    that a tensor continues into the next launch; checked against the reference in windows (the
    stream is keyed on the global element index: a window is the reference's step of that slice
    at its offset) at the start, across the table boundary and at the unaligned tail."""
    ext = ops(backend)
    gen = torch.Generator().manual_seed(4)
    sizes, offsets, ids = [4099, 9_000_005], [0, 6], [1, 0]
    params = [torch.randn(n, generator=gen) for n in sizes]
    grads = [torch.randn(n, generator=gen) for n in sizes]
    gpu, gpu_g = [p.cuda() for p in params], [g.cuda() for g in grads]
    args = (2**40 + 3, 12, 1e-2, 1e-3, 0.0, 1e-3, 0.02, 0.03)
    ext.fused_step_(gpu, gpu_g, [], ids, *args, offsets=offsets)
    # CUDA's first table: the small tensor's 2 chunks, then 2046 of the big one, whose chunks start
    # at global element 4 (local -2); Triton's programs need not split there
    boundary = 2046 * 4096 - 2
    for t, lo, hi in [(0, 0, sizes[0]), (1, 0, 4096), (1, boundary - 4096, boundary + 4096),
                      (1, sizes[1] - 4101, sizes[1])]:
        p, g = [params[t][lo:hi].clone()], [grads[t][lo:hi].clone()]
        R.fused_step_(p, g, [], [ids[t]], *args, offsets=[offsets[t] + lo])
        assert_step_close(gpu[t][lo:hi].cpu(), p[0], 0.02 + 0.03 + 1e-3)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_stochastic_rounding_matches_spec_2c_on_gpu(backend):
    # the kernels' SPEC 2c check (tests/test_cuda_emulation.py, the Triton interpreter) on the device:
    # warp shuffles, the GPU's own sqrt and bf16 conversion, compiled Triton; the reference on the CPU
    _sr_paths.check_all(ops(backend, torch.bfloat16), device="cuda")
