"""Training integration: AMP, non-finite gradients, fp32 master weights, checkpoints across
backends, torch.compile, and state_dict refusals."""

import copy
import math

import pytest
import torch

from conftest import CPU_BACKENDS, KERNEL_BACKENDS
from fsgld_fused import FSGLD
from fsgld_fused import reference as R
from fsgld_fused.testing import assert_step_close


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g).to(dtype), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]


# ---- AMP ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_unscales_in_the_step(backend):
    """A GradScaler-driven step equals an unscaled step with the same gradients."""
    m1, m2 = _mlp(), _mlp()
    o1 = FSGLD(m1.parameters(), lr=1e-2, beta=1e5, sigma=1e-2, seed=3, backend=backend)
    o2 = FSGLD(m2.parameters(), lr=1e-2, beta=1e5, sigma=1e-2, seed=3, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for x, y in _batches(3):
        o1.zero_grad()
        scaler.scale(torch.nn.functional.cross_entropy(m1(x), y)).backward()
        scaler.step(o1)
        scaler.update()
        o2.zero_grad()
        torch.nn.functional.cross_entropy(m2(x), y).backward()
        o2.step()
    # the scale is a power of two: scaling and unscaling are exact, so the runs are bit-identical
    # (measured on reference, cpu and triton)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    assert o1.step_count == 3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scaler_overflow_changes_nothing(backend):
    model = _mlp()
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e5, sigma=1e-2, seed=3, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _batches(1)[0]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    next(model.parameters()).grad[0, 0] = math.inf
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # perturbed as they were
    assert opt.step_count == 1 and opt.is_perturbed and opt.skipped_steps == 1
    assert scaler.get_scale() == 512.0


# ---- non-finite gradients without a scaler ----------------------------------------------------------
def test_nonfinite_gradient_raises_naming_the_parameter_and_changes_nothing():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))
    opt = FSGLD([a, b], lr=1e-2, beta=1e4, sigma=0.1, seed=1)
    opt.perturb()
    before = [a.detach().clone(), b.detach().clone()]
    a.grad, b.grad = torch.ones(3), torch.tensor([[1.0, math.nan], [0.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"param 1 \(group 0, shape \(2, 2\)\).*nothing was changed"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1]) and opt.step_count == 0


def test_nonfinite_skip_counts_and_survives_a_checkpoint():
    a = torch.nn.Parameter(torch.randn(3))
    opt = FSGLD([a], lr=1e-2, beta=1e4, sigma=0.1, seed=1, nonfinite="skip")
    a.grad = torch.tensor([1.0, -math.inf, 0.0])
    before = a.detach().clone()
    opt.step()
    assert torch.equal(a, before) and opt.skipped_steps == 1 and opt.step_count == 0
    opt2 = FSGLD([a], lr=1e-2, beta=1e4, nonfinite="skip")
    opt2.load_state_dict(opt.state_dict())
    assert opt2.skipped_steps == 1
    with pytest.raises(ValueError, match="nonfinite"):
        FSGLD([a], lr=1e-2, beta=1e4, nonfinite="warn")


# ---- fp32 master weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights_keep_small_updates_that_low_precision_drops(backend, dtype):
    p = torch.nn.Parameter(torch.ones(4096, dtype=dtype))
    opt = FSGLD([p], lr=1e-4, beta=1e12, sigma=0.01, seed=2, master_weights=True, backend=backend)
    master = opt.state[p]["master"]
    assert master.dtype == torch.float32
    for _ in range(5):
        p.grad = torch.ones_like(p)  # each update, 1e-4, is below half an ulp of 1.0 in bf16/fp16
        opt.step()
        with opt.unperturbed():  # exact: the param is the rounded master
            assert torch.equal(p, master.to(dtype))
    torch.testing.assert_close(master, torch.full_like(master, 1 - 5e-4), atol=1e-6, rtol=0)
    # the param holds round(master + sigma * eps_k), drawn from the SPEC stream
    eps = R.normals(2, 0, 5, R.EPS, 4096)
    assert_step_close(p.detach().float(), (master + 0.01 * eps).to(dtype).float(), 0.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_master_weights_survive_a_checkpoint_in_fp32(backend, tmp_path):
    model = _mlp(torch.bfloat16)
    opt = FSGLD(model.parameters(), lr=1e-3, beta=1e6, momentum=0.9, master_weights=True, seed=9, backend=backend)
    data = _batches(6, torch.bfloat16)
    for x, y in data[:3]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
    for x, y in data[3:]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        opt.step()
    model2 = _mlp(torch.bfloat16)
    opt2 = FSGLD(model2.parameters(), lr=1e-3, beta=1e6, momentum=0.9, master_weights=True, backend=backend)
    ckpt = torch.load(tmp_path / "c.pt")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    for p in model2.parameters():
        assert opt2.state[p]["master"].dtype == torch.float32
        assert opt2.state[p]["momentum_buffer"].dtype == torch.float32
    for x, y in data[3:]:
        opt2.zero_grad()
        torch.nn.functional.cross_entropy(model2(x).float(), y).backward()
        opt2.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["master"], opt2.state[q]["master"])


# ---- checkpoints across backends ------------------------------------------------------------------------
@pytest.mark.skipif(len(CPU_BACKENDS) < 2, reason="needs two backends")
@pytest.mark.parametrize("save_on,load_on", [(a, b) for a in CPU_BACKENDS for b in CPU_BACKENDS if a != b])
def test_checkpoint_moves_between_backends(save_on, load_on):
    data = _batches(8)

    def run(model, opt, batches):
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

    m1 = _mlp()
    o1 = FSGLD(m1.parameters(), lr=1e-2, beta=1e6, momentum=0.5, seed=4, backend=save_on)
    run(m1, o1, data[:4])
    sd_model, sd_opt = copy.deepcopy(m1.state_dict()), copy.deepcopy(o1.state_dict())
    run(m1, o1, data[4:])
    m2 = _mlp()
    o2 = FSGLD(m2.parameters(), lr=1e-2, beta=1e6, momentum=0.5, backend=load_on)
    m2.load_state_dict(sd_model)
    o2.load_state_dict(sd_opt)
    run(m2, o2, data[4:])
    # SPEC: the same stream, so the backends differ only by the normals' rounding, over the 4
    # resumed steps (restore + Langevin + next perturbation each); measured: 0 on every pair here
    noise = 4 * (2 * FSGLD.group_sigma(o1.param_groups[0]) + math.sqrt(2 * 1e-2 / 1e6))
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert_step_close(p.detach(), q.detach(), noise)


def test_load_state_dict_refusals_name_the_parameter():
    model = _mlp()
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e6, momentum=0.9, seed=1)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][2]["momentum_buffer"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of param 2 has shape \(3, 3\).*\(2, 16\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["params"] = bad["param_groups"][0]["params"][:-1]
    with pytest.raises(ValueError, match="param group 0 has 3 params in the state_dict and 4 here"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    for st in bad["state"].values():
        del st["seed"]
    with pytest.raises(ValueError, match="not an FSGLD state_dict"):
        opt.load_state_dict(bad)


# ---- torch.compile ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    data = _batches(3)

    def make():
        model = _mlp()
        return model, FSGLD(model.parameters(), lr=1e-2, beta=1e6, sigma=1e-2, seed=8, backend=backend)

    def train_step(model, opt, x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    m1, o1 = make()
    m2, o2 = make()
    compiled = torch.compile(train_step)
    for x, y in data:
        train_step(m1, o1, x, y)
        compiled(m2, o2, x, y)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_our_ops_trace_without_graph_breaks(backend):
    # the Triton launches build tables from data_ptr(): they are custom ops so Dynamo never sees that
    from fsgld_fused import _backends

    ops = _backends.resolve(backend, torch.device("cpu"), torch.float32).ops
    params = [torch.randn(10), torch.randn(7)]
    grads = [torch.randn(10), torch.randn(7)]

    def f(ps, gs):
        ops.fused_step_(ps, gs, [], [0, 1], 2**64 - 5, 3, 1e-2, 0.0, 0.0, 1e-3, 0.01, 0.01)
        ops.perturb_(ps, [0, 1], 2**64 - 5, 4, 0.02)
        return ps[0].sum()

    explained = torch._dynamo.explain(f)(params, grads)
    assert explained.graph_break_count == 0, explained.break_reasons
    expected = [p.clone() for p in params]
    f(expected, grads)
    got = [p.clone() for p in params]
    torch.compile(f, fullgraph=True)(got, grads)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
