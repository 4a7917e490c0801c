"""Worker for tests/test_dcp.py: FSDP2 + torch.distributed.checkpoint on gloo ranks (run and torn
down by tests/_dist_workers.py's `_run`, which says why it imports everything first)."""

import os

import torch
import torch.distributed.checkpoint  # noqa: F401  (before init_process_group, as _dist_workers does)
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from _dist_workers import _run
from _readme import readme_snippet

STEPS = 5


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def batches(n, start=0):
    g = torch.Generator().manual_seed(123)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)) for _ in range(start + n)]
    return data[start:]


def optimizer(m, backend, seed=77):
    from fsgld_fused import FSGLD

    return FSGLD(m.parameters(), lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, weight_decay=1e-3, seed=seed,
                 backend=backend)


def train(m, opt, data, rank, world):
    for x, y in data:
        opt.zero_grad()
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's share of the global batch
        torch.nn.functional.mse_loss(m(xs), ys).backward()
        opt.step()


def local_state(m, opt):
    """This rank's shards of the weights (as they are: perturbed) and of the momentum buffers."""
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t).detach().clone()  # noqa: E731
    return [local(p) for p in m.parameters()] + [local(opt.state[p]["momentum_buffer"]) for p in m.parameters()]


def fsdp_dcp_worker(rank, world, port, backend, out_dir):
    _run(_fsdp_dcp, rank, world, port, backend, out_dir)


def _fsdp_dcp(rank, world, backend, out_dir):
    results = {}

    def sharded():
        m = model()
        exec(readme_snippet("fsdp2"), {"model": m, "blocks": [m[0], m[2]]})  # shards as the README does
        return m

    def dcp_snippet(name, m, o, path):
        exec(readme_snippet(name), {"model": m, "opt": o, "path": os.path.join(out_dir, path)})

    m = sharded()
    opt = optimizer(m, backend)
    train(m, opt, batches(STEPS), rank, world)
    dcp_snippet("dcp-save", m, opt, "as_is")
    with opt.unperturbed():
        dcp_snippet("dcp-save", m, opt, "clean")
    full_opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_msd, full_osd = get_state_dict(m, opt, options=full_opts)  # rank 0 holds it, on the CPU
    train(m, opt, batches(STEPS, start=STEPS), rank, world)
    expected = local_state(m, opt)
    with opt.unperturbed():
        results["full_clean"] = [p.full_tensor().detach().clone() for p in m.parameters()]

    def resume(kind):
        m2 = sharded()
        opt2 = optimizer(m2, backend, seed=None)
        before = local_state(m2, opt2)
        get_state_dict(m2, opt2)  # on a fresh optimizer: must not step it (no dummy step)
        untouched = opt2.step_count == 0 and all(torch.equal(a, b) for a, b in zip(before, local_state(m2, opt2)))
        if kind == "full":  # rank 0 holds the full state dict, the other ranks an empty one
            bcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
            set_model_state_dict(m2, full_msd, options=bcast)
            set_optimizer_state_dict(m2, opt2, full_osd, options=bcast)
        else:
            dcp_snippet("dcp-load", m2, opt2, kind)
        if kind == "clean":
            opt2.perturb()  # saved under unperturbed(): the next forward needs its perturbation back
        loaded = (opt2.seed, opt2.step_count) == (opt.seed, STEPS)
        train(m2, opt2, batches(STEPS, start=STEPS), rank, world)
        got = local_state(m2, opt2)
        exact = all(torch.equal(a, b) for a, b in zip(got, expected))
        err = max((a.double() - b.double()).abs().max().item() for a, b in zip(got, expected))
        return {"untouched": untouched, "loaded": loaded, "exact": exact, "max_err": err}

    for kind in ("as_is", "clean", "full"):
        results[kind] = resume(kind)
    torch.save(results, os.path.join(out_dir, f"dcp_{rank}.pt"))


def ddp_snippet_worker(rank, world, port):
    _run(_ddp_snippet, rank, world, port)


def _ddp_snippet(rank, world):
    """README's DDP lines, one training step (its DDP module, which holds the group, is released
    before `_run` tears the group down)."""
    ns = {"model": model()}
    exec(readme_snippet("ddp"), ns)
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(ns["model"](x), y).backward()
    ns["opt"].step()
    assert ns["opt"].step_count == 1 and ns["opt"].is_perturbed
