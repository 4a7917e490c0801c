"""`python -m fsgld_fused [main|check|bench|demo|sass]`.

main (the default): check, then bench --quick, then demo --quick (a part whose optional
dependency is missing is skipped with a message), ending in one summary line.
check: every backend present against the reference, and a step timed against torch.optim.
bench: one step against torch.optim at several sizes (JSON + PNG). demo: posterior sampling on
digits. sass: static GPU instruction counts of the step kernels (no GPU needed).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from . import _backends, _cli, benchmark, demo, reference, sass
from .baselines import NaiveFSGLD, measure, spread_hides_difference
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
    """Largest |backend - reference| over `steps` fused steps with momentum, wd and perturbation:
    Gaussian first, then Rademacher from step 2 on (step 2 restores a Gaussian one and draws signs)."""
    params = _param_list(12, 50_000, device, dtype, gen)
    grads = [torch.randn_like(p) for p in params]
    ours, ref = [p.clone() for p in params], [p.clone() for p in params]
    bufs_ours, bufs_ref = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    pids = list(range(3, 3 + len(params)))
    err = 0.0
    for k in range(steps):
        args = (pids, 1234, k, 1e-2, 5e-4, 0.9, 1e-2, 0.0 if k == 0 else 0.05, 0.05)
        kinds = dict(restore_rademacher=k >= 3, perturb_rademacher=k >= 2)
        backend.ops.fused_step_(ours, grads, bufs_ours, *args, **kinds)
        reference.fused_step_(ref, grads, bufs_ref, *args, **kinds)
        for a, b in zip(ours, ref):
            if a.numel():
                err = max(err, (a.double() - b.double()).abs().max().item())
    return err


# Largest |backend - reference| that check passes: a few float32 roundings of the weights; the
# noise streams agree to ~1e-6 (testing.NOISE_ATOL) and are scaled by sigma and sqrt(2 lr / beta).
CHECK_TOLERANCE = 1e-5


def check(args: argparse.Namespace) -> int:
    if args.tensors < 2:
        raise SystemExit("check: --tensors must be at least 2")
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

    rows = []  # (variant, max |err| vs reference or '', Measurement)
    for name, kw in (("SGD for-loop", dict(foreach=False)), ("SGD foreach", dict(foreach=True)), ("SGD fused", dict(fused=True))):
        ps = _clone_with_grads(params, grads)
        opt = torch.optim.SGD(ps, lr=1e-3, **kw)
        rows.append((f"torch.optim.{name}", "", measure(opt.step, device, repeat=7)))
    naive = NaiveFSGLD(_clone_with_grads(params, grads), lr=1e-3, beta=1e6, sigma=0.02)
    rows.append(("naive eager fSGLD", "", measure(naive.step, device, repeat=7)))

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
            failed |= not err <= CHECK_TOLERANCE or math.isnan(err)
            err = f"{err:.2e}"
        ps = _clone_with_grads(params, grads)
        opt = FSGLD(ps, lr=1e-3, beta=1e6, sigma=0.02, backend=name, seed=1)
        repeat = 2 if name == "reference" else 7  # the reference takes seconds per step at 4M
        rows.append((f"FSGLD backend={name}", err, measure(opt.step, device, warmup=1, repeat=repeat)))

    base = rows[2][2]  # SGD fused
    print(f"\n{'variant':28s} {f'max |err| (pass <= {CHECK_TOLERANCE:g})':>24s} {'median ms':>10s} {'IQR ms':>8s} "
          f"{'x SGD fused':>12s}")
    unresolved = False
    for name, err, m in rows:
        flag = name != "torch.optim.SGD fused" and spread_hides_difference(m, base)
        unresolved |= flag
        print(f"{name:28s} {err:>24s} {m.median * 1e3:10.2f} {m.iqr * 1e3:8.2f} {m.median / base.median:11.2f}"
              f"{'~' if flag else ' '}")
    where = "a CPU figure, not a GPU one" if device.type == "cpu" else "CUDA events"
    print(f"timing: {len(base.times)} steps per row after warm-up, the reference 2 ({numel:,} params, "
          f"{torch.get_num_threads()} threads); {where}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if device.type == "cpu" and load > (os.cpu_count() or 1):
        print(f"note: load average {load:.1f} on {os.cpu_count()} cores: other processes share them, and CPU "
              "timings with several threads can be many times slower than on an idle machine")
    if unresolved:
        print("~: the IQRs of the row and of SGD fused together exceed their difference: this run does not "
              "resolve that ratio (a loaded machine?); `python -m fsgld_fused bench` times more steps")
    compared = sum(1 for _, err, _ in rows if err not in ("", "(is the reference)"))
    if failed:
        print(f"\nFAIL: a backend differs from the reference by more than {CHECK_TOLERANCE:g} (4 fused steps, "
              "momentum, weight decay, Gaussian and Rademacher perturbations)", flush=True)
        return 1
    if compared == 0:
        print("\nFAIL: no compiled backend to compare with the reference (build the extension)", flush=True)
        return 1
    print(f"\nPASS: {compared} backend(s) within {CHECK_TOLERANCE:g} of the reference (4 fused steps, momentum, "
          "weight decay, Gaussian and Rademacher perturbations)", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    fmt = _cli.HelpFormatter
    parser = _cli.Parser(prog="python -m fsgld_fused", description=__doc__, formatter_class=fmt)
    sub = parser.add_subparsers(dest="command", metavar="{main,check,bench,demo,sass}")
    sub.add_parser("main", help="the main job (also the default): check, then bench --quick, then demo --quick",
                   formatter_class=fmt)
    p = sub.add_parser("check", formatter_class=fmt,
                       help=f"compare every backend present with the reference (pass: max |err| <= "
                            f"{CHECK_TOLERANCE:g}), and time a step against torch.optim")
    p.add_argument("--device", type=_cli.device, default=_cli.default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--params", type=_cli.positive_int, default=4_000_000, help="total parameter count to time")
    p.add_argument("--tensors", type=_cli.positive_int, default=64, help="number of parameter tensors (at least 2)")
    p.set_defaults(func=check)
    b = sub.add_parser("bench", formatter_class=fmt,
                       help="time one step against torch.optim; write JSON and a PNG plot")
    benchmark.add_arguments(b)
    b.set_defaults(func=benchmark.main)
    d = sub.add_parser("demo", formatter_class=fmt,
                       help="SGD / SGLD / SAM / fSGLD on digits with label noise: accuracy, calibration, OOD")
    demo.add_arguments(d)
    d.set_defaults(func=demo.main)
    s = sub.add_parser("sass", formatter_class=fmt,
                       help="static sm_90 SASS instructions per element of the step kernels (no GPU needed)")
    sass.add_arguments(s)
    s.set_defaults(func=sass.main)
    return parser


def main(argv=None) -> int:
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows as it happens, also through a pipe
    args = build_parser().parse_args(argv)
    if args.command in (None, "main"):
        return main_job()
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # an optional dependency (scikit-learn for the demo)
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main_job() -> int:
    """check, then bench --quick, then demo --quick, on this machine's default backend. The
    figures come first; a part whose optional dependency is missing is skipped, not fatal. The
    last line is the verdict and each part's status."""
    rc, status = 0, []
    for argv in (["check"], ["bench", "--quick"], ["demo", "--quick"]):
        print(f"\n===== python -m fsgld_fused {' '.join(argv)} =====", flush=True)
        try:
            args = build_parser().parse_args(argv)
            part = args.func(args)
            status.append(f"{argv[0]} {'PASS' if part == 0 else 'FAIL'}")
            rc |= part
        except ModuleNotFoundError as exc:
            print(f"skipped `{' '.join(argv)}`: {exc}", flush=True)
            status.append(f"{argv[0]} skipped ({exc.name or 'a module'} missing)")
    print(f"\nmain job: {'PASS' if rc == 0 else 'FAIL'} ({', '.join(status)})", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
