"""The cached step plan (fsgld_fused/_plan.py) never goes stale: each route by which what a plan
depends on can change is taken between two steps, and the next steps must equal those of a
freshly built optimizer loaded with the same state (issue 23)."""

import copy

import pytest
import torch

from fsgld_fused import FSGLD

HP = dict(lr=1e-2, beta=1e6, momentum=0.5, seed=3, backend="cpu")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _backward(model, x):
    for p in model.parameters():
        p.grad = None
    h = x
    for layer in model:
        h = layer(h.to(layer.weight.dtype))
    h.float().sum().backward()


def _fresh(model, opt):
    """A new model and FSGLD with the same groups, state and grads: it builds its plan anew."""
    m2 = copy.deepcopy(model)
    where = {id(p): q for p, q in zip(model.parameters(), m2.parameters())}
    for p, q in zip(model.parameters(), m2.parameters()):
        q.requires_grad_(p.requires_grad)
        q.grad = None if p.grad is None else p.grad.clone()
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [where[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    o2 = FSGLD(groups, **HP)
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # a live state dict shares its tensors
    return m2, o2


def _freeze(m, o):
    m[1].weight.requires_grad_(False)


def _unfreeze(m, o):
    m[0].bias.requires_grad_(True)


def _lr(m, o):
    o.param_groups[1]["lr"] = 3e-2


def _beta(m, o):
    o.param_groups[0]["beta"] = 1e4


def _momentum(m, o):
    o.param_groups[0]["momentum"] = 0.9  # read at launch: the plan is kept


def _momentum_off(m, o):
    o.param_groups[1]["momentum"] = 0.0  # no buffer read or written any more


def _weight_decay(m, o):
    o.param_groups[0]["weight_decay"] = 1e-2


def _state_replaced(m, o):
    o.state = type(o.state)(dict, {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                   for p, s in o.state.items()})


def _add_group(m, o):
    o.add_param_group({"params": m[2].parameters(), "momentum": 0.0})


def _to_bf16(m, o):
    m[1].to(torch.bfloat16)


def _data(m, o):
    m[0].weight.data = m[0].weight.data.clone() * 2  # new storage, same metadata


def _transpose(m, o):
    m[0].weight.data = m[0].weight.data.t()  # same storage and shape, new strides


def _in_place(m, o):
    with torch.no_grad():  # a rollback / clipping between steps, on a param the kernels see through a copy
        m[0].weight.mul_(0.5)


def _perturbation(m, o):
    o.param_groups[0]["perturbation"] = "rademacher"


def _masters(m, o):
    o.restore()  # a master copies clean weights
    m[1].to(torch.bfloat16)
    o.param_groups[1]["master_weights"] = True


def _state_by_hand(m, o):
    state = o.state[m[1].weight]
    state["momentum_buffer"] = state["momentum_buffer"] * 0.5


def _load(m, o):
    state = o.state_dict()
    loaded = {i: {**{k: v * 2 if k == "momentum_buffer" else v for k, v in s.items()}, "seed": 11, "step": 40}
              for i, s in state["state"].items()}  # new tensors: a stale plan would keep the old buffers
    o.load_state_dict({**state, "state": loaded})


ROUTES = {"lr": _lr, "beta": _beta, "momentum": _momentum, "momentum off": _momentum_off,
          "weight_decay": _weight_decay, "state replaced": _state_replaced, "add_param_group": _add_group, "freeze": _freeze, "unfreeze": _unfreeze,
          "to bf16": _to_bf16, "p.data =": _data, "p.data = p.data.t()": _transpose,
          "in place, strided": _in_place, "perturbation": _perturbation, "master_weights": _masters,
          "restore": lambda m, o: o.restore(), "unperturbed": lambda m, o: o.unperturbed().__enter__(),
          "load_state_dict": _load, "state by hand": _state_by_hand, "grad disappears": None, "grad appears": None}


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_cached_plan_follows_every_change(route):
    model = _model()
    if route == "in place, strided":  # a strided param: the kernels update a contiguous copy of it
        model[0].weight = torch.nn.Parameter(model[0].weight.detach().t().contiguous().t())
    model[0].bias.requires_grad_(False)  # frozen until "unfreeze"
    opt = FSGLD([{"params": model[0].parameters()}, {"params": model[1].parameters()}], **HP)
    x = torch.randn(5, 4)
    for _ in range(3):  # steady state: the third step runs the cached plan
        _backward(model, x)
        opt.step()
    assert opt._cache["plan"] is not None, "no plan was cached"
    change = ROUTES[route]
    if change is not None:
        change(model, opt)
    for k in range(2):
        _backward(model, x)
        if route == "grad disappears" or (route == "grad appears" and k == 0):
            model[1].bias.grad = None
        if route == "freeze":  # frozen with a grad left over: still never touched
            model[1].weight.grad = torch.ones_like(model[1].weight)
        fresh_model, fresh = _fresh(model, opt)
        opt.step()
        fresh.step()
        for p, q in zip(model.parameters(), fresh_model.parameters()):
            assert p.dtype == q.dtype and torch.equal(p, q), f"{route}: step {k} differs from a fresh optimizer"
        assert opt.step_count == fresh.step_count
        if route == "master_weights":  # the fresh one's load_state_dict cast the fp32 buffer to bf16
            continue
        for p, q in zip(model.parameters(), fresh_model.parameters()):  # and so does the state it holds
            s, t = opt.state.get(p, {}), fresh.state.get(q, {})
            assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) if torch.is_tensor(s[k]) else s[k] == t[k]
                                                for k in s), f"{route}: step {k} state differs"


def test_the_plan_is_reused_in_steady_state():
    model = _model()
    opt = FSGLD(model.parameters(), **HP)
    x = torch.randn(5, 4)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
    plans = []
    for _ in range(4):
        _backward(model, x)
        opt.step()
        sched.step()  # a float lr is read at launch: changing it keeps the plan
        plans.append(opt._cache["plan"])
    # step 0 creates buffers and perturbs, step 1 builds the steady plan, steps 2 and 3 reuse it
    assert plans[0] is None and plans[1] is not None and plans[1] is plans[2] is plans[3]
    opt.param_groups[0]["lr"] = float("nan")
    _backward(model, x)
    with pytest.raises(ValueError, match="Invalid learning rate"):  # still checked at every step
        opt.step()


@pytest.mark.parametrize("name", ["momentum", "weight_decay"])
def test_a_momentum_cycling_schedule_keeps_the_plan(name):
    """OneCycleLR cycles the momentum with the lr at every step: both are read at launch, so the
    plan is built once; a bad value set by hand is still refused at the next step, changing nothing."""
    model = _model()
    opt = FSGLD(model.parameters(), **HP)
    x = torch.randn(5, 4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10, cycle_momentum=True)
    plans, momenta = [], []
    for _ in range(5):
        _backward(model, x)
        opt.step()
        sched.step()
        plans.append(opt._cache["plan"])
        momenta.append(opt.param_groups[0]["momentum"])
    assert len(set(momenta)) == 5 and plans[1] is not None and all(p is plans[1] for p in plans[1:])
    opt.param_groups[0][name] = -0.5
    _backward(model, x)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=f"Invalid {name}"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_closure_and_train_steps_reuse_the_plan():
    """perturb() / restore() that change nothing (step(closure), opt.train() before a step, as the
    HF Trainer calls it) keep the plan."""
    model = _model()
    opt = FSGLD(model.parameters(), **HP)
    x = torch.randn(5, 4)

    def closure():
        _backward(model, x)
        return None

    plans = []
    for k in range(5):
        if k % 2:
            opt.train()
            _backward(model, x)
            opt.step()
        else:
            opt.step(closure)
        plans.append(opt._cache["plan"])
    assert plans[1] is not None and all(p is plans[1] for p in plans[1:])


def test_an_expanded_grad_is_checked_too():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = FSGLD([p], **HP)
    p.grad = torch.ones(1).expand(4)  # its elements share memory: the multi-tensor check refuses it
    opt.step()
    p.grad = torch.tensor([float("nan")]).expand(4)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="non-finite gradient"):
        opt.step()
    assert torch.equal(p.detach(), before)
