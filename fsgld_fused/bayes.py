"""Posterior sampling with FSGLD: sample collection, the cyclical step-size schedule, Bayesian
model averaging, calibration / OOD metrics, and a flatness probe (Hessian trace, top eigenvalue).

The paper's Bayesian protocol: a cyclical cosine step size (4 cycles), a few samples taken at the
end of each cycle, predictions averaged over the samples.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.distributions import Categorical
from torch.func import functional_call

__all__ = [
    "CyclicalCosineSchedule",
    "SampleCollector",
    "bma_log_probs",
    "accuracy",
    "nll",
    "ece",
    "brier",
    "auroc",
    "predictive_entropy",
    "hutchinson_trace",
    "top_hessian_eigenvalue",
]


# ---- schedule and sample collection ----------------------------------------------------------------
class CyclicalCosineSchedule(torch.optim.lr_scheduler.CosineAnnealingWarmRestarts):
    """The cSG-MCMC cyclical step size: torch's CosineAnnealingWarmRestarts with T_0 = total_steps /
    cycles and eta_min = 0, lr(k) = base_lr / 2 * (cos(pi * (k mod L) / L) + 1), base_lr the
    optimizer's lr; a stock scheduler (state_dict, checkpoints). Call `step()` after `opt.step()`.

    `sample_now(k)` is True on the last `samples_per_cycle` steps of each cycle (k counted from 0),
    where the step size is smallest and the chain samples rather than explores; never from
    `total_steps` on.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, cycles: int = 4,
                 samples_per_cycle: int = 3, last_epoch: int = -1):
        if total_steps < cycles or cycles < 1:
            raise ValueError(f"need total_steps >= cycles >= 1, got {total_steps}, {cycles}")
        if not 0 < samples_per_cycle <= total_steps // cycles:
            raise ValueError(f"samples_per_cycle must be in [1, {total_steps // cycles}]")
        self.total_steps, self.cycles, self.samples_per_cycle = total_steps, cycles, samples_per_cycle
        self.cycle_len = total_steps // cycles
        super().__init__(optimizer, T_0=self.cycle_len, eta_min=0.0, last_epoch=last_epoch)

    def sample_now(self, k: int) -> bool:
        return 0 <= k < self.cycle_len * self.cycles and (k % self.cycle_len) >= self.cycle_len - self.samples_per_cycle


class SampleCollector:
    """Keeps posterior samples (clean weights) after burn-in, every `thin` steps, in memory or on
    disk (`directory`: one file per sample, loaded back one at a time)."""

    def __init__(self, burn_in: int = 0, thin: int = 1, directory: Optional[str] = None):
        if burn_in < 0 or thin < 1:
            raise ValueError("need burn_in >= 0 and thin >= 1")
        self.burn_in, self.thin, self.directory = burn_in, thin, directory
        self._memory: list[dict[str, torch.Tensor]] = []
        self._files: list[str] = []
        if directory is not None:
            os.makedirs(directory, exist_ok=True)

    def due(self, k: int) -> bool:
        return k >= self.burn_in and (k - self.burn_in) % self.thin == 0

    def add(self, model: torch.nn.Module, optimizer=None) -> None:
        """Store the model's clean weights (restored for the copy if `optimizer` perturbed them)."""
        ctx = optimizer.unperturbed() if optimizer is not None and hasattr(optimizer, "unperturbed") else nullcontext()
        with ctx:
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if self.directory is None:
            self._memory.append(sd)
        else:
            path = os.path.join(self.directory, f"sample_{len(self._files):05d}.pt")
            torch.save(sd, path)
            self._files.append(path)

    def maybe_add(self, k: int, model: torch.nn.Module, optimizer=None) -> bool:
        if self.due(k):
            self.add(model, optimizer)
            return True
        return False

    def __len__(self) -> int:
        return len(self._memory) + len(self._files)

    def __iter__(self) -> Iterable[dict[str, torch.Tensor]]:
        yield from self._memory
        for path in self._files:
            yield torch.load(path)


# ---- Bayesian model averaging ----------------------------------------------------------------------
@torch.no_grad()
def bma_log_probs(model: torch.nn.Module, samples: Iterable[dict[str, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """log of the sample-averaged predictive probabilities, computed in log space:
    logsumexp_s(log_softmax(f_s(x))) - log S. Each sample runs through torch.func.functional_call:
    the model's own weights are never touched. One sample at a time, not vmap over stacked samples:
    a SampleCollector on disk yields them one by one, and memory stays one model's worth."""
    total, count = None, 0
    for sd in samples:
        missing = model.state_dict().keys() - sd.keys()  # non-persistent buffers are the model's own
        if missing:
            raise ValueError(f"a sample lacks {sorted(missing)[:3]} of the model's state_dict")
        lp = torch.log_softmax(functional_call(model, sd, (x,)).float(), dim=-1)
        total = lp if total is None else torch.logaddexp(total, lp)
        count += 1
    if count == 0:
        raise ValueError("no samples to average")
    return total - math.log(count)


# ---- metrics (log_probs: [N, C] log predictive probabilities, y: [N] labels) ---------------------------
# torch, not torchmetrics or scikit-learn: neither is a dependency of the package (scikit-learn is the
# demo's); tests/test_bayes.py checks each against scikit-learn (and torchmetrics where installed).
def accuracy(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return (log_probs.argmax(-1) == y).float().mean().item()


def nll(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    return F.nll_loss(log_probs, y).item()


def ece(log_probs: torch.Tensor, y: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error (L1) with `bins` equal-width confidence bins (lo, hi]."""
    conf, pred = log_probs.float().exp().max(-1)
    correct = (pred == y).float()
    which = torch.bucketize(conf, torch.linspace(0, 1, bins + 1, device=conf.device), right=False).clamp_(1, bins) - 1
    gap = torch.zeros(bins, device=conf.device).index_add_(0, which, conf - correct)  # per bin: sum of confidence - accuracy
    return (gap.abs().sum() / len(y)).item()


def brier(log_probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multiclass Brier score: mean over samples of the squared distance to the one-hot label."""
    probs = log_probs.exp()
    return F.mse_loss(probs, F.one_hot(y, probs.shape[-1]).to(probs.dtype), reduction="sum").item() / len(y)


def predictive_entropy(log_probs: torch.Tensor) -> torch.Tensor:
    return Categorical(logits=log_probs, validate_args=False).entropy()  # a diverged row: NaN, not an error


def auroc(scores_in: torch.Tensor, scores_out: torch.Tensor) -> float:
    """P(score_out > score_in) (ties count one half): with predictive entropy as the score, the
    AUROC of telling out-of-distribution inputs from in-distribution ones. The Mann-Whitney rank
    formula, ties given their mean rank: sklearn.metrics.roc_auc_score's value (tested)."""
    s = torch.cat([scores_in, scores_out]).double()
    _, which, counts = torch.unique(s, return_inverse=True, return_counts=True)  # sorted distinct scores
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2  # 1-based mean rank of each score
    n_in, n_out = len(scores_in), len(scores_out)
    return ((mean_rank[which[n_in:]].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out)).item()


# ---- flatness probe ---------------------------------------------------------------------------------
def _hvp(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]):
    # double backward, not torch.func.hvp: the loss is a closure over the module's own parameters
    # (any model, any loss), where torch.func needs a pure function of them
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)
    dot = sum((g * v).sum() for g, v in zip(grads, vs))
    return torch.autograd.grad(dot, params)


def hutchinson_trace(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], samples: int = 32,
                     generator: Optional[torch.Generator] = None) -> float:
    """Hutchinson's estimate E[v^T H v] of tr(H) with Rademacher v, at the params as they are."""
    params = list(params)
    total = 0.0
    for _ in range(samples):
        vs = [torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1 for p in params]
        hv = _hvp(loss_fn, params, vs)
        total += sum((h * v).sum() for h, v in zip(hv, vs)).item()
    return total / samples


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], iters: int = 50,
                           tol: float = 1e-4, generator: Optional[torch.Generator] = None) -> float:
    """Largest-magnitude Hessian eigenvalue by power iteration on Hessian-vector products."""
    params = list(params)
    vs = [torch.randn(p.shape, generator=generator).to(p) for p in params]
    norm = math.sqrt(sum((v * v).sum().item() for v in vs))
    vs = [v / norm for v in vs]
    eig = 0.0
    for _ in range(iters):
        hv = _hvp(loss_fn, params, vs)
        new = sum((h * v).sum() for h, v in zip(hv, vs)).item()  # Rayleigh quotient
        norm = math.sqrt(sum((h * h).sum().item() for h in hv))
        if norm == 0.0:
            return 0.0
        vs = [h / norm for h in hv]
        if abs(new - eig) <= tol * max(1.0, abs(new)):
            return new
        eig = new
    return eig
