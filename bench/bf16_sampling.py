"""Does a bf16 chain sample at the right temperature? SGLD on a quadratic through `FSGLD`, SPEC 2c.

    python bench/bf16_sampling.py [--chains 8192] [--steps 1000] [--backend reference]
                                  [--out bench/results/bf16-sampling-reference.json]

U(theta) = (theta - mu)**2 / 2 per coordinate (`chains` independent coordinates of one parameter,
mu = 1.25 + 0.37 ulp, so the weights sit in [1, 2) where a bf16 ulp is 2**-7), lr = 0.01, and beta
chosen so that the Langevin std per step, sqrt(2 lr / beta), is a given fraction of that ulp. Each
row is the measured stationary variance over the exact one and the mean's bias in exact stationary
standard deviations, for four ways to store theta: fp32, bf16 with fp32 masters, bf16 rounded to
nearest, bf16 rounded stochastically (SPEC 2c: compensated Langevin std). The chains are stepped by
the public optimizer, `FSGLD(..., sigma=0, rounding=..., master_weights=...)` (plain SGLD), so the
figures are what a user gets; they start from the exact law (the master, where there is one, and
the momentum buffer are set in `opt.state` before the first step), so no burn-in is needed.

With `--momentum` (heavy ball, buf = m buf + g, theta -= lr buf, Langevin noise on theta), the
exact law of (theta, buf) solves the discrete Lyapunov equation; the rows then also compare the
momentum buffer of a bf16 param without masters: bf16 rounded to nearest (what FSGLD allocates
and every kernel writes) against an fp32 buffer (the reference's `fused_step_` called directly:
it takes a buffer of any dtype; FSGLD itself always allocates the param's dtype).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch

from fsgld_fused import FSGLD, TemperatureWarning
from fsgld_fused import reference as R
from fsgld_fused import _cli
from fsgld_fused._files import replace_file

MU, LR = 1.25 + 0.37 * 2.0**-7, 0.01  # mu between two bf16 values: nearest rounding then biases the mean
ULP = 2.0**-7  # bf16's ulp in [1, 2)
REGIMES = (0.81, 0.26, 0.026)  # Langevin std per step, in ulps (issue 26's table)
STORAGES = ("fp32", "bf16+master", "bf16 nearest", "bf16 stochastic")
MOMENTUM = 0.9
MOMENTUM_REGIMES = (0.81, 0.26)
FP32_BUFFER = "bf16 stochastic, fp32 buffer"  # not an FSGLD option: the reference op called directly
MOMENTUM_STORAGES = (*STORAGES, FP32_BUFFER)


def exact_covariance(noise_std: float, momentum: float) -> torch.Tensor:
    """Stationary covariance of (theta - mu, buf) for the discretised chain z' = A z + (noise_std xi, 0),
    A = [[1 - lr, -lr m], [1, m]]: vec(S) = (I - A kron A)^-1 vec(B B^T). With m = 0 its [0, 0]
    is noise_std**2 / (1 - (1 - lr)**2)."""
    a = torch.tensor([[1 - LR, -LR * momentum], [1.0, momentum]], dtype=torch.float64)
    bb = torch.tensor([[noise_std**2, 0.0], [0.0, 0.0]], dtype=torch.float64)
    vec = torch.linalg.solve(torch.eye(4, dtype=torch.float64) - torch.kron(a, a), bb.reshape(4))
    return vec.reshape(2, 2)


def stationary_moments(storage: str, std_ulps: float, chains: int = 4096, steps: int = 1000, skip: int = 100,
                       seed: int = 7, momentum: float = 0.0, backend: str = "reference") -> dict:
    """Variance / exact and mean bias (in exact sds) of theta over steps skip..steps-1, all chains;
    `moved`: the fraction of chains whose stored param ever changed."""
    noise_std = std_ulps * ULP
    cov = exact_covariance(noise_std, momentum)
    exact_var = cov[0, 0].item()
    gen = torch.Generator().manual_seed(seed)
    factor = torch.linalg.cholesky(cov) if momentum else cov.sqrt()  # without momentum buf stays 0
    z = torch.randn(chains, 2, generator=gen, dtype=torch.float64) @ factor.T
    start, start_buf = MU + z[:, 0], z[:, 1]
    p = torch.nn.Parameter(start.float() if storage == "fp32" else start.to(torch.bfloat16))
    master = storage == "bf16+master"
    buf = None
    if storage == FP32_BUFFER:
        buf = start_buf.float()
    else:
        opt = FSGLD([p], lr=LR, beta=2 * LR / noise_std**2, sigma=0.0, momentum=momentum, seed=seed, backend=backend,
                    master_weights=master, rounding="nearest" if storage == "bf16 nearest" else "stochastic")
        if master:
            opt.state[p]["master"] = start.float()  # the exact law, not its bf16 rounding
        if momentum:
            opt.state[p]["momentum_buffer"] = start_buf.to(p.dtype if not master else torch.float32)
    first = p.detach().clone()
    moved = torch.zeros(chains, dtype=torch.bool)
    total, total_sq, n = 0.0, 0.0, 0
    for k in range(steps):
        theta = opt.state[p]["master"] if master else p.detach().float()
        grad = (theta - MU).to(p.dtype)  # dU/dtheta at the stored weights (sigma = 0: unperturbed)
        if buf is not None:
            R.fused_step_([p.data], [grad], [buf], [0], seed, k, LR, 0.0, momentum, noise_std, 0.0, 0.0,
                          stochastic_rounding=True)
        else:
            p.grad = grad
            with warnings.catch_warnings():  # below ~0.41 ulp: the unreachable temperature, by design here
                warnings.simplefilter("ignore", TemperatureWarning)
                opt.step()
        moved |= p.detach() != first
        if k >= skip:
            x = (opt.state[p]["master"] if master else p.detach()).double()  # the chain's state
            total, total_sq, n = total + x.sum().item(), total_sq + x.pow(2).sum().item(), n + chains
    mean = total / n
    var = total_sq / n - mean**2
    return {"storage": storage, "std_ulps": std_ulps, "momentum": momentum,
            "buffer": None if not momentum else ("fp32" if master or storage in ("fp32", FP32_BUFFER) else "bf16"),
            "var_ratio": var / exact_var, "mean_bias_sd": (mean - MU) / math.sqrt(exact_var),
            "moved": moved.double().mean().item()}


def _table(regimes, storages, momentum, args, rows) -> None:
    print(f"momentum {momentum}: stationary variance / exact, mean bias in exact sds")
    print(f"{'std/step':>9} | " + " | ".join(f"{s:>28}" for s in storages))
    for c in regimes:
        cells = []
        for storage in storages:
            row = stationary_moments(storage, c, args.chains, args.steps, momentum=momentum, backend=args.backend)
            rows.append(row)
            cells.append(f"{row['var_ratio']:6.3f}x bias {row['mean_bias_sd']:+.3f}sd")
        print(f"{c:>5} ulp | " + " | ".join(f"{cell:>28}" for cell in cells), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chains", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backend", default="reference",
                        help="FSGLD's backend for every row (the fp32-buffer row always calls the reference)")
    parser.add_argument("--no-momentum", action="store_true", help="skip the momentum rows")
    parser.add_argument("--out", type=_cli.output_file, default=None,
                        help="JSON file to write (a regular file or absent)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # 4096 elements: nothing to split
    t0 = time.perf_counter()
    rows: list[dict] = []
    _table(REGIMES, STORAGES, 0.0, args, rows)
    if not args.no_momentum:
        _table(MOMENTUM_REGIMES, MOMENTUM_STORAGES, MOMENTUM, args, rows)
    print(f"{time.perf_counter() - t0:.0f} s")
    if args.out:
        meta = {"backend": args.backend, "chains": args.chains, "steps": args.steps, "skip": 100, "mu": MU, "lr": LR}
        replace_file(args.out, json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
