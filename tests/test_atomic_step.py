"""A step that any kernel would refuse changes nothing (issue 22.2): every precondition of the
kernels' own input checks (csrc/fsgld_ops.h, kernels/triton_ops.py::_check) is met or refused by
the step plan before the first launch. State whose dtype, device or layout no longer fits is
converted (as torch.optim's load_state_dict does); what cannot be converted is refused, and then
weights, grads, state (no new momentum buffer) and counters are as they were.

Each refused case is set up in the second param group, so that a plan checking group by group
would already have launched the first group's kernel."""

import copy

import pytest
import torch

from conftest import CPU_BACKENDS, KERNEL_BACKENDS
from fsgld_fused import FSGLD, _backends


def _setup(backend, dtype=torch.float32, steps=1, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)).to(dtype)
    opt = FSGLD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], lr=1e-2, beta=1e6,
                momentum=0.9, seed=5, backend=backend, **options)
    x = torch.randn(8, 4)
    for _ in range(steps):
        opt.zero_grad()
        model(x.to(dtype)).float().sum().backward()
        opt.step()
    return model, opt, x


def _snapshot(model, opt):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        copy.deepcopy(opt.state_dict()),
        (opt.step_count, opt.skipped_steps, opt.is_perturbed),
    )


def _assert_same(before, after):
    for a, b in zip(before[0], after[0]):
        assert a.dtype == b.dtype and torch.equal(a, b), "a weight changed"
    for a, b in zip(before[1], after[1]):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), "a grad changed"
    s0, s1 = before[2]["state"], after[2]["state"]
    assert s0.keys() == s1.keys(), "params gained or lost state"
    for i in s0:
        assert s0[i].keys() == s1[i].keys(), f"param {i}'s state gained or lost an entry: {s0[i].keys()} {s1[i].keys()}"
        for k in s0[i]:
            a, b = s0[i][k], s1[i][k]
            same = torch.equal(a, b) and a.dtype == b.dtype if isinstance(a, torch.Tensor) else a == b
            assert same, f"state {k!r} of param {i} changed"
    assert before[3] == after[3], "a counter changed"


# ---- what cannot be converted: refused before any launch --------------------------------------------
def _wrong_buffer_shape(model, opt):
    opt.state[model[1].weight]["momentum_buffer"] = torch.zeros(3)


def _wrong_master_shape(model, opt):
    opt.state[model[1].weight]["master"] = torch.zeros(5)


def _grad_dtype(model, opt):
    model[1].weight.data = model[1].weight.data.double()  # .data skips autograd's grad-dtype check


def _grad_shape(model, opt):
    model[1].weight.data = torch.zeros(2, 3)  # resized under its grad


REFUSED = {
    "momentum buffer shape": (_wrong_buffer_shape, {}),
    "master shape": (_wrong_master_shape, {"master_weights": True}),
    "grad dtype": (_grad_dtype, {}),
    "grad shape": (_grad_shape, {}),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(REFUSED))
@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_a_refused_step_changes_nothing(backend, case, first):
    """first-step: group 0 has no momentum buffer yet (a failing plan must not leave one)."""
    breaks, options = REFUSED[case]
    dtype = torch.bfloat16 if options.get("master_weights") else torch.float32
    model, opt, x = _setup(backend, dtype, steps=0 if first else 1, **options)
    opt.zero_grad()
    model(x.to(dtype)).float().sum().backward()
    breaks(model, opt)
    before = _snapshot(model, opt)
    with pytest.raises(RuntimeError, match="param 2|optimizer state"):
        opt.step()
    _assert_same(before, _snapshot(model, opt))


def _refused_by_kernel(backend, params, grads, bufs, masters=()):
    ops = _backends.resolve(backend, torch.device("cpu"), params[0].dtype).ops
    with pytest.raises(RuntimeError):
        ops.fused_step_(params, grads, bufs, list(range(len(params))), 5, 0, 1e-2, 0.0, 0.9, 1e-3, 0.0, 0.0,
                        masters=masters)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_the_kernels_refuse_what_the_plan_refuses(backend):
    """The premise of the test above: each case reaches a kernel check when called directly."""
    p, g = [torch.zeros(2, 4)], [torch.ones(2, 4)]
    _refused_by_kernel(backend, p, g, [torch.zeros(3)])  # momentum buffer shape
    _refused_by_kernel(backend, [p[0].bfloat16()], [g[0].bfloat16()], [torch.zeros(2, 4)], [torch.zeros(5)])  # master
    _refused_by_kernel(backend, p, [torch.ones(2, 3)], [torch.zeros(2, 4)])  # grad shape
    if backend == "cpu":  # the Triton launch does not compare a grad's dtype: the plan's check is its only guard
        _refused_by_kernel(backend, p, [g[0].double()], [torch.zeros(2, 4)])


# ---- what can be converted: converted, and the step is the one a converted state gives -----------
def _stale_buffer_dtype(model, opt):  # the reproducer: a mid-training cast of one layer
    model[1].to(torch.bfloat16)


def _strided_buffer(model, opt):
    buf = opt.state[model[1].weight]["momentum_buffer"]
    opt.state[model[1].weight]["momentum_buffer"] = buf.t().contiguous().t()  # same values, column-major


def _low_precision_master(model, opt):
    state = opt.state[model[1].weight]
    state["master"] = state["master"].bfloat16().t().contiguous().t()


CONVERTED = {
    "momentum buffer dtype": (_stale_buffer_dtype, {}, torch.float32),
    "momentum buffer layout": (_strided_buffer, {}, torch.float32),
    "master dtype and layout": (_low_precision_master, {"master_weights": True}, torch.bfloat16),
}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(CONVERTED))
def test_state_no_kernel_takes_is_converted(backend, case):
    changes, options, dtype = CONVERTED[case]
    runs = []
    for by_hand in (False, True):
        model, opt, x = _setup(backend, dtype, steps=1, **options)
        changes(model, opt)
        if by_hand:  # what the plan must do: torch.optim's load_state_dict conversion
            for p in model[1].parameters():
                state = opt.state[p]
                if "master" in state:
                    state["master"] = state["master"].float().contiguous()
                want = torch.float32 if "master" in state else p.dtype
                state["momentum_buffer"] = state["momentum_buffer"].to(want).contiguous()
        for _ in range(2):
            opt.zero_grad()
            layer1 = model[0](x.to(dtype))
            model[1](layer1.to(model[1].weight.dtype)).float().sum().backward()
            opt.step()
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert o1.step_count == o2.step_count == 3
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(m1[1].parameters(), m2[1].parameters()):
        for key, value in o2.state[q].items():
            if isinstance(value, torch.Tensor):
                mine = o1.state[p][key]
                assert mine.dtype == value.dtype and mine.is_contiguous() and torch.equal(mine, value)
