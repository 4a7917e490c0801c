"""FSGLD's checkpoint plumbing: the chain (seed, step counter, skipped steps, applied
perturbation) saved in every parameter's state, and loaded back with what torch's casting would
lose (fp32 masters, this rank's shard of an FSDP2 parameter). `FSGLD.state_dict` and
`FSGLD.load_state_dict` run these as state-dict hooks registered for the call only."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._plan import _applied, _local, _set_applied, _state_like

_SEED_LIMIT = 1 << 64
# The chain state every parameter's entry of state_dict() carries (plain Python numbers, which
# load_state_dict never casts). Per parameter, not top-level: torch.distributed.checkpoint keeps
# only "state" and "param_groups". The perturbation applied to a parameter lives in its state
# all the time ("applied_sigma", "applied_rademacher"), so the optimizer's state is never empty
# and DCP never runs its zero-lr initialisation step on it.
_CHAIN_KEYS = ("seed", "step", "skipped_steps")


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"Invalid seed: {seed!r} (need an int in [0, 2**64))")
    return seed



def _state_for(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor laid out like p: a full (unsharded) tensor for a DTensor param keeps
    this rank's slice, which needs no communication (every rank holds the full tensor)."""
    if not hasattr(p, "device_mesh") or hasattr(value, "device_mesh"):
        return value
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + n) for o, n in zip(global_offset, local_shape))
    return _state_like(p, value[index].contiguous())


def chain_into_state_dict(opt, state_dict: dict[str, Any]) -> dict[str, Any]:
    chain = {"seed": opt.seed, "step": opt.step_count, "skipped_steps": opt.skipped_steps}
    state = dict(state_dict["state"])  # new per-param dicts: the packed ones are self.state's own
    for group in state_dict["param_groups"]:
        for idx in group["params"]:
            state[idx] = {"applied_sigma": 0.0, "applied_rademacher": False, **state.get(idx, {}), **chain}
    return {**state_dict, "state": state}

def chain_from_state_dict(opt, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Check a state dict against this optimizer before torch loads it, and keep what its
    casting would lose (the chain, fp32 masters) for `chain_after_load`."""
    if "fsgld" in state_dict:
        state_dict = upgrade_top_level_chain(state_dict)
    groups = state_dict.get("param_groups", [])
    state = state_dict.get("state", {})
    if len(groups) != len(opt.param_groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, this optimizer has {len(opt.param_groups)}")
    for gi, (g_saved, g_ours) in enumerate(zip(groups, opt.param_groups)):
        if len(g_saved["params"]) != len(g_ours["params"]):
            raise ValueError(f"param group {gi} has {len(g_saved['params'])} params in the state_dict and "
                             f"{len(g_ours['params'])} here")
    saved_ids = [i for g in groups for i in g["params"]]
    ours = [p for g in opt.param_groups for p in g["params"]]
    # Shapes first, with the parameter named: torch would cast a mismatched buffer silently.
    for pos, (idx, p) in enumerate(zip(saved_ids, ours)):
        for key, value in state.get(idx, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                raise ValueError(f"state_dict entry {key!r} of param {pos} has shape {tuple(value.shape)}, "
                                 f"the parameter has shape {tuple(p.shape)}")
    chains = {tuple(state[i][k] for k in _CHAIN_KEYS) for i in saved_ids if "seed" in state.get(i, {})}
    if not chains:
        raise ValueError("not an FSGLD state_dict: no parameter's state carries the chain (seed, step, "
                         "skipped_steps)")
    if len(chains) != 1:
        raise ValueError(f"the parameters' states disagree on the chain (seed, step, skipped_steps): {chains}")
    seed, step, skipped = chains.pop()
    for i in saved_ids:
        sigma, rademacher = _applied(state.get(i, {}))
        if not (isinstance(sigma, (int, float)) and 0.0 <= sigma < math.inf) or not isinstance(rademacher, bool):
            raise ValueError(f"state_dict: invalid applied perturbation {sigma!r}, {rademacher!r} for param {i}")
    # Optimizer.load_state_dict casts floating state to the param dtype: fp32 masters (and the
    # fp32 momentum buffers that go with them) are put back in fp32 from the source.
    fp32 = {pos: {k: state[idx][k] for k in ("master", "momentum_buffer") if k in state[idx]}
            for pos, idx in enumerate(saved_ids) if "master" in state.get(idx, {})}
    # A checkpoint from before the rounding option (SPEC 2c) rounded bf16 to nearest: it resumes so.
    nearest = [gi for gi, g in enumerate(groups) if "rounding" not in g]
    opt._loading = {"seed": _check_seed(seed), "step": int(step), "skipped_steps": int(skipped), "fp32": fp32,
                    "nearest": nearest}
    return state_dict

def chain_after_load(opt) -> None:
    loading = opt.__dict__.pop("_loading")
    opt._drop_plan()
    for gi in loading["nearest"]:
        opt.param_groups[gi]["rounding"] = "nearest"
    for group in opt.param_groups:  # checkpoints from before an option existed
        for key, value in opt.defaults.items():
            group.setdefault(key, value)
    for pos, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        state = opt.state[p]
        for key in _CHAIN_KEYS:
            state.pop(key, None)
        _set_applied(state, *_applied(state))
        for key, value in loading["fp32"].get(pos, {}).items():
            state[key] = value.to(device=p.device, dtype=torch.float32, copy=True)
        for key in ("master", "momentum_buffer"):  # FSDP2: full tensors become this rank's shard
            if key in state:
                state[key] = _state_for(p, state[key])
                if not _local(state[key])[0].is_contiguous():
                    state[key] = state[key].contiguous()
    opt._chain.update(seed=loading["seed"], step=loading["step"], skipped_steps=loading["skipped_steps"])
    for t in opt._chain["step_t"].values():  # in place: a captured graph keeps its pointer
        t.fill_(loading["step"])


def upgrade_top_level_chain(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict of fsgld-fused 0.1 kept the chain in a top-level "fsgld" entry (seed, step,
    per-group applied sigma): spread it into the parameters' states, as saved now."""
    old = state_dict["fsgld"]
    groups = state_dict.get("param_groups", [])
    applied = list(old.get("applied_sigma", []))
    if len(applied) != len(groups):
        raise ValueError(f"state_dict has {len(groups)} param groups, but its 'fsgld' entry has "
                         f"{len(applied)} applied sigmas")
    state = dict(state_dict.get("state", {}))
    chain = {"seed": old["seed"], "step": old["step"], "skipped_steps": old.get("skipped_steps", 0)}
    for group, sigma in zip(groups, applied):
        for idx in group["params"]:
            state[idx] = {**state.get(idx, {}), "applied_sigma": float(sigma), "applied_rademacher": False, **chain}
    return {k: v for k, v in state_dict.items() if k != "fsgld"} | {"state": state}
