"""Helpers of bench/gpu.sh: each writes or reads the JSON files of one run's out folder.

    python bench/gpu_report.py env OUT/stage.json STAGE        start a stage's JSON (environment)
    python bench/gpu_report.py step OUT/stage.json NAME RC S [WHY_SKIPPED]   record a step's exit code, seconds
    python bench/gpu_report.py ncu-skipped OUT/bench.json WHY  say in the results why ncu did not run
    python bench/gpu_report.py ncu OUT/ncu.csv OUT/bench.json  fold ncu's CSV metrics into the results
    python bench/gpu_report.py table OUT                       the short table printed last
"""

import csv
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The ncu metrics bench/gpu.sh asks for, and what they are called in the results.
NCU_METRICS = {
    "gpu__time_duration.sum": "duration",
    "dram__bytes_read.sum": "dram_bytes_read",
    "dram__bytes_write.sum": "dram_bytes_written",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_throughput_pct_of_peak",
    "sm__inst_issued.avg.pct_of_peak_sustained_active": "issue_slots_busy_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_throughput_pct_of_peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
}
# The rows of the short table (the rest are in the JSON and the bench log).
TABLE_VARIANTS = {"device copy", "SGD fused", "SGD foreach", "Adam fused", "naive fSGLD (eager)",
                  "naive fSGLD (torch.compile)", "FSGLD cuda", "FSGLD triton", "FSGLD cpu", "FSGLD auto (defaults)"}


def _load(path):
    with open(path) as f:
        return json.load(f)


def _benchmark():
    """fsgld_fused.benchmark, imported only where needed: torch's import costs seconds per step."""
    sys.path.insert(0, ROOT)
    from fsgld_fused import benchmark

    return benchmark


def _write(path, data):
    """Replace `path` atomically (as the benchmark writes bench.json), without importing torch."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def env(path, stage):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _write(path, {"schema": "fsgld-gpu-stage/1", "stage": stage, **_benchmark().environment(device), "steps": []})


def step(path, name, rc, seconds, skipped=None):
    data = _load(path)
    rc = int(rc)
    result = "skipped" if skipped else "ok" if rc == 0 else "TIMED OUT" if rc in (124, 137) else "FAILED"
    data["steps"].append({"name": name, "rc": rc, "seconds": int(seconds), "result": result,
                          **({"skipped": skipped} if skipped else {})})
    _write(path, data)


def ncu_skipped(json_path, why):
    data = _load(json_path)
    data["ncu"] = {"skipped": why}
    _write(json_path, data)


def parse_ncu_csv(text):
    """ncu --csv rows (one per kernel and metric) -> [{kernel, metric name: value, ...}] by kernel id."""
    lines = [line for line in text.splitlines() if line.startswith('"')]  # drop ==PROF== and app lines
    kernels = {}
    for row in csv.DictReader(lines):
        if row.get("Metric Name") not in NCU_METRICS:
            continue
        k = kernels.setdefault(row["ID"], {"kernel": row.get("Kernel Name", "")[:120], "grid": row.get("Grid Size"),
                                           "block": row.get("Block Size")})
        value = row.get("Metric Value", "").replace(",", "")
        try:
            value = float(value)
        except ValueError:
            pass
        k[NCU_METRICS[row["Metric Name"]]] = value
        k[NCU_METRICS[row["Metric Name"]] + "_unit"] = row.get("Metric Unit")
    return list(kernels.values())


def ncu(csv_path, json_path):
    text = open(csv_path, errors="replace").read() if os.path.exists(csv_path) else ""
    kernels = parse_ncu_csv(text)
    data = _load(json_path)
    data["ncu"] = {"kernels": kernels} if kernels else {"error": "no metrics in ncu's output (see ncu.log)"}
    _write(json_path, data)
    for k in kernels:
        print(f"ncu {k['kernel'][:50]:50s} {k.get('duration', float('nan')):>12} {k.get('duration_unit') or ''}  "
              f"DRAM {k.get('dram_throughput_pct_of_peak', float('nan'))}% of peak, "
              f"issue slots {k.get('issue_slots_busy_pct', float('nan'))}% busy")
    return 0 if kernels else 1


def table(out_dir):
    for name in ("build-test.json", "bench-stage.json"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            data = _load(path)
            print(f"\n{data['stage']} on {data['device']} (driver {data['driver']}), torch {data['versions']['torch']},"
                  f" triton {data['versions']['triton']}, commit {data['commit'][:12]}")
            for s in data["steps"]:
                print(f"  {s['name']:28s} {s['result']:9s} rc={s['rc']:<4d} {s['seconds']:5d} s")
    path = os.path.join(out_dir, "bench.json")
    if os.path.exists(path):
        result = _load(path)
        _benchmark().print_table(result, TABLE_VARIANTS)
        if not result.get("finished"):
            print("bench.json is PARTIAL: the benchmark did not finish (see bench.log)")
        for k in result.get("ncu", {}).get("kernels", []):
            print(f"ncu: {k['kernel'][:60]}: DRAM {k.get('dram_throughput_pct_of_peak')}% of peak, "
                  f"issue slots {k.get('issue_slots_busy_pct')}% busy")
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    sys.exit({"env": env, "step": step, "ncu": ncu, "ncu-skipped": ncu_skipped, "table": table}[command](*rest) or 0)
