"""FSGLD as a torch.optim optimizer: hand-computed steps, the loop contract, resume, bad input."""

import copy
import math

import pytest
import torch

from conftest import CPU_BACKENDS
from fsgld_fused import FSGLD, coupled_sigma
from fsgld_fused import reference as R
from fsgld_fused.testing import assert_step_close


def assert_restored(actual, clean, sigma):
    """Within one rounding of the perturbed magnitude: (w + s) - s loses at most ulp(|w + s|)."""
    bound = torch.finfo(clean.dtype).eps * (clean.abs() + sigma * 6.0)
    assert ((actual - clean).abs() <= bound).all()


def _model():
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))


def _loss(model, x):
    return model(x).pow(2).mean()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_steps_match_a_hand_computation(backend, momentum):
    lr, beta, sigma, wd, seed = 0.05, 1e4, 0.03, 0.01, 99
    theta0 = torch.randn(13)
    p = torch.nn.Parameter(theta0.clone())
    opt = FSGLD([p], lr=lr, beta=beta, sigma=sigma, weight_decay=wd, momentum=momentum, seed=seed, backend=backend)
    clean, buf = theta0.clone(), torch.zeros(13)
    opt.perturb()
    for k in range(4):
        eps = R.normals(seed, 0, k, R.EPS, 13)
        assert_step_close(p.detach(), clean + sigma * eps, sigma)  # forward sees theta + sigma * eps_k
        p.grad = torch.sin(p.detach()) * 3  # a gradient evaluated at the perturbed weights
        g = p.grad.clone()
        opt.step()
        d = g + wd * clean
        if momentum:
            buf = momentum * buf + d
            d = buf
        xi = R.normals(seed, 0, k, R.XI, 13)
        clean = clean - lr * d + math.sqrt(2 * lr / beta) * xi
        eps_next = R.normals(seed, 0, k + 1, R.EPS, 13)
        noise = sigma * 2 + math.sqrt(2 * lr / beta)
        assert_step_close(p.detach(), clean + sigma * eps_next, noise, atol_extra=1e-6)
        assert opt.step_count == k + 1
        with opt.unperturbed():
            assert_step_close(p.detach(), clean, noise, atol_extra=1e-6)


def test_coupled_sigma_and_defaults():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = FSGLD([p], lr=0.1, beta=1e8)
    assert opt.param_groups[0]["eta"] == 0.1
    assert FSGLD.group_sigma(opt.param_groups[0]) == pytest.approx(1e8 ** (-1.1 / 4))
    assert coupled_sigma(16.0, 0.5) == pytest.approx(16.0 ** (-1.5 / 4))
    assert opt.param_groups[0]["perturb_ahead"] is True


def test_seed_from_torch_default_generator_is_repeatable():
    p = torch.nn.Parameter(torch.zeros(3))
    torch.manual_seed(7)
    a = FSGLD([p], lr=0.1, beta=1.0).seed
    torch.manual_seed(7)
    b = FSGLD([p], lr=0.1, beta=1.0).seed
    torch.manual_seed(8)
    c = FSGLD([p], lr=0.1, beta=1.0).seed
    assert a == b != c and 0 <= a < 2**64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_training_loop_and_first_step_at_clean_weights(backend):
    """The loop's values: each step equals the reference op on the gradients the loop produced,
    with param ids in parameter order, step k's stream, and no restore at the first step."""
    model = _model()
    x = torch.randn(16, 5)
    w0 = [p.detach().clone() for p in model.parameters()]
    lr, beta, sigma, seed = 1e-2, 1e6, 0.01, 3
    std = math.sqrt(2 * lr / beta)
    opt = FSGLD(model.parameters(), lr=lr, beta=beta, sigma=sigma, seed=seed, backend=backend)
    assert not opt.is_perturbed
    expected, ids = [w.clone() for w in w0], list(range(len(w0)))
    for k in range(4):
        opt.zero_grad()
        _loss(model, x).backward()
        if k == 0:  # the first backward ran at the clean weights: nothing was perturbed yet
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        R.fused_step_(expected, grads, [], ids, seed, k, lr, 0.0, 0.0, std, 0.0 if k == 0 else sigma, sigma)
        for p, e in zip(model.parameters(), expected):
            assert_step_close(p.detach(), e, 2 * sigma + std)  # SPEC: the normals' rounding only
            e.copy_(p.detach())
        assert opt.is_perturbed and opt.step_count == k + 1
    with opt.unperturbed():  # the clean weights: the last perturbation (step 4's eps) taken off
        for p, e, pid in zip(model.parameters(), expected, ids):
            clean = e - sigma * R.normals(seed, pid, 4, R.EPS, e.numel()).view(e.shape)
            assert_step_close(p.detach(), clean, 2 * sigma)
    assert all(p.grad is not None for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_perturb_restore_are_idempotent_and_exact_inverses(backend):
    p = torch.nn.Parameter(torch.randn(1000))
    w0 = p.detach().clone()
    opt = FSGLD([p], lr=1e-3, beta=1e4, sigma=0.05, seed=1, backend=backend)
    opt.perturb()
    once = p.detach().clone()
    opt.perturb()
    assert torch.equal(p.detach(), once)
    assert not torch.equal(once, w0)
    opt.restore()
    opt.restore()
    assert_restored(p.detach(), w0, 0.05)
    assert not opt.is_perturbed


def test_unperturbed_context_puts_the_perturbation_back_even_on_error():
    p = torch.nn.Parameter(torch.randn(100))
    opt = FSGLD([p], lr=1e-3, beta=1e4, sigma=0.05, seed=1)
    opt.perturb()
    perturbed = p.detach().clone()
    with pytest.raises(KeyError):
        with opt.unperturbed():
            assert not opt.is_perturbed
            raise KeyError
    assert opt.is_perturbed
    assert_restored(p.detach(), perturbed, 0.05)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_closure_runs_at_perturbed_weights(backend):
    p = torch.nn.Parameter(torch.randn(50))
    w0 = p.detach().clone()
    opt = FSGLD([p], lr=1e-3, beta=1e4, sigma=0.05, seed=4, perturb_ahead=False, backend=backend)
    seen = {}

    def closure():
        opt.zero_grad()
        seen["w"] = p.detach().clone()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert_step_close(seen["w"], w0 + 0.05 * R.normals(4, 0, 0, R.EPS, 50), 0.05)
    assert not opt.is_perturbed  # perturb_ahead=False leaves clean weights


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_raising_closure_leaves_clean_weights(backend):
    p = torch.nn.Parameter(torch.randn(50))
    w0 = p.detach().clone()
    opt = FSGLD([p], lr=1e-3, beta=1e4, sigma=0.05, seed=4, backend=backend)

    def closure():
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(closure)
    assert not opt.is_perturbed and opt.step_count == 0
    assert_restored(p.detach(), w0, 0.05)


def test_param_without_grad_is_not_updated_but_its_perturbation_moves():
    a, b = torch.nn.Parameter(torch.randn(20)), torch.nn.Parameter(torch.randn(20))
    b0 = b.detach().clone()
    opt = FSGLD([a, b], lr=1e-2, beta=1e4, sigma=0.05, seed=5)
    a.grad = torch.ones(20)
    opt.step()
    # b: no update, no Langevin noise; perturbed with eps_1 for the next forward (pid 1)
    assert_step_close(b.detach(), b0 + 0.05 * R.normals(5, 1, 1, R.EPS, 20), 0.05)
    a.grad = torch.ones(20)
    opt.step()
    assert_step_close(b.detach(), b0 + 0.05 * R.normals(5, 1, 2, R.EPS, 20), 0.1)
    with opt.unperturbed():
        torch.testing.assert_close(b.detach(), b0, atol=1e-6, rtol=0)


def test_param_groups_have_their_own_hyperparameters_and_changes_take_effect():
    a, b = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(10))
    opt = FSGLD([{"params": [a]}, {"params": [b], "sigma": 0.0, "lr": 0.5}], lr=0.1, beta=math.inf, sigma=0.2, seed=1)
    a.grad, b.grad = torch.ones(10), torch.ones(10)
    opt.step()  # beta = inf: no Langevin noise
    torch.testing.assert_close(b.detach(), torch.full((10,), -0.5))
    assert_step_close(a.detach(), -0.1 + 0.2 * R.normals(1, 0, 1, R.EPS, 10), 0.2)
    opt.param_groups[0]["sigma"] = 0.4  # takes effect at the next perturbation, never at a restore
    a.grad = torch.ones(10)
    opt.step()
    assert_step_close(a.detach(), -0.2 + 0.4 * R.normals(1, 0, 2, R.EPS, 10), 0.6)
    opt.param_groups[1]["lr"] = -1.0
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()


def _run(model, opt, xs):
    for x in xs:
        opt.zero_grad()
        _loss(model, x).backward()
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_resume_is_bit_identical(backend, momentum, tmp_path):
    xs = [torch.randn(8, 5) for _ in range(20)]
    torch.manual_seed(1)
    model = _model()
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e5, momentum=momentum, weight_decay=1e-3, backend=backend)
    _run(model, opt, xs[:10])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _run(model, opt, xs[10:])

    torch.manual_seed(2)  # a different seed would be drawn: the checkpoint must carry it
    model2 = _model()
    opt2 = FSGLD(model2.parameters(), lr=1e-2, beta=1e5, momentum=momentum, weight_decay=1e-3, backend=backend)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.step_count == 10 and opt2.seed == opt.seed and opt2.is_perturbed
    _run(model2, opt2, xs[10:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_state_dict_round_trip_and_refusals():
    model = _model()
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e5, seed=2**64 - 1)
    sd = opt.state_dict()
    # the chain rides in every parameter's state: torch.distributed.checkpoint keeps nothing else
    assert all(sd["state"][i] == {"applied_sigma": 0.0, "applied_rademacher": False, "seed": 2**64 - 1, "step": 0,
                                  "skipped_steps": 0}
               for i in range(4))
    opt2 = FSGLD(model.parameters(), lr=1e-2, beta=1e5)
    opt2.load_state_dict(copy.deepcopy(sd))
    assert opt2.seed == 2**64 - 1
    with pytest.raises(ValueError, match="not an FSGLD state_dict"):
        opt2.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    bad = copy.deepcopy(sd)
    bad["state"][3]["step"] = 5
    with pytest.raises(ValueError, match="disagree on the chain"):
        opt2.load_state_dict(bad)
    assert opt2.step_count == 0 and opt2.seed == 2**64 - 1  # a refused load changes nothing


# ---- bad input: refused at construction or at the first step, never a wrong result ----
def _p():
    return [torch.nn.Parameter(torch.zeros(3))]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1e-3, beta=1.0), "learning rate"),
        (dict(lr=float("nan"), beta=1.0), "learning rate"),
        (dict(lr=1e-3, beta=0.0), "beta"),
        (dict(lr=1e-3, beta=-2.0), "beta"),
        (dict(lr=1e-3, beta=float("nan")), "beta"),
        (dict(lr=1e-3, beta=1.0, sigma=-0.1), "sigma"),
        (dict(lr=1e-3, beta=1.0, weight_decay=-1e-4), "weight_decay"),
        (dict(lr=1e-3, beta=1.0, momentum=-0.5), "momentum"),
        (dict(lr=1e-3, beta=1.0, eta=0.0), "Pass sigma explicitly"),
        (dict(lr=1e-3, beta=1.0, eta=1.0), "Pass sigma explicitly"),
        (dict(lr=1e-3, beta=1.0, eta=-0.3), "Pass sigma explicitly"),
        (dict(lr=1e-3, beta=1.0, seed=-1), "seed"),
        (dict(lr=1e-3, beta=1.0, seed=2**64), "seed"),
        (dict(lr=1e-3, beta=1.0, seed=1.5), "seed"),
        (dict(lr=1e-3, beta=1.0, backend="tpu"), "unknown backend"),
        (dict(lr=1e-3, beta=1.0, differentiable=True), "differentiable=True"),
        (dict(lr=1e-3, beta=1.0, fused=True, backend="reference"), "fused=True"),
        (dict(lr=1e-3, beta=1.0, foreach="yes"), "foreach"),
        (dict(lr=1e-3, beta=1.0, maximize=1), "maximize"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FSGLD(_p(), **kwargs)


def test_eta_is_free_when_sigma_is_given():
    FSGLD(_p(), lr=1e-3, beta=1.0, sigma=0.1, eta=5.0)


def test_unavailable_backend_names_the_available_ones():
    from conftest import AVAILABLE

    missing = [n for n, r in AVAILABLE.items() if r is not None]
    if not missing:
        pytest.skip("every backend is available here")
    with pytest.raises(ValueError, match="not available here.*Available: \\["):
        FSGLD(_p(), lr=1e-3, beta=1.0, backend=missing[0])


def test_bad_parameters_are_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="twice"):
        FSGLD([p, p], lr=1e-3, beta=1.0)
    with pytest.raises(ValueError, match="more than one|twice"):
        FSGLD([{"params": [p]}, {"params": [p]}], lr=1e-3, beta=1.0)
    with pytest.raises(ValueError, match="non-leaf"):
        FSGLD([p * 2], lr=1e-3, beta=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        FSGLD([torch.zeros(3, dtype=torch.complex64, requires_grad=True)], lr=1e-3, beta=1.0)
    with pytest.raises(ValueError, match="floating-point"):
        FSGLD([torch.zeros(3, dtype=torch.int64)], lr=1e-3, beta=1.0)


def test_sparse_gradient_is_refused_before_anything_changes():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    a0, b0 = a.detach().clone(), b.detach().clone()
    opt = FSGLD([a, b], lr=1e-3, beta=1.0, sigma=0.1)
    a.grad = torch.ones(4)
    b.grad = torch.ones(4).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0) and opt.step_count == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_momentum_and_weight_decay_follow_the_closed_form(backend):
    """Heavy ball with weight decay, noise-free (beta = inf, sigma = 0), on U = sum(h/2 theta^2 + c theta):
    buf_{k+1} = m buf_k + (h + wd) theta_k + c (buf_0 = 0), theta_{k+1} = theta_k - lr buf_{k+1}. So
    theta_k = theta* + a l1^k + b l2^k with theta* = -c / (h + wd) and l1, l2 the roots of
    l^2 - (1 + m - lr (h + wd)) l + m = 0 (complex for some h): an independent check of the rule
    in every backend at once, over many steps, in float64 (float32 where a backend has no float64)."""
    lr, wd, m, steps = 0.1, 0.3, 0.9, 25
    h = torch.tensor([0.0, 0.2, 1.0, 3.0, 7.5, 15.0, 0.05], dtype=torch.float64)
    c = torch.tensor([1.0, -0.5, 0.25, 2.0, -1.0, 0.3, 0.0], dtype=torch.float64)
    theta0 = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.5, -0.7, 3.0], dtype=torch.float64)
    s = h + wd
    star = -c / s
    tr = (1 + m - lr * s).to(torch.complex128)
    disc = torch.sqrt(tr * tr - 4 * m)
    l1, l2 = (tr + disc) / 2, (tr - disc) / 2
    theta1 = theta0 - lr * (s * theta0 + c)  # the first step: buf_1 = d_1
    b = ((theta1 - star) - l1 * (theta0 - star)) / (l2 - l1)
    a = (theta0 - star) - b

    def closed(k):
        return (star + a * l1**k + b * l2**k).real

    dtype = torch.float64 if _backends_take(backend, torch.float64) else torch.float32
    p = torch.nn.Parameter(theta0.to(dtype))
    opt = FSGLD([p], lr=lr, beta=math.inf, sigma=0.0, weight_decay=wd, momentum=m, seed=1, backend=backend)
    # measured max |error| over the 25 steps (values up to 12), weights / buffers: 8e-15 / 2.2e-14
    # in float64, 3.4e-7 / 1.8e-6 in float32 (triton); allowed: about 3x that
    atol, atol_buf = (3e-14, 1e-13) if dtype == torch.float64 else (1e-6, 5e-6)
    for k in range(1, steps + 1):
        p.grad = (h * p.detach().double() + c).to(dtype)
        opt.step()
        torch.testing.assert_close(p.detach().double(), closed(k), atol=atol, rtol=0)
        buf = opt.state_dict()["state"][0]["momentum_buffer"].double()
        torch.testing.assert_close(buf, (closed(k - 1) - closed(k)) / lr, atol=atol_buf, rtol=0)


def _backends_take(backend, dtype):
    from fsgld_fused import _backends

    try:
        return _backends.resolve(backend, torch.device("cpu"), dtype).name == backend
    except ValueError:
        return False
