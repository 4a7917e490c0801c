"""The step plan: a step's kernel calls (buckets, the backend per bucket, views, masters,
momentum buffers), every check a kernel could make done before the first launch, built once and
reused while nothing it depends on has changed. Per step what remains is to gather the grads,
check them (finite, one multi-tensor pass) and launch.

What a plan depends on, and how a step sees that it changed (every test is a comparison of
references or small tuples, no tensor is read):
  - the param groups: the same group dicts and param lists, the same params in them, and the
    same hyperparameters except a float lr (read at launch; a tensor lr by identity);
  - each param's requires_grad, storage and layout (a `.to()` of a module or `p.data = ...`
    gives a param new storage; `p.data = p.data.t()` or `.view(...)` a new shape or strides);
  - which params have a grad (one appearing or disappearing);
  - the state tensors the calls hold (a load, or state replaced by hand) and the applied
    perturbation (perturb, restore, unperturbed and load drop the plan: `FSGLD._drop_plan`).
A strided param's contiguous copy is refreshed from the param before every launch (`bind`): a
change made to the param between steps (a rollback, clipping, an EMA swap) is kept.
A grad of a plan that is still valid matches its param: autograd and the `.grad` setter refuse
any other dtype, shape or device, and a param changed under its grad fails the param test above.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.optim.optimizer import required

from . import _backends
from .reference import rounds_stochastically as _spec_2c_applies, substream_offset

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _applied(state: dict[str, Any]) -> tuple[float, bool]:
    """(sigma, rademacher) of the perturbation a param carries now; sigma 0.0 means clean."""
    return state.get("applied_sigma", 0.0), state.get("applied_rademacher", False)


def _set_applied(state: dict[str, Any], sigma: float, rademacher: bool) -> None:
    state["applied_sigma"], state["applied_rademacher"] = float(sigma), bool(rademacher) and sigma != 0.0


def _local(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor a kernel updates and the global row-major index of its first element.

    A DTensor (FSDP2's sharded parameters) contributes its local shard, which draws exactly its
    slice of the unsharded stream. That slice must be one contiguous range of the global order:
    sharded on the leading dimension only (FSDP2's Shard(0)).
    """
    if not hasattr(t, "device_mesh"):
        return t, 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    local_shape, global_offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    first_partial = next((d for d in range(len(t.shape)) if local_shape[d] != t.shape[d]), len(t.shape))
    if any(local_shape[d] != t.shape[d] for d in range(first_partial + 1, len(t.shape))):
        raise ValueError(f"FSGLD: a DTensor sharded as {t.placements} is not one contiguous range of the "
                         "global element order; shard it on dimension 0 (FSDP2's default)")
    offset, stride = 0, 1
    for d in reversed(range(len(t.shape))):
        offset += global_offset[d] * stride
        stride *= t.shape[d]
    return local, offset


def _state_like(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Per-parameter state (momentum buffer, master) from its local tensor: for a DTensor param a
    DTensor laid out like it, so state_dict() and distributed checkpointing see each shard's place
    in the global tensor (and load_state_dict's shape checks compare global shapes)."""
    if not hasattr(p, "device_mesh"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _fitted(p: torch.Tensor, local: torch.Tensor, value: Any, dtype: torch.dtype, key: str,
            pid: Optional[int]) -> Optional[torch.Tensor]:
    """None if the state tensor `value` of p is what the kernels take (contiguous, `dtype`, on p's
    device, p's local shape), else its converted copy; a shape that differs is refused."""
    if not isinstance(value, torch.Tensor):
        raise RuntimeError(f"optimizer state {key!r} of param {pid} is a {type(value).__name__}, not a tensor")
    v = _local(value)[0]
    if v.shape != local.shape:
        raise RuntimeError(f"optimizer state {key!r} of param {pid} has shape {tuple(v.shape)}, the parameter "
                           f"{tuple(local.shape)}: it cannot be converted (was the parameter resized?)")
    if v.dtype == dtype and v.device == local.device and v.is_contiguous():
        return None
    return _state_like(p, v.to(device=local.device, dtype=dtype, memory_format=torch.contiguous_format, copy=True))


@dataclass
class _Call:
    """One kernel call: tensors of one (backend, device, dtype) that share an applied sigma.

    `params` are the tensors the kernel writes: a parameter itself, its local shard (DTensor), or
    a contiguous copy of a strided parameter, written back afterwards (`writeback`).
    """

    backend: Any
    device: torch.device
    sigma: float  # the sigma these params carry now (restore), or the one to add (perturb)
    rademacher: bool = False  # eps are signs (SPEC 2b), not normals
    substream: int = 0  # j of n_pert perturbations: the stream shifted by substream_offset(j)
    stochastic: bool = False  # bf16 params without masters, rounded stochastically (SPEC 2c)
    params: list = field(default_factory=list)
    pids: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    masters: list = field(default_factory=list)
    grads: list = field(default_factory=list)
    bufs: list = field(default_factory=list)
    writeback: list = field(default_factory=list)  # (parameter view, contiguous copy)

    def add(self, view, pid, master, grad=None, buf=None):
        tensor, offset, strided = view
        self.params.append(tensor)
        self.pids.append(pid)
        self.offsets.append(offset + (substream_offset(self.substream, self.rademacher) if self.substream else 0))
        if master is not None:
            self.masters.append(master)
        if grad is not None:
            self.grads.append(grad)
        if buf is not None:
            self.bufs.append(buf)
        if strided is not None:
            self.writeback.append((strided, tensor))

    def write_back(self):
        for dst, src in self.writeback:
            dst.copy_(src)

    def read_in(self):
        """A reused plan's contiguous copies take the strided params' current values."""
        for strided, copy in self.writeback:
            copy.copy_(strided)


@dataclass
class _GroupPlan:
    """What a step does to one param group: fused-step calls, and shifts (restore at k, perturb
    at k + 1) for params without a gradient, each list of calls keyed by _Call's identity."""

    group: dict
    new_sigma: float
    new_rademacher: bool
    stepped: dict = field(default_factory=dict)  # (backend, device, dtype, sigma, master, update) -> _Call
    restores: dict = field(default_factory=dict)  # (backend, device, dtype, sigma, master) -> _Call
    perturbs: dict = field(default_factory=dict)
    applied: list = field(default_factory=list)  # (param state, (sigma, rademacher) applied after the step)


# ---- building a step's plan (the FSGLD methods of the same names delegate here) ----
def _new_state(opt, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any],
               pid: Optional[int] = None, momentum: bool = True) -> dict[str, torch.Tensor]:
    """The master and momentum buffer a trainable param needs and lacks, and those it has in a
    form no kernel takes (returned, not stored, so a step can create or convert them and still
    change nothing if it fails its checks).

    Every kernel takes a master as a contiguous fp32 tensor and a momentum buffer as a
    contiguous tensor of the param's dtype (fp32 with a master), both shaped and placed like
    the param. One whose dtype, device or layout no longer fits (the param was cast or moved
    mid-run, or the state was set by hand) is converted, as `torch.optim`'s load_state_dict
    does; one of another shape cannot be, and is refused here, before any launch."""
    new: dict[str, torch.Tensor] = {}
    if not p.requires_grad:
        return new
    local = _local(p.detach())[0]
    if "master" in state:
        master = _fitted(p, local, state["master"], torch.float32, "master", pid)
        if master is not None:
            new["master"] = master
    elif group["master_weights"] and p.dtype in _LOW_PRECISION:
        if _applied(state)[0] != 0.0:
            raise RuntimeError("master_weights was turned on while the weights are perturbed: call restore() "
                               "first, so that the fp32 master copies clean weights")
        new["master"] = _state_like(p, local.float().clone(memory_format=torch.contiguous_format))
    if group["momentum"] != 0.0 and momentum:  # a param stepped without a grad needs no buffer yet
        has_master = "master" in new or "master" in state
        if "momentum_buffer" in state:
            buf = _fitted(p, local, state["momentum_buffer"], torch.float32 if has_master else p.dtype,
                          "momentum_buffer", pid)
            if buf is not None:
                new["momentum_buffer"] = buf
        else:
            # zeros: momentum * 0 + d == d on the first step, exactly as SGD's buf = d
            dtype = torch.float32 if has_master else p.dtype
            new["momentum_buffer"] = _state_like(p, torch.zeros_like(local, dtype=dtype,
                                                                     memory_format=torch.contiguous_format))
    return new

def _backend(group: dict[str, Any], p: torch.Tensor) -> _backends.Backend:
    backend = _backends.resolve(group["backend"], p.device, p.dtype)
    if group["fused"] and backend.name == "reference":
        raise ValueError(f"fused=True, but no fused kernel runs {p.dtype} parameters on {p.device.type} "
                         f"here; pass fused=None to let the reference run them")
    return backend

def _view(p: torch.Tensor) -> tuple[torch.Tensor, int, Optional[torch.Tensor]]:
    """(tensor a kernel writes, global index of its first element, strided view to write it
    back to). The kernels walk the row-major element order of contiguous memory; a strided
    param goes through a contiguous copy, so every layout takes the fast path."""
    local, offset = _local(p.detach())
    if local.is_contiguous():
        return local, offset, None
    return local.contiguous(), offset, local

def _master(opt, p: torch.Tensor, new: Optional[dict] = None) -> Optional[torch.Tensor]:
    """The fp32 master the kernels update (its local shard for a DTensor param), or None;
    `new`: the param's state that a step creates or converts (_new_state)."""
    master = (new or {}).get("master", opt.state[p].get("master"))
    return None if master is None else _local(master)[0]

def _master_now(opt, p: torch.Tensor, pid: int) -> Optional[torch.Tensor]:
    """_master outside a step (perturb, restore): a master no kernel takes is converted now
    (to contiguous fp32 on p's device: no value changes)."""
    state = opt.state[p]
    if "master" in state and p.requires_grad:
        fitted = _fitted(p, _local(p.detach())[0], state["master"], torch.float32, "master", pid)
        if fitted is not None:
            state["master"] = fitted
    return opt._master(p)

def _touchable(p: torch.Tensor) -> bool:
    """Frozen params are never touched; meta tensors hold no data to touch."""
    return p.requires_grad and p.device.type != "meta"

def rounds_stochastically(group: dict[str, Any], p: torch.Tensor, master: Optional[torch.Tensor]) -> bool:
    """SPEC 2c applies to a bf16 param without a master in a group with rounding="stochastic"."""
    return _spec_2c_applies(p, () if master is None else (master,), group["rounding"] == "stochastic")


def _shift_call(opt, calls: dict, group, p, pid, applied: tuple[float, bool], view, master,
                substream: int = 0) -> None:
    """Add p to the restore_/perturb_ call of its (backend, device, dtype, perturbation, master,
    rounding)."""
    stochastic = rounds_stochastically(group, p, master)
    key = (group["backend"], p.device, p.dtype, applied, substream, master is not None, stochastic)
    if key not in calls:
        calls[key] = _Call(opt._backend(group, p), p.device, applied[0], applied[1], substream, stochastic)
    calls[key].add(view, pid, master)

# Not named _init_group: Dynamo special-cases that name with torch.optim's return contract.
def _plan_group(opt, group: dict[str, Any], pids: list[int], new_state: dict) -> _GroupPlan:
    """Every tensor of one group in its kernel call, checked; nothing is modified."""
    opt._check_group(group, opt.capturable)
    sigma, rademacher = opt.group_perturbation(group)
    plan = _GroupPlan(group, sigma if group["perturb_ahead"] else 0.0, rademacher)
    new_pert = (plan.new_sigma, rademacher if plan.new_sigma != 0.0 else False)
    lr = group["lr"]
    for p, pid in zip(group["params"], pids):
        state = opt.state[p]
        old = _applied(state)
        if not opt._touchable(p):
            if old[0] != 0.0 and p.device.type != "meta":  # frozen since it was perturbed
                opt._shift_call(plan.restores, group, p, pid, old, opt._view(p), opt._master(p))
                plan.applied.append((state, (0.0, False)))
            continue
        view = opt._view(p)
        plan.applied.append((state, new_pert))
        g = p.grad
        update = g is not None  # capturable: a grad-less param steps with no update (no host branch)
        new = opt._new_state(group, p, state, pid, momentum=update)
        if new:
            new_state[p] = new
        master = opt._master(p, new)
        if not update and not opt.capturable:  # no grad: no update, no noise; the perturbation moves on
            if old[0] != 0.0:
                opt._shift_call(plan.restores, group, p, pid, old, view, master)
            if plan.new_sigma != 0.0:
                opt._shift_call(plan.perturbs, group, p, pid, new_pert, view, master)
            continue
        if update:
            if g.is_sparse:
                raise RuntimeError("FSGLD does not support sparse gradients")
            if g.is_complex() or g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                raise RuntimeError(f"gradient of shape {tuple(g.shape)} / {g.dtype} on {g.device} does not "
                                   f"match its parameter of shape {tuple(p.shape)} / {p.dtype} on {p.device} "
                                   f"(param {pid})")
        backend = opt._backend(group, p)
        if isinstance(lr, torch.Tensor) and lr.device != p.device:
            raise ValueError(f"a Tensor lr must live on the params' device ({p.device}), not {lr.device}")
        restore = (0.0, False) if master is not None else old  # a master is clean: nothing to restore
        key = (group["backend"], p.device, p.dtype, restore, master is not None, update)
        if key not in plan.stepped:  # dtype and master decide the rounding within a group
            plan.stepped[key] = _Call(backend, p.device, *restore, stochastic=rounds_stochastically(group, p, master))
        grad = _local(g)[0] if update else torch.zeros_like(view[0])
        buf = None
        if group["momentum"] != 0.0 and update:
            buf = _local(new.get("momentum_buffer", state.get("momentum_buffer")))[0]
        plan.stepped[key].add(view, pid, master, grad, buf)
    return plan

def _plan_step(opt) -> tuple[list[_GroupPlan], dict]:
    new_state: dict = {}
    return [opt._plan_group(group, pids, new_state) for group, pids in opt._groups_with_pids()], new_state

def _grads(plans: list[_GroupPlan]) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(group index, param id, gradient) of every param that is updated."""
    for gi, plan in enumerate(plans):
        for (_, _, _, _, _, update), call in plan.stepped.items():
            if update:
                for pid, g in zip(call.pids, call.grads):
                    yield gi, pid, g

def _grads_are_finite(opt, plans: list[_GroupPlan]) -> bool:
    """One pass over the gradients and one sync per device."""
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for plan in plans:
        for key, call in plan.stepped.items():
            if key[-1]:  # an update call: the device of a call is its grads' (checked when planned)
                by_device[call.device].extend(call.grads)
    for device, grads in by_device.items():
        if device.type == "cuda":  # one fused multi-tensor launch; NaN and inf reach the max
            summary = [n.float() for n in torch._foreach_norm(grads, math.inf)]
            if not bool(torch.isfinite(torch.stack(summary)).all()):
                return False
        else:
            # One multi-tensor pass: GradScaler's own check, unscaling by exactly 1 (the grads keep
            # their values). Measured on CPU, one thread, alternated: 0.85 ms for 1000 grads of 16
            # elements (one sum per grad: 7.9 ms, _foreach_norm: 5.7 ms); 6.9 ms for 16M elements
            # (sums: 8.1 ms, the inf-norm: 95 ms).
            # It writes each grad (times 1): a grad whose elements share memory (an expand) is
            # refused there, and checked one by one instead.
            found = torch.zeros(1, device=device)
            try:
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
            except RuntimeError:
                found = torch.tensor([0.0 if all(bool(torch.isfinite(g).all()) for g in grads) else 1.0])
            if found.item() != 0.0:
                return False
    return True

def _cached_plan(opt) -> tuple[list[_GroupPlan], dict, list]:
    """(group plans, state they create, applied perturbations they change): the cached plan
    with this step's grads if it still holds, else a new one. A compiled step plans in its
    trace (the graph keeps nothing of the planning) and caches nothing."""
    if torch.compiler.is_compiling():
        plans, new_state = opt._plan_step()
        return plans, new_state, [a for plan in plans for a in plan.applied]
    plan = opt._cache["plan"]
    grads = None if plan is None else plan.grads(opt)
    if grads is None:
        plan = StepPlan(opt, *opt._plan_step())
        opt._cache["plan"] = plan if plan.reusable else None
    else:
        for group in opt.param_groups:
            check_scheduled(group)
        plan.bind(grads)
    return plan.groups, plan.new_state, plan.applied


# ---- the cache ----
_META = operator.attrgetter("dtype", "device", "shape")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_GRAD = operator.attrgetter("grad")




def _storage(params: list, dtensor: bool) -> list:
    """Where and how each param's data lives: a cast, a move or `p.data = ...` gives it new
    storage, `p.data = p.data.t()` new strides. A DTensor, whose pointer is its shard's, is
    compared by its metadata and its shard's pointer."""
    if dtensor:
        return [(_META(p), p._local_tensor.data_ptr() if hasattr(p, "_local_tensor") else p.data_ptr())
                for p in params]
    # (pointer, strides, numel): the shape too, in 0.20 ms at 1000 params where (pointer, shape,
    # strides) takes 0.33 ms and the pointer alone 0.05 ms
    return list(zip(map(torch.Tensor.data_ptr, params), map(torch.Tensor.stride, params),
                    map(torch.Tensor.numel, params)))


# Float hyperparameters the launch reads at every step (schedulers change them: OneCycleLR and
# CyclicLR cycle the momentum too): a plan keys only whether each is zero (a momentum buffer, a
# weight-decay term), and check_scheduled repeats their range checks at every step.
_LAUNCH_READ = ("lr", "momentum", "weight_decay")


def _hparams_key(group: dict[str, Any]) -> tuple:
    """A group's hyperparameters as the plan saw them."""
    return tuple((k, id(v) if isinstance(v, torch.Tensor) else (v != 0.0) if k in _LAUNCH_READ else v)
                 for k, v in group.items() if k != "params")


class StepPlan:
    """The kernel calls of one step (FSGLD._plan_step's _GroupPlan list) and what they depend on."""

    def __init__(self, opt, groups: list, new_state: dict) -> None:
        self.groups, self.new_state = groups, new_state
        self.param_groups = [(g, g["params"], len(g["params"]), _hparams_key(g)) for g in opt.param_groups]
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.dtensor = any(hasattr(p, "device_mesh") for p in self.params)
        self.storage = _storage(self.params, self.dtensor)
        self.trainable = list(map(_REQUIRES_GRAD, self.params))
        self.absent = [p.grad is None for p in self.params]
        self.state = opt.state  # replaced wholesale (opt.state = ...), it holds other buffers
        self.held = [(state, key, state[key]) for state in map(opt.state.__getitem__, self.params)
                     for key in ("master", "momentum_buffer") if key in state]
        # the applied perturbations this step changes (all of them at the first step, none later)
        self.applied = [(state, pert) for gp in groups for state, pert in gp.applied
                        if (state.get("applied_sigma", 0.0), state.get("applied_rademacher", False)) != pert]
        # A plan that creates state or changes the applied perturbation is run once: the next
        # step's plan holds the state as created and restores the perturbation as applied.
        self.reusable = not new_state and not self.applied
        self.strided = [call for gp in groups for calls in (gp.stepped, gp.restores, gp.perturbs)
                        for call in calls.values() if call.writeback]
        self.slots = []  # (call, indices of its grads in self.params, or None: all of them in order)
        for gp in groups:
            for key, call in gp.stepped.items():
                if key[-1]:  # an update call: its grads are gathered at every step
                    idx = list(call.pids)  # a param id is its position in the param order
                    self.slots.append((call, None if idx == list(range(len(self.params))) else idx))

    def grads(self, opt) -> Optional[list]:
        """This step's grads in param order if the plan still holds, else None."""
        if len(opt.param_groups) != len(self.param_groups) or opt.state is not self.state:
            return None
        for group, (g0, params0, n0, key0) in zip(opt.param_groups, self.param_groups):
            if group is not g0 or group["params"] is not params0 or len(params0) != n0 or _hparams_key(group) != key0:
                return None
        params = self.params
        flat = itertools.chain.from_iterable([g["params"] for g in opt.param_groups])
        if not all(map(operator.is_, flat, params)):
            return None
        if list(map(_REQUIRES_GRAD, params)) != self.trainable or _storage(params, self.dtensor) != self.storage:
            return None
        grads = list(map(_GRAD, params))
        if [g is None for g in grads] != self.absent:
            return None
        if any(state.get(key) is not t for state, key, t in self.held):
            return None
        return grads

    def bind(self, grads: list) -> None:
        """Put this step's grads into the update calls (the local shard of a DTensor grad)."""
        for call in self.strided:
            call.read_in()
        if self.dtensor:
            grads = [g if g is None else _local(g)[0] for g in grads]
        for call, idx in self.slots:
            call.grads = grads if idx is None else [grads[i] for i in idx]


def check_scheduled(group: dict[str, Any]) -> None:
    """The ranges of the float hyperparameters the launch reads (_LAUNCH_READ): the part of FSGLD's
    validator (`_check_hparams`) that a cached plan repeats at every step, since a schedule may
    change them."""
    lr = group["lr"]  # lr = 0: no update, no Langevin noise
    # A tensor lr is read on the device (no host sync to check it); compiled, a float lr is a graph
    # input that comparing would specialise the graph on; `required` is the groups' to supply.
    if (not isinstance(lr, torch.Tensor) and lr is not required and not torch.compiler.is_compiling()
            and not 0.0 <= lr < math.inf):
        raise ValueError(f"Invalid learning rate: {lr!r} (need a finite float >= 0)")
    for key in ("weight_decay", "momentum"):
        if not 0.0 <= group[key] < math.inf:
            raise ValueError(f"Invalid {key}: {group[key]!r} (need a finite value >= 0)")
