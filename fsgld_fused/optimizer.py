"""`FSGLD`: flatness-aware SGLD as a `torch.optim.Optimizer`.

Training loop (the same as `torch.optim.SGD`)::

    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e8)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # gradient at the perturbed weights theta + sigma*eps
        opt.step()                        # restore, SGLD update, perturb for the next forward

The first step's gradient is taken at the weights as they are (clean) unless `perturb()` was
called first. `unperturbed()` hands the clean weights to evaluation or checkpointing.

How a step runs: `_plan_step` collects every tensor into kernel calls (one per backend, device,
dtype and applied perturbation) and checks everything a kernel could refuse; only then does
`_run_step` touch a tensor, so a step that fails changes nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import _backends
from ._plan import StepPlan, check_lr
from .reference import substream_offset

__all__ = ["FSGLD"]

_SEED_LIMIT = 1 << 64
_NONFINITE = ("raise", "skip", "ignore")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_PERTURBATIONS = ("gaussian", "rademacher")
# The chain state every parameter's entry of state_dict() carries (plain Python numbers, which
# load_state_dict never casts). Per parameter, not top-level: torch.distributed.checkpoint keeps
# only "state" and "param_groups". The perturbation applied to a parameter lives in its state
# all the time ("applied_sigma", "applied_rademacher"), so the optimizer's state is never empty
# and DCP never runs its zero-lr initialisation step on it.
_CHAIN_KEYS = ("seed", "step", "skipped_steps")


def _applied(state: dict[str, Any]) -> tuple[float, bool]:
    """(sigma, rademacher) of the perturbation a param carries now; sigma 0.0 means clean."""
    return state.get("applied_sigma", 0.0), state.get("applied_rademacher", False)


def _set_applied(state: dict[str, Any], sigma: float, rademacher: bool) -> None:
    state["applied_sigma"], state["applied_rademacher"] = float(sigma), bool(rademacher) and sigma != 0.0


def coupled_sigma(beta: float, eta: float) -> float:
    """The paper's coupling sigma = beta ** (-(1 + eta) / 4)."""
    return beta ** (-(1.0 + eta) / 4.0)


def _check_hparams(group: dict[str, Any], capturable: bool = False) -> None:
    """The one argument validator: construction, add_param_group and every step use it.
    Values still `required` (lr, beta not given to the constructor) are the groups' to supply."""
    lr, beta, sigma, eta = group["lr"], group["beta"], group["sigma"], group["eta"]
    if isinstance(lr, torch.Tensor):
        # A tensor lr is for capturable=True (CUDA graphs): its value is read on the device, so it
        # is not range-checked here (that would be a host sync).
        if not capturable or lr.numel() != 1 or lr.dtype != torch.float32:
            raise ValueError("a Tensor lr needs capturable=True and a one-element float32 tensor")
    elif torch.compiler.is_compiling():
        pass  # a compiled step takes a float lr as a graph input: comparing it would specialise the graph on it
    elif lr is not required and not 0.0 <= lr < math.inf:  # lr = 0: no update, no Langevin noise
        raise ValueError(f"Invalid learning rate: {lr!r} (need a finite float >= 0)")
    if beta is not required and not beta > 0.0:  # also refuses NaN; beta = inf is noise-free
        raise ValueError(f"Invalid beta: {beta!r} (need beta > 0; it is the inverse temperature)")
    if sigma is None:
        if not 0.0 < eta < 1.0:
            raise ValueError(
                f"Invalid eta: {eta!r}; the coupling sigma = beta**(-(1+eta)/4) needs 0 < eta < 1. "
                "Pass sigma explicitly to decouple it from beta."
            )
    elif not 0.0 <= sigma < math.inf:
        raise ValueError(f"Invalid sigma: {sigma!r} (need a finite value >= 0)")
    for key in ("weight_decay", "momentum"):
        if not 0.0 <= group[key] < math.inf:
            raise ValueError(f"Invalid {key}: {group[key]!r} (need a finite value >= 0)")
    for key in ("perturb_ahead", "master_weights", "maximize"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
    if group["perturbation"] not in _PERTURBATIONS:
        raise ValueError(f"perturbation must be one of {_PERTURBATIONS}, got {group['perturbation']!r}")
    n_pert = group["n_pert"]
    if isinstance(n_pert, bool) or not isinstance(n_pert, int) or n_pert < 1:
        raise ValueError(f"Invalid n_pert: {n_pert!r} (need an int >= 1: perturbations per step)")
    if not isinstance(group["antithetic"], bool):
        raise ValueError(f"antithetic must be a bool, got {group['antithetic']!r}")
    if group["antithetic"] and n_pert != 2:
        raise ValueError(f"antithetic=True evaluates the pair +eps, -eps: it needs n_pert=2, got n_pert={n_pert}")
    for key in ("foreach", "fused"):
        if group[key] not in (None, False, True):
            raise ValueError(f"{key} must be None, False or True, got {group[key]!r}")
    if group["differentiable"]:
        raise ValueError("differentiable=True is not supported: FSGLD updates the weights in place outside "
                         "autograd (its noise is not a differentiable function of the hyperparameters)")
    if group["fused"] and group["backend"] == "reference":
        raise ValueError("fused=True asks for the fused kernels, but backend='reference' is the unfused "
                         "specification: use backend='auto' (or 'cpu', 'cuda', 'triton')")
    _backends.check_backend_name(group["backend"])


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"Invalid seed: {seed!r} (need an int in [0, 2**64))")
    return seed


def _sync_seed(seed: int, given: bool) -> int:
    """Data-parallel replicas must draw identical noise: with a process group initialised, a
    drawn seed is broadcast from rank 0 and a given one is checked equal on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return seed
    if given:
        seeds: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(seeds, seed)
        if len(set(seeds)) != 1:
            raise ValueError(f"FSGLD seeds differ across ranks ({seeds}): pass the same seed, or None")
        return seed
    box = [seed]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


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


def _state_for(p: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """A loaded state tensor laid out like p: a full (unsharded) tensor for a DTensor param keeps
    this rank's slice, which needs no communication (every rank holds the full tensor)."""
    if not hasattr(p, "device_mesh") or hasattr(value, "device_mesh"):
        return value
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, global_offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    index = tuple(slice(o, o + n) for o, n in zip(global_offset, local_shape))
    return _state_like(p, value[index].contiguous())


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


class FSGLD(Optimizer):
    """Flatness-aware stochastic gradient Langevin dynamics (arXiv 2510.02174).

    Args:
        params: parameters, named parameters or param groups, as for any `torch.optim` optimizer.
        lr: step size (>= 0; 0 means no update and no Langevin noise). May be left to the groups.
        beta: inverse temperature (> 0); Langevin noise std is sqrt(2 * lr / beta). May be left
            to the groups.
        sigma: perturbation scale; None couples it to beta as beta ** (-(1 + eta) / 4).
        eta: coupling exponent, 0 < eta < 1 (only used when sigma is None).
        weight_decay: L2 coefficient, applied to the clean (unperturbed) weights.
        momentum: heavy-ball momentum on the update direction, as in `torch.optim.SGD`.
        seed: 64-bit seed of the noise stream; None draws one from torch's default generator.
        perturb_ahead: leave the weights perturbed for the next forward after each step.
        backend: "auto", "reference", "cpu", "cuda" or "triton".
        master_weights: keep an fp32 master copy of bf16/fp16 params in optimizer state; the
            master is never perturbed and the param holds round(master + sigma * eps).
        nonfinite: without a GradScaler, what a non-finite gradient does: "raise" (default) a
            RuntimeError naming the parameters, "skip" the step (nothing changes; counted in
            `skipped_steps`), or "ignore" (no check: one pass over the gradients fewer).
        capturable: keep the step counter in a tensor on the params' device, advanced there (and
            accept a one-element float32 Tensor lr), so a CUDA graph of the step replays with fresh
            noise; needs nonfinite="ignore".
        perturbation: the distribution of eps: "gaussian" (the paper's analysed default) or
            "rademacher" (random signs, SPEC 2b: the same sigma^2/2 tr(H) flatness term).
        n_pert: perturbations per step (closure only): the gradient is the mean of the closure's
            gradients at theta + sigma*eps_{k,j}, j < n_pert.
        antithetic: with n_pert=2, evaluate at +eps_k and -eps_k.
        maximize: ascend the objective (the gradient's sign flipped; weight decay unchanged).
        foreach, fused: accepted as `torch.optim` passes them. FSGLD always runs one fused
            multi-tensor kernel per (backend, device, dtype); fused=True also refuses
            backend="reference" and any bucket that only the reference can run.
        differentiable: must be False (refused otherwise).

    Parameters with `requires_grad=False` are never touched (no perturbation, no update); a
    trainable parameter whose `.grad` is None in a step gets no update and no Langevin noise, but
    its perturbation moves on to the next step's. With `torch.amp.GradScaler`, the scaled
    gradients are unscaled inside the fused step and an overflow changes nothing (weights,
    perturbation, step counter); the scaler's own inf check replaces the `nonfinite` one.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: Any = required,
        beta: Any = required,
        sigma: Optional[float] = None,
        eta: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        seed: Optional[int] = None,
        perturb_ahead: bool = True,
        backend: str = "auto",
        master_weights: bool = False,
        nonfinite: str = "raise",
        capturable: bool = False,
        *,
        perturbation: str = "gaussian",
        n_pert: int = 1,
        antithetic: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, sigma=sigma, eta=eta, weight_decay=weight_decay, momentum=momentum,
                        perturb_ahead=perturb_ahead, backend=backend, master_weights=master_weights,
                        perturbation=perturbation, n_pert=n_pert, antithetic=antithetic, maximize=maximize,
                        foreach=foreach, fused=fused, differentiable=differentiable)
        if not isinstance(capturable, bool):
            raise ValueError(f"capturable must be a bool, got {capturable!r}")
        self.capturable = capturable
        _check_hparams(defaults, capturable)
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if capturable and nonfinite != "ignore":
            raise ValueError(
                "capturable=True cannot check gradients for inf/NaN without a host sync: pass "
                "nonfinite='ignore' (with a GradScaler, overflowed steps are still skipped on the device)"
            )
        self.nonfinite = nonfinite
        if seed is None:  # two 32-bit draws on the CPU generator: torch.manual_seed makes runs repeatable
            lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64, device="cpu").tolist()
            seed = _sync_seed(lo | (hi << 32), given=False)
        else:
            seed = _sync_seed(_check_seed(seed), given=True)
        # The chain's mutable state, in one dict mutated in place: Dynamo keeps item writes on
        # it, where it dropped plain attribute rebinding on an optimizer inside torch.compile.
        #   seed: the stream's 64-bit key
        #   step: the counter k of the noise stream, a Python int (never cast by load_state_dict)
        #   skipped_steps: steps skipped for non-finite gradients or AMP overflow
        #   step_t: one int64 counter per device, advanced on the device; when present it is the
        #     authoritative k. Made by capturable=True and by the first compiled step (torch.compile
        #     guards on a Python int's value: a host counter would recompile the step every step)
        # The perturbation applied to each param is in its state: _applied(self.state[p]).
        self._chain: dict[str, Any] = {"seed": _check_seed(seed), "step": 0, "skipped_steps": 0, "step_t": {}}
        self._cache: dict[str, Optional[StepPlan]] = {"plan": None}  # the eager step's plan (_plan.py)
        super().__init__(params, defaults)

    # -- construction --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering "
                            "of tensors in sets will change between runs. Please use a list instead.")
        params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]  # named_parameters() gives tuples
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in tensors:
            if not isinstance(p, torch.Tensor):
                continue  # torch's add_param_group names the offending type
            if p.is_complex() or not p.is_floating_point():
                raise ValueError(f"FSGLD needs real floating-point parameters, got {p.dtype}")
            if id(p) in seen:
                raise ValueError("a parameter appears twice in FSGLD's parameter list")
            seen.add(id(p))
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_hparams(merged, self.capturable)
        super().add_param_group({**param_group, "params": params})
        self._drop_plan()
        group = self.param_groups[-1]
        for p in group["params"]:  # weights are clean now: masters copy them before any perturbation
            state = self.state[p]
            _set_applied(state, *_applied(state))
            state.update(self._new_state(group, p, state))

    def _new_state(self, group: dict[str, Any], p: torch.Tensor, state: dict[str, Any],
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

    def _drop_plan(self) -> None:
        """Forget the cached step plan (the applied perturbation or the state changed)."""
        self._cache["plan"] = None

    @property
    def seed(self) -> int:
        return self._chain["seed"]

    @property
    def step_count(self) -> int:
        """The step counter k: how many successful steps this optimizer has taken (with
        capturable=True it lives on the device and reading it here is a host sync)."""
        for t in self._chain["step_t"].values():
            return int(t.item())
        return self._chain["step"]

    def _step_arg(self, device: torch.device, ahead: int = 0) -> tuple[int, Optional[torch.Tensor]]:
        """(step, step_t) for a kernel call: the host counter, or the device counter (capturable,
        compiled, or any step after a compiled one)."""
        counters = self._chain["step_t"]
        if not counters and not (self.capturable or torch.compiler.is_compiling()):
            return self._chain["step"] + ahead, None
        if device not in counters:  # from another device's counter without a sync, else from the host's
            other = next(iter(counters.values()), None)
            counters[device] = (torch.full((1,), self._chain["step"], dtype=torch.int64, device=device)
                                if other is None else other.to(device, copy=True))
        t = counters[device]
        return 0, (t if ahead == 0 else t + ahead)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (nonfinite="skip") or AMP overflow."""
        return self._chain["skipped_steps"]

    @property
    def is_perturbed(self) -> bool:
        return any(_applied(self.state[p])[0] != 0.0 for g in self.param_groups for p in g["params"])

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def group_sigma(group: dict[str, Any]) -> float:
        if group["sigma"] is not None:
            return float(group["sigma"])
        return coupled_sigma(group["beta"], group["eta"])

    def _groups_with_pids(self) -> Iterator[tuple[dict[str, Any], list[int]]]:
        """(group, the parameter ids of SPEC section 2: order across groups)."""
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            yield group, list(range(start, start + n))
            start += n

    @staticmethod
    def _backend(group: dict[str, Any], p: torch.Tensor) -> _backends.Backend:
        backend = _backends.resolve(group["backend"], p.device, p.dtype)
        if group["fused"] and backend.name == "reference":
            raise ValueError(f"fused=True, but no fused kernel runs {p.dtype} parameters on {p.device.type} "
                             f"here; pass fused=None to let the reference run them")
        return backend

    @staticmethod
    def _view(p: torch.Tensor) -> tuple[torch.Tensor, int, Optional[torch.Tensor]]:
        """(tensor a kernel writes, global index of its first element, strided view to write it
        back to). The kernels walk the row-major element order of contiguous memory; a strided
        param goes through a contiguous copy, so every layout takes the fast path."""
        local, offset = _local(p.detach())
        if local.is_contiguous():
            return local, offset, None
        return local.contiguous(), offset, local

    def _master(self, p: torch.Tensor, new: Optional[dict] = None) -> Optional[torch.Tensor]:
        """The fp32 master the kernels update (its local shard for a DTensor param), or None;
        `new`: the param's state that a step creates or converts (_new_state)."""
        master = (new or {}).get("master", self.state[p].get("master"))
        return None if master is None else _local(master)[0]

    def _master_now(self, p: torch.Tensor, pid: int) -> Optional[torch.Tensor]:
        """_master outside a step (perturb, restore): a master no kernel takes is converted now
        (to contiguous fp32 on p's device: no value changes)."""
        state = self.state[p]
        if "master" in state and p.requires_grad:
            fitted = _fitted(p, _local(p.detach())[0], state["master"], torch.float32, "master", pid)
            if fitted is not None:
                state["master"] = fitted
        return self._master(p)

    @staticmethod
    def _touchable(p: torch.Tensor) -> bool:
        """Frozen params are never touched; meta tensors hold no data to touch."""
        return p.requires_grad and p.device.type != "meta"

    def _shift_call(self, calls: dict, group, p, pid, applied: tuple[float, bool], view, master,
                    substream: int = 0) -> None:
        """Add p to the restore_/perturb_ call of its (backend, device, dtype, perturbation, master)."""
        key = (group["backend"], p.device, p.dtype, applied, substream, master is not None)
        if key not in calls:
            calls[key] = _Call(self._backend(group, p), p.device, applied[0], applied[1], substream)
        calls[key].add(view, pid, master)

    def _run_shifts(self, calls: dict, ahead: int, perturb: bool) -> None:
        for call in calls.values():
            fn = call.backend.ops.perturb_ if perturb else call.backend.ops.restore_
            step, step_t = self._step_arg(call.device, ahead)
            fn(call.params, call.pids, self.seed, step, call.sigma, offsets=call.offsets, masters=call.masters,
               step_t=step_t, rademacher=call.rademacher)
            call.write_back()

    @staticmethod
    def group_perturbation(group: dict[str, Any]) -> tuple[float, bool]:
        """(sigma, rademacher): what perturbing this group adds now."""
        return FSGLD.group_sigma(group), group["perturbation"] == "rademacher"

    # -- perturbation control ------------------------------------------------------------
    @torch.no_grad()
    def perturb(self) -> None:
        """Add sigma * eps_k to every clean trainable param (eps of the current step k). Idempotent."""
        calls: dict = {}
        applied = []  # (param state, perturbation added)
        for group, pids in self._groups_with_pids():
            _check_hparams(group, self.capturable)
            pert = self.group_perturbation(group)
            for p, pid in zip(group["params"], pids):
                state = self.state[p]
                if pert[0] != 0.0 and self._touchable(p) and _applied(state)[0] == 0.0:
                    self._shift_call(calls, group, p, pid, pert, self._view(p), self._master_now(p, pid))
                    applied.append((state, pert))
        self._drop_plan()
        self._run_shifts(calls, 0, perturb=True)
        for state, pert in applied:
            _set_applied(state, *pert)

    @torch.no_grad()
    def restore(self) -> None:
        """Subtract exactly the perturbation that was added (from every param that carries one,
        frozen since or not). Idempotent."""
        calls: dict = {}
        restored = []
        for group, pids in self._groups_with_pids():
            for p, pid in zip(group["params"], pids):
                state = self.state[p]
                if _applied(state)[0] != 0.0 and p.device.type != "meta":
                    self._shift_call(calls, group, p, pid, _applied(state), self._view(p), self._master(p))
                    restored.append(state)
        self._drop_plan()
        self._run_shifts(calls, 0, perturb=False)
        for state in restored:
            _set_applied(state, 0.0, False)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Clean weights inside the block (evaluation, `model.state_dict()`); the same
        perturbation after it, also when the block raises."""
        params = [(g, p, pid) for g, pids in self._groups_with_pids() for p, pid in zip(g["params"], pids)]
        applied = [_applied(self.state[p]) for _, p, _ in params]
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                calls: dict = {}
                for (group, p, pid), pert in zip(params, applied):
                    if pert[0] != 0.0:
                        self._shift_call(calls, group, p, pid, pert, self._view(p), self._master_now(p, pid))
                self._run_shifts(calls, 0, perturb=True)
            for (_, p, _), pert in zip(params, applied):
                _set_applied(self.state[p], *pert)
            self._drop_plan()

    # -- the step ------------------------------------------------------------------------
    # Not named _init_group: Dynamo special-cases that name with torch.optim's return contract.
    def _plan_group(self, group: dict[str, Any], pids: list[int], new_state: dict) -> _GroupPlan:
        """Every tensor of one group in its kernel call, checked; nothing is modified."""
        _check_hparams(group, self.capturable)
        sigma, rademacher = self.group_perturbation(group)
        plan = _GroupPlan(group, sigma if group["perturb_ahead"] else 0.0, rademacher)
        new_pert = (plan.new_sigma, rademacher if plan.new_sigma != 0.0 else False)
        lr = group["lr"]
        for p, pid in zip(group["params"], pids):
            state = self.state[p]
            old = _applied(state)
            if not self._touchable(p):
                if old[0] != 0.0 and p.device.type != "meta":  # frozen since it was perturbed
                    self._shift_call(plan.restores, group, p, pid, old, self._view(p), self._master(p))
                    plan.applied.append((state, (0.0, False)))
                continue
            view = self._view(p)
            plan.applied.append((state, new_pert))
            g = p.grad
            update = g is not None  # capturable: a grad-less param steps with no update (no host branch)
            new = self._new_state(group, p, state, pid, momentum=update)
            if new:
                new_state[p] = new
            master = self._master(p, new)
            if not update and not self.capturable:  # no grad: no update, no noise; the perturbation moves on
                if old[0] != 0.0:
                    self._shift_call(plan.restores, group, p, pid, old, view, master)
                if plan.new_sigma != 0.0:
                    self._shift_call(plan.perturbs, group, p, pid, new_pert, view, master)
                continue
            if update:
                if g.is_sparse:
                    raise RuntimeError("FSGLD does not support sparse gradients")
                if g.is_complex() or g.shape != p.shape or g.device != p.device or g.dtype != p.dtype:
                    raise RuntimeError(f"gradient of shape {tuple(g.shape)} / {g.dtype} on {g.device} does not "
                                       f"match its parameter of shape {tuple(p.shape)} / {p.dtype} on {p.device} "
                                       f"(param {pid})")
            backend = self._backend(group, p)
            if isinstance(lr, torch.Tensor) and lr.device != p.device:
                raise ValueError(f"a Tensor lr must live on the params' device ({p.device}), not {lr.device}")
            restore = (0.0, False) if master is not None else old  # a master is clean: nothing to restore
            key = (group["backend"], p.device, p.dtype, restore, master is not None, update)
            if key not in plan.stepped:
                plan.stepped[key] = _Call(backend, p.device, *restore)
            grad = _local(g)[0] if update else torch.zeros_like(view[0])
            buf = None
            if group["momentum"] != 0.0 and update:
                buf = _local(new.get("momentum_buffer", state.get("momentum_buffer")))[0]
            plan.stepped[key].add(view, pid, master, grad, buf)
        return plan

    def _plan_step(self) -> tuple[list[_GroupPlan], dict]:
        new_state: dict = {}
        return [self._plan_group(group, pids, new_state) for group, pids in self._groups_with_pids()], new_state

    @staticmethod
    def _grads(plans: list[_GroupPlan]) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(group index, param id, gradient) of every param that is updated."""
        for gi, plan in enumerate(plans):
            for (_, _, _, _, _, update), call in plan.stepped.items():
                if update:
                    for pid, g in zip(call.pids, call.grads):
                        yield gi, pid, g

    def _grads_are_finite(self, plans: list[_GroupPlan]) -> bool:
        """One read-only pass over the gradients and one sync per device."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for _, _, g in self._grads(plans):
            by_device[g.device].append(g)
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
                found = torch.zeros(1, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=device))
                if found.item() != 0.0:
                    return False
        return True

    def _cached_plan(self) -> tuple[list[_GroupPlan], dict, list]:
        """(group plans, state they create, applied perturbations they change): the cached plan
        with this step's grads if it still holds, else a new one. A compiled step plans in its
        trace (the graph keeps nothing of the planning) and caches nothing."""
        if torch.compiler.is_compiling():
            plans, new_state = self._plan_step()
            return plans, new_state, [a for plan in plans for a in plan.applied]
        plan = self._cache["plan"]
        grads = None if plan is None else plan.grads(self)
        if grads is None:
            plan = StepPlan(self, *self._plan_step())
            self._cache["plan"] = plan if plan.reusable else None
        else:
            for group in self.param_groups:
                check_lr(group)
            plan.bind(grads)
        return plan.groups, plan.new_state, plan.applied

    def _run_step(self, plans: list[_GroupPlan], new_state: dict, applied: list, grad_scale, found_inf) -> None:
        for p, new in new_state.items():
            self.state[p].update(new)
        for plan in plans:
            group = plan.group
            lr = group["lr"]
            # Compiled, a float lr travels as a tensor too: passed to an op as a float, Dynamo would
            # guard on its value and recompile at every change of a schedule.
            as_tensor = isinstance(lr, torch.Tensor) or torch.compiler.is_compiling()
            # with a tensor lr the kernel computes sqrt(2 / beta) * sqrt(lr) on the device
            noise_std = math.sqrt(2.0 / group["beta"]) if as_tensor else math.sqrt(2.0 * lr / group["beta"])
            for (_, device, _, _, _, update), call in plan.stepped.items():
                lr_t = None
                if as_tensor:
                    # ones * lr: Dynamo keeps the float an input there (torch.full would specialise it)
                    lr_t = lr if isinstance(lr, torch.Tensor) else torch.ones(1, device=device).mul_(lr)
                scale = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
                if group["maximize"] and update:  # d = g * (1 / -scale) = -g / scale: exact negation
                    scale = -scale if scale is not None else torch.full((1,), -1.0, device=device)
                step, step_t = self._step_arg(device)
                call.backend.ops.fused_step_(
                    call.params, call.grads, call.bufs, call.pids, self.seed, step,
                    lr if update and lr_t is None else 0.0,
                    group["weight_decay"] if update else 0.0,
                    group["momentum"] if update else 0.0,
                    noise_std if update else 0.0,
                    call.sigma, plan.new_sigma,
                    offsets=call.offsets, masters=call.masters, grad_scale=scale if update else None,
                    found_inf=None if found_inf is None else found_inf.to(device=device, dtype=torch.float32),
                    step_t=step_t, lr_t=lr_t if update else None,
                    restore_rademacher=call.rademacher, perturb_rademacher=plan.new_rademacher,
                )  # fmt: skip
                call.write_back()
            self._run_shifts(plan.restores, 0, perturb=False)
            self._run_shifts(plan.perturbs, 1, perturb=True)
        for state, pert in applied:
            _set_applied(state, *pert)

    def _perturbations_per_step(self) -> tuple[int, bool]:
        """(n_pert, antithetic): one closure evaluation perturbs every group, so all agree."""
        values = {(g["n_pert"], g["antithetic"]) for g in self.param_groups}
        if len(values) > 1:
            raise ValueError(f"n_pert and antithetic must be the same in every param group, got {sorted(values)}")
        return values.pop() if values else (1, False)

    def _mean_gradient(self, closure: Callable[[], Any], n_pert: int, antithetic: bool) -> Any:
        """Evaluate the closure at theta + sigma*eps_{k,j}, j < n_pert (antithetic: +eps_k, -eps_k)
        and leave the mean of its gradients in .grad and the weights clean. The gradients are
        summed here (each evaluation starts from .grad = None), so a closure that zeroes them
        does no harm; the mean of the losses is returned. If the closure raises, the weights are
        clean and the error propagates."""
        for group in self.param_groups:
            _check_hparams(group, self.capturable)
        self.restore()
        params = [(g, p, pid) for g, pids in self._groups_with_pids() for p, pid in zip(g["params"], pids)
                  if self._touchable(p)]
        sums: dict[torch.Tensor, torch.Tensor] = {}
        losses = []
        for j in range(n_pert):
            calls: dict = {}
            for group, p, pid in params:
                sigma, rademacher = self.group_perturbation(group)
                if sigma != 0.0:
                    sign, sub = (-1.0 if j else 1.0, 0) if antithetic else (1.0, j)
                    self._shift_call(calls, group, p, pid, (sign * sigma, rademacher), self._view(p),
                                     self._master_now(p, pid), sub)
                p.grad = None
            self._run_shifts(calls, 0, perturb=True)
            try:
                with torch.enable_grad():
                    losses.append(closure())
            finally:
                self._run_shifts(calls, 0, perturb=False)
            for _, p, _ in params:
                if p.grad is not None:
                    sums[p] = p.grad if p not in sums else sums[p].add_(p.grad)
        for _, p, _ in params:
            p.grad = sums[p].div_(n_pert) if p in sums else None
        self._drop_plan()
        if all(isinstance(x, torch.Tensor) for x in losses):
            return torch.stack([x.detach() for x in losses]).mean()
        return losses[-1]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One fSGLD step. With a closure: perturb if needed, evaluate it there, then step. With
        n_pert > 1 (closure required), the gradient is the mean over the perturbations.

        If the closure raises, the weights are restored (clean) and the error propagates. Every
        check runs before any tensor is modified: a step that raises changes nothing.
        """
        loss = None
        n_pert, antithetic = self._perturbations_per_step()
        if n_pert > 1:
            if closure is None:
                raise ValueError(f"n_pert={n_pert} evaluates the loss at {n_pert} perturbations per step: pass a "
                                 "closure to step()")
            loss = self._mean_gradient(closure, n_pert, antithetic)
        elif closure is not None:
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()
                raise

        plans, new_state, applied = self._cached_plan()
        # AMP: GradScaler hands us its scale and overflow flag (and has checked the grads itself).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and not self.capturable:
            if found_inf.item() != 0.0:  # the same host sync GradScaler's own skip does
                self._chain["skipped_steps"] += 1
                return loss  # overflow: weights, perturbation and step counter stay as they are
        elif found_inf is None and self.nonfinite != "ignore" and not self._grads_are_finite(plans):
            if self.nonfinite == "raise":
                bad = [f"param {pid} (group {gi}, shape {tuple(g.shape)})" for gi, pid, g in self._grads(plans)
                       if not torch.isfinite(g).all()]
                raise RuntimeError("FSGLD: non-finite gradient in " + ", ".join(bad)
                                   + "; nothing was changed. Pass nonfinite='skip' to skip such steps instead.")
            self._chain["skipped_steps"] += 1
            return loss

        # capturable: no host branch on found_inf, the kernels read it (and change nothing if set)
        self._run_step(plans, new_state, applied, grad_scale, found_inf if self.capturable else None)
        if self._chain["step_t"]:  # advanced on the device: k + 1, or k again after an AMP overflow
            for device, t in self._chain["step_t"].items():
                if found_inf is None:
                    t.add_(1)
                else:
                    t.add_(1 - found_inf.to(device=device, dtype=torch.int64).reshape(1))
        else:
            self._chain["step"] += 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------
    # Our additions run as state-dict hooks registered for the call only: after the user's
    # load pre-hooks (which can upgrade a checkpoint first) and before the user's post-hooks
    # (which see the loaded chain), like torch's own processing.
    def state_dict(self) -> dict[str, Any]:
        handle = self.register_state_dict_post_hook(FSGLD._chain_into_state_dict, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    @staticmethod
    def _chain_into_state_dict(opt: "FSGLD", state_dict: dict[str, Any]) -> dict[str, Any]:
        chain = {"seed": opt.seed, "step": opt.step_count, "skipped_steps": opt.skipped_steps}
        state = dict(state_dict["state"])  # new per-param dicts: the packed ones are self.state's own
        for group in state_dict["param_groups"]:
            for idx in group["params"]:
                state[idx] = {"applied_sigma": 0.0, "applied_rademacher": False, **state.get(idx, {}), **chain}
        return {**state_dict, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pre = self.register_load_state_dict_pre_hook(FSGLD._chain_from_state_dict)
        post = self.register_load_state_dict_post_hook(FSGLD._chain_after_load, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
            self.__dict__.pop("_loading", None)

    @staticmethod
    def _chain_from_state_dict(opt: "FSGLD", state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check a state dict against this optimizer before torch loads it, and keep what its
        casting would lose (the chain, fp32 masters) for `_chain_after_load`."""
        if "fsgld" in state_dict:
            state_dict = _upgrade_top_level_chain(state_dict)
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
        opt._loading = {"seed": _check_seed(seed), "step": int(step), "skipped_steps": int(skipped), "fp32": fp32}
        return state_dict

    @staticmethod
    def _chain_after_load(opt: "FSGLD") -> None:
        loading = opt.__dict__.pop("_loading")
        opt._drop_plan()
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

    # -- copies: deepcopy, pickle, torch.save(opt), multiprocessing -------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch's Optimizer keeps only defaults, state and param_groups
        return {**super().__getstate__(), "_chain": self._chain, "capturable": self.capturable,
                "nonfinite": self.nonfinite}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._cache = {"plan": None}
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    def __repr__(self) -> str:
        """torch's listing, plus the seed and step, the backend that "auto" runs and the sigma
        that a coupled (None) sigma takes."""
        lines = [f"FSGLD (seed={self.seed}, step={self.step_count}, nonfinite={self.nonfinite!r}, "
                 f"capturable={self.capturable}"]
        for i, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {i}")
            for key in sorted(group):
                if key == "params":
                    continue
                value = group[key]
                if key == "backend":
                    runs = sorted({_backends.describe(value, p.device, p.dtype) for p in group["params"]})
                    value = f"{value} ({', '.join(runs) or 'no params'})"
                elif key == "sigma" and value is None:
                    value = f"None (coupled: beta**(-(1+eta)/4) = {self.group_sigma(group):.6g})"
                lines.append(f"    {key}: {value}")
        return "\n".join(lines) + "\n)"

    # -- train()/eval(): the protocol of schedule-free optimizers ------------------------
    # Trainers that support schedule-free optimizers call optimizer.train() before each training
    # forward and optimizer.eval() before evaluating (Hugging Face Trainer's training_step and
    # evaluation_loop, through accelerate's AcceleratedOptimizer), so they evaluate on clean weights.
    def train(self) -> None:
        """Weights for a training forward: perturbed, as `perturb()` (idempotent)."""
        self.perturb()

    def eval(self) -> None:
        """Weights for evaluation: clean, as `restore()` (idempotent); `train()` perturbs again."""
        self.restore()


def _upgrade_top_level_chain(state_dict: dict[str, Any]) -> dict[str, Any]:
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
