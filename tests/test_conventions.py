"""FSGLD under torch.optim's own conventions, modelled on PyTorch's generic optimizer tests
(test/test_optim.py's TestOptimRenewed): atomic steps, frozen params, lr = 0 and the stock
schedulers, copies, any layout, named params, meta tensors, group-supplied hyperparameters,
maximize / foreach / fused / differentiable, state-dict hooks, SWA, torch.compile.

What differs from torch.optim on purpose (see README, "Conventions"): a step with all gradients
zero is not a no-op (Langevin noise and the perturbation move on), and complex or integer
parameters are refused.
"""

import copy
import io
import math
import pickle

import pytest
import torch

from conftest import CPU_BACKENDS, KERNEL_BACKENDS
from fsgld_fused import FSGLD
from fsgld_fused import reference as R
from fsgld_fused.testing import assert_step_close


def _params(n=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(5 + 3 * i, generator=g).to(dtype)) for i in range(n)]


def _grads(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _same(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


# ---- 1. a step that fails changes nothing, in any group ------------------------------------------
def _break_last_group(opt, params, how):
    """Make the step fail in the last group's last param, after group 0 would have been done."""
    group, last = opt.param_groups[-1], params[-1]
    if how == "sparse grad":
        last.grad = last.grad.to_sparse()
        return RuntimeError, "sparse"
    if how == "bad lr":
        group["lr"] = -1.0
        return ValueError, "learning rate"
    if how == "lr on another device":
        opt.capturable, opt.nonfinite = True, "ignore"  # a Tensor lr is a capturable feature
        group["lr"] = torch.tensor([1e-2], device="meta")
        return ValueError, "Tensor lr must live on the params' device"
    if how == "backend cannot run the dtype":
        group["backend"] = "triton" if "triton" in KERNEL_BACKENDS else "cuda"
        return ValueError, "cannot run|not available"
    raise AssertionError(how)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("how", ["sparse grad", "bad lr", "lr on another device", "backend cannot run the dtype"])
def test_a_step_that_fails_in_its_last_group_changes_nothing(backend, how):
    a, b = _params(2, seed=3), [torch.nn.Parameter(torch.randn(4, 6).t())]  # group 1: a strided param
    extra = {}
    if how == "backend cannot run the dtype":  # fp64, which no GPU kernel runs, on the reference
        b, extra = [torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))], {"backend": "reference"}
    kw = dict(lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=11, backend=backend)
    ref_a, ref_b = [torch.nn.Parameter(p.detach().clone()) for p in a], [torch.nn.Parameter(b[0].detach().clone())]
    opt = FSGLD([{"params": a}, {"params": b, **extra}], **kw)
    ref = FSGLD([{"params": ref_a}, {"params": ref_b, **extra}], **kw)
    for o, ps in ((opt, a + b), (ref, ref_a + ref_b)):  # one good step each: perturbed, buffers exist
        _grads(ps)
        o.step()
    _grads(a + b, seed=2)
    _grads(ref_a + ref_b, seed=2)
    before, applied = _snapshot(a + b), [opt.state[p]["applied_sigma"] for p in a + b]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in a + b]
    saved_group = dict(opt.param_groups[-1])
    error, match = _break_last_group(opt, a + b, how)
    with pytest.raises(error, match=match):
        opt.step()
    assert _same(a + b, before) and opt.step_count == 1  # group 0 was not stepped either
    assert [opt.state[p]["applied_sigma"] for p in a + b] == applied
    assert _same([opt.state[p]["momentum_buffer"] for p in a + b], bufs)
    # put it right and retry: the same as never having failed
    opt.param_groups[-1].update(saved_group)
    opt.capturable, opt.nonfinite = False, "raise"
    _grads(a + b, seed=2)
    opt.step()
    ref.step()
    assert _same(a + b, ref_a + ref_b) and opt.step_count == ref.step_count == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_strided_params_take_any_backend_and_match_contiguous_ones(backend):
    strided = torch.nn.Parameter(torch.randn(6, 5).t())  # (5, 6), column-major storage
    flat = torch.nn.Parameter(strided.detach().contiguous())
    o1 = FSGLD([strided], lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=3, backend=backend)
    o2 = FSGLD([flat], lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=3, backend=backend)
    for k in range(3):
        g = torch.randn(5, 6)
        strided.grad, flat.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert not strided.is_contiguous() and torch.equal(strided, flat)  # the row-major stream, same element math
    with o1.unperturbed(), o2.unperturbed():
        assert torch.equal(strided, flat)


# ---- 2. frozen parameters are never touched -----------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_params_are_never_touched(backend, dtype):
    train, frozen = _params(1, seed=1, dtype=dtype)[0], torch.nn.Parameter(torch.randn(64).to(dtype))
    frozen.requires_grad_(False)
    w0 = frozen.detach().clone()
    opt = FSGLD([train, frozen], lr=1e-2, beta=1e4, sigma=0.05, seed=2, backend=backend)
    opt.perturb()
    for _ in range(50):
        train.grad = torch.randn_like(train)
        opt.step()
    with opt.unperturbed():
        pass
    assert torch.equal(frozen, w0) and opt.state[frozen]["applied_sigma"] == 0.0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_freezing_a_perturbed_param_takes_the_perturbation_off_once(backend):
    p = torch.nn.Parameter(torch.randn(40))
    w0 = p.detach().clone()
    opt = FSGLD([p], lr=1e-2, beta=1e4, sigma=0.05, seed=2, backend=backend)
    opt.perturb()
    p.requires_grad_(False)  # e.g. a fine-tuning schedule freezing a layer between steps
    opt.step()
    assert_step_close(p.detach(), w0, 0.05)  # restored, not updated, not perturbed again
    after = p.detach().clone()
    opt.step()
    assert torch.equal(p, after) and not opt.is_perturbed
    p.requires_grad_(True)  # unfrozen: perturbed again from the next step on, like any param
    opt.step()
    assert_step_close(p.detach(), after + 0.05 * R.normals(2, 0, 3, R.EPS, 40), 0.05)


# ---- 3. lr = 0 and the stock schedulers --------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_lr_zero_means_no_update_and_no_noise_but_the_perturbation_moves(backend):
    p = torch.nn.Parameter(torch.randn(30))
    w0 = p.detach().clone()
    opt = FSGLD([p], lr=0.0, beta=1e2, sigma=0.05, momentum=0.9, seed=4, backend=backend)
    for _ in range(3):
        p.grad = torch.randn(30)
        opt.step()
    assert_step_close(p.detach(), w0 + 0.05 * R.normals(4, 0, 3, R.EPS, 30), 0.05)
    with opt.unperturbed():
        assert_step_close(p.detach(), w0, 0.1)  # clean weights: restored, never updated


@pytest.mark.parametrize(
    "make",
    [
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=3),  # eta_min = 0
        lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=3),
        lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=1.0, end_factor=0.0, total_iters=3),
        lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: s / 3),  # warm-up from 0 at step 0
    ],
    ids=["cosine", "polynomial", "linear-to-0", "warmup"],
)
def test_stock_schedulers_that_reach_lr_zero_run(make):
    model = torch.nn.Linear(4, 2)
    opt = FSGLD(model.parameters(), lr=0.1, beta=1e4, seed=1)
    sched = make(opt)
    lrs = []
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert 0.0 in lrs + [opt.param_groups[0]["lr"]] and opt.step_count == 5


# ---- 4. copies ------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_of_the_optimizer_continue_the_same_chain(how):
    params = _params(2, seed=5)
    opt = FSGLD(params, lr=1e-2, beta=1e4, momentum=0.5, nonfinite="skip", seed=9)
    _grads(params)
    opt.step()
    if how == "deepcopy":
        copy_params, copy_opt = copy.deepcopy((params, opt))
    elif how == "pickle":
        copy_params, copy_opt = pickle.loads(pickle.dumps((params, opt)))
    else:
        buf = io.BytesIO()
        torch.save((params, opt), buf)
        buf.seek(0)
        copy_params, copy_opt = torch.load(buf, weights_only=False)
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public == {k for k in vars(copy_opt) if not k.startswith("_")}  # test_optim's public-attrs check
    assert (copy_opt.seed, copy_opt.step_count, copy_opt.nonfinite) == (opt.seed, 1, "skip")
    for ps, o in ((params, opt), (copy_params, copy_opt)):
        _grads(ps, seed=7)
        o.step()
    assert _same(params, copy_params)


# ---- 6. named parameters ----------------------------------------------------------------------
def test_named_parameters_with_master_weights_and_the_usual_checks():
    model = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = FSGLD(model.named_parameters(), lr=1e-2, beta=1e4, seed=1, master_weights=True)
    assert all(opt.state[p]["master"].dtype == torch.float32 for p in model.parameters())
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    model(torch.randn(2, 4, dtype=torch.bfloat16)).float().sum().backward()
    opt.step()
    w = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        FSGLD([("a", w), ("b", w)], lr=1e-2, beta=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        FSGLD([("i", torch.zeros(3, dtype=torch.int64))], lr=1e-2, beta=1.0)


# ---- 7. meta tensors ----------------------------------------------------------------------------
def test_construction_and_a_grad_less_step_on_the_meta_device():
    with torch.device("meta"):
        model = torch.nn.Linear(8, 4)
        opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, momentum=0.9)  # seed drawn on the CPU
    opt.step()  # no grads: torch does nothing, and a meta tensor has no data to perturb
    opt.perturb()
    assert not opt.is_perturbed and 0 <= opt.seed < 2**64
    for p in model.parameters():  # a step with meta grads does not fail either
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.step_count == 2 and not opt.is_perturbed


# ---- 8. hyperparameters from the groups -------------------------------------------------------
def test_lr_and_beta_can_come_from_every_group():
    a, b = _params(2)
    opt = FSGLD([{"params": [a], "lr": 0.1, "beta": 1e4}, {"params": [b], "lr": 0.2, "beta": 1e5}])
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.2]
    with pytest.raises(ValueError, match="required optimization parameter lr"):
        FSGLD([{"params": [a], "beta": 1e4}])
    with pytest.raises(ValueError, match="required optimization parameter beta"):
        FSGLD([{"params": [a], "lr": 0.1}], lr=0.1)


# ---- 9. maximize, foreach / fused, differentiable ------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_maximize_is_the_step_on_the_negated_gradient(backend):
    a, b = _params(1, seed=2)[0], _params(1, seed=2)[0]
    o1 = FSGLD([a], lr=1e-2, beta=1e4, sigma=0.05, weight_decay=0.1, momentum=0.5, maximize=True, seed=1,
               backend=backend)
    o2 = FSGLD([b], lr=1e-2, beta=1e4, sigma=0.05, weight_decay=0.1, momentum=0.5, seed=1, backend=backend)
    for _ in range(3):
        g = torch.randn_like(a)
        a.grad, b.grad = g.clone(), -g
        o1.step()
        o2.step()
    assert torch.equal(a, b)


def test_foreach_and_fused_are_accepted_as_torch_passes_them():
    for kw in (dict(foreach=None), dict(foreach=True), dict(foreach=False), dict(fused=False), dict(fused=True)):
        p = _params(1)
        opt = FSGLD(p, lr=1e-2, beta=1e4, **kw)
        _grads(p)
        opt.step()
    with pytest.raises(ValueError, match="fused=True.*reference"):
        FSGLD(_params(1), lr=1e-2, beta=1e4, fused=True, backend="reference")
    with pytest.raises(ValueError, match="differentiable=True"):
        FSGLD(_params(1), lr=1e-2, beta=1e4, differentiable=True)


# ---- 10. state-dict hooks see the chain ----------------------------------------------------------
def test_state_dict_hooks_see_the_chain_and_a_pre_hook_can_upgrade_a_checkpoint():
    params = _params(2)
    opt = FSGLD(params, lr=1e-2, beta=1e4, seed=21)
    _grads(params)
    opt.step()
    seen = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(post=sd["state"][0]["seed"]))
    sd = opt.state_dict()
    assert seen["post"] == 21
    # a checkpoint of another program, upgraded by a pre-hook before FSGLD reads it
    foreign = {"param_groups": sd["param_groups"], "state": {0: {}, 1: {}}, "chain": {"seed": 5, "step": 3}}

    def upgrade(o, state_dict):
        chain = state_dict.pop("chain")
        for st in state_dict["state"].values():
            st.update(seed=chain["seed"], step=chain["step"], skipped_steps=0)
        return state_dict

    opt2 = FSGLD(_params(2), lr=1e-2, beta=1e4)
    opt2.register_load_state_dict_pre_hook(upgrade)
    opt2.register_load_state_dict_post_hook(lambda o: seen.update(loaded=(o.seed, o.step_count)))
    opt2.load_state_dict(foreign)
    assert seen["loaded"] == (5, 3) == (opt2.seed, opt2.step_count)


def test_a_checkpoint_of_the_top_level_format_still_loads():
    params = _params(2)
    opt = FSGLD([{"params": params[:1]}, {"params": params[1:], "sigma": 0.0}], lr=1e-2, beta=1e4, sigma=0.05)
    old = {"state": {}, "param_groups": opt.state_dict()["param_groups"],
           "fsgld": {"seed": 77, "step": 4, "applied_sigma": [0.05, 0.0], "skipped_steps": 1}}
    opt.load_state_dict(old)
    assert (opt.seed, opt.step_count, opt.skipped_steps) == (77, 4, 1)
    assert [opt.state[p]["applied_sigma"] for p in params] == [0.05, 0.0]


# ---- 11. SWA averages the clean weights -------------------------------------------------------
def test_averaged_model_over_clean_weights():
    model = torch.nn.Linear(3, 2)
    swa = torch.optim.swa_utils.AveragedModel(model)
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, sigma=0.05, seed=1)
    clean = []
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        with opt.unperturbed():  # the documented pattern: update_parameters sees theta, not theta + sigma*eps
            swa.update_parameters(model)
            clean.append(model.weight.detach().clone())
    expected = (torch.stack(clean[1:]).sum(0) + clean[0]) / 3  # AveragedModel's first update copies
    torch.testing.assert_close(swa.module.weight, expected, atol=1e-6, rtol=0)


# ---- 12. a compiled step has no graph breaks without the host-side finite check ---------------
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compiled_step_graph_breaks(backend):
    for nonfinite, breaks in (("ignore", 0), ("raise", 1)):  # "raise" syncs to decide: one break
        model = torch.nn.Linear(4, 3)
        opt = FSGLD(model.parameters(), lr=0.1, beta=1e4, seed=1, momentum=0.5, nonfinite=nonfinite, backend=backend)
        model(torch.randn(5, 4)).pow(2).mean().backward()
        assert torch._dynamo.explain(opt.step)().graph_break_count == breaks


# ---- repr -----------------------------------------------------------------------------------------
def test_repr_names_the_backend_auto_runs_and_the_coupled_sigma():
    opt = FSGLD(_params(1), lr=1e-2, beta=1e8, seed=3)
    text = repr(opt)
    assert "seed=3" in text and "backend: auto (" in text
    assert f"= {1e8 ** (-1.1 / 4):.6g})" in text
    assert math.isfinite(FSGLD.group_sigma(opt.param_groups[0]))
