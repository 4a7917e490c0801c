"""Property-based: random shapes, dtypes, group layouts and hyperparameters; every kernel backend
follows the reference through the optimizer, and through its ops with drawn shard offsets and
fp32 masters."""

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import _op_paths
from conftest import KERNEL_BACKENDS
from fsgld_fused import FSGLD, _backends
from fsgld_fused.testing import assert_step_close

if not KERNEL_BACKENDS:
    pytest.skip("no kernel backend here", allow_module_level=True)

DTYPES = {"cpu": [torch.float32, torch.float64, torch.bfloat16, torch.float16],
          "triton": [torch.float32, torch.bfloat16, torch.float16]}

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)
hparams = st.fixed_dictionaries({
    "lr": st.floats(1e-4, 0.1),
    "beta": st.one_of(st.floats(1.0, 1e8), st.just(math.inf)),
    "sigma": st.one_of(st.none(), st.floats(0.0, 0.1)),
    "weight_decay": st.sampled_from([0.0, 1e-4, 1e-2]),
    "momentum": st.sampled_from([0.0, 0.5, 0.9]),
    "perturb_ahead": st.booleans(),
    "master_weights": st.booleans(),
})


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_backend_follows_the_reference(backend, data):
    n_groups = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**64 - 1))
    groups_a, groups_b, all_a, all_b = [], [], [], []
    for _ in range(n_groups):
        n = data.draw(st.integers(1, 3))
        hp = data.draw(hparams)
        ps_a = []
        for _ in range(n):
            dtype = data.draw(st.sampled_from(DTYPES[backend]))
            ps_a.append(torch.nn.Parameter(torch.randn(data.draw(shapes)).to(dtype)))
        ps_b = [torch.nn.Parameter(p.detach().clone()) for p in ps_a]
        groups_a.append({"params": ps_a, **hp})
        groups_b.append({"params": ps_b, **hp})
        all_a += ps_a
        all_b += ps_b
    opt_a = FSGLD(groups_a, lr=0.01, beta=1e4, seed=seed, backend=backend)
    coeff, langevin = {}, {}  # the noise a step adds to each param: restore + Langevin + next perturbation
    for g in opt_a.param_groups:
        c = 2 * FSGLD.group_sigma(g) + math.sqrt(2 * g["lr"] / g["beta"])
        coeff.update({id(p): c for p in g["params"]})
        langevin.update({id(p): math.sqrt(2 * g["lr"] / g["beta"]) for p in g["params"]})
    opt_b = FSGLD(groups_b, lr=0.01, beta=1e4, seed=seed, backend="reference")
    steps = data.draw(st.integers(1, 3))
    for _ in range(steps):
        for a, b in zip(all_a, all_b):
            has_grad = data.draw(st.booleans())
            g = torch.randn(a.shape).to(a.dtype) if has_grad else None
            a.grad, b.grad = g, (None if g is None else g.clone())
        opt_a.step()
        opt_b.step()
        # keep the two on one trajectory: compare, then copy the reference's values across
        for a, b in zip(all_a, all_b):
            assert_step_close(a.detach(), b.detach(), coeff[id(a)])
            with torch.no_grad():
                a.copy_(b)
        state_a, state_b = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        assert state_a.keys() == state_b.keys()
        for i, st_b in state_b.items():  # fp32 masters: the clean weights, Langevin noise only
            if "master" in st_b:
                assert_step_close(state_a[i]["master"], st_b["master"], langevin[id(all_a[i])])
        opt_a.load_state_dict(copy.deepcopy(opt_b.state_dict()))  # buffers and masters
    assert opt_a.step_count == opt_b.step_count == steps


# Offsets: small ones (every residue mod 4 and 128), and any up to 2**40 (block indices past 2**32).
offsets = st.one_of(st.integers(0, 300), st.integers(0, 2**40))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_ops_follow_the_reference_with_offsets_and_masters(backend, data):
    """perturb_ / fused_step_ / restore_ on drawn sizes, shard offsets, param ids, masters, weight
    decay, momentum, grad scales, sigmas (0: not perturbed) and steps (tests/_op_paths.py)."""
    n = data.draw(st.integers(1, 3))
    # the interpreter runs its 1024-element programs one by one: smaller tensors there
    sizes = data.draw(st.lists(st.integers(0, 1100 if backend == "triton" else 5000), min_size=n, max_size=n))
    offs = data.draw(st.lists(offsets, min_size=n, max_size=n))
    ids = data.draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n, unique=True))
    master = data.draw(st.booleans())
    dtypes = [torch.bfloat16, torch.float16] if master else DTYPES[backend]
    dtype = data.draw(st.sampled_from(dtypes))
    steps = data.draw(st.integers(1, 3))
    _op_paths.check_chain(
        _backends.resolve(backend, torch.device("cpu"), dtype).ops, dtype, master,
        weight_decay=data.draw(st.sampled_from([0.0, 1e-4, 0.05])),
        momentum=data.draw(st.sampled_from([0.0, 0.5, 0.9])),
        sizes=sizes, offsets=offs, ids=ids, seed=data.draw(st.integers(0, 2**64 - 1)),
        sigmas=data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.05]), min_size=steps + 1, max_size=steps + 1)),
        scales=data.draw(st.lists(st.sampled_from([None, 2.0**-3, 512.0]), min_size=steps, max_size=steps)),
        lr=data.draw(st.floats(1e-4, 0.1)), beta=data.draw(st.one_of(st.floats(1.0, 1e8), st.just(math.inf))),
        first_ahead=data.draw(st.integers(0, steps)), data_seed=data.draw(st.integers(0, 2**31)),
    )
