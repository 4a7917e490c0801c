"""Helpers of bench/gpu.sh: each writes or reads the JSON files of one run's out folder.

    python bench/gpu_report.py env OUT/run.json BUDGET_S STEP=CAP...   start the run's JSON (environment, plan)
    python bench/gpu_report.py step OUT/run.json NAME RC S [WHY_SKIPPED]   record a step's exit code, seconds
    python bench/gpu_report.py tests PYTEST.xml OUT/run.json     fold pytest's junit XML into the run's JSON
    python bench/gpu_report.py ncu-skipped OUT/bench.json WHY  say in the results why ncu did not run
    python bench/gpu_report.py ncu OUT/ncu.csv OUT/bench.json  fold ncu's CSV metrics into the results
    python bench/gpu_report.py table OUT                       the short table printed last
"""

import csv
import importlib.util
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
                  "naive fSGLD (torch.compile)", "FSGLD cuda", "FSGLD triton", "FSGLD cpu", "FSGLD auto (defaults)",
                  "FSGLD cuda rademacher", "FSGLD triton rademacher", "FSGLD cpu rademacher"}


def _load(path):
    with open(path) as f:
        return json.load(f)


def _benchmark():
    """fsgld_fused.benchmark, imported only where needed: torch's import costs seconds per step."""
    sys.path.insert(0, ROOT)
    from fsgld_fused import benchmark

    return benchmark


def _files():
    """fsgld_fused/_files.py by its path: the package's write rule without importing torch."""
    spec = importlib.util.spec_from_file_location("fsgld_files", os.path.join(ROOT, "fsgld_fused", "_files.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path, data):
    """Replace `path` atomically (as the benchmark writes bench.json): a regular file or a new one."""
    _files().replace_file(path, json.dumps(data, indent=1))


def env(path, budget_s, *plan):
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    caps = {name: int(cap) for name, cap in (entry.rsplit("=", 1) for entry in plan)}
    _write(path, {"schema": "fsgld-gpu-run/1", **_benchmark().environment(device), "budget_s": int(budget_s),
                  "plan": caps, "steps": []})


def step(path, name, rc, seconds, skipped=None):
    data = _load(path)
    rc = int(rc)
    result = "skipped" if skipped else "ok" if rc == 0 else "TIMED OUT" if rc in (124, 137) else "FAILED"
    data["steps"].append({"name": name, "rc": rc, "seconds": int(seconds), "result": result,
                          **({"skipped": skipped} if skipped else {})})
    _write(path, data)


def tests(xml_path, json_path):
    """pytest's junit XML -> counts, the failures (with their first lines) and the slowest tests."""
    import xml.etree.ElementTree as ET

    data = _load(json_path)
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        data["tests"] = {"error": f"no pytest report: {exc}"}
        _write(json_path, data)
        print(f"gpu tests: no pytest report ({exc})")
        return 1
    cases = []
    for case in root.iter("testcase"):
        outcome = "passed"
        message = ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    slowest = sorted(cases, key=lambda c: -c["seconds"])[:10]
    data["tests"] = {**counts, "seconds": round(sum(c["seconds"] for c in cases), 1),
                     "failures": [c for c in cases if c["outcome"] in ("failed", "error")],
                     "slowest": [{"test": c["test"], "seconds": c["seconds"]} for c in slowest]}
    _write(json_path, data)
    print("gpu tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + f"; slowest: "
          + ", ".join(f"{c['test'].rsplit('::', 1)[-1]} {c['seconds']:.1f} s" for c in slowest[:3]))
    return 0


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
    path = os.path.join(out_dir, "run.json")
    if os.path.exists(path):
        data = _load(path)
        print(f"\nrun on {data['device']} (driver {data['driver']}), torch {data['versions']['torch']}, triton "
              f"{data['versions']['triton']}, commit {data['commit'][:12]}, budget {data['budget_s']} s")
        for s in data["steps"]:
            cap = data["plan"].get(s["name"], "")
            print(f"  {s['name']:22s} {s['result']:9s} rc={s['rc']:<4d} {s['seconds']:5d} s of {cap:>3} s"
                  + (f"  ({s['skipped']})" if "skipped" in s else ""))
        t = data.get("tests", {})
        if "passed" in t:
            print(f"  gpu tests: {t['passed']} passed, {t['failed']} failed, {t['error']} errors, "
                  f"{t['skipped']} skipped")
            for f in t["failures"]:
                print(f"    {f['outcome'].upper()} {f['test']}: {f['message']}")
    path = os.path.join(out_dir, "bench.json")
    if os.path.exists(path):
        result = _load(path)
        _benchmark().print_table(result, TABLE_VARIANTS)
        if not result.get("finished"):
            print("bench.json is PARTIAL: its last benchmark step did not finish (see run.log)")
        for k in result.get("ncu", {}).get("kernels", []):
            print(f"ncu: {k['kernel'][:60]}: DRAM {k.get('dram_throughput_pct_of_peak')}% of peak, "
                  f"issue slots {k.get('issue_slots_busy_pct')}% busy")
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    commands = {"env": env, "step": step, "tests": tests, "ncu": ncu, "ncu-skipped": ncu_skipped, "table": table}
    sys.exit(commands[command](*rest) or 0)
