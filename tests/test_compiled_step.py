"""A compiled step compiles at most twice (issue 22.1): once with the weights clean (the first
step), once perturbed; the step counter and a float lr reach the kernels as tensors, so neither
a new k nor a schedule's new lr recompiles. Every case runs 50 steps against eager."""

import pytest
import torch
from torch._dynamo.utils import counters

from conftest import KERNEL_BACKENDS
from fsgld_fused import FSGLD

STEPS = 50
# (nonfinite, options, param dtype): every option the README shows with torch.compile
CASES = [
    ("ignore", {}, torch.float32),
    ("raise", {}, torch.float32),
    ("ignore", {"perturbation": "rademacher"}, torch.float32),
    ("raise", {"momentum": 0.9, "weight_decay": 1e-3}, torch.float32),
    ("ignore", {"momentum": 0.9, "master_weights": True}, torch.bfloat16),
]


def _model(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).to(dtype)


def _data(n, dtype):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g).to(dtype), torch.randint(0, 2, (4,), generator=g)) for _ in range(n)]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _run(compile_what, backend, nonfinite, options, dtype, steps=STEPS, schedule=True, compiler="aot_eager"):
    """Train `steps` steps; compile_what: None (eager), "step" (torch.compile(opt.step)) or
    "train_step" (the README's compiled train_step). Returns (model, opt, graphs after the first
    step, graphs at the end)."""
    model = _model(dtype)
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e6, seed=7, nonfinite=nonfinite, backend=backend, **options)
    # a float lr changed at every step (the scheduler writes param_groups[i]["lr"] = float)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.97) if schedule else None
    step = torch.compile(opt.step, backend=compiler) if compile_what == "step" else opt.step

    def train_step(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x).float(), y).backward()
        step()

    run = torch.compile(train_step, backend=compiler) if compile_what == "train_step" else train_step
    torch._dynamo.reset()
    counters.clear()
    first = None
    for x, y in _data(steps, dtype):
        run(x, y)
        if sched is not None:
            sched.step()
        first = _graphs() if first is None else first
    return model, opt, first, _graphs()


def _assert_matches_eager(model, opt, backend, nonfinite, options, dtype, steps=STEPS):
    ref_model, ref_opt, _, _ = _run(None, backend, nonfinite, options, dtype, steps)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        # a compiled float lr is a float32 tensor: lr and the Langevin std round once differently
        torch.testing.assert_close(p.float(), q.float(), atol=1e-6, rtol=1e-5)
    assert opt.step_count == ref_opt.step_count == steps
    saved = opt.state_dict()["state"][0]["step"]
    assert type(saved) is int and saved == steps  # the checkpoint's counter stays an exact int
    assert all(type(g["lr"]) is float for g in opt.param_groups)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("nonfinite,options,dtype", CASES)
def test_compiled_step_compiles_at_most_twice(backend, nonfinite, options, dtype):
    if backend == "triton" and (options or nonfinite == "raise"):
        pytest.skip("the interpreter is slow: triton runs the plain cases (the plan is backend-independent)")
    steps = 10 if backend == "triton" else STEPS
    model, opt, first, total = _run("step", backend, nonfinite, options, dtype, steps)
    assert first >= 1, "the first step compiled nothing"
    # the first compile's graphs (two with nonfinite="raise": its host check breaks the graph) at
    # most twice: clean weights at step 0, perturbed from step 1 on; nothing after
    assert total <= 2 * first, f"{total} graphs in {steps} steps, {first} per compile"
    _assert_matches_eager(model, opt, backend, nonfinite, options, dtype, steps)


@pytest.mark.parametrize("nonfinite", ["ignore", "raise"])
def test_compiled_train_step_compiles_at_most_twice(nonfinite):
    model, opt, first, total = _run("train_step", "cpu", nonfinite, {}, torch.float32, compiler="inductor")
    assert first >= 1 and total <= 2 * first, f"{total} graphs in {STEPS} steps, {first} per compile"
    _assert_matches_eager(model, opt, "cpu", nonfinite, {}, torch.float32)


def test_eager_steps_after_compiled_ones_continue_the_stream():
    """The first compiled step moves the counter to the device (a tensor); eager steps then read it."""
    model = _model(torch.float32)
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e6, seed=7, nonfinite="ignore", backend="cpu")
    ref_model = _model(torch.float32)
    ref = FSGLD(ref_model.parameters(), lr=1e-2, beta=1e6, seed=7, nonfinite="ignore", backend="cpu")
    compiled = torch.compile(opt.step)
    for i, (x, y) in enumerate(_data(6, torch.float32)):
        for m, o, s in ((model, opt, compiled if i % 3 else opt.step), (ref_model, ref, ref.step)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            s()
    assert opt.step_count == ref.step_count == 6
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)  # a constant float lr: the same float32 value on both paths
    fresh = FSGLD(_model(torch.float32).parameters(), lr=1e-2, beta=1e6, backend="cpu")
    fresh.load_state_dict(opt.state_dict())
    assert fresh.step_count == 6 and fresh.seed == 7
