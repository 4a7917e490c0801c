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


def coupled_sigma(beta: float, eta: float) -> float:
    """The paper's coupling sigma = beta ** (-(1 + eta) / 4)."""
    return beta ** (-(1.0 + eta) / 4.0)


def _check_hparams(group: dict[str, Any]) -> None:
    """The one argument validator: construction, add_param_group and every step use it."""
    lr, beta, sigma, eta = group["lr"], group["beta"], group["sigma"], group["eta"]
    if isinstance(lr, torch.Tensor) or not (0.0 < lr < math.inf):
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
    if not isinstance(group["perturb_ahead"], bool):
        raise ValueError(f"perturb_ahead must be a bool, got {group['perturb_ahead']!r}")
    _backends.check_backend_name(group["backend"])


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"Invalid seed: {seed!r} (need an int in [0, 2**64))")
    return seed


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
    """

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
        )
        _check_hparams(defaults)
        if seed is None:  # two 32-bit draws: torch.manual_seed makes runs repeatable
            lo, hi = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
            seed = lo | (hi << 32)
        self._seed = _check_seed(seed)
        self._step = 0  # the step counter k of the noise stream; a Python int, never cast
        self._applied_sigma: list[float] = []  # per group: sigma now added to its weights (0: clean)
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
        _check_hparams(self.param_groups[-1])
        self._applied_sigma.append(0.0)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def step_count(self) -> int:
        """The step counter k: how many successful steps this optimizer has taken."""
        return self._step

    @property
    def is_perturbed(self) -> bool:
        return any(s != 0.0 for s in self._applied_sigma)

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
            cols = out[(backend, p.device, p.dtype)]
            cols[0].append(p)
            for col, lst in zip(cols[1:], lists):
                col.append(lst[i])
        return out

    def _shift(self, sigmas: list[float], step: int, sign: float) -> None:
        """Add sign * sigma_g * eps_step to every group g's weights (perturb or restore)."""
        for gi, group, pids in self._groups_with_pids():
            if sigmas[gi] == 0.0:
                continue
            for (backend, _, _), (ps, ids) in self._buckets(group, group["params"], pids).items():
                if sign > 0:
                    backend.ops.perturb_(ps, ids, self._seed, step, sigmas[gi])
                else:
                    backend.ops.restore_(ps, ids, self._seed, step, sigmas[gi])

    # -- perturbation control ------------------------------------------------------------
    @torch.no_grad()
    def perturb(self) -> None:
        """Add sigma * eps_k to every clean group (eps of the current step k). Idempotent."""
        sigmas = [
            0.0 if applied != 0.0 else self.group_sigma(g)
            for g, applied in zip(self.param_groups, self._applied_sigma)
        ]
        for g in self.param_groups:
            _check_hparams(g)
        self._shift(sigmas, self._step, +1.0)
        self._applied_sigma = [a if a != 0.0 else s for a, s in zip(self._applied_sigma, sigmas)]

    @torch.no_grad()
    def restore(self) -> None:
        """Subtract exactly the perturbation that was added. Idempotent."""
        self._shift(self._applied_sigma, self._step, -1.0)
        self._applied_sigma = [0.0] * len(self.param_groups)

    @contextlib.contextmanager
    def unperturbed(self) -> Iterator[None]:
        """Clean weights inside the block (evaluation, `model.state_dict()`); perturbation after."""
        applied = list(self._applied_sigma)
        self.restore()
        try:
            yield
        finally:
            with torch.no_grad():
                self._shift(applied, self._step, +1.0)
            self._applied_sigma = applied

    # -- the step ------------------------------------------------------------------------
    def _init_group(self, group, pids):
        """Collect a group's tensors and check them all before anything is modified."""
        with_grad: dict[str, list] = {"params": [], "grads": [], "bufs": [], "pids": []}
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
            with_grad["params"].append(p)
            with_grad["grads"].append(g)
            with_grad["pids"].append(pid)
            if group["momentum"] != 0.0:
                state = self.state[p]
                if "momentum_buffer" not in state:  # zeros: momentum * 0 + d == d on the first step
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                with_grad["bufs"].append(state["momentum_buffer"])
        return with_grad, no_grad

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

        k = self._step
        plans = []
        for gi, group, pids in self._groups_with_pids():  # validate everything first
            _check_hparams(group)
            with_grad, no_grad = self._init_group(group, pids)
            new_sigma = self.group_sigma(group) if group["perturb_ahead"] else 0.0
            lists = (with_grad["grads"], with_grad["bufs"] or [None] * len(with_grad["params"]), with_grad["pids"])
            plans.append(
                (
                    gi,
                    group,
                    new_sigma,
                    self._buckets(group, with_grad["params"], *lists),
                    self._buckets(group, no_grad["params"], no_grad["pids"]),
                )
            )

        for gi, group, new_sigma, stepped, skipped in plans:
            old_sigma = self._applied_sigma[gi]
            noise_std = math.sqrt(2.0 * group["lr"] / group["beta"])
            for (backend, _, _), (ps, gs, bufs, ids) in stepped.items():
                backend.ops.fused_step_(
                    ps,
                    gs,
                    bufs if group["momentum"] != 0.0 else [],
                    ids,
                    self._seed,
                    k,
                    group["lr"],
                    group["weight_decay"],
                    group["momentum"],
                    noise_std,
                    old_sigma,
                    new_sigma,
                )
            for (backend, _, _), (ps, ids) in skipped.items():  # no grad: no update, no noise
                if old_sigma != 0.0:
                    backend.ops.restore_(ps, ids, self._seed, k, old_sigma)
                if new_sigma != 0.0:
                    backend.ops.perturb_(ps, ids, self._seed, k + 1, new_sigma)
            self._applied_sigma[gi] = new_sigma
        self._step = k + 1
        return loss

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # Plain Python ints and floats: load_state_dict's dtype casting never touches them.
        sd["fsgld"] = {"seed": self._seed, "step": self._step, "applied_sigma": list(self._applied_sigma)}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "fsgld" not in state_dict:
            raise ValueError("not an FSGLD state_dict: the 'fsgld' entry (seed, step, perturbation) is missing")
        extra = state_dict["fsgld"]
        applied = [float(s) for s in extra["applied_sigma"]]
        if len(applied) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(applied)} param groups, this optimizer has {len(self.param_groups)}"
            )
        seed, step = _check_seed(extra["seed"]), int(extra["step"])
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "fsgld"})
        self._seed, self._step, self._applied_sigma = seed, step, applied

    def __repr__(self) -> str:
        return super().__repr__().replace("FSGLD (", f"FSGLD (seed={self._seed}, step={self._step}", 1)
