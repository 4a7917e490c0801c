"""One fp32 FSGLD step per GPU backend, for Nsight Compute (bench/gpu.sh runs it under ncu).

Each backend is warmed up first (Triton compile and block-size tuning, tables, first
perturbation) outside the profiled range; then exactly one step of each runs between
cudaProfilerStart and cudaProfilerStop, so `ncu --profile-from-start off` profiles those kernels
only. Prints nothing on stdout (ncu writes its CSV there).
"""

import argparse
import sys

import torch

from fsgld_fused import FSGLD, available_backends
from fsgld_fused.benchmark import make_tensors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--params", type=int, default=1 << 26, help="fp32 params (larger than L2)")
    parser.add_argument("--layout", default="transformer", choices=["transformer", "flat"])
    args = parser.parse_args()
    backends = [b for b in ("cuda", "triton") if available_backends()[b] is None]
    if not torch.cuda.is_available() or not backends:
        print(f"ncu_step: no GPU backend to profile ({available_backends()})", file=sys.stderr)
        return 1
    params, grads = make_tensors(args.params, args.layout, "cuda")
    for p, g in zip(params, grads):
        p.requires_grad_(True).grad = g
    steps = {}
    for name in backends:
        opt = FSGLD(params, lr=1e-6, beta=1e12, sigma=1e-4, seed=1, backend=name, nonfinite="ignore")
        for _ in range(3):
            opt.step()
        steps[name] = opt.step
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, step in steps.items():
        torch.cuda.nvtx.range_push(f"FSGLD {name}")
        step()
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"ncu_step: profiled one step of {', '.join(backends)} over {sum(p.numel() for p in params):,} params",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
