"""bench/gpu.sh: the GPU run's one command, walked on this CPU machine so it cannot rot.

--plan: the steps' caps add up to at most the budget of one device call (and a smaller budget is
refused). --dry-run: the same steps as on a lent GPU (build check, GPU tests, the benchmark
steps, ncu, the table), at tiny sizes with no GPU rows; the out folder must hold the same files
and JSON shape."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from fsgld_fused import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {"dtype", "layout", "params", "tensors", "variant", "bytes_per_param", "median_s", "min_s", "iqr_s",
            "achieved_GBps", "copy_fraction", "x_sgd_fused"}


BASH = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                          reason="needs bash and timeout")
# The run's steps in order of value (issue 21); their caps must add up to one device call.
STEPS = ["start", "build", "gpu tests", "bench 128M fp32", "bench host-bound", "bench 128M bf16", "bench 1B fp32",
         "bench torch.compile", "ncu", "report"]


def _plan(budget=None):
    env = {**os.environ, **({"FSGLD_GPU_BUDGET_S": str(budget)} if budget is not None else {})}
    res = subprocess.run(["bash", "bench/gpu.sh", "--plan"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=60)
    caps = {}
    for line in res.stdout.splitlines():
        m = re.match(r"  (\S.*?)\s+(\d+) s  \(\s*(\d+) s\)  ", line)
        if m:
            caps[m.group(1)] = int(m.group(2))
    total = re.search(r"sum of the caps: (\d+) s of (\d+) s", res.stdout)
    return res, caps, total


@BASH
def test_plan_fits_one_device_call():
    res, caps, total = _plan()
    assert res.returncode == 0, res.stdout + res.stderr
    assert list(caps) == STEPS
    assert int(total.group(1)) == sum(caps.values()) <= int(total.group(2)) == 480
    assert caps["gpu tests"] <= 90 and caps["build"] <= 100  # the bounds for these two


@BASH
def test_plan_over_budget_fails():
    """The other side: a budget below the caps' sum refuses to run (so does --dry-run)."""
    _, caps, _ = _plan()
    res, _, total = _plan(budget=sum(caps.values()) - 1)
    assert res.returncode == 1 and "PLAN OVER BUDGET" in res.stderr, res.stdout + res.stderr
    assert int(total.group(1)) == sum(caps.values())
    res, _, _ = _plan(budget=sum(caps.values()))
    assert res.returncode == 0


@BASH
def test_dry_run_walks_every_step(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "FSGLD_COMMIT": "0123456789abcdef-test"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run(["bash", "bench/gpu.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=480)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files in (["bench.json", "bench.png", "run.json", "run.log"],
                     ["bench.json", "run.json", "run.log"])  # no matplotlib: no PNG
    assert len(files) <= 8  # what the device tool returns from $OUT

    run = json.load(open(out / "run.json"))
    assert run["commit"] == "0123456789abcdef-test"
    assert {"device", "driver", "versions", "machine"} <= set(run)
    assert list(run["plan"]) == STEPS and run["budget_s"] == 480
    assert [s["name"] for s in run["steps"]] == STEPS
    assert all(s["result"] in ("ok", "skipped") for s in run["steps"]), run["steps"]
    # every step under `timeout` ended by its cap (+5 s: SIGINT, then SIGKILL); "start" and
    # "report" are not (a loaded CI box may take longer than a device there)
    assert all(s["seconds"] <= run["plan"][s["name"]] + 5 for s in run["steps"][1:-1]), run["steps"]
    steps = {s["name"]: s for s in run["steps"]}
    assert steps["bench host-bound"]["result"] == "ok"
    assert steps["ncu"]["skipped"] == "dry run: no GPU"
    tests = run["tests"]  # the GPU tests were collected and skipped here, none failed
    assert tests["skipped"] >= 60 and tests["passed"] == tests["failed"] == tests["error"] == 0

    result = json.load(open(out / "bench.json"))
    assert result["schema"] == benchmark.SCHEMA and result["finished"] is True
    assert result["commit"] == "0123456789abcdef-test"
    assert set(result["versions"]) >= {"torch", "cuda", "triton", "python"}
    assert result["ncu"] == {"skipped": "dry run: no GPU"}
    rows = result["runs"]
    measured = [r for r in rows if "median_s" in r]
    assert len(measured) == len(rows)  # every step's rows, appended to one file, none skipped or failed
    for r in measured:
        assert ROW_KEYS <= set(r), r
        assert r["min_s"] <= r["median_s"] and r["iqr_s"] >= 0
    # the steps' rows in the order asked for: 64K fp32, host-bound (100 and 1000 tensors of 16),
    # 64K bf16 (with masters, then without: stochastic rounding), 256K fp32
    headline = ["device copy", "SGD fused", "FSGLD cpu", "FSGLD cpu rademacher", "naive fSGLD (eager)"]
    host = [("float32", v) for v in ("SGD fused", "FSGLD cpu", "FSGLD auto (defaults)")]
    bf16_rows = ["device copy", "SGD fused", "FSGLD cpu"]
    assert [(r["dtype"], r["variant"]) for r in rows] == (
        [("float32", v) for v in headline] + host + host + [("bfloat16", v) for v in bf16_rows]
        + [("bfloat16-sr", v) for v in bf16_rows]
        + [("float32", v) for v in ("device copy", "SGD fused", "FSGLD cpu", "naive fSGLD (eager)")])
    assert [(r["params"], r["tensors"]) for r in rows if r["layout"] == "host"] == [(1600, 100)] * 3 + [(16000, 1000)] * 3
    rows = [r for r in rows if r["layout"] != "host"]
    measured = [r for r in measured if r["layout"] != "host"]
    assert len({r["params"] for r in rows}) == 2
    by = {(r["dtype"], r["params"], r["variant"]): r for r in measured}
    for (dtype, params, variant), r in by.items():
        if variant == "SGD fused":
            assert r["x_sgd_fused"] == 1.0
    small = min(r["params"] for r in rows)
    assert by[("float32", small, "FSGLD cpu")]["bytes_per_param"] == 12
    bf16 = by[("bfloat16", small, "FSGLD cpu")]
    assert bf16["bytes_per_param"] == 12 and bf16["master_weights"]
    bf16_sr = by[("bfloat16-sr", small, "FSGLD cpu")]
    assert bf16_sr["bytes_per_param"] == 6 and not bf16_sr["master_weights"]
    # the short table is printed last
    tail = res.stdout.strip().splitlines()
    assert tail[-1].startswith("gpu.sh: all steps passed")
    assert any("FSGLD cpu rademacher" in line for line in tail[-40:])


def test_variants_and_append(tmp_path):
    """--variants runs only those rows in that order (an unavailable one is an error row, an unknown
    name is refused); --append keeps the rows already in --out."""
    first = benchmark.run(_args(tmp_path, variants="SGD fused,device copy"))
    assert [r["variant"] for r in first["runs"]] == ["SGD fused", "device copy"]
    second = benchmark.run(_args(tmp_path, variants="FSGLD cuda,naive fSGLD (eager)", append=True))
    assert [r["variant"] for r in second["runs"]] == ["SGD fused", "device copy", "FSGLD cuda",
                                                      "naive fSGLD (eager)"]
    assert "not available here" in second["runs"][2]["error"]
    assert second["runs"][3]["x_sgd_fused"] > 0  # a ratio across the two runs' rows
    saved = json.load(open(tmp_path / "b.json"))["runs"]
    assert [r["variant"] for r in saved] == [r["variant"] for r in second["runs"]]
    with pytest.raises(SystemExit, match="--variants SGD fast"):
        benchmark.run(_args(tmp_path, variants="SGD fast"))


def test_bytes_model():
    b = benchmark.bytes_per_param
    assert [b(v, 4, False) for v in ("SGD fused", "SGD foreach m=0.9", "Adam fused", "FSGLD cuda", "device copy")] \
        == [12, 20, 28, 12, 8]
    assert b("FSGLD triton", 2, True) == 12 and b("FSGLD auto (defaults)", 4, False) == 16
    assert b("naive fSGLD (eager)", 4, False) == 56 and b("naive fSGLD (torch.compile)", 2, False) == 10


def _args(tmp_path, **kw):
    parser = __import__("argparse").ArgumentParser()
    benchmark.add_arguments(parser)
    argv = ["--device", "cpu", "--sizes", "4K", "--layout", "flat", "--repeat", "2", "--include", "",
            "--out", str(tmp_path / "b.json")]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return parser.parse_args(argv)


def test_json_is_written_after_every_row(tmp_path, monkeypatch):
    written = []
    real = benchmark.write_json

    def spy(path, result):
        real(path, result)
        written.append(len(json.load(open(path))["runs"]))

    monkeypatch.setattr(benchmark, "write_json", spy)
    result = benchmark.run(_args(tmp_path))
    n = len(result["runs"])
    assert n >= 5
    assert written[-1] == n and list(range(n + 1)) == sorted(set(written))
    assert not any(name.endswith(".tmp") or ".tmp" in name for name in os.listdir(tmp_path))


def test_time_budget_skips_rows_and_says_so(tmp_path):
    result = benchmark.run(_args(tmp_path, budget_s=1e-9))
    assert result["runs"] and all(r.get("skipped", "").startswith("time budget") for r in result["runs"])
    assert result["finished"] is True


def test_commit_from_environment(monkeypatch):
    monkeypatch.setenv("FSGLD_COMMIT", "abc123")
    assert benchmark.git_commit() == "abc123"
    monkeypatch.delenv("FSGLD_COMMIT")
    assert benchmark.git_commit()  # git rev-parse, or "unknown" without .git
