"""Worker functions for tests/test_distributed.py (importable by spawned processes).

The flaky SIGABRT ("terminate called without an active exception", ~2 of 25 runs; not reproduced
in 50 looped spawns here) points at the workers' exit, which was racy: their gloo process group
outlived `destroy_process_group` (observed in /proc/self/task), so its threads
(gloo_tcp_loop, pt_gloo_runloop x2, and the TCPStore server pt_tcpstore_uv on rank 0) were still
running when the worker returned, and were torn down in interpreter and C++ static teardown
while the peer processes exited and closed their sockets. Two things kept the group alive:
torch._dynamo imported after `init_process_group` (by the first torch.optim optimizer, DDP or
fully_shard) keeps it referenced, so everything is imported here first; and FSDP2 keeps its gloo
transport (gloo_tcp_loop) alive regardless, so `_run` ends every worker with a barrier, the
teardown, and os._exit(0) once its results are written.
"""

import os
import sys

import torch
import torch._dynamo  # noqa: F401  (see above: before init_process_group)
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from fsgld_fused import FSGLD


def _init(rank, world, port):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)


def _run(body, rank, world, port, *args):
    """Run body(rank, world, *args) in a process group; its locals (DDP/FSDP modules, which hold
    the group) are released when it returns. Then every rank tears the group down after a barrier
    and leaves with os._exit(0): its results are on disk, and torch may still hold gloo threads
    (FSDP2 keeps a gloo_tcp_loop alive past destroy_process_group), which interpreter and static
    teardown would otherwise destroy while they run and while the peers close their sockets."""
    _init(rank, world, port)
    try:
        body(rank, world, *args)
    except BaseException:
        dist.destroy_process_group()  # no barrier: a failed peer would never reach it
        raise
    dist.barrier()  # no rank closes its connections while a peer still uses them
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))


def _global_batches(n):
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)) for _ in range(n)]


def ddp_worker(rank, world, port, backend, out_dir):
    _run(_ddp, rank, world, port, backend, out_dir)


def _ddp(rank, world, backend, out_dir):
    model = DDP(_model())
    torch.manual_seed(1000 + rank)  # each rank would draw a different seed on its own
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, momentum=0.5, backend=backend)
    seeds = [None] * world
    dist.all_gather_object(seeds, opt.seed)
    assert len(set(seeds)) == 1, seeds
    g = torch.Generator().manual_seed(rank)  # different data on every rank
    for _ in range(5):
        x, y = torch.randn(4, 6, generator=g), torch.randn(4, 5, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"ddp_{rank}.pt"))


def mismatched_seed_worker(rank, world, port, out_dir):
    _run(_mismatched_seed, rank, world, port, out_dir)


def _mismatched_seed(rank, world, out_dir):
    try:
        FSGLD(_model().parameters(), lr=1e-2, beta=1e4, seed=rank)
        msg = "no error"
    except ValueError as exc:
        msg = str(exc)
    with open(os.path.join(out_dir, f"seed_{rank}.txt"), "w") as f:
        f.write(msg)


def fsdp_worker(rank, world, port, backend, out_dir):
    _run(_fsdp, rank, world, port, backend, out_dir)


def _fsdp(rank, world, backend, out_dir):
    model = _model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=77, backend=backend)
    # the perturbation of each shard is its slice of the unsharded stream
    before = [p.to_local().detach().clone() for p in model.parameters()]
    opt.perturb()
    shards = []
    for p, b in zip(model.parameters(), before):
        shards.append({"local": p.to_local().detach().clone(), "before": b,
                       "full_shape": tuple(p.shape), "placements": str(p.placements)})
    opt.restore()
    for x, y in _global_batches(4):
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]  # this rank's half of the global batch
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(xs), ys).backward()
        opt.step()
    with opt.unperturbed():
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
    # optimizer state is laid out like the params (DTensor shards), and a state_dict taken
    # here loads into a fresh optimizer on the same sharded model, also from full tensors
    state_like_params = all(
        type(opt.state[p]["momentum_buffer"]) is type(p) and opt.state[p]["momentum_buffer"].placements == p.placements
        and opt.state[p]["momentum_buffer"].shape == p.shape for p in model.parameters())
    sd = opt.state_dict()
    full_sd = {**sd, "state": {i: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in st.items()}
                               for i, st in sd["state"].items()}}
    loaded = []
    for source in (sd, full_sd):
        opt2 = FSGLD(model.parameters(), lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=1, backend=backend)
        opt2.load_state_dict(source)
        loaded.append(opt2.step_count == opt.step_count and opt2.seed == opt.seed and all(
            torch.equal(opt2.state[p]["momentum_buffer"].to_local(), opt.state[p]["momentum_buffer"].to_local())
            and opt2.state[p]["momentum_buffer"].placements == p.placements for p in model.parameters()))
    torch.save({"full": full, "shards": shards, "state_like_params": state_like_params, "loaded": loaded},
               os.path.join(out_dir, f"fsdp_{rank}.pt"))
