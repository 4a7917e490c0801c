"""`FSGLD`: flatness-aware SGLD as a `torch.optim.Optimizer`.

Training loop (the same as `torch.optim.SGD`)::

    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e8)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # gradient at the perturbed weights theta + sigma*eps
        opt.step()                        # restore, SGLD update, perturb for the next forward

The first step's gradient is taken at the weights as they are (clean) unless `perturb()` was
called first. `unperturbed()` hands the clean weights to evaluation or checkpointing.

How a step runs: the plan (`_plan.py`) puts every tensor into kernel calls (one per backend,
device, dtype and applied perturbation) and checks everything a kernel could refuse; it is built
once and reused while it holds. Only then does `_run_step` touch a tensor, so a step that fails
changes nothing. Checkpoints (the chain in every parameter's state): `_checkpoint.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import required

from . import _backends, _checkpoint, _plan
from ._checkpoint import _check_seed
from ._plan import _applied, _GroupPlan, _set_applied

__all__ = ["FSGLD", "TemperatureWarning"]

_NONFINITE = ("raise", "skip", "ignore")
_PERTURBATIONS = ("gaussian", "rademacher")
_ROUNDINGS = ("stochastic", "nearest")


class TemperatureWarning(UserWarning):
    """Part of a group's bf16 weights without masters cannot sample at the temperature 1/beta:
    their bf16 rounding alone adds more variance than the Langevin noise (SPEC 2c). Silence it with
    `warnings.filterwarnings("ignore", category=fsgld_fused.TemperatureWarning)`."""


def rounding_threshold(variance: float) -> float:
    """The smallest |theta| whose bf16 rounding variance ulp(theta)**2 / 6 exceeds the Langevin
    `variance` 2 lr / beta (a power of two, ulp = 2**(e - 7)); 0.0 when every value's does (the ulp
    stops shrinking at 2**-133 below 2**-126)."""
    if not variance > 0.0:
        return 0.0
    e = math.floor((math.log2(6.0 * variance) + 14.0) / 2.0)  # 2**(2e - 14) / 6 ~ variance
    while 2.0 ** (2 * e - 14) / 6.0 > variance:
        e -= 1
    while not 2.0 ** (2 * e - 14) / 6.0 > variance:
        e += 1
    return 0.0 if e <= -126 else 2.0**e


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def _caller_stacklevel() -> int:
    """warnings.warn's stacklevel of the first frame outside fsgld_fused and torch (the code that
    called step(), through any wrappers torch puts around it), counted from the caller of this."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


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
    _plan.check_scheduled(group)  # a float lr, weight_decay, momentum: also checked at every step
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
    for key in ("perturb_ahead", "master_weights", "maximize"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
    if group["rounding"] not in _ROUNDINGS:
        raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {group['rounding']!r}")
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
        rounding: how bf16 params without masters are written: "stochastic" (default; SPEC 2c:
            rounded up or down at random, unbiased, with the Langevin std reduced per element to
            leave room for the rounding's own variance, so the chain keeps its temperature) or
            "nearest" (drops every change below half an ulp: small Langevin noise vanishes and the
            chain freezes). fp32 params, params with masters and fp16 params are written to nearest.
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
        rounding: str = "stochastic",
        n_pert: int = 1,
        antithetic: bool = False,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        differentiable: bool = False,
    ) -> None:
        defaults = dict(lr=lr, beta=beta, sigma=sigma, eta=eta, weight_decay=weight_decay, momentum=momentum,
                        perturb_ahead=perturb_ahead, backend=backend, master_weights=master_weights,
                        perturbation=perturbation, rounding=rounding, n_pert=n_pert, antithetic=antithetic,
                        maximize=maximize, foreach=foreach, fused=fused, differentiable=differentiable)
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
        self._cache: dict[str, Optional[_plan.StepPlan]] = {"plan": None}  # the eager step's plan (_plan.py)
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

    # The step plan (building, checking, caching) lives in _plan.py; these names are its face here.
    _new_state = _plan._new_state
    _backend = staticmethod(_plan._backend)
    _view = staticmethod(_plan._view)
    _master = _plan._master
    _master_now = _plan._master_now
    _touchable = staticmethod(_plan._touchable)
    _shift_call = _plan._shift_call
    _plan_group = _plan._plan_group
    _plan_step = _plan._plan_step
    _grads = staticmethod(_plan._grads)
    _grads_are_finite = _plan._grads_are_finite
    _check_group = staticmethod(_check_hparams)
    _cached_plan = _plan._cached_plan

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

    def _run_shifts(self, calls: dict, ahead: int, perturb: bool) -> None:
        for call in calls.values():
            fn = call.backend.ops.perturb_ if perturb else call.backend.ops.restore_
            step, step_t = self._step_arg(call.device, ahead)
            fn(call.params, call.pids, self.seed, step, call.sigma, offsets=call.offsets, masters=call.masters,
               step_t=step_t, rademacher=call.rademacher, stochastic_rounding=call.stochastic)
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
        if applied:  # the plan's calls restore what is applied: a change of it makes a new plan
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
        if restored:
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
                    stochastic_rounding=call.stochastic,
                )  # fmt: skip
                call.write_back()
            self._run_shifts(plan.restores, 0, perturb=False)
            self._run_shifts(plan.perturbs, 1, perturb=True)
        for state, pert in applied:
            _set_applied(state, *pert)

    def _check_temperature(self, plans: list[_GroupPlan]) -> None:
        """Warn (TemperatureWarning) where a group's stochastically rounded bf16 weights cannot reach
        the temperature: |theta| >= rounding_threshold(2 lr / beta). One pass over those weights (one
        host sync per device) when the threshold falls below the lowest one checked for the group's
        params and dtypes: a decaying or cyclical lr scans at most once per factor of 4 of its first
        descent, then never. Otherwise one float comparison per group."""
        if torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()):
            return  # a compiled or captured step: counting would sync the host
        checked = self._cache.setdefault("temperature", {})
        for gi, plan in enumerate(plans):
            group = plan.group
            lr, beta = group["lr"], group["beta"]
            if isinstance(lr, torch.Tensor):
                continue  # an lr read on the device (capturable): not checked (a host sync at every change)
            variance = 2.0 * lr / beta
            if not variance > 0.0:  # no noise (lr 0, beta inf, or an underflow): no temperature to reach
                continue
            threshold = rounding_threshold(variance)
            last = checked.get(gi)  # (lowest threshold checked, the plan (weakly), its weights' layout)
            if last is not None and threshold >= last[0] and last[1]() is plan:
                continue
            weights = [t for key, call in plan.stepped.items() if call.stochastic and key[-1] for t in call.params]
            layout = [(t.data_ptr(), t.dtype, t.numel()) for t in weights]
            if last is not None and last[2] == layout and threshold >= last[0]:
                checked[gi] = (last[0], weakref.ref(plan), layout)  # a new plan over the same weights
                continue
            checked[gi] = (threshold, weakref.ref(plan), layout)
            total = sum(t.numel() for t in weights)
            if total == 0:
                continue
            per_device: dict[torch.device, list[torch.Tensor]] = {}
            for t in weights:
                per_device.setdefault(t.device, []).append(torch.count_nonzero(t.abs() >= threshold))
            affected = sum(int(torch.stack(counts).sum()) for counts in per_device.values())
            if affected:
                warnings.warn(
                    f"FSGLD param group {gi}: {affected / total:.1%} of its bf16 weights without masters "
                    f"({affected} of {total} elements, |theta| >= {threshold:g}) round with more variance "
                    f"(ulp**2/6) than the Langevin noise adds (2*lr/beta = {variance:.3g}): they cannot "
                    "sample at the temperature 1/beta (SPEC 2c). Use master_weights=True for this group.",
                    TemperatureWarning, stacklevel=_caller_stacklevel())

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
        self._check_temperature(plans)
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
        handle = self.register_state_dict_post_hook(_checkpoint.chain_into_state_dict, prepend=True)
        try:
            return super().state_dict()
        finally:
            handle.remove()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pre = self.register_load_state_dict_pre_hook(_checkpoint.chain_from_state_dict)
        post = self.register_load_state_dict_post_hook(_checkpoint.chain_after_load, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()
            self.__dict__.pop("_loading", None)

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
