"""capturable=True: step counter (and optionally lr) in tensors on the params' device, advanced
there; checked on CPU tensors here, with CUDA-graph replay in tests/test_gpu.py."""

import math

import pytest
import torch

from conftest import CPU_BACKENDS
from fsgld_fused import FSGLD
from fsgld_fused.testing import assert_step_close


def _pair(backend, lr_tensor=False, **kw):
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(37)), torch.nn.Parameter(torch.randn(4, 5))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    lr = torch.tensor([1e-2]) if lr_tensor else 1e-2
    o_cap = FSGLD(a, lr=lr, beta=1e4, sigma=0.05, seed=3, backend=backend, capturable=True, nonfinite="ignore", **kw)
    o_ref = FSGLD(b, lr=1e-2, beta=1e4, sigma=0.05, seed=3, backend=backend, **kw)
    return a, b, o_cap, o_ref


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lr_tensor", [False, True])
@pytest.mark.parametrize("perturbation", ["gaussian", "rademacher"])
def test_capturable_follows_the_host_counter_run(backend, lr_tensor, perturbation):
    a, b, o_cap, o_ref = _pair(backend, lr_tensor, momentum=0.5, perturbation=perturbation)
    for k in range(4):
        for p, q in zip(a, b):
            g = torch.randn(p.shape)
            p.grad, q.grad = g, g.clone()
        o_cap.step()
        o_ref.step()
        for p, q in zip(a, b):
            if lr_tensor:  # sqrt(2/beta) * sqrt(lr) rounds differently from sqrt(2 lr / beta)
                assert_step_close(p.detach(), q.detach(), 0.1 + math.sqrt(2e-6), atol_extra=1e-7)
            else:
                assert torch.equal(p, q)
    assert list(o_cap._chain["step_t"].values())[0].item() == 4 and o_cap.step_count == 4
    assert o_cap._chain["step"] == 0  # the host counter is not the authority any more


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_capturable_amp_overflow_is_skipped_on_the_device(backend):
    a, b, o_cap, _ = _pair(backend)
    for p in a:
        p.grad = torch.ones_like(p)
    o_cap.step()
    before = [p.detach().clone() for p in a]
    o_cap.grad_scale, o_cap.found_inf = torch.tensor([2.0]), torch.tensor([1.0])  # as GradScaler sets them
    for p in a:
        p.grad = torch.ones_like(p)
    o_cap.step()
    assert all(torch.equal(p, q) for p, q in zip(a, before)) and o_cap.step_count == 1
    o_cap.found_inf = torch.tensor([0.0])
    o_cap.step()
    assert o_cap.step_count == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_capturable_grad_less_params_move_their_perturbation_only(backend):
    a, b, o_cap, o_ref = _pair(backend)
    for k in range(3):
        a[0].grad, b[0].grad = torch.ones(37), torch.ones(37)
        a[1].grad = b[1].grad = None
        o_cap.step()
        o_ref.step()
        for p, q in zip(a, b):
            assert_step_close(p.detach(), q.detach(), 0.1, atol_extra=1e-7)


def test_capturable_checkpoint_round_trip_fills_the_counter_in_place():
    a, b, o_cap, _ = _pair("reference")
    for p in a:
        p.grad = torch.ones_like(p)
    o_cap.step()
    counter = list(o_cap._chain["step_t"].values())[0]
    sd = o_cap.state_dict()
    assert {st["step"] for st in sd["state"].values()} == {1}
    for st in sd["state"].values():
        st["step"] = 7
    o_cap.load_state_dict(sd)
    assert counter.item() == 7 and o_cap.step_count == 7


def test_capturable_argument_checks():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        FSGLD(p, lr=1e-2, beta=1.0, capturable=True)
    with pytest.raises(ValueError, match="Tensor lr needs capturable=True"):
        FSGLD(p, lr=torch.tensor([1e-2]), beta=1.0)
    with pytest.raises(ValueError, match="one-element float32"):
        FSGLD(p, lr=torch.tensor([1e-2, 1e-2]), beta=1.0, capturable=True, nonfinite="ignore")
