"""DDP and FSDP2 (torch.distributed's own engines) with the gloo backend on CPU."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dist_workers as W
from conftest import CPU_BACKENDS
from fsgld_fused import FSGLD
from fsgld_fused import reference as R

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
DIST_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"]  # DDP: the interpreter in 4 processes is slow


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("backend", DIST_BACKENDS)
def test_ddp_replicas_stay_bit_identical(world, backend, tmp_path):
    mp.spawn(W.ddp_worker, args=(world, _port(), backend, str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"ddp_{r}.pt") for r in range(world)]
    for other in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(ranks[0], other))


def test_different_explicit_seeds_are_refused(tmp_path):
    mp.spawn(W.mismatched_seed_worker, args=(2, _port(), str(tmp_path)), nprocs=2)
    for r in range(2):
        assert "seeds differ across ranks" in (tmp_path / f"seed_{r}.txt").read_text()


@pytest.mark.parametrize("backend", CPU_BACKENDS)  # every backend: shards start at offsets 3, 17, 99, 102
def test_fsdp2_matches_a_single_process_run(backend, tmp_path):
    world = 2
    mp.spawn(W.fsdp_worker, args=(world, _port(), backend, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"fsdp_{r}.pt") for r in range(world)]
    for r in range(world):
        assert results[r]["state_like_params"], "momentum buffers are not DTensors laid out like their params"
        assert results[r]["loaded"] == [True, True], "state_dict round trip (sharded, full) lost state"

    # the same global batches in one process
    model = W._model()
    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e4, sigma=0.05, momentum=0.5, seed=77, backend=backend)
    for x, y in W._global_batches(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with opt.unperturbed():
        for got, want in zip(results[0]["full"], model.parameters()):
            torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-5)

    # each rank's perturbation was exactly its slice of the unsharded noise (pid = param order)
    for pid, _ in enumerate(model.parameters()):
        pieces = []
        for r in range(world):
            sh = results[r]["shards"][pid]
            pieces.append((sh["local"] - sh["before"]).reshape(-1))
        shape = results[0]["shards"][pid]["full_shape"]
        numel = torch.Size(shape).numel()
        noise = torch.cat(pieces)
        assert noise.numel() == numel
        befores = torch.cat([results[r]["shards"][pid]["before"].reshape(-1) for r in range(world)])
        afters = torch.cat([results[r]["shards"][pid]["local"].reshape(-1) for r in range(world)])
        expected = befores + 0.05 * R.normals(77, pid, 0, R.EPS, numel)
        torch.testing.assert_close(afters, expected, atol=4e-6 * 0.05 + 1e-7, rtol=1e-6)


@pytest.mark.skipif("cpu" not in DIST_BACKENDS, reason="C++ extension not built")
def test_shard_noise_is_bit_identical_to_the_unsharded_slice_on_the_cpu_kernel():
    from fsgld_fused import _ops

    full = torch.zeros(7, 5)
    _ops.cpu_ops.perturb_([full], [3], 99, 4, 1.0)
    for start, stop in ((0, 4), (4, 7), (3, 6)):
        shard = torch.zeros(stop - start, 5)
        _ops.cpu_ops.perturb_([shard], [3], 99, 4, 1.0, offsets=[start * 5])
        assert torch.equal(shard, full[start:stop])
