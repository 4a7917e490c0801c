"""bench/test_bench_step.py is a real pytest-benchmark suite (JSON out), and a missing plugin is
harmless: the plain test command still runs, the suite is skipped with a reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args, **env):
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    return res.returncode, res.stdout + res.stderr


def test_bench_suite_writes_pytest_benchmark_json(tmp_path):
    pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed: nothing to run")
    out = tmp_path / "bench.json"
    rc, log = _pytest("bench/test_bench_step.py", "--benchmark-only", f"--benchmark-json={out}", "-k",
                      "SGD and fused or FSGLD and cpu",
                      FSGLD_BENCH_SIZES="4K")
    assert rc == 0, log[-3000:]
    runs = {b["param"]: b for b in json.loads(out.read_text())["benchmarks"]}
    assert {"4K-SGD fused", "4K-SGD fused m=0.9", "4K-FSGLD cpu", "4K-FSGLD cpu rademacher"} <= set(runs), sorted(runs)
    for b in runs.values():
        assert b["stats"]["rounds"] == 7 and b["stats"]["median"] > 0 and b["extra_info"]["params"] > 4000 * 0.5
        assert b["options"]["timer"].endswith("timer")  # torch.utils.benchmark's clock, not perf_counter


def test_a_missing_plugin_is_harmless():
    rc, log = _pytest("-p", "no:benchmark", "bench/", "-rs")
    assert rc == 0 and "pytest-benchmark is not installed or disabled" in log and " passed" not in log, log[-3000:]
    # the project's settings name no plugin option: the plain command runs without the plugin
    rc, log = _pytest("-p", "no:benchmark", "tests/test_cli.py", "-k", "usage_lists_every_command")
    assert rc == 0 and "1 passed" in log, log[-3000:]
