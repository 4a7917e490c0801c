"""The host cost of a step (issue 23): FSGLD next to SGD(fused=True) on N tensors of 16 elements,
steps alternated in one process, medians, one thread. On a CPU only the ratios mean anything.

    python bench/host_step.py [--counts 100,1000] [--repeat 41]
"""

import argparse
import statistics
import time

import torch

from fsgld_fused import FSGLD


def _optimizers(n: int, device: str) -> dict:
    def params():
        ps = [torch.nn.Parameter(torch.randn(16, device=device)) for _ in range(n)]
        for p in ps:
            p.grad = torch.randn(16, device=device)
        return ps

    return {
        "SGD fused": torch.optim.SGD(params(), lr=1e-3, fused=True),
        "FSGLD defaults": FSGLD(params(), lr=1e-3, beta=1e6, seed=0),
        'FSGLD nonfinite="ignore"': FSGLD(params(), lr=1e-3, beta=1e6, seed=0, nonfinite="ignore"),
    }


def measure(n: int, repeat: int, device: str) -> dict[str, float]:
    opts = _optimizers(n, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in opts}
    for opt in opts.values():  # first step: state and perturbation; second: the plan that is reused
        opt.step(), opt.step()
    for _ in range(repeat):
        for name, opt in opts.items():
            sync()
            t = time.perf_counter()
            opt.step()
            sync()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="100,1000")
    ap.add_argument("--repeat", type=int, default=41)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| tensors | SGD fused | FSGLD defaults | FSGLD ignore | defaults / SGD | ignore / SGD |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in (int(c) for c in args.counts.split(",")):
        m = measure(n, args.repeat, args.device)
        sgd, dft, ign = m["SGD fused"], m["FSGLD defaults"], m['FSGLD nonfinite="ignore"']
        print(f"| {n} | {sgd * 1e3:.3f} ms | {dft * 1e3:.3f} ms | {ign * 1e3:.3f} ms | {dft / sgd:.2f}x | {ign / sgd:.2f}x |",
              flush=True)


if __name__ == "__main__":
    main()
