"""The step plan's cache: a step's kernel calls (FSGLD._plan_step: buckets, backend per bucket,
views, masters, momentum buffers, all checked) are built once and reused while nothing they
depend on has changed. Per step what remains is to gather the grads, check them and launch.

What a plan depends on, and how a step sees that it changed (every test is a comparison of
references or small tuples, no tensor is read):
  - the param groups: the same group dicts and param lists, the same params in them, and the
    same hyperparameters except a float lr (read at launch; a tensor lr by identity);
  - each param's requires_grad and storage (a `.to()` of a module or `p.data = ...` gives a param
    new storage; a dtype, device or shape change without one, e.g. `p.data = p.data.view(...)`,
    is left to the kernels' own checks);
  - which params have a grad (one appearing or disappearing);
  - the state tensors the calls hold (a load, or state replaced by hand) and the applied
    perturbation (perturb, restore, unperturbed and load drop the plan: `FSGLD._drop_plan`).
A grad of a plan that is still valid matches its param: autograd and the `.grad` setter refuse
any other dtype, shape or device, and a param changed under its grad fails the param test above.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Optional

import torch

_META = operator.attrgetter("dtype", "device", "shape")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _storage(params: list) -> list:
    """Where each param's data lives: a cast, a move or `p.data = ...` gives it new storage. The
    data pointer is read in a fifth of the time of (dtype, device, shape) at 1000 params; a
    DTensor, whose pointer is its shard's, is compared by its metadata."""
    if any(hasattr(p, "device_mesh") for p in params):
        return list(map(_META, params))
    return [p.data_ptr() for p in params]


def _hparams_key(group: dict[str, Any]) -> tuple:
    """A group's hyperparameters as the plan saw them: a float lr is left out (the launch reads it)."""
    return tuple((k, id(v) if isinstance(v, torch.Tensor) else v) for k, v in group.items()
                 if k != "params" and not (k == "lr" and not isinstance(v, torch.Tensor)))


class StepPlan:
    """The kernel calls of one step (FSGLD._plan_step's _GroupPlan list) and what they depend on."""

    def __init__(self, opt, groups: list, new_state: dict) -> None:
        self.groups, self.new_state = groups, new_state
        self.param_groups = [(g, g["params"], len(g["params"]), _hparams_key(g)) for g in opt.param_groups]
        self.params = [p for g in opt.param_groups for p in g["params"]]
        self.storage = _storage(self.params)
        self.trainable = list(map(_REQUIRES_GRAD, self.params))
        self.absent = [p.grad is None for p in self.params]
        self.held = [(state, key, state[key]) for state in map(opt.state.__getitem__, self.params)
                     for key in ("master", "momentum_buffer") if key in state]
        # the applied perturbations this step changes (all of them at the first step, none later)
        self.applied = [(state, pert) for gp in groups for state, pert in gp.applied
                        if (state.get("applied_sigma", 0.0), state.get("applied_rademacher", False)) != pert]
        # A plan that creates state or changes the applied perturbation is run once: the next
        # step's plan holds the state as created and restores the perturbation as applied.
        self.reusable = not new_state and not self.applied
        self.slots = []  # (call, indices of its grads in self.params, or None: all of them in order)
        for gp in groups:
            for key, call in gp.stepped.items():
                if key[-1]:  # an update call: its grads are gathered at every step
                    idx = list(call.pids)  # a param id is its position in the param order
                    self.slots.append((call, None if idx == list(range(len(self.params))) else idx))
        self.dtensor = any(hasattr(p, "device_mesh") for p in self.params)

    def grads(self, opt) -> Optional[list]:
        """This step's grads in param order if the plan still holds, else None."""
        if len(opt.param_groups) != len(self.param_groups):
            return None
        for group, (g0, params0, n0, key0) in zip(opt.param_groups, self.param_groups):
            if group is not g0 or group["params"] is not params0 or len(params0) != n0 or _hparams_key(group) != key0:
                return None
        params = self.params
        if not all(map(operator.is_, (p for g in opt.param_groups for p in g["params"]), params)):
            return None
        if list(map(_REQUIRES_GRAD, params)) != self.trainable or _storage(params) != self.storage:
            return None
        grads = [p.grad for p in params]
        if [g is None for g in grads] != self.absent:
            return None
        if any(state.get(key) is not t for state, key, t in self.held):
            return None
        return grads

    def bind(self, grads: list) -> None:
        """Put this step's grads into the update calls (the local shard of a DTensor grad)."""
        if self.dtensor:
            from .optimizer import _local

            grads = [g if g is None else _local(g)[0] for g in grads]
        for call, idx in self.slots:
            call.grads = grads if idx is None else [grads[i] for i in idx]


def check_lr(group: dict[str, Any]) -> None:
    """The per-step part of the hyperparameter check: a float lr, which a schedule may change."""
    lr = group["lr"]
    if not isinstance(lr, torch.Tensor) and not 0.0 <= lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr!r} (need a finite float >= 0)")
