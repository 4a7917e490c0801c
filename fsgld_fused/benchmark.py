"""`python -m fsgld_fused bench`: one fSGLD step against torch.optim, side by side in one run.

Every variant steps the same parameter and gradient tensors. Results go to a JSON file, rewritten
(atomically) after every row so that a run cut short keeps what it measured: the device, driver,
versions and git commit, and per row the median, min and IQR of the step time, the bytes the step
moves, achieved GB/s, the fraction of the measured copy bandwidth and the ratio to
SGD(fused=True). A PNG plot goes beside it at the end.

Bytes per parameter (`BYTES_MODEL`; e = the param's element size, 4 for float32, 2 for bf16): what
each variant's passes read and write in device memory, counted once per pass.
- device copy: read e, write e (2e).
- SGD without momentum: read weight and grad, write weight (3e; 12 B in fp32).
- SGD with momentum: plus the buffer read and written (5e; 20 B).
- Adam: weight, exp_avg and exp_avg_sq read and written, grad read (7e; 28 B).
- FSGLD (one fused pass; its noise is generated, never read): 3e; with fp32 master weights, read
  master and grad, write master and weight (8 + 2e; 12 B for bf16).
- FSGLD with the default nonfinite="raise": plus one read of the grads for the finite check.
- naive eager fSGLD: restore (3e), update (3e), randn_like (e), noise add (3e), next eps
  randn_like (e), perturb (3e): 14e (56 B in fp32).
- naive fSGLD under torch.compile: the fewest bytes of that algorithm with the perturbation
  stored, read weight, grad and eps, write weight and the new eps (5e).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

from . import _backends, _cli
from .baselines import NaiveFSGLD, measure
from .optimizer import FSGLD

SCHEMA = "fsgld-bench/2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> bytes per parameter as a function of (element size e, fp32 masters); see the docstring.
BYTES_MODEL: dict[str, tuple[str, Callable[[int, bool], float]]] = {
    "device copy": ("2e", lambda e, m: 2 * e),
    "SGD": ("3e", lambda e, m: 3 * e),
    "SGD m=0.9": ("5e", lambda e, m: 5 * e),
    "Adam": ("7e", lambda e, m: 7 * e),
    "FSGLD": ("3e, or 8+2e with fp32 masters", lambda e, m: 8 + 2 * e if m else 3 * e),
    "FSGLD defaults": ("FSGLD's + e (the finite check reads the grads)", lambda e, m: (8 + 2 * e if m else 3 * e) + e),
    "naive fSGLD (eager)": ("14e", lambda e, m: 14 * e),
    "naive fSGLD (torch.compile)": ("5e", lambda e, m: 5 * e),
}


def bytes_per_param(variant: str, element_size: int, master: bool) -> float:
    """Bytes one step of `variant` moves per parameter (BYTES_MODEL)."""
    if variant.startswith("SGD"):
        key = "SGD m=0.9" if "m=0.9" in variant else "SGD"
    elif variant.startswith("Adam"):
        key = "Adam"
    elif variant == "FSGLD auto (defaults)":
        key = "FSGLD defaults"
    elif variant.startswith("FSGLD"):
        key = "FSGLD"
    else:
        key = variant
    return BYTES_MODEL[key][1](element_size, master)


# Rows run in this order within a size, the headline comparisons first: a run cut short by its
# time budget loses the least informative rows.
VARIANT_ORDER = (
    "device copy", "SGD fused", "FSGLD cuda", "FSGLD triton", "FSGLD cpu", "naive fSGLD (eager)",
    "FSGLD cuda rademacher", "FSGLD triton rademacher", "FSGLD cpu rademacher",
    "FSGLD auto (defaults)", "SGD foreach", "SGD for-loop", "Adam fused", "SGD fused m=0.9", "SGD foreach m=0.9",
    "SGD for-loop m=0.9", "naive fSGLD (torch.compile)", "FSGLD reference",
)
# Seconds of budget a row must still have to start (torch.compile's first call compiles).
_ROW_RESERVE_S = {"naive fSGLD (torch.compile)": 90.0}
# bfloat16: FSGLD with fp32 master weights (12 B/param); bfloat16-sr: without masters, rounded
# stochastically (SPEC 2c, the default rounding; 6 B/param)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bfloat16-sr": torch.bfloat16}


# ---- parameter lists ------------------------------------------------------------------------------
def transformer_shapes(total: int) -> list[tuple[int, ...]]:
    """Shapes of transformer blocks (qkv, out, 2 LayerNorms, MLP) summing to about `total`:
    about 8 blocks of 12 tensors, so ~100 tensors of very different sizes."""
    d = max(64, int(round(math.sqrt(total / (12 * 8)) / 64)) * 64)
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,)]
    per_block = sum(math.prod(s) for s in block)
    return block * max(1, round(total / per_block))


HOST_NUMEL = 16  # layout "host": tensors this small, so a step's host (Python + launch) cost is all that shows


def make_tensors(total: int, layout: str, device, dtype=torch.float32):
    if layout == "host":  # total // 16 tensors of 16 elements (issue 23's host-bound case)
        shapes = [(HOST_NUMEL,)] * max(1, total // HOST_NUMEL)
    else:
        shapes = transformer_shapes(total) if layout == "transformer" else [(total,)]
    params = [(torch.randn(s, device=device) * 0.02).to(dtype) for s in shapes]
    grads = [(torch.randn(s, device=device) * 1e-3).to(dtype) for s in shapes]
    return params, grads


def copy_bandwidth(device: torch.device, numel: int, repeat: int) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    return 2 * 4 * numel / measure(lambda: dst.copy_(src), device, repeat=repeat).median / 1e9


def normals_rate(device: torch.device, numel: int, repeat: int) -> dict[str, float]:
    """Normal variates per second: our stream (cpu or cuda kernel) against torch.randn."""
    out = torch.empty(numel, device=device)
    rates = {"torch.randn": numel / measure(lambda: torch.randn(numel, out=out), device, repeat=repeat).median}
    name = "cpu" if device.type == "cpu" else "cuda"
    if _backends.available_backends()[name] is None:
        fn = lambda: torch.ops.fsgld.normals_(out, 1, 0, 0, 0, 0)  # noqa: E731
        rates[f"fsgld {name} kernel"] = numel / measure(fn, device, repeat=repeat).median
    return rates


# ---- the environment --------------------------------------------------------------------------------
def _run_quiet(cmd: list[str]) -> Optional[str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else None


def git_commit() -> str:
    """$FSGLD_COMMIT (set by whoever copied the tree without .git), else `git rev-parse`, else unknown."""
    return os.environ.get("FSGLD_COMMIT") or _run_quiet(["git", "rev-parse", "HEAD"]) or "unknown"


def environment(device: torch.device) -> dict:
    """Machine, device, driver, versions and commit: what a results file must say about itself."""
    env = {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    # above cpu_count: other processes shared the cores (CPU figures are suspect)
                    "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "device": f"cpu ({platform.machine()})",
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
        "commit": git_commit(),
        "driver": None,
    }
    try:
        import triton

        env["versions"]["triton"] = triton.__version__
    except ImportError:
        env["versions"]["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = props.name
        env["device_info"] = {"capability": "%d.%d" % (props.major, props.minor),
                              "multiprocessors": props.multi_processor_count,
                              "memory_GiB": round(props.total_memory / 2**30, 1)}
        smi = shutil.which("nvidia-smi")
        index = device.index if device.index is not None else torch.cuda.current_device()
        query = [smi, f"--id={index}", "--query-gpu=driver_version", "--format=csv,noheader"]
        env["driver"] = smi and _run_quiet(query)
    nvcc = shutil.which("nvcc")
    out = nvcc and _run_quiet([nvcc, "--version"])
    env["versions"]["nvcc"] = out.splitlines()[-1] if out else None
    return env


def write_json(path: str, result: dict) -> None:
    """Replace `path` atomically (a reader, or a kill, never sees half a file); a regular file only."""
    _cli.replace_file(path, json.dumps(result, indent=1))


# ---- variants ---------------------------------------------------------------------------------------
def _with_grads(params, grads):
    ps = [p.requires_grad_(True) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g
    return ps


def variants(params, grads, device, include: set[str],
             master: bool = False) -> dict[str, Callable[[], Callable[[], object]]]:
    """name -> a factory returning the step function (built lazily so state is freed in between),
    in VARIANT_ORDER. `master`: FSGLD keeps fp32 master weights (for bf16/fp16 params)."""
    ps = _with_grads(params, grads)
    lr, beta, sigma = 1e-6, 1e12, 1e-4  # tiny steps keep the shared weights finite over the run

    def optim(cls, **kw):
        return lambda: cls(ps, lr=lr, **kw).step

    def fsgld(backend, **kw):
        return lambda: FSGLD(ps, lr=lr, beta=beta, sigma=sigma, seed=1, backend=backend, master_weights=master,
                             **kw).step

    out: dict[str, Callable[[], Callable[[], object]]] = {
        "SGD for-loop": optim(torch.optim.SGD, foreach=False),
        "SGD foreach": optim(torch.optim.SGD, foreach=True),
        "SGD fused": optim(torch.optim.SGD, fused=True),
        "SGD for-loop m=0.9": optim(torch.optim.SGD, momentum=0.9, foreach=False),
        "SGD foreach m=0.9": optim(torch.optim.SGD, momentum=0.9, foreach=True),
        "SGD fused m=0.9": optim(torch.optim.SGD, momentum=0.9, fused=True),
        "Adam fused": optim(torch.optim.Adam, fused=True),
        "naive fSGLD (eager)": lambda: NaiveFSGLD(ps, lr, beta, sigma).step,
        # what a user gets without options: backend="auto", nonfinite="raise" (one more read of the grads)
        "FSGLD auto (defaults)": fsgld("auto"),
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
        # nonfinite="ignore": the kernel alone, like torch.optim's steps (which check nothing)
        out[f"FSGLD {name}"] = fsgld(name, nonfinite="ignore")
        if name != "reference":
            out[f"FSGLD {name} rademacher"] = fsgld(name, nonfinite="ignore", perturbation="rademacher")
    rank = {name: i for i, name in enumerate(VARIANT_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _time_row(step: Callable[[], object], device, repeat: int) -> dict:
    m = measure(step, device, repeat=repeat)
    return {"median_s": m.median, "min_s": min(m.times), "iqr_s": m.iqr, "samples": len(m.times)}


def _free(device, between_rows: bool = False) -> None:
    """Free the last variant's state (an optimizer may sit in a reference cycle): on a GPU after
    every row (1G params of Adam state is 8 GB); on a CPU between sizes (gc.collect costs ~0.3 s)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
    elif not between_rows:
        gc.collect()


def settings(args: argparse.Namespace, device: torch.device) -> tuple[list[int], int, set[str]]:
    """Sizes, repeat and extra variants: --quick only changes the defaults, an option given stands."""
    if args.sizes is not None:
        sizes = list(args.sizes)
    elif args.quick:
        sizes = [1 << 20, 1 << 22]
    else:
        sizes = [1 << 24, 1 << 27, 1 << 30] if device.type == "cuda" else [1 << 20, 1 << 22, 1 << 24, 1 << 26]
    repeat = args.repeat if args.repeat is not None else 3 if args.quick else 7
    if args.include is not None:
        include = set(filter(None, args.include.split(","))) - {"none"}
        unknown = sorted(include - INCLUDABLE)
        if unknown:
            _cli.fail(f"bench --include {','.join(unknown)}: choose from {', '.join(sorted(INCLUDABLE))} ('' or none for none)")
    else:  # Inductor's C++ compile of 100 tensors takes minutes on 2 cores
        include = set() if args.quick and device.type == "cpu" else {"compile"}
    return sizes, repeat, include


INCLUDABLE = {"compile", "reference"}  # the extra variants --include names


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    start = time.monotonic()
    sizes, repeat, include = settings(args, device)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"bench: --dtypes {d!r}: choose from {', '.join(DTYPES)}")
    result = {
        "schema": SCHEMA,
        **environment(device),
        "command": sys.argv,
        "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "finished": False,
        "bytes_model": {name: formula for name, (formula, _) in BYTES_MODEL.items()},
        "bytes_per_param": BYTES_MODEL["SGD"][1](4, False),  # the fp32 SGD floor, the plot's axis
        "repeat": repeat,
        "sizes": sizes,
        "dtypes": dtypes,
        "runs": [],
    }
    out = getattr(args, "out", None)
    if getattr(args, "append", False) and out and os.path.exists(out):
        with open(out) as f:
            result["runs"] = json.load(f)["runs"]  # bench/gpu.sh: its steps' rows in one results file
    only = [v.strip() for v in getattr(args, "variants", "").split(",") if v.strip()]
    unknown = [v for v in only if v not in VARIANT_ORDER]
    if unknown:
        raise SystemExit(f"bench: --variants {', '.join(unknown)}: choose from {', '.join(VARIANT_ORDER)}")

    def save():
        _ratios(result)
        if out:
            write_json(out, result)

    copy_numel = max(sizes) if device.type == "cpu" else max(1 << 28, max(sizes))
    result["copy_bandwidth_GBps"] = copy_bandwidth(device, min(copy_numel, 1 << 28), repeat)
    result["normals_per_second"] = normals_rate(device, min(1 << 24, max(sizes)), repeat)
    save()
    print(f"device: {result['device']}; copy bandwidth {result['copy_bandwidth_GBps']:.1f} GB/s; normals/s: "
          + ", ".join(f"{k} {v:.3g}" for k, v in result["normals_per_second"].items()), flush=True)
    layouts = ["transformer", "flat"] if args.layout == "both" else [args.layout]
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        master = dtype_name == "bfloat16"  # FSGLD with fp32 master weights
        for layout in layouts:
            for total in sizes:
                try:
                    params, grads = make_tensors(total, layout, device, dtype)
                except torch.OutOfMemoryError as exc:
                    result["runs"].append({"dtype": dtype_name, "layout": layout, "params": total,
                                           "variant": "(tensors)", "error": f"OutOfMemoryError: {exc}"[:300]})
                    save()
                    _free(device)
                    continue
                numel = sum(p.numel() for p in params)
                factories = {"device copy": None, **variants(params, grads, device, include, master)}
                if only:  # these rows, in this order; one not available here is an error row
                    factories = {name: factories.get(name, "unavailable") for name in only}
                for name, factory in factories.items():
                    if name == "FSGLD reference" and numel > (1 << 22):
                        continue  # minutes per step: the reference is a specification, not a contender
                    row = {"dtype": dtype_name, "master_weights": master and name.startswith("FSGLD"),
                           "layout": layout, "params": numel, "tensors": len(params), "variant": name}
                    row["bytes_per_param"] = bytes_per_param(name, params[0].element_size(), row["master_weights"])
                    left = args.budget_s - (time.monotonic() - start) if args.budget_s else math.inf
                    if left < _ROW_RESERVE_S.get(name, 5.0):
                        row["skipped"] = f"time budget ({args.budget_s:g} s) spent"
                    elif factories[name] == "unavailable":
                        why = _backends.available_backends().get(name.split()[1]) if name.startswith("FSGLD ") else None
                        row["error"] = "not available here" + (f": {why}" if why else "")
                    else:
                        row.update(_measure(name, factory, params, device, repeat))
                        if "median_s" in row:
                            row["achieved_GBps"] = row["bytes_per_param"] * numel / row["median_s"] / 1e9
                    result["runs"].append(row)
                    save()
                    print("  " + _row_line(row), flush=True)
                    _free(device, between_rows=True)
                for p in params:
                    p.grad = None
                del params, grads, factories
                _free(device)
    result["finished"] = True
    result["seconds"] = round(time.monotonic() - start, 1)
    save()
    return result


def _measure(name, factory, params, device, repeat) -> dict:
    """Time one variant; an error (out of memory, an unsupported dtype) is recorded, not raised."""
    step = None
    try:
        if factory is None:  # the device copy of the same bytes: the ceiling of a one-pass step
            src = torch.cat([p.detach().reshape(-1) for p in params])
            dst = torch.empty_like(src)
            step = lambda: dst.copy_(src)  # noqa: E731
        else:
            step = factory()
        return _time_row(step, device, repeat)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        del step


def _row_line(row: dict) -> str:
    head = f"[{row['dtype']:8s} {row['layout']:11s} {row['params']:>13,d} params, {row['tensors']:3d} tensors] " \
           f"{row['variant']:28s}"
    if "median_s" in row:
        return head + f"{row['median_s'] * 1e3:10.3f} ms  {row['achieved_GBps']:8.1f} GB/s"
    return head + "  " + ("skipped: " + row["skipped"] if "skipped" in row else "failed: " + row["error"])


def _ratios(result: dict) -> None:
    """Per (dtype, layout, size): each variant's time over SGD fused's and over the naive eager
    step's, and its GB/s over the same bytes' device copy (else the large copy measured first)."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in result["runs"]:
        if "median_s" in r:
            by_key.setdefault((r["dtype"], r["layout"], r["params"]), {})[r["variant"]] = r
    for r in result["runs"]:
        if "median_s" not in r:
            continue
        rows = by_key[(r["dtype"], r["layout"], r["params"])]
        if "SGD fused" in rows:
            base = rows["SGD fused"]
            r["x_sgd_fused"] = r["median_s"] / base["median_s"]
            if r is not base:  # the two IQRs together exceed the difference: this run does not resolve it
                r["x_sgd_fused_unresolved"] = r["iqr_s"] + base["iqr_s"] > abs(r["median_s"] - base["median_s"])
        if "naive fSGLD (eager)" in rows:
            r["speedup_vs_naive"] = rows["naive fSGLD (eager)"]["median_s"] / r["median_s"]
        copy = rows["device copy"]["achieved_GBps"] if "device copy" in rows else result.get("copy_bandwidth_GBps")
        if copy:
            r["copy_fraction"] = r["achieved_GBps"] / copy


def plot(result: dict, path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    measured = [r for r in result["runs"] if "median_s" in r]
    if not measured:
        return "no measured rows: no plot"
    fig, (ax_t, ax_bw) = plt.subplots(1, 2, figsize=(13, 5))
    dtype = "float32" if any(r["dtype"] == "float32" for r in measured) else measured[0]["dtype"]
    layout = "transformer" if any(r["layout"] == "transformer" for r in measured) else "flat"
    mine = [r for r in measured if r["layout"] == layout and r["dtype"] == dtype]
    for name in sorted({r["variant"] for r in mine}):
        rows = sorted((r for r in mine if r["variant"] == name), key=lambda r: r["params"])
        x = [r["params"] for r in rows]
        style = "-o" if name.startswith("FSGLD") else "--."
        ax_t.plot(x, [r["median_s"] * 1e3 for r in rows], style, label=name)
        ax_bw.plot(x, [r["achieved_GBps"] for r in rows], style, label=name)
    ax_bw.axhline(result["copy_bandwidth_GBps"], color="k", lw=1, label="measured copy bandwidth")
    for ax, ylabel in ((ax_t, "step time (ms)"), (ax_bw, "achieved GB/s (each variant's bytes)")):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.set_yscale("log")
    ax_bw.legend(fontsize=7)
    fig.suptitle(f"one optimizer step, {dtype} {layout} tensor list: {result['device']}, "
                 f"torch {result['versions']['torch']}")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    _cli.replace_file(path, png.getvalue())
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", type=_cli.device, default=_cli.default_device(), help="cpu, cuda or cuda:N")
    p.add_argument("--sizes", type=_cli.size_list,
                   help="comma-separated parameter counts, K/M/G suffixes allowed (default: 16M,128M,1G on "
                        "cuda; 1M,4M,16M,64M on cpu; 1M,4M with --quick)")
    p.add_argument("--layout", choices=["transformer", "flat", "both", "host"], default="both",
                   help="~100 transformer-shaped tensors, one flat tensor, both, or host: tensors of 16 "
                        "elements (size / 16 of them), where only the host cost of a step shows")
    p.add_argument("--dtypes", default="float32",
                   help="comma-separated: float32, bfloat16 (bf16 params; FSGLD with fp32 master weights), "
                        "bfloat16-sr (bf16 params; FSGLD without masters, rounded stochastically)")
    p.add_argument("--repeat", type=_cli.positive_int,
                   help="timed steps per variant, after 2 warm-ups (default: 7; 3 with --quick)")
    p.add_argument("--include", help="extra variants, comma-separated: compile, reference; '' or none for none "
                                     "(default: compile; none with --quick on cpu)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized defaults: 1M and 4M params, 3 repeats, no compile on cpu (options given still hold)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="skip the rows that would start after this many seconds (0: no limit); the JSON says so")
    p.add_argument("--variants", default="",
                   help="comma-separated: only these rows, in this order (default: every variant available)")
    p.add_argument("--append", action="store_true", help="keep the rows already in --out and add these")
    p.add_argument("--out", type=_cli.output_file, default="bench/results/latest.json",
                   help="JSON path (a regular file or a new one), rewritten after every row; the PNG goes "
                        "beside it at the end")


def main(args: argparse.Namespace) -> int:
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        _cli.check_output_file(png)  # refused before any work, like --out itself
    except ValueError as exc:
        _cli.fail(f"bench: the plot beside --out: {exc}")
    if os.path.realpath(png) == os.path.realpath(args.out):
        _cli.fail(f"bench: --out {args.out} is where the plot goes; name the JSON file *.json")
    result = run(args)
    err = plot(result, png)
    print(f"\nwrote {args.out}" + (f" and {png}" if err is None else f" ({err})"))
    print_table(result)
    return 1 if any("error" in r and r["variant"].startswith("FSGLD") for r in result["runs"]) else 0


def print_table(result: dict, variants: Optional[set[str]] = None) -> None:
    """One line per measured row (of `variants`, if given): time, GB/s, copy fraction, x SGD fused."""
    print(f"\n{result['device']}, torch {result['versions']['torch']}, commit {result['commit'][:12]}")
    print(f"{'dtype':11s} {'layout':11s} {'params':>13s} {'variant':28s} {'median ms':>10s} {'IQR ms':>8s} "
          f"{'B/param':>7s} {'GB/s':>7s} {'of copy':>7s} {'x SGD fused':>11s}")
    for r in result["runs"]:
        if "median_s" not in r or (variants is not None and r["variant"] not in variants):
            continue
        print(f"{r['dtype']:11s} {r['layout']:11s} {r['params']:13,d} {r['variant']:28s} {r['median_s'] * 1e3:10.3f} "
              f"{r['iqr_s'] * 1e3:8.3f} {r['bytes_per_param']:7g} {r['achieved_GBps']:7.1f} "
              f"{r.get('copy_fraction', float('nan')):7.2f} {r.get('x_sgd_fused', float('nan')):11.2f}"
              f"{'~' if r.get('x_sgd_fused_unresolved') else ''}")
    if any(r.get("x_sgd_fused_unresolved") for r in result["runs"]):
        print("~: the IQRs of the row and of SGD fused together exceed their difference; this run does not "
              "resolve that ratio (a loaded machine? raise --repeat)")
    failed = [r for r in result["runs"] if "error" in r]
    for r in failed:
        print(f"FAILED {r['dtype']} {r['layout']} {r['params']:,d} {r['variant']}: {r['error']}")
    skipped = sum("skipped" in r for r in result["runs"])
    if skipped:
        print(f"{skipped} rows skipped: {next(r['skipped'] for r in result['runs'] if 'skipped' in r)}")


if __name__ == "__main__":
    parser = _cli.Parser(formatter_class=_cli.HelpFormatter)
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
