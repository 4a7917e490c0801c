"""torch.distributed.checkpoint (DCP) with FSDP2: get_state_dict -> dcp.save, then a fresh model
and optimizer -> get_state_dict -> dcp.load -> set_state_dict, on 2 gloo ranks and resharded to 1."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _dcp_workers as W
from _readme import readme_snippet

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp")
    mp.spawn(W.fsdp_dcp_worker, args=(2, _port(), "cpu", str(out)), nprocs=2)
    return out, [torch.load(out / f"dcp_{r}.pt") for r in range(2)]


@pytest.mark.parametrize("kind", ["as_is", "full"])
def test_resume_from_dcp_is_bit_identical(checkpoints, kind):
    """Saved as-is (sharded, dcp.save) or as a full CPU state dict: 5 more steps equal the
    uninterrupted run bit for bit, and reading the fresh optimizer's state dict did not step it."""
    for r in checkpoints[1]:
        assert r[kind]["untouched"], "get_state_dict stepped or perturbed a fresh optimizer"
        assert r[kind]["loaded"], "seed or step lost"
        assert r[kind]["exact"], f"max |diff| {r[kind]['max_err']}"


def test_resume_from_a_checkpoint_saved_under_unperturbed(checkpoints):
    """Clean weights saved with applied sigma 0; perturb() after loading puts back the same
    perturbation up to one rounding (restore + perturb is not exactly the identity)."""
    for r in checkpoints[1]:
        assert r["clean"]["untouched"] and r["clean"]["loaded"]
        assert r["clean"]["max_err"] < 1e-5


def test_dcp_checkpoint_resharded_to_one_process(checkpoints):
    """The 2-rank checkpoint loaded into one unsharded process continues the same stream (each
    shard drew its slice of the unsharded stream); gradients differ from the 2-rank mean by rounding."""
    out, results = checkpoints
    m = W.model()
    opt = W.optimizer(m, "cpu", seed=None)
    exec(readme_snippet("dcp-load"), {"model": m, "opt": opt, "path": os.path.join(out, "as_is")})
    assert opt.step_count == W.STEPS and opt.is_perturbed
    W.train(m, opt, W.batches(W.STEPS, start=W.STEPS), 0, 1)
    with opt.unperturbed():
        for p, q in zip(m.parameters(), results[0]["full_clean"]):
            torch.testing.assert_close(p.detach(), q, atol=2e-6, rtol=0)


def test_ddp_snippet_runs():
    """README's DDP lines in a one-process group (tests/test_distributed.py runs DDP on 2 and 4
    ranks). In a spawned process that `_run` ends with os._exit: in this process, the gloo group's
    teardown (the DDP reducer's last reference) once hung joining a gloo thread."""
    mp.spawn(W.ddp_snippet_worker, args=(1, _port()), nprocs=1)
