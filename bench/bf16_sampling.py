"""Does a bf16 chain sample at the right temperature? SGLD on a quadratic, SPEC 2c.

    python bench/bf16_sampling.py [--chains 8192] [--steps 1500] [--out bench/results/bf16-sampling.json]

U(theta) = (theta - mu)**2 / 2 per coordinate (`chains` independent coordinates, mu = 1.25 + 0.37 ulp, so
the weights sit in [1, 2) where a bf16 ulp is 2**-7), lr = 0.01, and beta chosen so that the
Langevin std per step is a given fraction of that ulp. The exact stationary law of the
discretised chain is N(mu, noise_std**2 / (1 - (1 - lr)**2)); each row is the measured variance
over that and the mean's bias in stationary standard deviations, for four ways to store theta:
fp32, bf16 with fp32 masters, bf16 rounded to nearest, bf16 rounded stochastically with the
compensated Langevin std. The chains start from the exact law (no burn-in needed) and are
stepped by the reference's `fused_step_` (the executable SPEC), sigma = 0 (plain SGLD).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

from fsgld_fused import reference as R

MU, LR = 1.25 + 0.37 * 2.0**-7, 0.01  # mu between two bf16 values: nearest rounding then biases the mean
ULP = 2.0**-7  # bf16's ulp in [1, 2)
REGIMES = (0.81, 0.26, 0.026)  # Langevin std per step, in ulps (issue 26's table)
STORAGES = ("fp32", "bf16+master", "bf16 nearest", "bf16 stochastic")


def stationary_moments(storage: str, std_ulps: float, chains: int = 8192, steps: int = 1500, skip: int = 100,
                       seed: int = 7) -> dict:
    """Variance / exact and mean bias (in exact sds) of theta over steps skip..steps-1, all chains;
    `moved`: the fraction of chains whose bf16 (or fp32) param ever changed."""
    noise_std = std_ulps * ULP
    exact_var = noise_std**2 / (1 - (1 - LR) ** 2)
    gen = torch.Generator().manual_seed(seed)
    start = MU + math.sqrt(exact_var) * torch.randn(chains, generator=gen, dtype=torch.float64)
    master = [start.float()] if storage == "bf16+master" else []
    p = start.float() if storage == "fp32" else start.to(torch.bfloat16)
    first = p.clone()
    moved = torch.zeros(chains, dtype=torch.bool)
    total, total_sq, n = 0.0, 0.0, 0
    for k in range(steps):
        theta = (master[0] if master else p).float()
        grad = (theta - MU).to(p.dtype)  # dU/dtheta at the stored weights (sigma = 0: unperturbed)
        R.fused_step_([p], [grad], [], [0], seed, k, LR, 0.0, 0.0, noise_std, 0.0, 0.0, masters=master,
                      stochastic_rounding=storage == "bf16 stochastic")
        moved |= p != first
        if k >= skip:
            x = (master[0] if master else p).double()  # the chain's state: the master where there is one
            total, total_sq, n = total + x.sum().item(), total_sq + x.pow(2).sum().item(), n + chains
    mean = total / n
    var = total_sq / n - mean**2
    return {"storage": storage, "std_ulps": std_ulps, "var_ratio": var / exact_var,
            "mean_bias_sd": (mean - MU) / math.sqrt(exact_var), "moved": moved.double().mean().item()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=None, help="JSON file to write (a regular file or absent)")
    args = parser.parse_args(argv)
    if args.out and os.path.exists(args.out) and not os.path.isfile(args.out):
        parser.error(f"--out {args.out}: not a regular file")
    rows = []
    print(f"{'std/step':>9} | " + " | ".join(f"{s:>22}" for s in STORAGES))
    for c in REGIMES:
        cells = []
        for storage in STORAGES:
            row = stationary_moments(storage, c, args.chains, args.steps)
            rows.append(row)
            cells.append(f"{row['var_ratio']:6.3f}x bias {row['mean_bias_sd']:+.2f}sd")
        print(f"{c:>5} ulp | " + " | ".join(f"{cell:>22}" for cell in cells), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"chains": args.chains, "steps": args.steps, "mu": MU, "lr": LR, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
