"""SPEC 2b: the Rademacher perturbation, several perturbations per step (n_pert), antithetic pairs."""

import copy
import math

import pytest
import torch

from conftest import CPU_BACKENDS, KERNEL_BACKENDS
from fsgld_fused import FSGLD, _backends
from fsgld_fused import reference as R
from fsgld_fused.testing import assert_step_close


def _ops(backend):
    return _backends.resolve(backend, torch.device("cpu"), torch.float32).ops


# ---- the stream ------------------------------------------------------------------------------------
def test_signs_are_single_bits_of_one_philox_call_per_128_elements():
    seed, pid, step, offset, n = 0x0123456789ABCDEF, 5, 9, 2**32 * 128 - 70, 300  # crosses a 2**32 block carry
    signs = R.rademacher(seed, pid, step, n, offset)
    for e in (0, 1, 69, 70, 71, 200, 299):
        i = offset + e
        block = i // 128
        words = R.philox4x32((block & 0xFFFFFFFF, block >> 32, step, pid << 1), (seed & 0xFFFFFFFF, seed >> 32))
        bit = (int(words[(i % 128) // 32]) >> (i % 32)) & 1
        assert signs[e].item() == (1.0 if bit else -1.0), e


def test_substream_j_sits_in_bits_16_to_31_of_counter_word_1():
    for rademacher in (False, True):
        per_block = 128 if rademacher else 4
        off = R.substream_offset(3, rademacher)
        assert (off // per_block) >> 32 == 3 << 16  # counter word 1 = (block >> 32) | (j << 16)
        draw = (lambda o: R.rademacher(7, 1, 2, 64, o)) if rademacher else (lambda o: R.normals(7, 1, 2, R.EPS, 64, o))
        assert not torch.equal(draw(off), draw(0))  # another stream
    assert R.substream_offset(0, True) == 0  # eps_{k,0} is eps_k


def test_sign_balance():
    n = 1 << 20
    signs = R.rademacher(11, 0, 0, n)
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    assert abs(signs.mean().item()) < 5 / math.sqrt(n)  # 5 standard errors of a fair coin's mean
    bits = (signs.view(-1, 32) > 0).double().mean(0)  # every bit position of a word, separately
    assert (bits - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(n / 32)
    lag = (signs[1:] * signs[:-1]).mean().item()  # neighbours: independent
    assert abs(lag) < 5 / math.sqrt(n)


# ---- every backend against the reference, signs exact --------------------------------------------
SIZES, OFFSETS = [1, 127, 129, 1000], [0, 5, 131, 2**32 * 128 - 3]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_and_restore_match_the_reference_exactly(backend, dtype):
    params = [torch.randn(n).to(dtype) for n in SIZES]
    ref = [p.clone() for p in params]
    ids = [3, 0, 7, 1]
    _ops(backend).perturb_(params, ids, 99, 4, 0.25, offsets=OFFSETS, rademacher=True)
    R.perturb_(ref, ids, 99, 4, 0.25, offsets=OFFSETS, rademacher=True)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))  # +-sigma: one exact rounding, same everywhere
    _ops(backend).restore_(params, ids, 99, 4, 0.25, offsets=OFFSETS, rademacher=True)
    R.restore_(ref, ids, 99, 4, 0.25, offsets=OFFSETS, rademacher=True)
    assert all(torch.equal(a, b) for a, b in zip(params, ref))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("kinds", [(True, True), (False, True), (True, False)], ids=["r->r", "g->r", "r->g"])
def test_fused_step_with_signs_matches_the_reference(backend, master, kinds):
    dtype = torch.bfloat16 if master else torch.float32
    masters = [torch.randn(n) for n in SIZES] if master else []
    params = [m.to(dtype) for m in masters] if master else [torch.randn(n) for n in SIZES]
    grads = [torch.randn(n).to(dtype) for n in SIZES]
    bufs = [torch.randn(n) if master else torch.randn(n) for n in SIZES]
    copies = lambda xs: [x.clone() for x in xs]  # noqa: E731
    ref_p, ref_m, ref_b = copies(params), copies(masters), copies(bufs)
    ids = [2, 0, 1, 3]
    for step in (5, 6):
        args = (ids, 2**64 - 3, step, 1e-2, 1e-3, 0.9, 1e-3, 0.0 if master else 0.05, 0.05)
        kw = dict(offsets=OFFSETS, grad_scale=torch.tensor([4.0]), restore_rademacher=kinds[0],
                  perturb_rademacher=kinds[1])
        _ops(backend).fused_step_(params, grads, bufs, *args, masters=masters, **kw)
        R.fused_step_(ref_p, grads, ref_b, *args, masters=ref_m, **kw)
    for a, b in zip(params + masters + bufs, ref_p + ref_m + ref_b):
        assert_step_close(a, b, 0.1 + 1e-3)  # the Langevin noise is Gaussian: the SPEC tolerance


# ---- kernels that draw the signs themselves: bit for bit ------------------------------------------
# (numel, offset): whole programs on the unmasked path (offsets 0 and 128; 1024-element programs in
# the interpreter), 128-element and 2**32-block boundaries crossed, offsets that are not multiples of
# 128 (a chunk starting before the tensor), a masked tail everywhere. A few thousand elements: the
# interpreter runs programs one by one.
PAIRS = [(2100, 0), (1000, 5), (300, 2**32 * 128 - 70), (127, 131), (1, 7), (2100, 128)]
CASES = [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)]
CASE_IDS = ["fp32", "bf16", "bf16-masters"]


def _fused_sign_ops(backend, dtype):
    return _backends.resolve(backend, torch.device("cpu"), dtype).ops


def _tensors(dtype, master, offsets_shift=0):
    """params, masters (fp32, or none), grads, ids and offsets for PAIRS."""
    torch.manual_seed(0)
    masters = [torch.randn(n) for n, _ in PAIRS] if master else []
    params = [m.to(dtype) for m in masters] if master else [torch.randn(n).to(dtype) for n, _ in PAIRS]
    grads = [torch.randn(n).to(dtype) for n, _ in PAIRS]
    return params, masters, grads, [4, 0, 2, 1, 5, 3], [off + offsets_shift for _, off in PAIRS]


def _assert_equal(actual, expected):
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a, b), (i, PAIRS[i], (a.double() - b.double()).abs().max().item())


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("substream", [0, 3])
def test_perturb_and_restore_bit_for_bit(backend, case, substream):
    """Sub-stream j of n_pert is the stream shifted by substream_offset(j, True) elements (counter word 1)."""
    dtype, master = case
    ops = _fused_sign_ops(backend, dtype)
    params, masters, _, ids, offs = _tensors(dtype, master, R.substream_offset(substream, True))
    ref = [p.clone() for p in params]
    ops.perturb_(params, ids, 2**64 - 5, 2**32 + 9, 0.375, offsets=offs, masters=masters, rademacher=True)
    R.perturb_(ref, ids, 2**64 - 5, 2**32 + 9, 0.375, offsets=offs, masters=masters, rademacher=True)
    _assert_equal(params, ref)
    ops.restore_(params, ids, 2**64 - 5, 2**32 + 9, 0.375, offsets=offs, masters=masters, rademacher=True)
    R.restore_(ref, ids, 2**64 - 5, 2**32 + 9, 0.375, offsets=offs, masters=masters, rademacher=True)
    _assert_equal(params, ref)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fused_step_with_signs_bit_for_bit(backend, case, momentum):
    """Restore + update + next perturbation, all signs, without Langevin noise (its normals are exact
    only to the SPEC tolerance): params, masters and buffers equal the reference's bit for bit."""
    dtype, master = case
    ops = _fused_sign_ops(backend, dtype)
    params, masters, grads, ids, offs = _tensors(dtype, master)
    bufs = [torch.zeros_like(m) for m in masters] if master else [torch.zeros_like(p) for p in params]
    bufs = bufs if momentum else []
    ref_p, ref_m, ref_b = ([x.clone() for x in xs] for xs in (params, masters, bufs))
    for step in (5, 6):  # step 6 removes what step 5 added
        args = (ids, 0x0123456789ABCDEF, step, 1e-2, 5e-4, momentum, 0.0, 0.0 if master or step == 5 else 0.05, 0.05)
        kw = dict(offsets=offs, grad_scale=torch.tensor([4.0]), restore_rademacher=True, perturb_rademacher=True)
        ops.fused_step_(params, grads, bufs, *args, masters=masters, **kw)
        R.fused_step_(ref_p, grads, ref_b, *args, masters=ref_m, **kw)
        _assert_equal(params + masters + bufs, ref_p + ref_m + ref_b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=[CASE_IDS[0], CASE_IDS[2]])
@pytest.mark.parametrize("kinds", [(True, False), (False, True)], ids=["r->g", "g->r"])
def test_mixed_kinds_are_the_single_kind_passes(backend, case, kinds):
    """A step restoring one kind and perturbing ahead with the other (a group's perturbation changed
    mid-run), Langevin noise and momentum on, is bit for bit its parts run separately (exact where
    fp32 is stored in between: fp32 params, or masters); its parts match the reference above."""
    dtype, master = case
    ops = _fused_sign_ops(backend, dtype)
    params, masters, grads, ids, offs = _tensors(dtype, master)
    bufs = [torch.randn(n) for n, _ in PAIRS]
    parts_p, parts_m, parts_b = ([x.clone() for x in xs] for xs in (params, masters, bufs))
    restore_sigma = 0.0 if master else 0.05
    args = (ids, 77, 11, 1e-2, 5e-4, 0.9, 1e-3)
    ops.fused_step_(params, grads, bufs, *args, restore_sigma, 0.07, offsets=offs, masters=masters,
                    restore_rademacher=kinds[0], perturb_rademacher=kinds[1])
    if kinds[0] and restore_sigma:
        ops.restore_(parts_p, ids, 77, 11, restore_sigma, offsets=offs, rademacher=True)
    ops.fused_step_(parts_p, grads, parts_b, *args, 0.0 if kinds[0] else restore_sigma, 0.0 if kinds[1] else 0.07,
                    offsets=offs, masters=parts_m)
    if kinds[1]:
        ops.perturb_(parts_p, ids, 77, 12, 0.07, offsets=offs, masters=parts_m, rademacher=True)
    _assert_equal(params + masters + bufs, parts_p + parts_m + parts_b)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_capturable_form_with_signs_bit_for_bit(backend):
    """step_t / lr_t (device tensors) replace step / lr, on a sub-stream's offsets (n_pert)."""
    ops = _fused_sign_ops(backend, torch.float32)
    params, _, grads, ids, offs = _tensors(torch.float32, False, R.substream_offset(1, True))
    ref = [p.clone() for p in params]
    ops.perturb_(params, ids, 9, 0, 0.05, offsets=offs, step_t=torch.tensor([41]), rademacher=True)
    R.perturb_(ref, ids, 9, 41, 0.05, offsets=offs, rademacher=True)
    _assert_equal(params, ref)
    ops.fused_step_(params, grads, [], ids, 9, 0, 0.0, 1e-3, 0.0, 0.0, 0.05, 0.05, offsets=offs,
                    step_t=torch.tensor([41]), lr_t=torch.tensor([0.02]), restore_rademacher=True,
                    perturb_rademacher=True)
    R.fused_step_(ref, grads, [], ids, 9, 41, float(torch.tensor(0.02)), 1e-3, 0.0, 0.0, 0.05, 0.05, offsets=offs,
                  restore_rademacher=True, perturb_rademacher=True)
    _assert_equal(params, ref)


# ---- the optimizer ---------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stationary_variance_on_a_quadratic_with_signs(backend):
    """The exact AR(1) variance (lr^2 sigma^2 a^2 + 2 lr / beta) / (lr a (2 - lr a)) depends on eps
    only through its variance, 1 for signs as for normals."""
    lr, a, beta, sigma = 0.5, 1.0, 100.0, 0.3
    n = 100_000 if backend != "triton" else 4_096
    p = torch.nn.Parameter(torch.zeros(n))
    opt = FSGLD([p], lr=lr, beta=beta, sigma=sigma, seed=2025, backend=backend, perturbation="rademacher")
    rho = 1 - lr * a
    burn_in, gap = int(math.ceil(12 / -math.log(rho))), int(math.ceil(6 / -math.log(rho)))
    samples = []
    opt.perturb()
    for k in range(burn_in + 8 * gap):
        p.grad = a * p.detach()
        opt.step()
        if k >= burn_in and (k - burn_in) % gap == 0:
            with opt.unperturbed():
                samples.append(p.detach().double().pow(2).mean().item())
    exact = (lr**2 * sigma**2 * a**2 + 2 * lr / beta) / (lr * a * (2 - lr * a))
    se = exact * math.sqrt(2.0 / n) / math.sqrt(len(samples))
    assert abs(sum(samples) / len(samples) - exact) < 5 * se


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_switching_kind_mid_run_and_resuming(backend):
    """A group's perturbation changed mid-run takes effect at the next perturbation; the restore
    removes what was added; the applied kind is checkpointed like the applied sigma."""
    def run(opt, p, steps):
        for k in steps:
            p.grad = torch.cos(p.detach()) + k
            opt.step()

    p = torch.nn.Parameter(torch.randn(300))
    clean0 = p.detach().clone()
    opt = FSGLD([p], lr=1e-2, beta=1e5, sigma=0.05, momentum=0.5, seed=8, backend=backend)
    run(opt, p, range(2))
    opt.param_groups[0]["perturbation"] = "rademacher"
    assert opt.state[p]["applied_rademacher"] is False  # still Gaussian until the next perturbation
    run(opt, p, range(2, 3))
    assert opt.state[p]["applied_rademacher"] is True
    with opt.unperturbed():
        clean = p.detach().clone()
    eps = R.rademacher(8, 0, 3, 300)
    assert_step_close(p.detach(), clean + 0.05 * eps, 0.0, atol_extra=1e-6)  # perturbed by signs of step 3
    sd, model_w = copy.deepcopy(opt.state_dict()), p.detach().clone()
    assert sd["state"][0]["applied_rademacher"] is True
    run(opt, p, range(3, 6))
    q = torch.nn.Parameter(model_w.clone())
    opt2 = FSGLD([q], lr=1e-2, beta=1e5, sigma=0.05, momentum=0.5, backend=backend)  # Gaussian by default
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["perturbation"] == "rademacher"
    run(opt2, q, range(3, 6))
    assert torch.equal(p, q)
    opt2.param_groups[0]["perturbation"] = "gaussian"
    opt2.restore()
    with opt.unperturbed():
        assert_step_close(q.detach(), p.detach(), 0.0, atol_extra=1e-6)
    assert not torch.equal(q.detach(), clean0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
@pytest.mark.parametrize("antithetic", [False, True])
def test_n_pert_is_the_mean_gradient_of_a_hand_written_loop(backend, perturbation, antithetic):
    n, lr, beta, sigma, seed = 257, 0.05, 1e4, 0.1, 31
    m = 2 if antithetic else 3
    theta0 = torch.randn(n)
    p = torch.nn.Parameter(theta0.clone())
    opt = FSGLD([p], lr=lr, beta=beta, sigma=sigma, seed=seed, backend=backend, perturbation=perturbation,
                n_pert=m, antithetic=antithetic)
    target = torch.linspace(-1, 1, n)

    def closure():
        opt.zero_grad()  # zeroing inside the closure is harmless: FSGLD sums the gradients itself
        loss = (torch.sin(p) - target).pow(2).sum()
        loss.backward()
        return loss

    rad = perturbation == "rademacher"
    eps = lambda k, j: (R.rademacher(seed, 0, k, n, R.substream_offset(j, True)) if rad  # noqa: E731
                        else R.normals(seed, 0, k, R.EPS, n, R.substream_offset(j, False)))
    clean = theta0.clone()
    for k in range(2):
        opt.step(closure)
        shifts = [eps(k, 0), -eps(k, 0)] if antithetic else [eps(k, j) for j in range(m)]
        g = sum(2 * (torch.sin(clean + sigma * e) - target) * torch.cos(clean + sigma * e) for e in shifts) / m
        clean = clean - lr * g + math.sqrt(2 * lr / beta) * R.normals(seed, 0, k, R.XI, n)
        with opt.unperturbed():
            assert_step_close(p.detach(), clean, math.sqrt(2 * lr / beta), atol_extra=1e-5)
        assert_step_close(p.detach(), clean + sigma * eps(k + 1, 0), sigma + 1e-2, atol_extra=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_closure_failing_at_any_perturbation_leaves_clean_weights(backend):
    p = torch.nn.Parameter(torch.randn(50))
    opt = FSGLD([p], lr=1e-2, beta=1e4, sigma=0.1, seed=2, backend=backend, n_pert=3)
    opt.perturb()
    with opt.unperturbed():
        clean = p.detach().clone()
    calls = []

    def closure():
        calls.append(p.detach().clone())
        if len(calls) == 2:
            raise RuntimeError("batch 2 broke")
        p.pow(2).sum().backward()

    with pytest.raises(RuntimeError, match="batch 2"):
        opt.step(closure)
    assert not opt.is_perturbed and opt.step_count == 0
    assert_step_close(p.detach(), clean, 0.2)
    assert not torch.equal(calls[0], calls[1])  # two different perturbations were evaluated


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(perturbation="uniform"), "perturbation must be one of"),
        (dict(n_pert=0), "n_pert"),
        (dict(n_pert=1.5), "n_pert"),
        (dict(n_pert=True), "n_pert"),
        (dict(antithetic=1), "antithetic must be a bool"),
        (dict(antithetic=True, n_pert=3), "needs n_pert=2"),
        (dict(antithetic=True), "needs n_pert=2"),
    ],
)
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSGLD([torch.nn.Parameter(torch.zeros(3))], lr=1e-2, beta=1.0, **kwargs)


def test_n_pert_needs_a_closure_and_agreement_across_groups():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = FSGLD([a], lr=1e-2, beta=1.0, n_pert=2)
    a.grad = torch.ones(3)
    with pytest.raises(ValueError, match="pass a closure"):
        opt.step()
    opt = FSGLD([{"params": [a]}, {"params": [b], "n_pert": 1}], lr=1e-2, beta=1.0, n_pert=2)
    with pytest.raises(ValueError, match="same in every param group"):
        opt.step(lambda: None)
