"""`FSGLD`: flatness-aware SGLD as a `torch.optim.Optimizer`.

Training loop (the same as `torch.optim.SGD`)::

    opt = FSGLD(model.parameters(), lr=1e-2, beta=1e8)
    for x, y in data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()   # gradient at the perturbed weights theta + sigma*eps
        opt.step()                        # restore, SGLD update, perturb for the next forward

The first step's gradient is taken at the weights as they are (clean) unless `perturb()` was
called first. `unperturbed()` hands the clean weights to evaluation or checkpointing.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Callable, Iterator, Optional

import torch
from torch.optim import Optimizer

from . import _backends

__all__ = ["FSGLD"]

_SEED_LIMIT = 1 << 64
_NONFINITE = ("raise", "skip", "ignore")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def coupled_sigma(beta: float, eta: float) -> float:
    """The paper's coupling sigma = beta ** (-(1 + eta) / 4)."""
    return beta ** (-(1.0 + eta) / 4.0)


def _check_hparams(group: dict[str, Any], capturable: bool = False) -> None:
    """The one argument validator: construction, add_param_group and every step use it."""
    lr, beta, sigma, eta = group["lr"], group["beta"], group["sigma"], group["eta"]
    if isinstance(lr, torch.Tensor):
        # A tensor lr is for capturable=True (CUDA graphs): its value is read on the device, so it
        # is not range-checked here (that would be a host sync).
        if not capturable or lr.numel() != 1 or lr.dtype != torch.float32:
            raise ValueError("a Tensor lr needs capturable=True and a one-element float32 tensor")
    elif not 0.0 < lr < math.inf:
        raise ValueError(f"Invalid learning rate: {lr!r} (need a finite float > 0)")
    if not beta > 0.0:  # also refuses NaN; beta = inf is noise-free (plain SGD)
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
    for key in ("perturb_ahead", "master_weights"):
        if not isinstance(group[key], bool):
            raise ValueError(f"{key} must be a bool, got {group[key]!r}")
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


class FSGLD(Optimizer):
    """Flatness-aware stochastic gradient Langevin dynamics (arXiv 2510.02174).

    Args:
        params: parameters or param groups, as for any `torch.optim` optimizer.
        lr: step size (> 0).
        beta: inverse temperature (> 0); Langevin noise std is sqrt(2 * lr / beta).
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

    With `torch.amp.GradScaler`, the scaled gradients are unscaled inside the fused step and an
    overflow changes nothing (weights, perturbation, step counter); the scaler's own inf check
    replaces the `nonfinite` one.
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params,
        lr: float,
        beta: float,
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
    ) -> None:
        defaults = dict(
            lr=lr,
            beta=beta,
            sigma=sigma,
            eta=eta,
            weight_decay=weight_decay,
            momentum=momentum,
            perturb_ahead=perturb_ahead,
            backend=backend,
            master_weights=master_weights,
        )
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
        if seed is None:  # two 32-bit draws: torch.manual_seed makes runs repeatable
            lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
            seed = _sync_seed(lo | (hi << 32), given=False)
        else:
            seed = _sync_seed(_check_seed(seed), given=True)
        self._seed = _check_seed(seed)
        # The chain's mutable state, in one dict mutated in place: Dynamo keeps item writes on
        # it, where it dropped plain attribute rebinding on an optimizer inside torch.compile.
        #   step: the counter k of the noise stream, a Python int (never cast by load_state_dict)
        #   applied_sigma: per group, the sigma now added to its weights (0.0: clean)
        #   skipped_steps: steps skipped for non-finite gradients or AMP overflow
        #   step_t: capturable only, one int64 counter per device, advanced on the device; when
        #     present it is the authoritative k
        self._chain: dict[str, Any] = {"step": 0, "applied_sigma": [], "skipped_steps": 0, "step_t": {}}
        super().__init__(params, defaults)

    # -- construction --------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            if isinstance(p, torch.Tensor) and (p.is_complex() or not p.is_floating_point()):
                raise ValueError(f"FSGLD needs real floating-point parameters, got {p.dtype}")
            if id(p) in seen:
                raise ValueError("a parameter appears twice in FSGLD's parameter list")
            seen.add(id(p))
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        _check_hparams(group, self.capturable)
        self._chain["applied_sigma"].append(0.0)
        if group["master_weights"]:  # the weights are clean now: copy them before any perturbation
            for p in params:
                if p.dtype in _LOW_PRECISION and "master" not in self.state[p]:
                    local = _local(p.detach())[0]
                    self.state[p]["master"] = _state_like(p, local.float().clone(memory_format=torch.contiguous_format))

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def step_count(self) -> int:
        """The step counter k: how many successful steps this optimizer has taken (with
        capturable=True it lives on the device and reading it here is a host sync)."""
        for t in self._chain["step_t"].values():
            return int(t.item())
        return self._chain["step"]

    def _step_arg(self, device: torch.device, ahead: int = 0) -> tuple[int, Optional[torch.Tensor]]:
        """(step, step_t) for a kernel call: the host counter, or the device counter (capturable)."""
        if not self.capturable:
            return self._chain["step"] + ahead, None
        counters = self._chain["step_t"]
        if device not in counters:
            counters[device] = torch.full((1,), self.step_count, dtype=torch.int64, device=device)
        t = counters[device]
        return 0, (t if ahead == 0 else t + ahead)

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (nonfinite="skip") or AMP overflow."""
        return self._chain["skipped_steps"]

    @property
    def is_perturbed(self) -> bool:
        return any(s != 0.0 for s in self._chain["applied_sigma"])

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def group_sigma(group: dict[str, Any]) -> float:
        if group["sigma"] is not None:
            return float(group["sigma"])
        return coupled_sigma(group["beta"], group["eta"])

    def _groups_with_pids(self) -> Iterator[tuple[int, dict[str, Any], list[int]]]:
        """(group index, group, the parameter ids of SPEC section 2: order across groups)."""
        start = 0
        for gi, group in enumerate(self.param_groups):
            n = len(group["params"])
            yield gi, group, list(range(start, start + n))
            start += n

    @staticmethod
    def _buckets(group, params, *lists):
        """Split parallel lists by (backend, device, dtype): one kernel call per bucket."""
        out: dict[tuple, list[list]] = defaultdict(lambda: [[] for _ in range(len(lists) + 1)])
        for i, p in enumerate(params):
            backend = _backends.resolve(group["backend"], p.device, p.dtype)
            cols = out[(backend, p.device, p.dtype)]  # a group's masters are all there or all absent
            cols[0].append(p)
            for col, lst in zip(cols[1:], lists):
                col.append(lst[i])
        return out

    def _master(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The fp32 master the kernels update (its local shard for a DTensor param), or None."""
        master = self.state[p].get("master") if p in self.state else None
        return None if master is None else _local(master)[0]

    def _shift_params(self, group, params, pids, ahead: int, sigma: float, perturb: bool) -> None:
        """Perturb (or restore) params by sigma * eps_{k+ahead}, bucket by bucket; masters make
        both exact."""
        masters = [self._master(p) for p in params]
        views = [_local(p) for p in params]
        locals_, offsets = [v[0] for v in views], [v[1] for v in views]
        for (backend, device, _), (ps, ids, ms, offs) in self._buckets(group, locals_, pids, masters, offsets).items():
            ms = ms if ms and ms[0] is not None else []
            fn = backend.ops.perturb_ if perturb else backend.ops.restore_
            step, step_t = self._step_arg(device, ahead)
            fn(ps, ids, self._seed, step, sigma, offsets=offs, masters=ms, step_t=step_t)

    def _shift(self, sigmas: list[float], sign: float) -> None:
        """Add sign * sigma_g * eps_k to every group g's weights (perturb or restore)."""
        for gi, group, pids in self._groups_with_pids():
            if sigmas[gi] != 0.0:
                self._shift_params(group, group["params"], pids, 0, sigmas[gi], perturb=sign > 0)

    # -- perturbation control ------------------------------------------------------------
    @torch.no_grad()
    def perturb(self) -> None:
        """Add sigma * eps_k to every clean group (eps of the current step k). Idempotent."""
        sigmas = [
            0.0 if applied != 0.0 else self.group_sigma(g)
            for g, applied in zip(self.param_groups, self._chain["applied_sigma"])
        ]
        for g in self.param_groups:
            _check_hparams(g, self.capturable)
        self._shift(sigmas, +1.0)
        applied = self._chain["applied_sigma"]
        self._chain["applied_sigma"] = [a if a != 0.0 else s for a, s in zip(applied, sigmas)]

    @torch.no_grad()
    def restore(self) -> None:
        """Subtract exactly the perturbation that was added. Idempotent."""
        self._shift(self._chain["applied_sigma"], -1.0)
        self._chain["applied_sigma"] = [0.0] * len(self.param_groups)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Clean weights inside the block (evaluation, `model.state_dict()`); perturbation after."""
        applied = list(self._chain["applied_sigma"])
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                self._shift(applied, +1.0)
            self._chain["applied_sigma"] = applied

    # -- the step ------------------------------------------------------------------------
    # Not named _init_group: Dynamo special-cases that name with torch.optim's return contract.
    def _gather_group(self, group, pids):
        """Collect a group's tensors and check them all before anything is modified."""
        with_grad: dict[str, list] = {"params": [], "grads": [], "bufs": [], "masters": [], "pids": [], "offsets": []}
        no_grad: dict[str, list] = {"params": [], "pids": []}
        for p, pid in zip(group["params"], pids):
            if p.grad is None:
                no_grad["params"].append(p)
                no_grad["pids"].append(pid)
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("FSGLD does not support sparse gradients")
            if g.is_complex() or g.shape != p.shape:
                raise RuntimeError(f"gradient of shape {tuple(g.shape)} / {g.dtype} does not match its parameter")
            master = self._master(p)
            local, offset = _local(p)
            with_grad["params"].append(local)
            with_grad["grads"].append(_local(g)[0])
            with_grad["pids"].append(pid)
            with_grad["offsets"].append(offset)
            with_grad["masters"].append(master)
            if group["momentum"] != 0.0:
                state = self.state[p]
                if "momentum_buffer" not in state:  # zeros: momentum * 0 + d == d on the first step
                    like = master if master is not None else local
                    state["momentum_buffer"] = _state_like(p, torch.zeros_like(like, memory_format=torch.contiguous_format))
                with_grad["bufs"].append(_local(state["momentum_buffer"])[0])
        return with_grad, no_grad

    def _grads_are_finite(self, plans) -> bool:
        """One read-only pass over the gradients and one sync per device."""
        by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
        for plan in plans:
            for (_, device, _), cols in plan[3].items():
                by_device[device] += cols[1]
        for device, grads in by_device.items():
            if device.type == "cuda":  # one fused multi-tensor launch; NaN and inf reach the max
                summary = [n.float() for n in torch._foreach_norm(grads, math.inf)]
            else:
                # On CPU the inf-norm ran at 3 GB/s (64M params: 93 ms) and float32 sums at 30 GB/s
                # (9 ms). A NaN or inf makes a sum non-finite; so would a float32 overflow of the
                # sum (|sum| > 3.4e38), which we accept as non-finite too.
                summary = [g.sum(dtype=torch.float32) for g in grads]
            if not bool(torch.isfinite(torch.stack(summary)).all()):
                return False
        return True

    def _nonfinite_names(self, plans) -> list[str]:
        bad = []
        for gi, _, _, stepped, _ in plans:
            for cols in stepped.values():
                for p, g, pid in zip(cols[0], cols[1], cols[3]):
                    if not torch.isfinite(g).all():
                        bad.append(f"param {pid} (group {gi}, shape {tuple(p.shape)})")
        return bad

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One fSGLD step. With a closure: perturb if needed, evaluate it there, then step.

        If the closure raises, the weights are restored (clean) and the error propagates.
        """
        loss = None
        if closure is not None:
            self.perturb()
            try:
                with torch.enable_grad():
                    loss = closure()
            except BaseException:
                self.restore()
                raise

        plans = []
        for gi, group, pids in self._groups_with_pids():  # validate everything first
            _check_hparams(group, self.capturable)
            with_grad, no_grad = self._gather_group(group, pids)
            new_sigma = self.group_sigma(group) if group["perturb_ahead"] else 0.0
            n = len(with_grad["params"])
            lists = (with_grad["grads"], with_grad["bufs"] or [None] * n, with_grad["pids"], with_grad["masters"],
                     with_grad["offsets"])
            if self.capturable and no_grad["params"]:
                # No host branch on the device's found_inf: params without a grad take the fused
                # step with a zero gradient and no update (lr, decay, noise 0), which restores and
                # re-perturbs them, or changes nothing on an overflow.
                for p, pid in zip(no_grad["params"], no_grad["pids"]):
                    local, offset = _local(p)
                    lists[0].append(torch.zeros_like(local))
                    lists[1].append(None)
                    lists[2].append(-1 - pid)  # marks "no update"; the real pid is recovered below
                    lists[3].append(self._master(p))
                    lists[4].append(offset)
                    with_grad["params"].append(local)
                no_grad = {"params": [], "pids": []}
            plans.append((gi, group, new_sigma, self._buckets(group, with_grad["params"], *lists), no_grad))

        # AMP: GradScaler hands us its scale and overflow flag (and has checked the grads itself).
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and not self.capturable:
            if found_inf.item() != 0.0:  # the same host sync GradScaler's own skip does
                self._chain["skipped_steps"] += 1
                return loss  # overflow: weights, perturbation and step counter stay as they are
        elif found_inf is None and self.nonfinite != "ignore" and not self._grads_are_finite(plans):
            if self.nonfinite == "raise":
                raise RuntimeError(
                    "FSGLD: non-finite gradient in " + ", ".join(self._nonfinite_names(plans))
                    + "; nothing was changed. Pass nonfinite='skip' to skip such steps instead."
                )
            self._chain["skipped_steps"] += 1
            return loss

        for gi, group, new_sigma, stepped, no_grad in plans:
            old_sigma = self._chain["applied_sigma"][gi]
            lr = group["lr"]
            lr_t = lr if isinstance(lr, torch.Tensor) else None
            # with a tensor lr the kernel computes sqrt(2 / beta) * sqrt(lr) on the device
            noise_std = math.sqrt(2.0 / group["beta"]) if lr_t is not None else math.sqrt(2.0 * lr / group["beta"])
            for (backend, device, _), (ps, gs, bufs, ids, ms, offs) in stepped.items():
                scale = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
                inf = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
                step, step_t = self._step_arg(device)
                if lr_t is not None and lr_t.device != device:
                    raise ValueError(f"a Tensor lr must live on the params' device ({device}), not {lr_t.device}")
                masters = ms if ms[0] is not None else []
                update = [i >= 0 for i in ids]
                for sel, coeffs in ((True, None), (False, 0.0)):  # stepped params, then grad-less ones
                    idx = [j for j, u in enumerate(update) if u == sel]
                    if not idx:
                        continue
                    pick = lambda xs: [xs[j] for j in idx]  # noqa: E731
                    backend.ops.fused_step_(
                        pick(ps),
                        pick(gs),
                        pick(bufs) if group["momentum"] != 0.0 and sel else [],
                        [i if i >= 0 else -1 - i for i in pick(ids)],
                        self._seed,
                        step,
                        group["lr"] if sel and lr_t is None else 0.0,
                        group["weight_decay"] if sel else 0.0,
                        group["momentum"] if sel else 0.0,
                        noise_std if sel else 0.0,
                        old_sigma,
                        new_sigma,
                        offsets=pick(offs),
                        masters=pick(masters) if masters else [],
                        grad_scale=scale if sel else None,
                        found_inf=inf if self.capturable else None,
                        step_t=step_t,
                        lr_t=lr_t if sel else None,
                    )
            if no_grad["params"]:  # no grad: no update, no noise; the perturbation still moves on
                if old_sigma != 0.0:
                    self._shift_params(group, no_grad["params"], no_grad["pids"], 0, old_sigma, perturb=False)
                if new_sigma != 0.0:
                    self._shift_params(group, no_grad["params"], no_grad["pids"], 1, new_sigma, perturb=True)
            self._chain["applied_sigma"][gi] = new_sigma
        if self.capturable:  # advanced on the device: k + 1, or k again after an AMP overflow
            for device, t in self._chain["step_t"].items():
                if found_inf is None:
                    t.add_(1)
                else:
                    t.add_(1 - found_inf.to(device=device, dtype=torch.int64).reshape(1))
        else:
            self._chain["step"] += 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # Plain Python ints and floats: load_state_dict's dtype casting never touches them.
        sd["fsgld"] = {
            "seed": self._seed,
            "step": self.step_count,
            "applied_sigma": list(self._chain["applied_sigma"]),
            "skipped_steps": self._chain["skipped_steps"],
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "fsgld" not in state_dict:
            raise ValueError("not an FSGLD state_dict: the 'fsgld' entry (seed, step, perturbation) is missing")
        extra = state_dict["fsgld"]
        applied = [float(s) for s in extra["applied_sigma"]]
        groups = state_dict.get("param_groups", [])
        if len(applied) != len(self.param_groups) or len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        saved_ids = [i for g in groups for i in g["params"]]
        ours = [p for g in self.param_groups for p in g["params"]]
        for gi, (g_saved, g_ours) in enumerate(zip(groups, self.param_groups)):
            if len(g_saved["params"]) != len(g_ours["params"]):
                raise ValueError(
                    f"param group {gi} has {len(g_saved['params'])} params in the state_dict and "
                    f"{len(g_ours['params'])} here"
                )
        # Shapes first, with the parameter named: torch would cast a mismatched buffer silently.
        for pos, (idx, p) in enumerate(zip(saved_ids, ours)):
            for key, value in state_dict.get("state", {}).get(idx, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != p.shape:
                    raise ValueError(
                        f"state_dict entry {key!r} of param {pos} has shape {tuple(value.shape)}, "
                        f"the parameter has shape {tuple(p.shape)}"
                    )
        seed, step = _check_seed(extra["seed"]), int(extra["step"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fsgld"})
        # Optimizer.load_state_dict casts floating state to the param dtype: fp32 masters (and
        # the fp32 momentum buffers that go with them) are put back in fp32 from the source.
        for idx, p in zip(saved_ids, ours):
            saved = state_dict.get("state", {}).get(idx, {})
            if "master" in saved:
                for key in ("master", "momentum_buffer"):
                    if key in saved:
                        self.state[p][key] = saved[key].to(device=p.device, dtype=torch.float32, copy=True)
            state = self.state.get(p, {})
            for key in ("master", "momentum_buffer"):  # FSDP2: full tensors become this rank's shard
                if key in state:
                    state[key] = _state_for(p, state[key])
        self._seed = seed
        self._chain.update(step=step, applied_sigma=applied, skipped_steps=int(extra.get("skipped_steps", 0)))
        for t in self._chain["step_t"].values():  # in place: a captured graph keeps its pointer
            t.fill_(step)

    def __repr__(self) -> str:
        return super().__repr__().replace("FSGLD (", f"FSGLD (seed={self._seed}, step={self.step_count}", 1)

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
