"""`python -m fsgld_fused bench`: one fSGLD step against torch.optim, side by side in one run.

Every variant steps the same parameter and gradient tensors. Results go to a JSON file (machine,
device, versions, sizes, per-variant median and spread) and a PNG plot (step time and achieved
GB/s against parameter count, with the measured copy bandwidth as the ceiling line).

Bytes counted per parameter: 12 for every variant (read weight and grad, write weight), the
floor that plain SGD without momentum moves. Achieved GB/s = 12 * params / time, so a variant
that moves more bytes shows as a lower figure rather than a different denominator.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from typing import Callable, Optional

import torch

from . import _backends
from .baselines import NaiveFSGLD, time_fn
from .optimizer import FSGLD

BYTES_PER_PARAM = 12


# ---- parameter lists ------------------------------------------------------------------------------
def transformer_shapes(total: int) -> list[tuple[int, ...]]:
    """Shapes of transformer blocks (qkv, out, 2 LayerNorms, MLP) summing to about `total`:
    about 8 blocks of 12 tensors, so ~100 tensors of very different sizes."""
    d = max(64, int(round(math.sqrt(total / (12 * 8)) / 64)) * 64)
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    per_block = sum(math.prod(s) for s in block)
    return block * max(1, round(total / per_block))


def make_tensors(total: int, layout: str, device, dtype=torch.float32):
    shapes = transformer_shapes(total) if layout == "transformer" else [(total,)]
    params = [torch.randn(s, device=device, dtype=dtype) * 0.02 for s in shapes]
    grads = [torch.randn(s, device=device, dtype=dtype) * 1e-3 for s in shapes]
    return params, grads


def copy_bandwidth(device: torch.device, numel: int, repeat: int) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    times = time_fn(lambda: dst.copy_(src), device, repeat=repeat)
    return 2 * 4 * numel / statistics.median(times) / 1e9


def normals_rate(device: torch.device, numel: int, repeat: int) -> dict[str, float]:
    """Normal variates per second: our stream (cpu or cuda kernel) against torch.randn."""
    out = torch.empty(numel, device=device)
    rates = {"torch.randn": numel / statistics.median(time_fn(lambda: torch.randn(numel, out=out), device, repeat=repeat))}
    name = "cpu" if device.type == "cpu" else "cuda"
    if _backends.available_backends()[name] is None:
        ops = _backends.resolve(name, device, torch.float32).ops
        fn = lambda: torch.ops.fsgld.normals_(out, 1, 0, 0, 0, 0)  # noqa: E731
        rates[f"fsgld {name} kernel"] = numel / statistics.median(time_fn(fn, device, repeat=repeat))
        del ops
    return rates


# ---- variants ---------------------------------------------------------------------------------------
def _with_grads(params, grads):
    ps = [p.requires_grad_(True) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def variants(params, grads, device, include: set[str]) -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> a factory returning the step function (built lazily so state is freed in between)."""
    ps = _with_grads(params, grads)
    lr, beta, sigma = 1e-6, 1e12, 1e-4  # tiny steps keep the shared weights finite over the run

    def optim(cls, **kw):
        return lambda: cls(ps, lr=lr, **kw).step

    out: dict[str, Callable[[], Callable[[], object]]] = {
        "SGD for-loop": optim(torch.optim.SGD, foreach=False),
        "SGD foreach": optim(torch.optim.SGD, foreach=True),
        "SGD fused": optim(torch.optim.SGD, fused=True),
        "SGD for-loop m=0.9": optim(torch.optim.SGD, momentum=0.9, foreach=False),
        "SGD foreach m=0.9": optim(torch.optim.SGD, momentum=0.9, foreach=True),
        "SGD fused m=0.9": optim(torch.optim.SGD, momentum=0.9, fused=True),
        "Adam fused": optim(torch.optim.Adam, fused=True),
        "naive fSGLD (eager)": lambda: NaiveFSGLD(ps, lr, beta, sigma).step,
    }
    if "compile" in include:

        def compiled():
            naive = NaiveFSGLD(ps, lr, beta, sigma)
            return torch.compile(naive.step)

        out["naive fSGLD (torch.compile)"] = compiled
    for name, reason in _backends.available_backends().items():
        if reason is not None or (name == "reference" and "reference" not in include):
            continue
        try:
            _backends.resolve(name, device, params[0].dtype)
        except ValueError:
            continue
        out[f"FSGLD {name}"] = (lambda n: lambda: FSGLD(ps, lr=lr, beta=beta, sigma=sigma, seed=1, backend=n).step)(name)
    return out


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.quick:
        sizes = [1 << 20, 1 << 22]
        repeat = 3
    else:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else (
            [1 << 20, 1 << 24, 1 << 27, 1 << 30] if device.type == "cuda" else [1 << 20, 1 << 22, 1 << 24, 1 << 26])
        repeat = args.repeat
    include = set(args.include.split(",")) if args.include else set()
    if args.quick and device.type == "cpu":
        include.discard("compile")  # Inductor's C++ compile of 100 tensors takes minutes on 2 cores
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "bytes_per_param": BYTES_PER_PARAM,
        "repeat": repeat,
        "runs": [],
    }
    try:
        import triton

        result["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    copy_numel = max(sizes) if device.type == "cpu" else max(1 << 28, max(sizes))
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, min(copy_numel, 1 << 28), repeat)
    result["normals_per_second"] = normals_rate(device, 1 << 24, repeat)
    print(f"device: {result['device']}; copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s; normals/s: "
          + ", ".join(f"{k} {v:.3g}" for k, v in result["normals_per_second"].items()), flush=True)
    layouts = ["transformer", "flat"] if args.layout == "both" else [args.layout]
    for layout in layouts:
        for total in sizes:
            params, grads = make_tensors(total, layout, device)
            numel = sum(p.numel() for p in params)
            for name, factory in variants(params, grads, device, include).items():
                if name == "FSGLD reference" and numel > (1 << 22):
                    continue  # minutes per step: the reference is a specification, not a contender
                row = {"layout": layout, "params": numel, "tensors": len(params), "variant": name}
                try:
                    step = factory()
                    times = time_fn(step, device, repeat=repeat)
                    med = statistics.median(times)
                    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [med, med, med]
                    row.update(median_s=med, iqr_s=q[2] - q[0], min_s=min(times),
                               achieved_GBps=BYTES_PER_PARAM * numel / med / 1e9)
                    del step
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                result["runs"].append(row)
                shown = f"{row['median_s'] * 1e3:10.2f} ms  {row['achieved_GBps']:7.1f} GB/s" if "median_s" in row \
                    else "  failed: " + row["error"]
                print(f"  [{layout:11s} {numel:>12,d} params, {len(params):3d} tensors] {name:30s}{shown}", flush=True)
            for p in params:
                p.grad = None
            del params, grads
    _ratios(result)
    return result


def _ratios(result: dict) -> None:
    """Per (layout, size): each variant's time over SGD fused's and over the naive eager step's."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in result["runs"]:
        if "median_s" in r:
            by_key.setdefault((r["layout"], r["params"]), {})[r["variant"]] = r["median_s"]
    for r in result["runs"]:
        t = by_key.get((r["layout"], r["params"]), {})
        if "median_s" in r and "SGD fused" in t:
            r["x_sgd_fused"] = r["median_s"] / t["SGD fused"]
        if "median_s" in r and "naive fSGLD (eager)" in t:
            r["speedup_vs_naive"] = t["naive fSGLD (eager)"] / r["median_s"]


def plot(result: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(13, 5))
    layout = "transformer" if any(r["layout"] == "transformer" for r in result["runs"]) else "flat"
    names = sorted({r["variant"] for r in result["runs"] if r["layout"] == layout})
    for name in names:
        rows = sorted((r for r in result["runs"] if r["variant"] == name and r["layout"] == layout and "median_s" in r),
                      key=lambda r: r["params"])
        if not rows:
            continue
        x = [r["params"] for r in rows]
        style = "-o" if name.startswith("FSGLD") else "--."
        ax_t.plot(x, [r["median_s"] * 1e3 for r in rows], style, label=name)
        ax_bw.plot(x, [r["achieved_GBps"] for r in rows], style, label=name)
    ax_bw.axhline(result["copy_bandwidth_GBps"], color="k", lw=1, label="measured copy bandwidth")
    for ax, ylabel in ((ax_t, "step time (ms)"), (ax_bw, f"achieved GB/s ({BYTES_PER_PARAM} B/param)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_bw.legend(fontsize=7)
    fig.suptitle(f"one optimizer step, {layout} tensor list: {result['device']}, torch {result['versions']['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", default="", help="comma-separated parameter counts (default by device)")
    p.add_argument("--layout", choices=["transformer", "flat", "both"], default="both")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--include", default="compile", help="extra variants: compile,reference")
    p.add_argument("--quick", action="store_true", help="CI-sized: 1M and 4M params, 3 repeats")
    p.add_argument("--out", default="bench/results/latest.json", help="JSON path (the PNG goes beside it)")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    png = os.path.splitext(args.out)[0] + ".png"
    err = plot(result, png)
    print(f"\nwrote {args.out}" + (f" and {png}" if err is None else f" ({err})"))
    _print_table(result)
    return 1 if any("error" in r and r["variant"].startswith("FSGLD") for r in result["runs"]) else 0


def _print_table(result: dict) -> None:
    print(f"\n{'layout':11s} {'params':>12s} {'variant':30s} {'ms':>9s} {'GB/s':>7s} {'x SGD fused':>12s} {'vs naive':>9s}")
    for r in result["runs"]:
        if "median_s" not in r:
            continue
        print(f"{r['layout']:11s} {r['params']:12,d} {r['variant']:30s} {r['median_s'] * 1e3:9.2f} "
              f"{r['achieved_GBps']:7.1f} {r.get('x_sgd_fused', float('nan')):12.2f} "
              f"{r.get('speedup_vs_naive', float('nan')):8.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
