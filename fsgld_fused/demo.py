"""`python -m fsgld_fused demo`: SGD, SGLD, SAM and fSGLD on scikit-learn's digits with label noise.

Data: the 8x8 digits that ship inside scikit-learn (no download). In-distribution task: digits
0-4 (train/test split 60/40 of those, stratified), with symmetric label noise on the training labels (a
fraction r of them moved to a uniformly drawn other class). Out-of-distribution: digits 5-9,
scored by predictive entropy (AUROC). A 64-128-128-5 MLP, minibatches of 32, weight decay 5e-4,
momentum 0 (the paper's settings).

Methods: SGD and SAM (rho = 0.05, two gradients per step, written here) keep their final weights.
SGLD (FSGLD with sigma = 0) and fSGLD (coupled sigma = beta**(-(1+eta)/4), eta = 0.1; the same
with a Rademacher perturbation; and a decoupled sigma = 0.05 ablation) follow the paper's Bayesian protocol: a cyclical cosine step
size over 4 cycles (peak 2 * lr, so its mean equals SGD's constant lr), 3 samples at the end of
each, Bayesian model averaging of the 12 samples.
beta = N / T with N the training-set size and T = 1e-4, as in the paper's Bayesian runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from . import bayes
from .optimizer import FSGLD

TEMPERATURE = 1e-4


def load_digits_split(seed: int = 0):
    """Digits 0-4 split 60/40, stratified by class; digits 5-9 as the OOD set (all float32 in [0, 1])."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # scikit-learn is an optional (demo/test) dependency
        raise ModuleNotFoundError("the demo needs scikit-learn: pip install scikit-learn", name="sklearn") from exc
    x, y = load_digits(return_X_y=True)
    ind = y < 5
    x_tr, x_te, y_tr, y_te = train_test_split(x[ind], y[ind], train_size=0.6, stratify=y[ind], random_state=seed)
    pixels = lambda a: torch.tensor(a, dtype=torch.float32) / 16.0  # noqa: E731
    labels = lambda a: torch.tensor(a, dtype=torch.int64)  # noqa: E731
    return pixels(x_tr), labels(y_tr), pixels(x_te), labels(y_te), pixels(x[~ind])


def noisy_labels(y: torch.Tensor, rate: float, classes: int, gen: torch.Generator) -> torch.Tensor:
    """Symmetric noise: a fraction `rate` of labels moved to a uniformly drawn other class."""
    y = y.clone()
    flip = torch.rand(len(y), generator=gen) < rate
    shift = torch.randint(1, classes, (len(y),), generator=gen)
    y[flip] = (y[flip] + shift[flip]) % classes
    return y


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(), torch.nn.Linear(128, 5)
    )


def sam_step(model, loss_fn, opt, rho: float = 0.05) -> None:
    """Sharpness-aware minimisation: gradient at w + rho * g / |g|, applied at w (two gradients)."""
    opt.zero_grad()
    loss_fn().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.norm(torch.stack([p.grad.norm() for p in params])) + 1e-12
        shifts = [p.grad * (rho / norm) for p in params]
        for p, e in zip(params, shifts):
            p.add_(e)
    opt.zero_grad()
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(params, shifts):
            p.sub_(e)
    opt.step()


def train(method: str, x, y, seed: int, epochs: int, lr: float, batch: int = 32):
    model = mlp(seed)
    n = len(y)
    beta = n / TEMPERATURE
    steps_per_epoch = math.ceil(n / batch)
    total = epochs * steps_per_epoch
    gen = torch.Generator().manual_seed(1000 + seed)
    collector = bayes.SampleCollector()
    langevin = method.startswith(("SGLD", "fSGLD"))
    if method in ("SGD", "SAM"):
        opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=5e-4)
    else:
        torch.manual_seed(seed)
        # the cosine schedule averages its peak / 2: peak at 2 * lr so the chains get SGD's mean step
        opt = FSGLD(model.parameters(), lr=2 * lr, beta=beta, eta=0.1, weight_decay=5e-4, **CHAINS[method])
        schedule = bayes.CyclicalCosineSchedule(opt, total, cycles=4, samples_per_cycle=3)
    t0 = time.perf_counter()
    k = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            xb, yb = x[idx], y[idx]

            def loss_fn():
                return torch.nn.functional.cross_entropy(model(xb), yb)

            if method == "SAM":
                sam_step(model, loss_fn, opt)
            else:
                opt.zero_grad()
                loss_fn().backward()
                opt.step()
            if langevin:
                if schedule.sample_now(k):
                    collector.add(model, opt)
                schedule.step()
            k += 1
    if langevin:
        opt.restore()  # evaluate and probe at clean weights
    return model, collector if langevin else None, time.perf_counter() - t0


def evaluate(model, samples, x_tr, y_tr, x_te, y_te, x_ood, probe_samples: int):
    if samples is not None:
        lp_te, lp_ood = bayes.bma_log_probs(model, samples, x_te), bayes.bma_log_probs(model, samples, x_ood)
    else:
        with torch.no_grad():
            lp_te, lp_ood = torch.log_softmax(model(x_te), -1), torch.log_softmax(model(x_ood), -1)
    params = list(model.parameters())

    def train_loss():
        return torch.nn.functional.cross_entropy(model(x_tr), y_tr)

    return {
        "acc": bayes.accuracy(lp_te, y_te),
        "nll": bayes.nll(lp_te, y_te),
        "ece": bayes.ece(lp_te, y_te),
        "auroc": bayes.auroc(bayes.predictive_entropy(lp_te), bayes.predictive_entropy(lp_ood)),
        # at the final (clean) weights, on the noisy training loss the chain saw
        "trH": bayes.hutchinson_trace(train_loss, params, probe_samples, torch.Generator().manual_seed(0)),
    }


# FSGLD's options for each sampling method (the Gaussian perturbation is the paper's analysed default)
CHAINS = {
    "SGLD": dict(sigma=0.0),
    "fSGLD": dict(sigma=None),
    "fSGLD-Rademacher": dict(sigma=None, perturbation="rademacher"),
    "fSGLD sigma=0.05": dict(sigma=0.05),
}
METHODS = ("SGD", "SAM", *CHAINS)


def run(args: argparse.Namespace) -> dict:
    x_tr, y_tr_clean, x_te, y_te, x_ood = load_digits_split()
    epochs = args.epochs or (30 if args.quick else 60)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    probe = 8 if args.quick else 32
    results = {}
    print(f"digits 0-4: {len(y_tr_clean)} train, {len(y_te)} test; OOD digits 5-9: {len(x_ood)}; "
          f"{epochs} epochs, seeds {seeds}, beta = N/T = {len(y_tr_clean) / TEMPERATURE:.3g}", flush=True)
    for rate in args.noise:
        for method in METHODS:
            rows = []
            for seed in seeds:
                y_tr = noisy_labels(y_tr_clean, rate, 5, torch.Generator().manual_seed(seed))
                model, samples, secs = train(method, x_tr, y_tr, seed, epochs, args.lr)
                row = evaluate(model, samples, x_tr, y_tr, x_te, y_te, x_ood, probe)
                row["time"] = secs
                rows.append(row)
            results[(rate, method)] = rows
            print("  " + _row(rate, method, rows), flush=True)
    return results


def _fmt(xs, scale=1.0, digits=3):
    m = statistics.mean(xs) * scale
    s = (statistics.stdev(xs) if len(xs) > 1 else 0.0) * scale
    return f"{m:.{digits}f}±{s:.{digits}f}"


def _row(rate, method, rows):
    col = lambda k: [r[k] for r in rows]  # noqa: E731
    return (f"{rate:5.0%} {method:18s} {_fmt(col('acc'), 100, 1):>11s} {_fmt(col('nll')):>13s} "
            f"{_fmt(col('ece')):>13s} {_fmt(col('auroc')):>13s} {_fmt(col('trH'), 1, 1):>14s} {_fmt(col('time'), 1, 1):>9s}")


HEADER = (f"{'noise':>5s} {'method':18s} {'acc %':>11s} {'NLL':>13s} {'ECE':>13s} {'OOD AUROC':>13s} "
          f"{'tr(Hessian)':>14s} {'time s':>9s}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import _cli

    p.add_argument("--quick", action="store_true", help="2 seeds, 30 epochs, 8 Hutchinson probe vectors")
    p.add_argument("--seeds", type=_cli.non_negative_int, default=0, help="seeds per setting (0: 3, or 2 with --quick)")
    p.add_argument("--epochs", type=_cli.non_negative_int, default=0, help="epochs (0: 60, or 30 with --quick)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD/SAM step size; the mean of the SGLD cyclical schedule")
    p.add_argument("--noise", type=_cli.fraction, nargs="+", default=[0.0, 0.2, 0.4],
                   help="label-noise fractions in [0, 1) to run (0.2: 20%% of training labels flipped)")


def main(args: argparse.Namespace) -> int:
    # One thread: a 64-128-128-5 MLP on batches of 32 has nothing to split, and a second intra-op
    # thread on a loaded 2-core box made training 7-40x slower (5 epochs: 0.99-4.66 s vs 0.06-0.14 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        print(HEADER)
        results = run(args)
    finally:
        torch.set_num_threads(threads)
    print("\n" + HEADER)
    for (rate, method), rows in results.items():
        print(_row(rate, method, rows))
    print("\nmean ± std over seeds; SGD/SAM: final weights; SGLD/fSGLD: Bayesian model average of 12 samples")
    return 0
