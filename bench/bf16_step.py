"""The cost of SPEC 2c on the CPU kernel (issue 26): one fused step of bf16 params rounded
stochastically next to the fp32 step and the bf16 step rounded to nearest, on the same layout,
calls alternated in one process. The default Gaussian config: restore, Langevin noise and the
next perturbation, no momentum, no weight decay. Calls the backend op directly (no optimizer).

    python bench/bf16_step.py [--size 64M] [--repeat 15] [--threads N] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from fsgld_fused import _cli
from fsgld_fused._files import replace_file
from fsgld_fused._ops import cpu_ops
from fsgld_fused.benchmark import make_tensors

LR, BETA, SIGMA = 1e-6, 1e12, 1e-4  # fsgld_fused/benchmark.py's: tiny steps keep the weights finite
ROWS = {  # name: (param dtype, stochastic_rounding)
    "fp32": (torch.float32, False),
    "bf16 stochastic": (torch.bfloat16, True),
    "bf16 nearest": (torch.bfloat16, False),
}


def measure(total: int, repeat: int) -> dict:
    lists = {}
    for name, (dtype, _) in ROWS.items():
        torch.manual_seed(0)
        lists[name] = make_tensors(total, "transformer", "cpu", dtype)
    params0 = lists["fp32"][0]
    ids = list(range(len(params0)))
    noise_std = math.sqrt(2 * LR / BETA)
    step = {name: 0 for name in ROWS}

    def run(name: str) -> float:
        params, grads = lists[name]
        t = time.perf_counter()
        cpu_ops.fused_step_(params, grads, [], ids, 1, step[name], LR, 0.0, 0.0, noise_std, SIGMA, SIGMA,
                            stochastic_rounding=ROWS[name][1])
        step[name] += 1
        return time.perf_counter() - t

    for name in ROWS:  # warm-up: pages touched, the ISA picked
        run(name)
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for _ in range(repeat):
        for name in ROWS:
            times[name].append(run(name))
    out = {"numel": sum(p.numel() for p in params0), "tensors": len(params0), "rows": {}}
    for name, ts in times.items():
        out["rows"][name] = {"min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3,
                             "times_ms": [t * 1e3 for t in ts]}
    base = out["rows"]["fp32"]
    for row in out["rows"].values():
        row["x_fp32_min"] = row["min_ms"] / base["min_ms"]
        row["x_fp32_median"] = row["median_ms"] / base["median_ms"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=_cli.size_list, default=[64 << 20], help="params (transformer layout)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=_cli.output_file, help="also write the figures here (a regular file or a new path)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    m = measure(args.size[0], args.repeat)
    load_after = os.getloadavg()
    print(f"{m['numel'] / 1e6:.1f}M params in {m['tensors']} tensors, {torch.get_num_threads()} threads, "
          f"ISA {torch.ops.fsgld.cpu_isa()}, {args.repeat} repeats, load (1/5/15 min) {load_before[0]:.2f} "
          f"{load_before[1]:.2f} {load_before[2]:.2f} before, {load_after[0]:.2f} after")
    print("| params | min | median | min / fp32 | median / fp32 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in m["rows"].items():
        print(f"| {name} | {r['min_ms']:.1f} ms | {r['median_ms']:.1f} ms | {r['x_fp32_min']:.3f}x "
              f"| {r['x_fp32_median']:.3f}x |")
    if args.json:
        m.update(threads=torch.get_num_threads(), isa=torch.ops.fsgld.cpu_isa(), repeat=args.repeat,
                 load_average_before=load_before, load_average_after=load_after, cpu_count=os.cpu_count(),
                 machine=platform.processor() or platform.machine(), torch=torch.__version__,
                 config=dict(lr=LR, beta=BETA, sigma=SIGMA, momentum=0.0, weight_decay=0.0))
        replace_file(args.json, json.dumps(m, indent=1) + "\n")


if __name__ == "__main__":
    main()
