"""`python -m fsgld_fused [main|check|demo|bench]`.

main (the default): check, then demo --quick, then bench --quick.
check: every backend present against the reference, and a step timed against torch.optim.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from . import _backends, benchmark, demo, reference, sass
from .baselines import NaiveFSGLD, median, time_fn
from .optimizer import FSGLD


def _param_list(n_tensors: int, total: int, device, dtype, gen: torch.Generator) -> list[torch.Tensor]:
    """Random sizes (some odd, one empty, one of a single element) summing to about `total`."""
    sizes = torch.randint(1, 2 * total // n_tensors, (n_tensors,), generator=gen).tolist()
    sizes[0], sizes[1] = 0, 1
    return [torch.randn(s, generator=gen).to(device, dtype) for s in sizes]


def _clone_with_grads(params, grads):
    out = [p.clone().requires_grad_(True) for p in params]
    for p, g in zip(out, grads):
        p.grad = g.clone()
    return out


def _max_err(backend: _backends.Backend, device, dtype, steps: int, gen) -> float:
    """Largest |backend - reference| over `steps` fused steps with momentum, wd and perturbation."""
    params = _param_list(12, 50_000, device, dtype, gen)
    grads = [torch.randn_like(p) for p in params]
    ours, ref = [p.clone() for p in params], [p.clone() for p in params]
    bufs_ours, bufs_ref = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    pids = list(range(3, 3 + len(params)))
    err = 0.0
    for k in range(steps):
        args = (pids, 1234, k, 1e-2, 5e-4, 0.9, 1e-2, 0.0 if k == 0 else 0.05, 0.05)
        backend.ops.fused_step_(ours, grads, bufs_ours, *args)
        reference.fused_step_(ref, grads, bufs_ref, *args)
        for a, b in zip(ours, ref):
            if a.numel():
                err = max(err, (a.double() - b.double()).abs().max().item())
    return err


def check(args: argparse.Namespace) -> int:
    gen = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    avail = _backends.available_backends()
    print(f"torch {torch.__version__}, device {device}, backends:")
    for name, reason in avail.items():
        print(f"  {name:10s} {'available' if reason is None else 'unavailable: ' + reason}")

    dtype = torch.float32
    n_tensors, total = args.tensors, args.params
    params = _param_list(n_tensors, total, device, dtype, gen)
    grads = [torch.randn_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    print(f"\ntiming one step over {numel:,} float32 params in {n_tensors} tensors on {device}")

    rows = []  # (variant, max |err| vs reference or '', median seconds)
    for name, kw in (("SGD for-loop", dict(foreach=False)), ("SGD foreach", dict(foreach=True)), ("SGD fused", dict(fused=True))):
        ps = _clone_with_grads(params, grads)
        opt = torch.optim.SGD(ps, lr=1e-3, **kw)
        rows.append((f"torch.optim.{name}", "", median(time_fn(opt.step, device))))
    naive = NaiveFSGLD(_clone_with_grads(params, grads), lr=1e-3, beta=1e6, sigma=0.02)
    rows.append(("naive eager fSGLD", "", median(time_fn(naive.step, device))))

    failed = False
    for name, reason in avail.items():
        if reason is not None:
            continue
        try:
            backend = _backends.resolve(name, device, dtype)
        except ValueError:
            continue  # e.g. the cuda backend on a cpu device
        err = "(is the reference)" if name == "reference" else _max_err(backend, device, dtype, 4, gen)
        if isinstance(err, float):
            failed |= not err <= 1e-5 or math.isnan(err)
            err = f"{err:.2e}"
        ps = _clone_with_grads(params, grads)
        opt = FSGLD(ps, lr=1e-3, beta=1e6, sigma=0.02, backend=name, seed=1)
        repeat = 2 if name == "reference" else 5
        rows.append((f"FSGLD backend={name}", err, median(time_fn(opt.step, device, warmup=1, repeat=repeat))))

    base = rows[2][2]  # SGD fused
    print(f"\n{'variant':28s} {'max |err| vs reference':>24s} {'ms/step':>10s} {'x SGD fused':>12s}")
    for name, err, t in rows:
        print(f"{name:28s} {err:>24s} {t * 1e3:10.2f} {t / base:12.2f}")
    if failed:
        print("\nFAILED: a backend differs from the reference by more than 1e-5", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fsgld_fused", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("main", help="the main job (also the default): check, then demo --quick, then bench --quick")
    p = sub.add_parser("check", help="compare every backend present with the reference, and time a step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--params", type=int, default=4_000_000, help="total parameter count to time")
    p.add_argument("--tensors", type=int, default=64, help="number of parameter tensors")
    p.set_defaults(func=check)
    b = sub.add_parser("bench", help="time one step against torch.optim; write JSON and a PNG plot")
    benchmark.add_arguments(b)
    b.set_defaults(func=benchmark.main)
    d = sub.add_parser("demo", help="SGD / SGLD / SAM / fSGLD on digits with label noise: accuracy, calibration, OOD")
    demo.add_arguments(d)
    d.set_defaults(func=demo.main)
    s = sub.add_parser("sass", help="static sm_90 SASS instructions per element of the step kernels (no GPU needed)")
    sass.add_arguments(s)
    s.set_defaults(func=sass.main)
    args = parser.parse_args(argv)
    if args.command in (None, "main"):
        return main_job()
    return args.func(args)


def main_job() -> int:
    """check, then demo --quick, then bench --quick, on this machine's default backend."""
    rc = 0
    for argv in (["check"], ["demo", "--quick"], ["bench", "--quick"]):
        print(f"\n===== python -m fsgld_fused {' '.join(argv)} =====", flush=True)
        rc |= main(argv)
    return rc


if __name__ == "__main__":
    sys.exit(main())
